"""What this CPU's fp32 matmul reaches on the shapes of the bench_vs_trl model (hidden 256, FFN 512,
vocab 1000; 1536-3072 token rows): the ceiling any PPO engine on this machine works under.

Command:  python benchmarks/bench_matmul_peak.py [--threads 2]
The last line is the lowest GFLOP/s over the shapes.
"""

import argparse
import time

import torch

SHAPES = [(1536, 256, 1024), (1536, 512, 256), (1536, 256, 512), (3072, 256, 1000)]  # (tokens, in, out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rates = []
    for m, k, n in SHAPES:
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        start = time.perf_counter()
        for _ in range(args.repeats):
            a @ b
        seconds = (time.perf_counter() - start) / args.repeats
        rates.append(2 * m * k * n / seconds / 1e9)
        print(f"[{m} x {k}] @ [{k} x {n}] fp32, {args.threads} threads: {seconds * 1e3:.2f} ms, {rates[-1]:.1f} GFLOP/s")
    print(f"lowest: {min(rates):.1f} GFLOP/s, highest: {max(rates):.1f} GFLOP/s")


if __name__ == "__main__":
    main()
