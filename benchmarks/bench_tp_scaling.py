"""At what model size does tensor parallelism pay on this machine? Our PPO step at TP1 (one rank
using every thread) and at TP2 (two ranks of half the threads each), the same cores either way,
for growing hidden sizes, the two layouts alternating in one run.

The work is bench_vs_trl.py's (64 prompts of 8-24 tokens, 32 new tokens at temperature 0.7, reward
model + critic + reference, GAE, 1 epoch x 2 mini-batches of 32, fp32, old log-probs from the decode
step, packed sequences) on a random Llama of vocab 1000, 4 heads / 2 KV heads, intermediate 2 x hidden and --layers
layers, at each --hidden. TP2 adds two all-reduces over gloo per layer per forward (and per decode
step); the halved matmuls must win that back, which they do only once a layer is big enough.
Every run does 1 warm-up update plus --updates timed ones in a fresh process (medians).

Hardware: the README's numbers came from the 2-core development VM.
Command:  python benchmarks/bench_tp_scaling.py [--hidden 256,512,1024 --layers 4 --updates 2 --rounds 2]
The last line names the smallest hidden size at which TP2 is at least as fast as TP1.
"""

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_vs_trl import BATCH, make_work, run_ours  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", default="256,512,1024", help="comma-separated hidden sizes")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--updates", type=int, default=2, help="timed updates per run (after one warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="runs per layout, the layouts alternating")
    p.add_argument("--threads", type=int, default=2, help="TP1's threads; TP2 runs 2 ranks of threads / 2")
    return p.parse_args()


def main():
    args = parse_args()
    sizes = [int(h) for h in args.hidden.split(",")]
    rows = []
    for hidden in sizes:
        with tempfile.TemporaryDirectory() as root:
            make_work(root, args.updates, hidden=hidden, intermediate=2 * hidden, layers=args.layers)
            steps = {1: [], 2: []}
            for r in range(args.rounds):
                for tp in (1, 2):
                    steps[tp] += [m["step"] for m in run_ours(root, args.updates, tp, args.threads, r)]
        t1, t2 = statistics.median(steps[1]), statistics.median(steps[2])
        rows.append((hidden, t1, t2))
        print(f"hidden {hidden}: TP1 {t1:.3f} s/update, TP2 {t2:.3f} s/update", flush=True)
    print(f"work: {BATCH} prompts x 32 new tokens; Llama vocab 1000, {args.layers} layers, inter 2 x hidden, 4/2 heads; "
          f"fp32; TP1 {args.threads} threads, TP2 2 ranks x {max(args.threads // 2, 1)}; "
          f"median of {args.rounds} x {args.updates} updates after warm-up")
    print(f"{'hidden':>7}{'TP1 s/update':>14}{'TP2 s/update':>14}{'TP2/TP1 samples/s':>19}")
    for hidden, t1, t2 in rows:
        print(f"{hidden:>7}{t1:>14.3f}{t2:>14.3f}{t1 / t2:>18.2f}x")
    paying = [hidden for hidden, t1, t2 in rows if t2 <= t1]
    print(f"TP2 at least as fast as TP1 from hidden {paying[0]}" if paying
          else f"TP2 slower than TP1 at every size up to hidden {sizes[-1]}")


if __name__ == "__main__":
    main()
