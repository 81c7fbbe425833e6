"""parallel.virtual_pp (megatron's interleaved 1F1B, models/chunks.py): at PP2 with two chunks per
rank (4 layers) the logits, scoring log-probs, greedy and sampled rollouts, losses, gradients and
weights after two optimizer steps (with full recomputation) equal the plain PP2 schedule's and the
single-rank result (fp32), including micro-batch counts and sizes the interleaved schedule cannot
run unpadded, and so do TP2 x PP2 x V2 and PP2 x V2 x DP2 on 4 ranks (slow); the model directory
it writes (one stage file per chunk) converts back to the original HF tensors; a PPO iteration
with chunk lists equals plain PP2's (slow)."""

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dist_utils import spawn

VOCAB = 100
LAYERS = 4
# (pp, virtual_pp) visited by one 2-rank group; pp=1 runs data-parallel on the same batch
LAYOUTS = [(1, 1), (2, 1), (2, 2)]


def make_hf(path: str) -> str:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, rope_theta=500.0, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).float().save_pretrained(path)
    return path


def _hf_named(chunks, state_of, pp_rank):
    """HF-named tensors of this rank's chunks, each chunk mapped as its stage of pp * V (under TP the
    shards are gathered from the rank's tensor-parallel group first)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from gil_megatron.models.chunks import stage_of_chunk
    from gil_megatron.models.hf_mapping import hf_from_megatron_stage

    tp = parallel_state.get_tensor_model_parallel_world_size()
    out = {}
    for chunk in chunks:
        stage, stages = stage_of_chunk(chunk, pp_rank)
        state = {name: t.detach().clone() for name, t in state_of(chunk).items()}
        shards = [None] * tp
        if tp > 1:
            dist.all_gather_object(shards, state, group=parallel_state.get_tensor_model_parallel_group())
        else:
            shards = [state]
        out.update(dict(hf_from_megatron_stage(chunk.arch, "actor", dict(enumerate(shards)), stage, stages)))
    return out


def _layout(ckpt: str, pp: int, vp: int, out_dir: str, tp: int = 1):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from gil_megatron.models.build import model_from_checkpoint
    from gil_megatron.models.chunks import model_chunks
    from gil_megatron.models.pipeline import broadcast_from_last_stage, gather_vocab_shards, run_microbatches
    from gil_megatron.models.weights import model_dir_stages, model_state_for_save, save_model_weights, write_meta
    from gil_megatron.parallel import distributed
    from gil_megatron.ppo.rollout import SamplingSettings, generate
    from gil_megatron.ppo.scoring import score_logprobs
    from gil_megatron.training.optim import OptimSettings, Trainable, main_grads

    layout = distributed.initialize(tp, pp, seed=1, virtual_pp=vp)
    assert layout.vp == vp
    model = model_from_checkpoint(ckpt, "actor", layout)
    chunks = model_chunks(model)
    assert len(chunks) == vp
    ids = torch.randint(0, VOCAB, (6, 10), generator=torch.Generator().manual_seed(0))
    r = {"rank": (layout.pp_rank, layout.dp_rank)}

    with torch.no_grad():  # one micro-batch: fewer than pp, the interleaved schedule is padded
        outs = run_microbatches(model, [{"input_ids": ids}], forward_only=True)
        logits = gather_vocab_shards(outs[0]["output"]) if outs else None
        (r["logits"],) = broadcast_from_last_stage([logits] if outs else None)
    r["logprobs"] = score_logprobs(model, ids, micro_batch_size=2)[0]  # 3 micro-batches: padded to 4
    prompts = ids[:4, :5]
    lengths = torch.tensor([5, 3, 4, 5])
    greedy = SamplingSettings(max_new_tokens=6, greedy=True, pad_token_id=0)
    r["greedy"] = generate(model, prompts, lengths, greedy).sequences
    r["sampled"] = generate(model, prompts, lengths, SamplingSettings(max_new_tokens=6, temperature=0.8),
                            torch.Generator().manual_seed(3)).sequences

    if out_dir is not None and vp > 1 and layout.dp_rank == 0:  # the model directory a run with chunks writes
        save_model_weights(model, out_dir, layout.tp_rank, layout.pp_rank)
        if layout.pp_rank == 0:
            write_meta(out_dir, model.arch, model.role, 1, model_dir_stages(model))

    # full recomputation under the interleaved schedule: the same math
    trainable = Trainable(model, OptimSettings(lr=1e-2, clip_grad=0.0), recompute="full" if vp > 1 else "none")
    n_tokens = ids[:, 1:].numel()

    def lm_loss(mb, logits):
        per_token = vocab_parallel_cross_entropy(logits[:, :-1].contiguous(), mb["input_ids"][:, 1:])
        loss = per_token.sum() / n_tokens
        return loss, {"loss": loss.detach()}

    losses = []
    for step, sizes in enumerate(((2, 2, 2), (3, 3))):  # 3 micro-batches (padded under vp), then 2
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        mbs = [{"input_ids": ids[s:s + n]} for s, n in zip(starts, sizes)]
        metrics = trainable.forward_backward(mbs, lm_loss)
        loss = torch.stack([m["loss"] for m in metrics]).sum() if metrics else None
        assert not metrics or len(metrics) == len(mbs)
        (loss,) = broadcast_from_last_stage([loss] if loss is not None else None)
        losses.append(loss)
        if step == 0:
            grads = {id(c.module): main_grads(c) for c in trainable.chunks}
            r["grads"] = _hf_named(chunks, lambda c: grads[id(c)], layout.pp_rank)
        updated, _ = trainable.step()
        assert updated
    r["losses"] = torch.stack(losses)
    r["weights"] = _hf_named(chunks, model_state_for_save, layout.pp_rank)
    return r


def _indivisible(ckpt):
    from gil_megatron.models.build import model_from_checkpoint
    from gil_megatron.models.config import LayoutError
    from gil_megatron.parallel import distributed

    layout = distributed.initialize(1, 2, virtual_pp=4)  # 4 layers cannot make 2 * 4 chunks of whole layers
    try:
        model_from_checkpoint(ckpt, "actor", layout)
    except LayoutError as exc:
        return str(exc)
    return None


def _all_layouts(ckpt, out_dir):
    results = {(pp, vp): _layout(ckpt, pp, vp, out_dir) for pp, vp in LAYOUTS}
    results["indivisible"] = _indivisible(ckpt)
    return results


def _union(results, key):
    merged = {}
    for r in results:
        if r["rank"][1] == 0:  # one data-parallel replica
            merged.update(r[key])
    return merged


def _assert_layouts_match(per_rank, ref_layout, layouts):
    """Every rank's results at each of ``layouts`` equal those at ``ref_layout``."""
    ref = per_rank[0][ref_layout]
    ref_grads, ref_weights = (_union([r[ref_layout] for r in per_rank], key) for key in ("grads", "weights"))
    assert len(ref_grads) == len(ref_weights) > 0
    for layout in layouts:
        results = [r[layout] for r in per_rank]
        for r in results:  # every rank holds the same broadcast results
            # the vocab is padded per TP size: compare the real entries
            torch.testing.assert_close(r["logits"][..., :VOCAB], ref["logits"][..., :VOCAB], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(r["logprobs"], ref["logprobs"], rtol=1e-5, atol=1e-5)
            assert torch.equal(r["greedy"], ref["greedy"]), layout
            assert torch.equal(r["sampled"], ref["sampled"]), layout
            torch.testing.assert_close(r["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
        for key, expected in (("grads", ref_grads), ("weights", ref_weights)):
            got = _union(results, key)
            assert sorted(got) == sorted(expected), (layout, key)
            for name in expected:
                torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6,
                                           msg=f"{key} {name} at layout {layout}")
    assert ref["losses"][1] < ref["losses"][0]  # the steps did something


def test_virtual_pipeline_equals_plain_pipeline_and_single_rank(tmp_path):
    from gil_megatron.models.convert import hf_to_megatron, megatron_to_hf
    from gil_megatron.models.weights import arch_of

    hf_dir = make_hf(str(tmp_path / "hf"))
    ckpt = str(tmp_path / "ckpt")
    hf_to_megatron(hf_dir, ckpt, 1, 2)
    out_dir = tmp_path / "vp_model"
    out_dir.mkdir()
    per_rank = spawn(_all_layouts, 2, ckpt, str(out_dir))

    _assert_layouts_match(per_rank, (1, 1), LAYOUTS[1:])
    assert "num_layers=4 is not divisible by parallel.pp * parallel.virtual_pp = 2*4" in per_rank[0]["indivisible"]

    # the directory written with chunks: 4 stage files, and back to the original HF tensors
    assert arch_of(str(out_dir))[3] == LAYERS
    back = str(tmp_path / "hf_back")
    megatron_to_hf(str(out_dir), back)
    import glob

    from safetensors.torch import load_file

    original = load_file(f"{hf_dir}/model.safetensors")
    restored = {}
    for path in glob.glob(f"{back}/*.safetensors"):
        restored.update(load_file(path))
    assert sorted(restored) == sorted(original)
    for name in original:
        assert torch.equal(restored[name], original[name]), name


# (tp, pp, virtual_pp) on 4 ranks; (1, 1, 1) is data parallel on one batch, i.e. the single-rank result
LAYOUTS_4 = [(1, 1, 1), (2, 2, 1), (2, 2, 2), (1, 2, 2)]


def _four_rank_layouts(ckpt):
    return {(tp, pp, vp): _layout(ckpt, pp, vp, None, tp=tp) for tp, pp, vp in LAYOUTS_4}


@pytest.mark.slow  # 4 ranks on 2 shared cores
def test_virtual_pipeline_with_tensor_and_data_parallelism(tmp_path):
    """Chunks together with DP2 (PP2 x V2 x DP2: the same logits, rollouts, losses, gradients and
    weights as one rank) and with TP2 (TP2 x PP2 x V2: the same as TP2 x PP2 unchunked)."""
    from gil_megatron.models.convert import hf_to_megatron

    hf_dir = make_hf(str(tmp_path / "hf"))
    ckpt = str(tmp_path / "ckpt")
    hf_to_megatron(hf_dir, ckpt, 1, 2)
    per_rank = spawn(_four_rank_layouts, 4, ckpt)
    _assert_layouts_match(per_rank, (1, 1, 1), [(1, 2, 2)])
    # TP2 sums in another order, and Adam's first steps (lr 1e-2) turn last-bit gradient differences
    # into 1e-5 weight differences; chunks under TP are compared with the same TP layout unchunked
    _assert_layouts_match(per_rank, (2, 2, 1), [(2, 2, 2)])


def test_virtual_pp_config_errors():
    from gil_megatron.config import ConfigError, ParallelConfig

    with pytest.raises(ConfigError, match="parallel.virtual_pp=2 interleaves pipeline stages and needs parallel.pp"):
        ParallelConfig(pp=1, virtual_pp=2).validate()
    with pytest.raises(ConfigError, match="parallel.virtual_pp=0"):
        ParallelConfig(pp=2, virtual_pp=0).validate()
    ParallelConfig(pp=2, virtual_pp=2).validate()
    from gil_megatron.config import PPOConfig, load_config

    with pytest.raises(ConfigError, match="train.sequence_packing=true does not run with parallel.virtual_pp=2"):
        load_config(PPOConfig, None, ["models.actor=a", "models.reward_fn=m:f", "data.train_prompts=p",
                                      "parallel.pp=2", "parallel.virtual_pp=2", "train.sequence_packing=true"])


# ---- the PPO/GIL engine with chunk lists -----------------------------------------------------------
def _ppo_iteration(root: str, vp: int):
    """One GIL iteration (actor + critic trained, reference + reward model frozen and offloaded,
    a held-out evaluation, a checkpoint) at PP2 with ``vp`` chunks per rank: its metrics."""
    from gil_megatron.config import PPOConfig, load_config
    from gil_megatron.ppo.trainer import PPOTrainer

    run_dir = os.path.join(root, f"run_vp{vp}")
    argv = [f"run_dir={run_dir}", f"models.actor={root}/actor", f"models.reward_model={root}/reward",
            f"data.train_prompts={root}/data/prompts_train.jsonl",
            f"data.eval_prompts.eval={root}/data/prompts_eval.jsonl", "data.max_prompt_length=12",
            "rollout.batch_size=8", "rollout.max_new_tokens=6", "rollout.micro_batch_size=3",
            "ppo.mini_batch_size=8", "ppo.micro_batch_size=4", "ppo.epochs=1", "train.steps=1",
            "train.eval_every=1", "train.save_every=1", "checkpoint.resume=none", "logging.progress=false",
            "offload.reference=true", "offload.reward_model=true", "actor_optim.lr=1e-3", "critic_optim.lr=1e-3",
            "parallel.pp=2", f"parallel.virtual_pp={vp}"]
    trainer = PPOTrainer(load_config(PPOConfig, None, argv))
    metrics = trainer.train()
    return {k: v for k, v in metrics.items() if not k.startswith(("time/", "rollout/tokens_per_s"))}


def _ppo_both(root):
    return {vp: _ppo_iteration(root, vp) for vp in (1, 2)}


@pytest.mark.slow  # ~40 s on 2 shared cores; the chunk mechanics are covered by the test above
def test_ppo_iteration_with_chunks_equals_plain_pipeline(tmp_path):
    import glob
    import shutil

    from gil_megatron.miniature.prepare import prepare
    from gil_megatron.models.config import LlamaArchConfig
    from gil_megatron.models.convert import save_fresh_model

    data = tmp_path / "data"
    prepare(str(data), seed=0, n_sft=8, n_prompts_train=16, n_prompts_eval=8, n_prompts_ood=8, n_rm_train=8,
            n_rm_eval=8)
    arch = LlamaArchConfig(vocab_size=24, hidden_size=32, intermediate_size=64, num_layers=LAYERS,
                           num_attention_heads=4, num_kv_heads=2, max_position_embeddings=64)
    for role in ("actor", "reward"):
        save_fresh_model(arch, role, str(tmp_path / role), 1, 1, seed=3)
        for f in glob.glob(str(data / "tokenizer" / "*")):
            shutil.copy(f, tmp_path / role)
    plain, chunked = spawn(_ppo_both, 2, str(tmp_path))[0].values()
    assert sorted(plain) == sorted(chunked)
    assert "eval/eval/reward" in plain and plain["skipped_updates"] == 0
    for key in plain:
        assert chunked[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-5, nan_ok=True), key
