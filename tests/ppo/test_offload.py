"""Frozen-model offload: the move code path runs (a no-op copy on the CPU), outputs are unchanged,
the config checks name the field, and the memory estimate counts offloaded models one at a time."""

import pytest
import torch

from gil_megatron.config import ConfigError, OffloadConfig, PPOConfig, load_config
from gil_megatron.ppo.offload import FrozenOffload


class Frozen(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.proj = torch.nn.Linear(4, 10, bias=False)
        self.proj.weight = self.embed.weight  # tied: one tensor, moved once
        self.register_buffer("scale", torch.full((4,), 2.0))

    def forward(self, ids):
        return self.proj(self.embed(ids) * self.scale)


def test_resident_moves_every_tensor_and_restores_the_host_copy():
    torch.manual_seed(0)
    ref, reward = Frozen(), Frozen()
    ids = torch.tensor([[1, 2, 3]])
    expected = ref(ids).detach()
    offload = FrozenOffload({"reference": ref, "reward_model": reward}, OffloadConfig(reference=True),
                            torch.device("cpu"))
    assert offload.offloaded("reference") and not offload.offloaded("reward_model")
    host = {id(t): t.data for t in list(ref.parameters()) + list(ref.buffers())}
    per_use = 4 * (10 * 4 + 4)  # tied weight once + buffer, fp32
    with offload.resident("reference"):
        out = ref(ids)
    assert torch.equal(out, expected)
    assert offload.bytes_moved == per_use
    # outside the block every tensor points at its host copy again
    assert all(t.data.data_ptr() == host[id(t)].data_ptr() for t in list(ref.parameters()) + list(ref.buffers()))
    with offload.resident("reward_model"):  # not configured: nothing moves
        reward(ids)
    with offload.resident("reference"):
        pass
    assert offload.bytes_moved == 2 * per_use


def test_resident_restores_after_an_error():
    ref = Frozen()
    offload = FrozenOffload({"reference": ref}, OffloadConfig(reference=True), torch.device("cpu"))
    before = ref.embed.weight.data.data_ptr()
    with pytest.raises(RuntimeError):
        with offload.resident("reference"):
            raise RuntimeError("scoring failed")
    assert ref.embed.weight.data.data_ptr() == before


def test_unknown_model_and_config_checks():
    with pytest.raises(ValueError, match="cannot offload \\['critic'\\]"):
        FrozenOffload({"critic": Frozen()}, OffloadConfig(), torch.device("cpu"))
    base = ["models.actor=a", "data.train_prompts=p.jsonl", "models.reward_fn=m:f"]
    with pytest.raises(ConfigError, match="offload.reward_model=true but models.reward_model is not set"):
        load_config(PPOConfig, None, base + ["offload.reward_model=true"])
    cfg = load_config(PPOConfig, None, base + ["offload.reference=true"])
    assert cfg.offload.reference and not cfg.offload.reward_model
    with pytest.raises(ConfigError, match="offload"):
        load_config(PPOConfig, None, base + ["offload.critic=true"])  # only frozen models can be offloaded


def test_memory_estimate_counts_offloaded_models_one_at_a_time():
    from gil_megatron.models.config import LlamaArchConfig
    from gil_megatron.training import memory

    arch = LlamaArchConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_layers=4,
                           num_attention_heads=4, num_kv_heads=2, max_position_embeddings=64)
    archs = {"actor": arch, "reference": arch, "critic": arch, "reward_model": arch}
    args = (archs, ("actor", "critic"), 1, 1, 4, 64, 2, 1)
    resident = memory.estimate(*args).per_rank_bytes["weights"]
    both = memory.estimate(*args, offloaded=("reference", "reward_model")).per_rank_bytes["weights"]
    one = memory.estimate(*args, offloaded=("reference",)).per_rank_bytes["weights"]
    ref_bytes = memory.param_count(arch, "actor") * 2
    rm_bytes = memory.param_count(arch, "critic") * 2
    assert one == resident  # a single offloaded model still comes back for its turn
    assert both == pytest.approx(resident - min(ref_bytes, rm_bytes))


def test_memory_estimate_counts_the_rollout_kv_cache_or_the_activations_whichever_is_larger():
    from gil_megatron.models.config import LlamaArchConfig
    from gil_megatron.training import memory

    arch = LlamaArchConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_layers=4,
                           num_attention_heads=4, num_kv_heads=2, max_position_embeddings=64)
    archs = {"actor": arch, "reference": arch}
    # tp2 pp2: 2 layers, 1 kv head of 64 per rank; 512 rows of 64 tokens in bf16
    est = memory.estimate(archs, ("actor",), 2, 2, 4, 64, 2, 1, decode_rows=512).per_rank_bytes
    kv = 2 * 2 * 512 * 1 * 64 * 64 * 2 + 512 * arch.padded_vocab_size(2) * 16
    assert est["rollout KV cache"] == kv
    total = memory.estimate(archs, ("actor",), 2, 2, 4, 64, 2, 1, decode_rows=512).total
    assert kv > est["activations"] and total == est["weights"] + est["grads+optimizer"] + kv
    small = memory.estimate(archs, ("actor",), 2, 2, 4, 64, 2, 1, decode_rows=1)
    assert small.total == est["weights"] + est["grads+optimizer"] + est["activations"]


def _with_and_without_offload(mini, out):
    from miniature_runs import overrides
    from miniature_runs import train_run as _train

    plain = _train(None, overrides(mini, out / "plain"))
    offloaded = _train(None, overrides(mini, out / "offloaded", **{"offload.reference": True,
                                                                    "offload.reward_model": True}))
    return plain, offloaded


@pytest.mark.slow
def test_trainer_iteration_with_offload_equals_without(mini, tmp_path):
    """The trainer's scoring and evaluation run through FrozenOffload.resident; on the CPU the
    moves are no-ops, so one iteration's metrics equal the run without offload."""
    from dist_utils import spawn
    from miniature_runs import comparable

    plain, offloaded = spawn(_with_and_without_offload, 1, mini, tmp_path)[0]
    assert len(plain) == 1
    assert [comparable(m) for m in plain] == [comparable(m) for m in offloaded]
