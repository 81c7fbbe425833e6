"""What GIL costs on top of PPO: step time and peak memory, same model, same rollout batch.

Time: one process builds a PPO trainer and a GIL trainer on identical weights, takes ONE rollout
batch, and then alternates (ppo, gil, ppo, gil, ...) timing score + experience + update on that
same batch, so generation noise is excluded and machine load hits both alike. Ratio of medians.
Memory: each algorithm then runs the same steps in a process of its own; peak resident set size
(ru_maxrss) of each, and the ratio. (On CPU the process peak is dominated by the models and
libraries: GIL's own tensors are O(batch x groups).)
Hardware: the numbers in the README came from the 2-core CPU development machine.
Command:  python benchmarks/bench_gil_overhead.py [--hidden 256 --layers 4 --repeats 7]
Batch arithmetic: 64 prompts x up to 10 new tokens; 2 mini-batches of 32, 1 epoch per step.
"""

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from bench_ppo_step import setup  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=7)
    return p.parse_args()


def config(root, actor, algo):
    from gil_megatron.config import PPOConfig, load_config

    return load_config(PPOConfig, os.path.join(ROOT, "examples", "configs", "miniature.yaml"), [
        f"run_dir={root}/{algo}", f"algo={algo}", "parallel.tp=1", f"models.actor={actor}",
        "models.reward_model=null", "models.reward_fn=gil_megatron.miniature.task:gold_reward",
        f"data.train_prompts={root}/data/prompts_train.jsonl", "data.eval_prompts={}",
        "checkpoint.resume=none", "logging.progress=false"])


def one_step(trainer, batch, rollout):
    trainer.update(trainer.experience(trainer.score(batch, rollout)))


def time_both(root, actor, repeats):
    from gil_megatron.ppo.trainer import PPOTrainer

    trainers = {algo: PPOTrainer(config(root, actor, algo)) for algo in ("ppo", "gil")}
    batch, rollout = trainers["ppo"].rollout()
    times = {algo: [] for algo in trainers}
    for algo, t in trainers.items():
        one_step(t, batch, rollout)  # warm-up
    for _ in range(repeats):
        for algo, t in trainers.items():
            start = time.perf_counter()
            one_step(t, batch, rollout)
            times[algo].append(time.perf_counter() - start)
    return {algo: statistics.median(v) for algo, v in times.items()}


def peak_memory(root, actor, algo, repeats):
    from gil_megatron.ppo.trainer import PPOTrainer

    trainer = PPOTrainer(config(root, actor, algo))
    batch, rollout = trainer.rollout()
    for _ in range(repeats):
        one_step(trainer, batch, rollout)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main():
    from dist_utils import run_single

    args = parse_args()
    with tempfile.TemporaryDirectory() as root:
        actor = setup(root, args.hidden, args.layers)
        times = run_single(time_both, root, actor, args.repeats)
        memory = {algo: run_single(peak_memory, root, actor, algo, 3) for algo in ("ppo", "gil")}
    print(f"model: hidden {args.hidden}, {args.layers} layers; one rollout batch of 64, "
          f"median of {args.repeats} alternating steps (score + experience + update), 1 thread")
    print(f"{'algo':<6}{'step s':>10}{'peak RSS MiB':>15}")
    for algo in ("ppo", "gil"):
        print(f"{algo:<6}{times[algo]:>10.3f}{memory[algo] / 2**20:>15.1f}")
    print(f"ratios GIL/PPO: step time {times['gil'] / times['ppo']:.3f}x (goal <= 1.03), "
          f"peak memory {memory['gil'] / memory['ppo']:.3f}x")


if __name__ == "__main__":
    main()
