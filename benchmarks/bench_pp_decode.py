"""Pipelined decode across pipeline stages, measured side by side: generation at PP2 (two 1-thread
ranks) with the rows decoded as pp groups that the stages work on at once (what the rollout does)
vs all rows as one group (the stages take turns), alternating in one run.

Model: a random Llama (vocab 1000, --hidden, intermediate 2 x hidden, 4 layers, 4 heads / 2 kv
heads), 64 prompts of 8-24 tokens, 32 new tokens at temperature 0.7, fp32 on CPU. Each run times
--calls generate calls after one warm-up (median).
Hardware: the README's numbers came from the 2-core development VM.
Command:  python benchmarks/bench_pp_decode.py [--hidden 256 --rounds 3 --calls 10]
The last line is the ratio grouped / one group in generated tokens per second.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3, help="runs per side, alternating")
    p.add_argument("--calls", type=int, default=10, help="timed generate calls per run")
    return p.parse_args()


def rank_main(ckpt: str, grouped: bool, calls: int, out: str) -> None:
    """One 2-rank run (called under torchrun): median seconds per generate call."""
    import torch
    import torch.distributed as dist

    from gil_megatron.models.build import model_from_checkpoint
    from gil_megatron.parallel import distributed
    from gil_megatron.ppo import rollout

    torch.set_num_threads(1)
    if not grouped:
        rollout.decode_groups = lambda pp, chunks, rows: 1
    layout = distributed.initialize(1, 2, seed=1)
    model = model_from_checkpoint(ckpt, "actor", layout, trainable=False)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 25, (64,), generator=g)
    ids = torch.randint(3, 1000, (64, 24), generator=g)
    settings = rollout.SamplingSettings(max_new_tokens=32, temperature=0.7, pad_token_id=0)
    times, tokens = [], 0
    for i in range(calls + 1):
        start = time.perf_counter()
        batch = rollout.generate(model, ids, lengths, settings, torch.Generator().manual_seed(i))
        times.append(time.perf_counter() - start)
        tokens = int(batch.response_mask.sum())
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"s": statistics.median(times[1:]), "tokens": tokens}, f)


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory() as root:
        from gil_megatron.models.config import LlamaArchConfig
        from gil_megatron.models.convert import save_fresh_model

        arch = LlamaArchConfig(vocab_size=1000, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                               num_layers=4, num_attention_heads=4, num_kv_heads=2, max_position_embeddings=64)
        ckpt = os.path.join(root, "policy")
        save_fresh_model(arch, "actor", ckpt, 1, 2, seed=0)
        results = {True: [], False: []}
        for r in range(args.rounds):
            for grouped in (False, True):
                out = os.path.join(root, f"out_{grouped}_{r}.json")
                env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
                subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                                __file__, "--rank", ckpt, str(grouped), str(args.calls), out],
                               env=env, check=True, capture_output=True, text=True)
                with open(out) as f:
                    results[grouped].append(json.load(f))
    print(f"model: Llama hidden {args.hidden}, 4 layers, vocab 1000; 64 prompts x 32 new tokens (T=0.7); PP2, "
          f"2 ranks x 1 thread; median of {args.calls} calls per run, {args.rounds} alternating runs per side")
    for grouped, label in ((False, "one group (stages take turns)"), (True, "pp groups (pipelined)")):
        per_run = [r["s"] for r in results[grouped]]
        print(f"{label:<32} s/generate per run: {', '.join(f'{s:.3f}' for s in per_run)}")
    one = statistics.median(r["s"] for r in results[False])
    grouped = statistics.median(r["s"] for r in results[True])
    print(f"ratio pipelined / one group tokens/s: {one / grouped:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank":
        rank_main(sys.argv[2], sys.argv[3] == "True", int(sys.argv[4]), sys.argv[5])
    else:
        main()
