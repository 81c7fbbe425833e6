"""One PPO/GIL iteration on CPU, measured side by side in one run:

  1. rollout tokens/s of our generation (megatron layers, KV cache) vs transformers' generate
     (benchmarks/bench_generate.py does the careful version; this repeats its headline ratio);
  2. step time at TP=1 (1 rank) vs TP=2 (2 gloo ranks) on the same model and batch;
  3. the step-time breakdown: generate / score / train.

What it runs: the miniature task (data written to a temp dir) with a fresh Llama (--hidden,
--layers), a Python reward (the miniature's gold reward, so no reward model is needed), algo=gil,
--iterations iterations per layout; the first iteration is warm-up and not counted.
Hardware: the numbers in the README came from the 2-core CPU development machine.
Command:  python benchmarks/bench_ppo_step.py [--hidden 256 --layers 4 --iterations 6]
Batch arithmetic: 64 prompts x up to 10 new tokens per iteration; 2 mini-batches of 32, 1 epoch.
"""

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--batch", type=int, default=64)
    return p.parse_args()


def setup(root: str, hidden: int, layers: int) -> str:
    from gil_megatron.miniature.prepare import prepare
    from gil_megatron.models.config import LlamaArchConfig
    from gil_megatron.models.convert import save_fresh_model

    prepare(os.path.join(root, "data"), seed=0, n_sft=64, n_prompts_train=1024, n_prompts_eval=16,
            n_prompts_ood=16, n_rm_train=16, n_rm_eval=16)
    arch = LlamaArchConfig(vocab_size=24, hidden_size=hidden, intermediate_size=2 * hidden, num_layers=layers,
                           num_attention_heads=8, num_kv_heads=4, max_position_embeddings=64)
    actor = os.path.join(root, "actor")
    save_fresh_model(arch, "actor", actor, 1, 1, seed=0)
    for f in glob.glob(os.path.join(root, "data", "tokenizer", "*")):
        shutil.copy(f, actor)
    return actor


def run_layout(root: str, actor: str, tp: int, iterations: int, batch: int) -> list:
    run_dir = os.path.join(root, f"tp{tp}")
    argv = [f"run_dir={run_dir}", f"parallel.tp={tp}", f"models.actor={actor}", "models.reward_model=null",
            "models.reward_fn=gil_megatron.miniature.task:gold_reward",
            f"data.train_prompts={root}/data/prompts_train.jsonl",
            # the YAML's held-out sets, pointed at this run's data (a YAML dict merges key by key, so
            # data.eval_prompts={} would keep the YAML's paths); evaluated once, after the last step
            *(f"data.eval_prompts.{s}={root}/data/prompts_{s}.jsonl" for s in ("eval", "ood")), "train.eval_every=0",
            f"rollout.batch_size={batch}", f"ppo.mini_batch_size={batch // 2}", f"ppo.micro_batch_size={batch // 2}",
            f"rollout.micro_batch_size={batch}", f"train.steps={iterations}", "train.save_every=0",
            "checkpoint.resume=none", "logging.progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp),
                    "-m", "gil_megatron.ppo.trainer", os.path.join(ROOT, "examples", "configs", "miniature.yaml"), *argv],
                   check=True, env=env, capture_output=True, text=True)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f][1:]  # drop the warm-up iteration


def median(lines, key):
    return statistics.median(m[key] for m in lines)


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory() as root:
        actor = setup(root, args.hidden, args.layers)
        results = {tp: run_layout(root, actor, tp, args.iterations, args.batch) for tp in (1, 2)}
    gen = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_generate.py"),
                          "--hidden", str(args.hidden), "--layers", str(args.layers), "--repeats", "3"],
                         capture_output=True, text=True, check=True)
    gen_ratio = gen.stdout.strip().splitlines()[-1]
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab 24; {args.batch} prompts/iteration; "
          f"median over {args.iterations - 1} iterations after warm-up; 1 thread per rank")
    print(f"{'layout':<8}{'step s':>9}{'generate s':>12}{'score s':>10}{'train s':>10}{'rollout tok/s':>15}")
    for tp, lines in results.items():
        print(f"{'TP=' + str(tp):<8}{median(lines, 'time/step_s'):>9.3f}{median(lines, 'time/generate_s'):>12.3f}"
              f"{median(lines, 'time/score_s'):>10.3f}{median(lines, 'time/train_s'):>10.3f}"
              f"{median(lines, 'rollout/tokens_per_s'):>15.0f}")
    print("generation vs transformers (bench_generate.py): " + gen_ratio)
    step_ratio = median(results[1], "time/step_s") / median(results[2], "time/step_s")
    print(f"ratios: step time TP1/TP2 {step_ratio:.2f}x; {gen_ratio}")


if __name__ == "__main__":
    main()
