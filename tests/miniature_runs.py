"""The tiny miniature every end-to-end PPO test trains on, and the helpers those tests share
(tests/ppo, tests/training, tests/models). The ``mini`` fixture (tests/conftest.py) builds it once
per test module."""

import json
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_mini(root):
    """Miniature data, a tiny fresh actor (with tokenizer files) and a fresh reward model in ``root``."""
    import glob
    import shutil

    from gil_megatron.miniature.prepare import prepare
    from gil_megatron.models.config import LlamaArchConfig
    from gil_megatron.models.convert import save_fresh_model
    from gil_megatron.models.weights import load_shard, save_shard

    data = root / "data"
    prepare(str(data), seed=0, n_sft=64, n_prompts_train=256, n_prompts_eval=32, n_prompts_ood=32,
            n_rm_train=64, n_rm_eval=16)
    arch = LlamaArchConfig(vocab_size=24, hidden_size=64, intermediate_size=128, num_layers=2,
                           num_attention_heads=4, num_kv_heads=2, max_position_embeddings=64)
    for role in ("actor", "reward"):
        save_fresh_model(arch, role, str(root / role), 1, 1, seed=3)
        for f in glob.glob(str(data / "tokenizer" / "*")):
            shutil.copy(f, root / role)
    # a fresh reward head is zero (every score 0, every advantage ~0): give it random rows so that
    # the layout and resume comparisons below run on real advantages
    shard = load_shard(str(root / "reward"), 0, 0)
    (head,) = [name for name in shard if name.endswith("score.weight")]
    shard[head] = torch.randn(shard[head].shape, generator=torch.Generator().manual_seed(5)) * 4 / arch.hidden_size**0.5
    save_shard(str(root / "reward"), 0, 0, shard)
    return root


def overrides(mini, run_dir, **extra):
    base = {
        "run_dir": str(run_dir), "models.actor": str(mini / "actor"), "models.reward_model": str(mini / "reward"),
        "models.gold_reward_fn": "gil_megatron.miniature.task:gold_reward",
        "data.train_prompts": str(mini / "data" / "prompts_train.jsonl"),
        "data.eval_prompts": "{}", "data.max_prompt_length": 12,
        "rollout.batch_size": 16, "rollout.max_new_tokens": 8, "rollout.micro_batch_size": 8,
        "ppo.mini_batch_size": 8, "ppo.micro_batch_size": 4, "ppo.epochs": 2,
        "train.steps": 1, "train.eval_every": 0, "train.save_every": 0,
        "checkpoint.resume": "none", "logging.progress": False,
        "actor_optim.lr": 1e-3, "critic_optim.lr": 1e-3,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def launcher_overrides(mini, run_dir, **extra):
    """For runs from examples/configs/miniature.yaml: its eval sets point at the tiny data too
    (a YAML dict is merged key by key, so ``data.eval_prompts={}`` would not remove them)."""
    sets = {f"data.eval_prompts.{name}": str(mini / "data" / f"prompts_{name}.jsonl") for name in ("eval", "ood")}
    return [a for a in overrides(mini, run_dir, **sets, **extra) if not a.startswith("data.eval_prompts={")]


def train_run(yaml_path, argv):
    from gil_megatron.config import PPOConfig, load_config
    from gil_megatron.ppo.trainer import PPOTrainer

    cfg = load_config(PPOConfig, yaml_path, argv)
    trainer = PPOTrainer(cfg)
    trainer.train()
    with open(os.path.join(cfg.run_dir, "metrics.jsonl")) if torch.distributed.get_rank() == 0 else open(os.devnull) as f:
        lines = [json.loads(line) for line in f]
    trainer.save()
    return lines


def hf_weights(ckpt_dir):
    from gil_megatron.models.weights import hf_tensors_of_checkpoint

    return dict(hf_tensors_of_checkpoint(ckpt_dir))


def latest_actor(run_dir):
    from gil_megatron.training.checkpoint import latest_checkpoint

    return os.path.join(latest_checkpoint(str(run_dir)), "actor")


def comparable(metrics):
    return {k: v for k, v in metrics.items() if not k.startswith("time/") and not k.startswith("rollout/tokens_per_s")}


def assert_metrics_close(a, b):
    m1, m2 = comparable(a), comparable(b)
    assert m1.keys() == m2.keys()
    mismatched = {k: (m1[k], m2[k]) for k in m1 if m1[k] != m2[k] and (not isinstance(m1[k], (int, float)) or
                  m1[k] != pytest.approx(m2[k], rel=1e-4, abs=1e-5))}
    assert not mismatched, mismatched
