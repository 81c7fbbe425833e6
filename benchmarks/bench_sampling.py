"""One decode step's draw on CPU, side by side: torch.multinomial (what the rollout used) vs the
inverse-CDF draw it uses now (rollout.draw_by_inverse_cdf), same probabilities, same generator.

Shape: the bench_vs_trl batch, 64 rows over a vocabulary of 1000 (--rows, --vocab).
Command:  python benchmarks/bench_sampling.py [--threads 2]
The last line is the ratio multinomial / inverse CDF in time per draw.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gil_megatron.ppo.rollout import draw_by_inverse_cdf, draw_uniforms  # noqa: E402


def per_call(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    probs = torch.softmax(torch.randn(args.rows, args.vocab, generator=torch.Generator().manual_seed(0)) / 0.7, -1)
    g = torch.Generator().manual_seed(1)
    multinomial = per_call(lambda: torch.multinomial(probs, 1, generator=g), args.repeats)
    inverse_cdf = per_call(lambda: draw_by_inverse_cdf(probs, draw_uniforms(args.rows, g)), args.repeats)
    print(f"[{args.rows} x {args.vocab}] fp32, {args.threads} threads, mean of {args.repeats} draws")
    print(f"torch.multinomial: {multinomial * 1e3:.3f} ms per draw")
    print(f"inverse CDF:       {inverse_cdf * 1e3:.3f} ms per draw")
    print(f"ratio multinomial / inverse CDF: {multinomial / inverse_cdf:.1f}x")


if __name__ == "__main__":
    main()
