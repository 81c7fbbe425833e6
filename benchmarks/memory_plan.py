#!/usr/bin/env python
"""Per-GPU memory plan of a GIL-PPO run (actor + critic trained, reference + reward model frozen)
from gil_megatron/training/memory.py's estimator -- the numbers the trainer prints and checks at start-up --
plus the one term the estimator leaves out: the distributed optimizer's sharding over data
parallelism.

    python benchmarks/memory_plan.py            # Llama-2-7B at TP4xPP2 (the example config) and 70B options

docs/memory_plan.md holds this script's output and what it means.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gil_megatron.models.config import LlamaArchConfig  # noqa: E402
from gil_megatron.training import memory  # noqa: E402

GiB = 2 ** 30
LLAMA2_7B = LlamaArchConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                            num_attention_heads=32, num_kv_heads=32, max_position_embeddings=4096)
LLAMA2_70B = LlamaArchConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_layers=80,
                             num_attention_heads=64, num_kv_heads=8, max_position_embeddings=4096)


def plan(title, arch, tp, pp, dp, micro_batch, rollout_micro_batch, seq_len, decode_rows, gpu_gib=80 * 1e9 / GiB):
    """decode_rows: rows the rollout decodes at once per rank (rollout.batch_size / dp, or
    rollout.decode_batch_size when smaller)."""
    archs = {"actor": arch, "reference": arch, "critic": arch, "reward_model": arch}
    mb = max(micro_batch, rollout_micro_batch)
    est = memory.estimate(archs, ("actor", "critic"), tp, pp, mb, seq_len, 2, 1, decode_rows=decode_rows)
    per = est.per_rank_bytes
    trained = sum(memory.param_count(arch, r) for r in ("actor", "critic")) / (tp * pp)
    # megatron's DistributedOptimizer keeps the fp32 grad buffer whole but shards the fp32 main
    # weights and both Adam moments (12 bytes per parameter) over the dp ranks
    dist_opt = trained * (4 + 12 / dp)
    total_dist = per["weights"] + dist_opt + max(per["activations"], per["rollout KV cache"])
    print(f"{title}")
    print(f"  {memory.param_count(arch, 'actor') / 1e9:.2f}B parameters per model; tp={tp} pp={pp} dp={dp} "
          f"({tp * pp * dp} GPUs); micro-batch {mb} x {seq_len} tokens; {decode_rows} rows decoded at once; bf16")
    for k, v in per.items():
        print(f"  {k:34s} {v / GiB:7.2f} GiB")
    print(f"  {'estimator total (what the run checks)':34s} {est.total / GiB:7.2f} GiB  "
          f"(weights + grads+optimizer + the larger of activations and KV cache)")
    offloaded = memory.estimate(archs, ("actor", "critic"), tp, pp, mb, seq_len, 2, 1,
                                offloaded=("reference", "reward_model"), decode_rows=decode_rows)
    print(f"  {'  with offload.reference+reward_model':34s} {offloaded.total / GiB:7.2f} GiB  "
          f"(frozen models on the GPU one at a time)")
    print(f"  {'grads+optimizer, distributed opt.':34s} {dist_opt / GiB:7.2f} GiB  (fp32 grads whole, 12 B/param / dp)")
    print(f"  {'total with the distributed opt.':34s} {total_dist / GiB:7.2f} GiB  of {gpu_gib:.1f} GiB "
          f"({'fits' if total_dist / GiB < 0.9 * gpu_gib else 'does NOT fit'} under the 90% check)")
    print()


if __name__ == "__main__":
    config = "examples/configs/llama2_7b_tp4pp2.yaml"
    plan(f"Llama-2-7B, {config} with rollout.decode_batch_size=0 (all 512 rows at once), 8 x 80 GB",
         LLAMA2_7B, 4, 2, 1, 8, 16, 1024, decode_rows=512)
    plan(f"Llama-2-7B, {config} as shipped (rollout.decode_batch_size=128), 8 x 80 GB",
         LLAMA2_7B, 4, 2, 1, 8, 16, 1024, decode_rows=128)
    plan("Llama-2-70B, same batch and sequence, TP8 x PP4, 32 x 80 GB", LLAMA2_70B, 8, 4, 1, 8, 16, 1024,
         decode_rows=128)
    plan("Llama-2-70B, TP8 x PP4 x DP4, 128 x 80 GB, micro-batches 2 / 4, 128 of 512 / 4 rows at once",
         LLAMA2_70B, 8, 4, 4, 2, 4, 1024, decode_rows=128)
    plan("Llama-2-70B, TP8 x PP8, 64 x 80 GB, micro-batches 2 / 4", LLAMA2_70B, 8, 8, 1, 2, 4, 1024,
         decode_rows=128)
