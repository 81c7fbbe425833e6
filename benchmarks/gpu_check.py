#!/usr/bin/env python
"""The GPU path on one GPU, end to end (run by benchmarks/gpu_check.sh, which prepares the machine).

On the miniature task with a ~100M-parameter Llama actor and reward model (bf16, megatron's
distributed optimizer, TE layer spec when transformer-engine imports):

  1. GIL-PPO for ``--iterations`` iterations straight, checkpointing at the end;
  2. the same run stopped after ``--iterations - 2`` iterations (a checkpoint), then resumed to the
     end: its metrics and final weights must equal run 1's bit for bit;

and prints one table: layer spec, dtype, optimizer, parameters, time per iteration, generated
tokens/s, peak GPU memory, resume equality. Exit status 1 when resume is not exact.

    python benchmarks/gpu_check.py --out /tmp/gpu_check [--iterations 5]
    python benchmarks/gpu_check.py --out /tmp/gpu_check --cpu-smoke   # the script itself, tiny model, CPU
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

# ~100M parameters: 8 layers x (4 h^2 attention + 3 h f MLP) with h = 1024, f = 2816
ARCH = dict(hidden_size=1024, intermediate_size=2816, num_layers=8, num_attention_heads=16, num_kv_heads=8,
            max_position_embeddings=256)


def prepare(out: str, arch_kw: dict) -> dict:
    """Miniature data, and a fresh actor and reward model of ARCH with the miniature tokenizer."""
    import glob
    import shutil

    from gil_megatron.miniature.prepare import prepare as prepare_data
    from gil_megatron.models.build import load_tokenizer
    from gil_megatron.models.config import LlamaArchConfig
    from gil_megatron.models.convert import save_fresh_model
    from gil_megatron.training.memory import param_count

    data = os.path.join(out, "data")
    prepare_data(data, seed=0, n_sft=64, n_prompts_train=512, n_prompts_eval=64, n_prompts_ood=64, n_rm_train=64,
                 n_rm_eval=16)
    tokenizer_dir = os.path.join(data, "tokenizer")
    vocab = len(load_tokenizer(tokenizer_dir))
    arch = LlamaArchConfig(vocab_size=vocab, **arch_kw)
    for role in ("actor", "reward"):
        path = os.path.join(out, role)
        save_fresh_model(arch, role, path, 1, 1, seed=3)
        for f in glob.glob(os.path.join(tokenizer_dir, "*")):
            shutil.copy(f, path)
    return {"data": data, "params": param_count(arch, "actor")}


def overrides(out: str, run_dir: str, iterations: int, resume: str):
    data = os.path.join(out, "data")
    return [f"run_dir={run_dir}", f"models.actor={out}/actor", f"models.reward_model={out}/reward",
            "models.gold_reward_fn=gil_megatron.miniature.task:gold_reward", "models.dtype=bf16",
            f"data.train_prompts={data}/prompts_train.jsonl", "data.max_prompt_length=16",
            "rollout.batch_size=64", "rollout.max_new_tokens=32", "rollout.micro_batch_size=32",
            "ppo.mini_batch_size=32", "ppo.micro_batch_size=16", "ppo.epochs=1",
            f"train.steps={iterations}", "train.save_every=0", f"checkpoint.resume={resume}",
            "logging.progress=false", "actor_optim.lr=1e-5", "critic_optim.lr=1e-5", "algo=gil"]


def train(argv):
    from gil_megatron.config import PPOConfig, load_config
    from gil_megatron.ppo.trainer import PPOTrainer

    cfg = load_config(PPOConfig, None, argv)
    trainer = PPOTrainer(cfg)
    info = {"te": bool(getattr(trainer.actor, "using_te", False)),
            "dtype": str(next(trainer.actor.parameters()).dtype).replace("torch.", ""),
            "optimizer": type(trainer.actor_train.optimizer.chained_optimizers[0]).__name__}
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    start = trainer.iteration
    trainer.train()
    torch.cuda.synchronize()
    info["s_per_iter"] = (time.perf_counter() - t0) / max(trainer.iteration - start, 1)
    with open(os.path.join(cfg.run_dir, "metrics.jsonl")) as f:
        info["metrics"] = [json.loads(line) for line in f]
    return info


def weights(run_dir: str) -> dict:
    from gil_megatron.models.weights import hf_tensors_of_checkpoint
    from gil_megatron.training.checkpoint import latest_checkpoint

    return dict(hf_tensors_of_checkpoint(os.path.join(latest_checkpoint(run_dir), "actor")))


def comparable(m: dict) -> dict:
    return {k: v for k, v in m.items() if not k.startswith("time/") and k != "rollout/tokens_per_s"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="scratch directory")
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--cpu-smoke", action="store_true", help="check the script on CPU with a tiny model")
    args = p.parse_args()
    arch_kw = ARCH
    if args.cpu_smoke:
        arch_kw = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                       max_position_embeddings=256)
        for name in ("synchronize", "reset_peak_memory_stats"):
            setattr(torch.cuda, name, lambda *a, **k: None)
        torch.cuda.max_memory_allocated = lambda *a, **k: 0
        torch.cuda.get_device_name = lambda *a, **k: "CPU (smoke test)"
    elif not torch.cuda.is_available():
        print("error: no CUDA device; this check is for a GPU machine (--cpu-smoke checks the script)",
              file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    prep = prepare(args.out, arch_kw)
    n = args.iterations
    torch.cuda.reset_peak_memory_stats()
    straight = train(overrides(args.out, os.path.join(args.out, "straight"), n, "none"))
    peak = torch.cuda.max_memory_allocated()
    resumed_dir = os.path.join(args.out, "resumed")
    train(overrides(args.out, resumed_dir, n - 2, "none"))
    resumed = train(overrides(args.out, resumed_dir, n, "auto"))

    same_metrics = [comparable(m) for m in straight["metrics"]] == [comparable(m) for m in resumed["metrics"]]
    ws, wr = weights(os.path.join(args.out, "straight")), weights(resumed_dir)
    same_weights = ws.keys() == wr.keys() and all(torch.equal(ws[k], wr[k]) for k in ws)
    last = straight["metrics"][-1]
    tokens_s = sum(m["rollout/tokens_per_s"] for m in straight["metrics"]) / len(straight["metrics"])
    rows = [
        ("GPU", torch.cuda.get_device_name()),
        ("torch / CUDA", f"{torch.__version__} / {torch.version.cuda}"),
        ("layer spec", "transformer-engine" if straight["te"] else "megatron-core local (TE not importable)"),
        ("params per model", f"{prep['params'] / 1e6:.1f} M (actor, reference, critic, reward)"),
        ("dtype / optimizer", f"{straight['dtype']} / {straight['optimizer']}"),
        ("GIL-PPO iterations", f"{n} (batch 64 prompts, 32 new tokens)"),
        ("time per iteration", f"{straight['s_per_iter']:.2f} s (first includes warm-up)"),
        ("generation tokens/s", f"{tokens_s:.0f}"),
        ("peak GPU memory", f"{peak / 2**30:.2f} GiB"),
        ("last reward / KL", f"{last.get('reward/mean', float('nan')):.4f} / {last.get('kl/mean', float('nan')):.4f}"),
        ("resume == straight", f"metrics {'yes' if same_metrics else 'NO'}, weights {'yes' if same_weights else 'NO'}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"| {k.ljust(width)} | {v} |" for k, v in rows), flush=True)
    return 0 if same_metrics and same_weights else 1


if __name__ == "__main__":
    from gil_megatron.parallel import distributed

    try:
        code = main()
    finally:
        distributed.destroy()
    sys.exit(code)
