"""Benchmark: RoPE in the packed forward, megatron-core's way vs ours, side by side in one process.

    megatron  apply_rotary_pos_emb(x, angles) for the queries and the keys of every layer: each call
              computes cos and sin of the angles again (what the packed path did before)
    ours      cos and sin once per forward, then models/rope.rotate for the queries and keys of
              every layer (what PackedDotProductAttention does now)

The shapes are bench_vs_trl.py's scoring forward (one packed row of 3085 tokens, 4 layers, 4 query
heads / 2 key-value heads of 64); the two are timed alternately and their outputs compared bit for
bit. Prints the median per 4-layer forward of each and the ratio megatron / ours as its last line.

Usage (run from the repository root; this is not a timed test):
    python benchmarks/bench_rope.py [--tokens 3085 --layers 4 --threads 2 --repeats 30]
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402

from gil_megatron.models import rope  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=3085)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    config = TransformerConfig(num_layers=args.layers, hidden_size=256, num_attention_heads=4, num_query_groups=2,
                               apply_rope_fusion=False)
    gen = torch.Generator().manual_seed(0)
    angles = torch.rand(args.tokens, 1, 1, 64, generator=gen) * 64  # [T, 1, 1, d] as megatron's rotary module
    query = torch.randn(args.tokens, 4, 64, generator=gen)
    key = torch.randn(args.tokens, 2, 64, generator=gen)

    def megatron():
        for _ in range(args.layers):  # cp_group: megatron asks for one it does not use without cu_seqlens
            q = apply_rotary_pos_emb(query.unsqueeze(1), angles, config=config, cp_group=object()).squeeze(1)
            k = apply_rotary_pos_emb(key.unsqueeze(1), angles, config=config, cp_group=object()).squeeze(1)
        return q, k

    def ours():
        cos, sin = angles.squeeze(1).cos(), angles.squeeze(1).sin()
        for _ in range(args.layers):
            q, k = rope.rotate(query, cos, sin), rope.rotate(key, cos, sin)
        return q, k

    same = all(torch.equal(a, b) for a, b in zip(megatron(), ours()))
    times = {"megatron": [], "ours": []}
    for _ in range(args.repeats):
        for name, fn in (("megatron", megatron), ("ours", ours)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    m, o = (1e3 * statistics.median(times[k]) for k in ("megatron", "ours"))
    print(f"RoPE of {args.tokens} tokens x {args.layers} layers (queries 4 x 64, keys 2 x 64), fp32, "
          f"{args.threads} threads; outputs bit-identical: {same}")
    print(f"megatron (cos/sin per call)  {m:8.2f} ms per forward")
    print(f"ours (cos/sin per forward)   {o:8.2f} ms per forward")
    print(f"ratio megatron / ours: {m / o:.2f}x")


if __name__ == "__main__":
    main()
