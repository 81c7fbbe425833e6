"""Where one PPO update's time goes: torch.profiler over our trainer (TP1, one process) on
bench_vs_trl.py's work, per phase of the iteration (the trainer's record_function ranges
gil_megatron/generate, /score, /experience, /update): wall time, the matmuls' FLOPs and rate, the
other ops' time, what is left outside any op (Python), and the heaviest other ops.

Why: an update of this work is ~156 GFLOP of matmuls, and this CPU's fp32 matmul peaks at 129-166
GFLOP/s (benchmarks/bench_matmul_peak.py). This shows how close the matmuls run to that and what
the rest of the time is spent on.

The profiler adds overhead to every op, so its times are larger than bench_vs_trl.py's; compare
phases and ops within one run. The first iteration is warm-up and not counted.
Hardware: the numbers in the README came from the 2-core development VM.
Command:  python benchmarks/profile_ppo_step.py [--updates 3 --threads 2 --top 6]
"""

import argparse
import collections
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PHASES = ("generate", "score", "experience", "update")
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--updates", type=int, default=3, help="profiled updates (after one warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=6, help="heaviest non-matmul ops listed per phase")
    p.add_argument("--old-logprobs", choices=("decode", "rescore"), default="decode")
    p.add_argument("--packing", choices=("on", "off"), default="on")
    return p.parse_args()


def matmul_flops(event) -> int:
    """2 * m * k * n (times the batch) of an mm / addmm / bmm event from its recorded shapes."""
    shapes = event.input_shapes
    if event.name == "aten::addmm":
        shapes = shapes[1:]  # (bias, a, b)
    a, b = shapes[0], shapes[1]
    batch = a[0] if event.name == "aten::bmm" else 1
    return 2 * batch * a[-2] * a[-1] * b[-1]


def descendants(event):
    for child in event.cpu_children:
        yield child
        yield from descendants(child)


def phase_breakdown(events, updates: int) -> dict:
    """Per phase: wall, matmul GFLOP and seconds, other ops' seconds, and their heaviest ops, summed
    over the iterations after the first and divided by ``updates``."""
    iterations = sorted((e for e in events if e.name == "gil_megatron/iteration"), key=lambda e: e.time_range.start)
    counted = iterations[1:]
    assert len(counted) == updates, f"expected {updates} profiled iterations, found {len(counted)}"
    stats = {name: {"wall": 0.0, "flops": 0, "matmul": 0.0, "other": 0.0, "ops": collections.Counter()}
             for name in PHASES}
    for iteration in counted:
        for event in descendants(iteration):
            name = event.name.removeprefix("gil_megatron/")
            if name not in stats:
                continue
            s = stats[name]
            s["wall"] += event.cpu_time_total / 1e6
            for op in descendants(event):
                seconds = op.self_cpu_time_total / 1e6
                if op.name in MATMULS:
                    s["flops"] += matmul_flops(op)
                    s["matmul"] += seconds
                else:
                    s["other"] += seconds
                    s["ops"][op.name] += seconds
    for s in stats.values():
        for key in ("wall", "flops", "matmul", "other"):
            s[key] /= updates
        s["ops"] = {k: v / updates for k, v in s["ops"].items()}
    return stats


def main():
    args = parse_args()
    os.environ.update(OMP_NUM_THREADS=str(args.threads), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1")
    import torch
    from bench_vs_trl import make_work, ours_argv
    from torch.profiler import ProfilerActivity, profile

    from gil_megatron.parallel import distributed
    from gil_megatron.ppo import trainer

    os.environ["MASTER_PORT"] = str(distributed.free_port())
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as root:
        make_work(root, args.updates)
        argv = ours_argv(root, os.path.join(root, "run"), args.updates, 1, args.old_logprobs, args.packing == "on")
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            trainer.main(argv)
    stats = phase_breakdown(prof.events(), args.updates)

    print(f"work: bench_vs_trl.py's (TP1, {args.threads} threads, old log-probs {args.old_logprobs}, packing "
          f"{args.packing}); per update, mean of {args.updates} after warm-up, under torch.profiler")
    print(f"{'phase':<11}{'wall s':>8}{'matmul GFLOP':>14}{'matmul s':>10}{'GFLOP/s':>9}{'other ops s':>13}"
          f"{'outside ops s':>15}")
    total = collections.Counter()
    for name, s in stats.items():
        rate = s["flops"] / s["matmul"] / 1e9 if s["matmul"] else 0.0
        outside = s["wall"] - s["matmul"] - s["other"]
        print(f"{name:<11}{s['wall']:>8.3f}{s['flops'] / 1e9:>14.1f}{s['matmul']:>10.3f}{rate:>9.1f}"
              f"{s['other']:>13.3f}{outside:>15.3f}")
        total.update({"wall": s["wall"], "flops": s["flops"], "matmul": s["matmul"], "other": s["other"]})
    print(f"{'total':<11}{total['wall']:>8.3f}{total['flops'] / 1e9:>14.1f}{total['matmul']:>10.3f}"
          f"{total['flops'] / total['matmul'] / 1e9:>9.1f}{total['other']:>13.3f}"
          f"{total['wall'] - total['matmul'] - total['other']:>15.3f}")
    for name, s in stats.items():
        top = sorted(s["ops"].items(), key=lambda kv: -kv[1])[:args.top]
        print(f"{name}: " + ", ".join(f"{op.removeprefix('aten::')} {sec:.3f}" for op, sec in top))
    print(f"matmul share of the update's wall time: {total['matmul'] / total['wall']:.0%}")


if __name__ == "__main__":
    main()
