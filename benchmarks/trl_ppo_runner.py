"""TRL's PPO on the work that benchmarks/bench_vs_trl.py sets up; runs in that script's own venv
(trl==1.12.0 and its pinned companions), never imports gil_megatron.

    python trl_ppo_runner.py WORK_DIR UPDATES THREADS OUT.json

WORK_DIR holds hf/policy, hf/reward (LlamaForSequenceClassification, num_labels=1; also the
value model's start) and prompts.jsonl. Runs 1 + UPDATES PPO updates and writes, per update after
the first (warm-up), the wall time and the time spent in TRL's generation, its no-grad scoring
forwards (reference log-probs, values, reward) and Python's gc.collect; the rest is the update.
"""

import gc
import json
import sys
import time

import torch


class PhaseClock:
    """Wall time spent inside wrapped functions, by phase, reset at every update."""

    def __init__(self):
        self.totals = {}

    def wrap(self, fn, phase):
        def timed(*args, **kwargs):
            phase_now = phase(*args) if callable(phase) else phase
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[phase_now] = self.totals.get(phase_now, 0.0) + time.perf_counter() - start
        return timed

    def take(self):
        out, self.totals = self.totals, {}
        return out


def main():
    work, updates, threads, out_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_module

    clock = PhaseClock()
    # the module's own names, so every call inside train() goes through the clock
    ppo_module.batch_generation = clock.wrap(ppo_module.batch_generation, "generate")
    ppo_module.get_reward = clock.wrap(ppo_module.get_reward, "score")
    ppo_module.forward = clock.wrap(ppo_module.forward, lambda *a: "score" if not torch.is_grad_enabled() else "train")

    class TimedGC:
        collect = staticmethod(clock.wrap(gc.collect, "gc"))

    ppo_module.gc = TimedGC

    tokenizer = AutoTokenizer.from_pretrained(f"{work}/hf/policy", padding_side="left")
    with open(f"{work}/prompts.jsonl") as f:
        prompts = [json.loads(line)["prompt"] for line in f]
    dataset = Dataset.from_dict({"input_ids": [tokenizer(p)["input_ids"] for p in prompts]})
    policy = AutoModelForCausalLM.from_pretrained(f"{work}/hf/policy", dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(f"{work}/hf/policy", dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(f"{work}/hf/reward", num_labels=1, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(f"{work}/hf/reward", num_labels=1, dtype=torch.float32)
    for m in (policy, ref, value, reward):
        m.config.pad_token_id = tokenizer.pad_token_id

    batch = 64
    args = PPOConfig(
        output_dir=f"{work}/trl_out", report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1,
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, num_mini_batches=2, num_ppo_epochs=1,
        local_rollout_forward_batch_size=batch, total_episodes=batch * (updates + 1), response_length=32,
        temperature=0.7, stop_token="eos", num_sample_generations=0, kl_coef=0.05, cliprange=0.2,
        cliprange_value=0.2, vf_coef=1.0, gamma=1.0, lam=0.95, use_cpu=True, bf16=False, fp16=False, seed=0,
    )
    marks = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *_, **__):
            marks.append((time.perf_counter(), clock.take()))

    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=dataset, value_model=value, callbacks=[StepClock()])
    start = time.perf_counter()
    clock.take()
    trainer.train()
    rows, prev = [], start
    for when, phases in marks:
        rows.append({"step_s": when - prev, **{f"{k}_s": v for k, v in phases.items()}})
        prev = when
    with open(out_path, "w") as f:
        json.dump(rows[1:], f)  # the first update is warm-up


if __name__ == "__main__":
    main()
