"""Packed training forward: peak memory of the actor's log-prob step with the logits left packed
(ours: models/logprobs.action_logprobs on the packed row, Packing.unpack_actions on per-token scalars) vs
unpacked first to the padded [b, s, V] layout (what the packed path did before), side by side.

What it measures: the growth of the process's peak resident memory (ru_maxrss) over one forward +
backward of the actor (log-probs and entropy of every action, summed) on one training micro-batch,
each mode in a fresh process, alternating. Both modes give the same log-probs and gradients
(tests/models/test_packing.py checks packed against padded); only the memory differs.

The work: bench_vs_trl.py's model (hidden 256, intermediate 512, 4 layers, 4 heads / 2 kv heads) with
a --vocab-sized vocabulary (Llama-2's 32000 by default: the logits then dominate), fp32, TP1, one
micro-batch of 32 rows of bench_packing.py's skewed lengths (prompt 8-24, long-tailed responses).

Hardware: any CPU (the numbers in the README came from the 2-core development VM). Not part of CI.
Command:  python benchmarks/bench_packed_logits_memory.py [--vocab 32000 --rounds 2]
The last line is the ratio of the peak-memory growth, unpacked / packed (> 1: packed saves memory).
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROWS = 32  # bench_vs_trl.py's training micro-batch
MODES = ("unpacked", "packed")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per mode, the modes alternating")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    return p.parse_args()


def child(args) -> None:
    """One mode in this process: print the peak-memory growth (MiB) and the batch's token counts."""
    import torch

    torch.set_num_threads(args.threads)
    from bench_packing import random_model, skewed_batch

    from gil_megatron.models.logprobs import action_logprobs
    from gil_megatron.models.packing import pack
    from gil_megatron.parallel import distributed

    os.environ.setdefault("MASTER_PORT", str(distributed.free_port()))
    distributed.initialize(seed=args.seed)
    actor = random_model("actor", torch.Generator().manual_seed(args.seed), vocab=args.vocab)
    seqs, lengths, _ = skewed_batch(args.seed, mean_response=6.0)
    seqs, lengths = seqs[:ROWS, :int(lengths[:ROWS].max())], lengths[:ROWS]
    packing = pack(seqs, lengths)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    logits = actor(seqs, packing=packing)  # [1, T, V]
    if args.child == "unpacked":
        logprobs, entropy = action_logprobs(packing.unpack(logits), seqs, with_entropy=True)
    else:
        logprobs, entropy = action_logprobs(logits, seqs, with_entropy=True, packing=packing)
    (logprobs.sum() + entropy.sum()).backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{(after - before) / 1024:.1f} {int(lengths.sum())} {seqs.numel()}")


def main():
    args = parse_args()
    if args.child:
        return child(args)
    growth = {m: [] for m in MODES}
    tokens = slots = None
    for _ in range(args.rounds):
        for mode in MODES:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, "--vocab", str(args.vocab),
                                   "--threads", str(args.threads), "--seed", str(args.seed)],
                                  capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
            if proc.returncode != 0:
                raise RuntimeError(f"{mode} run failed:\n{proc.stderr[-3000:]}")
            mib, tokens, slots = proc.stdout.split()[-3:]
            growth[mode].append(float(mib))
    print(f"work: vocab {args.vocab}, hidden 256, 4 layers; one micro-batch of {ROWS} rows: {tokens} real tokens in "
          f"{slots} padded slots; actor forward + backward of log-probs and entropy; fp32, TP1; median of {args.rounds}")
    print(f"{'logits':<10} {'peak memory growth MiB':>24}")
    med = {m: statistics.median(growth[m]) for m in MODES}
    for mode in MODES:
        print(f"{mode:<10} {med[mode]:>24.1f}")
    print(f"ratio unpacked / packed peak memory growth: {med['unpacked'] / med['packed']:.2f}x")


if __name__ == "__main__":
    main()
