#!/usr/bin/env python
"""Check a converted checkpoint against transformers on the HF directory it came from.

    torchrun --nproc-per-node N tools/verify_checkpoint.py --load-dir MEGATRON_DIR --hf-dir HF_DIR

Runs with the checkpoint's layout (N = tp * pp, or a multiple: extra ranks are data-parallel
replicas), forwards a fixed batch through both models in fp32 and prints the maximum absolute
difference of the logits (actor) or per-token scores (reward / critic heads) as its LAST line.
Exits 1 when it exceeds --tolerance.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gil_megatron.cli import run_cli  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load-dir", required=True, help="our sharded checkpoint")
    p.add_argument("--hf-dir", required=True, help="the Hugging Face directory to compare with")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted |difference| (exit 1 above it)")
    p.add_argument("--batch-size", type=int, default=2, help="rows of the random test batch")
    p.add_argument("--seq-length", type=int, default=32, help="tokens per row")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    return p.parse_args(argv)


def hf_outputs(hf_dir: str, role: str, ids):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.no_grad():
        if role == "actor":
            model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
            return model(ids).logits
        model = AutoModelForSequenceClassification.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
        hidden = model.model(ids).last_hidden_state
        scores = hidden @ model.score.weight.t()
        return scores.squeeze(-1) if role == "reward" else scores


def main(argv=None):
    args = parse_args(argv)  # first: --help and usage errors answer without importing megatron
    import torch
    import torch.distributed as dist

    from gil_megatron.models.build import model_from_checkpoint
    from gil_megatron.models.pipeline import broadcast_from_last_stage, gather_vocab_shards, run_microbatches
    from gil_megatron.models.weights import arch_of
    from gil_megatron.parallel import distributed

    if not os.path.isfile(os.path.join(args.hf_dir, "config.json")):
        raise FileNotFoundError(f"--hf-dir {args.hf_dir}: no config.json (not a Hugging Face model directory)")
    arch, role, tp, pp = arch_of(args.load_dir)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % (tp * pp):
        raise ValueError(f"{args.load_dir} has tp={tp} pp={pp}: launch a multiple of {tp * pp} ranks "
                         f"(torchrun --nproc-per-node {tp * pp}), not {world}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    layout = distributed.initialize(tp, pp, seed=args.seed)
    model = model_from_checkpoint(args.load_dir, role, layout, torch.float32, trainable=False)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, arch.vocab_size, (args.batch_size, args.seq_length), generator=gen)
    device = next(model.parameters()).device
    with torch.no_grad():
        outs = run_microbatches(model, [{"input_ids": ids.to(device)}], forward_only=True)
        out = None
        if outs:
            out = outs[0]["output"].float()
            out = gather_vocab_shards(out)[..., : arch.vocab_size] if role == "actor" else out
            out = out.cpu()
        (out,) = broadcast_from_last_stage([out] if out is not None else None)
    diff = None
    if dist.get_rank() == 0:
        expected = hf_outputs(args.hf_dir, role, ids)
        if expected.shape != out.shape:
            raise ValueError(f"output shapes differ: ours {tuple(out.shape)} vs HF {tuple(expected.shape)}")
        diff = (out - expected).abs().max().item()
        print(f"role={role} tp={tp} pp={pp} batch={tuple(ids.shape)} tolerance={args.tolerance:g}")
        print(f"max_abs_diff {diff:.3e}", flush=True)
    distributed.destroy()
    if diff is not None and not diff <= args.tolerance:
        sys.exit(1)
    return diff


if __name__ == "__main__":
    run_cli(main)
