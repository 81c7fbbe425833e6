"""gil_megatron/training/optim.py: activation recomputation gives the plain schedule's loss and gradients
(TP2 under gloo), and really recomputes (the recomputed modules run forward twice per step)."""


import pytest
import torch

from dist_utils import spawn


def _fresh_actor(path: str) -> None:
    from gil_megatron.models.config import LlamaArchConfig
    from gil_megatron.models.convert import save_fresh_model

    arch = LlamaArchConfig(vocab_size=24, hidden_size=32, intermediate_size=64, num_layers=2, num_attention_heads=4,
                           num_kv_heads=2, max_position_embeddings=64)
    save_fresh_model(arch, "actor", path, 1, 1, seed=0)


def _grads_per_recompute_mode(actor_dir: str):
    from gil_megatron.models.build import model_from_checkpoint
    from gil_megatron.models.logprobs import action_logprobs
    from gil_megatron.parallel import distributed
    from gil_megatron.training.optim import OptimSettings, Trainable, main_grads

    layout = distributed.initialize(2, 1, seed=0)
    ids = torch.randint(0, 24, (4, 12), generator=torch.Generator().manual_seed(1))
    microbatches = [{"input_ids": ids[:2]}, {"input_ids": ids[2:]}]
    out = {}
    for mode in ("none", "selective", "full"):
        model = model_from_checkpoint(actor_dir, "actor", layout)
        trainable = Trainable(model, OptimSettings(lr=1e-3), recompute=mode)
        calls = {"layer": 0, "core_attention": 0}
        layer = model.decoder.layers[0]
        layer.register_forward_hook(lambda *a: calls.__setitem__("layer", calls["layer"] + 1))
        layer.self_attention.core_attention.register_forward_hook(
            lambda *a: calls.__setitem__("core_attention", calls["core_attention"] + 1))

        def loss_fn(mb, logits):
            loss = -action_logprobs(logits, mb["input_ids"])[0].mean() / len(microbatches)
            return loss, {"loss": loss.detach()}

        metrics = trainable.forward_backward(microbatches, loss_fn)
        out[mode] = {"loss": float(sum(m["loss"] for m in metrics)), "grads": main_grads(trainable.model),
                     "calls": dict(calls)}
    return out


def test_recompute_matches_the_plain_schedule(tmp_path):
    actor = str(tmp_path / "actor")
    _fresh_actor(actor)
    for rank_result in spawn(_grads_per_recompute_mode, 2, actor):
        plain = rank_result["none"]
        assert plain["calls"] == {"layer": 2, "core_attention": 2}  # one forward per micro-batch
        assert rank_result["selective"]["calls"] == {"layer": 2, "core_attention": 4}
        assert rank_result["full"]["calls"]["layer"] == 4
        for mode in ("selective", "full"):
            r = rank_result[mode]
            assert r["loss"] == pytest.approx(plain["loss"], rel=1e-6)
            assert r["grads"].keys() == plain["grads"].keys()
            for name, g in plain["grads"].items():
                torch.testing.assert_close(r["grads"][name], g, rtol=1e-5, atol=1e-6, msg=f"{mode}: {name}")
