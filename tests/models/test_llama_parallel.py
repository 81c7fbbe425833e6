"""Every TP/PP layout gives the single-rank logits, loss and gradients, and HF's logits."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dist_utils import spawn

VOCAB = 100  # not a multiple of tp: exercises vocab padding and the -inf mask
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def make_hf(tmp_path, tied: bool, seed: int = 0) -> str:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied, rope_theta=500.0, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    out = str(tmp_path / ("hf_tied" if tied else "hf"))
    model.save_pretrained(out)
    return out


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (4, 12), generator=g)


def _run(hf_dir, ckpt_dir, tp, pp, ids, with_grads):
    import torch.nn.functional  # noqa: F401
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from gil_megatron.models.llama import LlamaModel
    from gil_megatron.models.pipeline import broadcast_from_last_stage, gather_vocab_shards, run_microbatches
    from gil_megatron.models.weights import arch_of, load_model_weights
    from gil_megatron.parallel import distributed
    from gil_megatron.training.optim import OptimSettings, Trainable, main_grads

    layout = distributed.initialize(tp, pp, seed=1)
    arch, role, _, _ = arch_of(ckpt_dir)
    model = LlamaModel(arch, "actor")
    load_model_weights(model, ckpt_dir, layout.tp_rank, tp, layout.pp_rank, pp)
    microbatches = [{"input_ids": ids[:2]}, {"input_ids": ids[2:]}]
    n_tokens = ids[:, 1:].numel()

    def lm_loss(mb, logits):
        per_token = vocab_parallel_cross_entropy(logits[:, :-1].contiguous(), mb["input_ids"][:, 1:])
        loss = per_token.sum() / n_tokens
        return loss, {"loss": loss.detach()}

    result = {}
    with torch.no_grad():
        outs = run_microbatches(model, microbatches, forward_only=True)
        logits = torch.cat([gather_vocab_shards(o["output"]) for o in outs]) if outs else None
        (logits,) = broadcast_from_last_stage([logits] if logits is not None else None)
    result["logits"] = logits[..., :VOCAB]
    result["pad_logits_max"] = logits[..., VOCAB:].max() if logits.shape[-1] > VOCAB else torch.tensor(float("-inf"))
    if with_grads:
        trainable = Trainable(model, OptimSettings(lr=1e-3))
        metrics = trainable.forward_backward(microbatches, lm_loss)
        loss = torch.stack([m["loss"] for m in metrics]).sum() if metrics else None
        (loss,) = broadcast_from_last_stage([loss] if loss is not None else None)
        result["loss"] = loss
        grads = main_grads(trainable.model)
        result["grads"] = {k: v for k, v in grads.items()}
        result["layout"] = (layout.tp_rank, layout.pp_rank, layout.dp_rank)
    return result


def merge_grads(results, arch, tp, pp):
    """Per-rank megatron grads -> HF-named full grads (the same mapping as the weights)."""
    from gil_megatron.models.hf_mapping import hf_from_megatron_stage

    merged = {}
    for pp_rank in range(pp):
        shards = {r["layout"][0]: r["grads"] for r in results if r["layout"][1] == pp_rank}
        merged.update(dict(hf_from_megatron_stage(arch, "actor", shards, pp_rank, pp)))
    return merged


def _run_all_layouts(ckpts, ids):
    """One 4-rank process group visits every layout (dp = 4 / (tp*pp) ranks see the same batch, so
    each layout's result must equal the single-model-rank result)."""
    return {key: _run(None, ckpt, tp, pp, ids, True) for key, (ckpt, tp, pp) in ckpts.items()}


def test_layouts_match_single_rank_and_hf(tmp_path):
    from gil_megatron.models.config import LlamaArchConfig
    from gil_megatron.models.convert import hf_to_megatron

    ids = batch()
    ckpts, hf_logits, archs = {}, {}, {}
    for tied in (False, True):
        hf_dir = make_hf(tmp_path, tied)
        with torch.no_grad():
            hf_logits[tied] = LlamaForCausalLM.from_pretrained(hf_dir).float()(ids).logits
        archs[tied] = LlamaArchConfig.from_hf_dir(hf_dir)
        for tp, pp in LAYOUTS:
            ckpt = str(tmp_path / f"ckpt_tied{tied}_tp{tp}_pp{pp}")
            hf_to_megatron(hf_dir, ckpt, tp, pp)
            ckpts[(tied, tp, pp)] = (ckpt, tp, pp)
    per_rank = spawn(_run_all_layouts, 4, ckpts, ids)
    for tied in (False, True):
        reference = None
        for tp, pp in LAYOUTS:
            results = [r[(tied, tp, pp)] for r in per_rank]
            results = [r for r in results if r["layout"][2] == 0]  # one data-parallel replica
            r0 = results[0]
            err = (r0["logits"] - hf_logits[tied]).abs().max()
            assert err < 1e-4, (tied, tp, pp, err)
            assert r0["pad_logits_max"] == float("-inf")
            grads = merge_grads(results, archs[tied], tp, pp)
            if reference is None:
                reference = (r0["logits"], r0["loss"], grads)
                continue
            ref_logits, ref_loss, ref_grads = reference
            assert torch.allclose(r0["logits"], ref_logits, atol=1e-5)
            assert torch.allclose(r0["loss"], ref_loss, atol=1e-5), (tied, tp, pp, r0["loss"], ref_loss)
            assert grads.keys() == ref_grads.keys()
            for name in ref_grads:
                assert torch.allclose(grads[name], ref_grads[name], atol=1e-5), (tied, tp, pp, name)
