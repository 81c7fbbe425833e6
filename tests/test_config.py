"""gil_megatron/config.py on its own: YAML + dotted overrides, and every error one line that names the
field and the fix (unknown key, wrong type, bad enum value, out-of-range value, batch arithmetic
against the launched world). No process group, no model."""

import os
import subprocess
import sys

import pytest

from gil_megatron.config import (
    ConfigError,
    DPOConfig,
    PPOConfig,
    SFTConfig,
    StageTrainConfig,
    load_config,
    overrides_from_argv,
    to_dict,
)

REQUIRED = ["models.actor=/ckpt/actor", "models.reward_fn=pkg.mod:fn", "data.train_prompts=/data/prompts.jsonl"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def error_of(schema, *overrides, yaml_path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(schema, yaml_path, list(overrides))
    message = str(info.value)
    assert "\n" not in message, message  # the CLI prints it as one `error:` line
    return message


def test_defaults_overrides_and_yaml(tmp_path):
    cfg = load_config(PPOConfig, None, REQUIRED + ["ppo.kl_coef=0.2", "rollout.top_k=5", "gil.known_groups={copy: 0}"])
    assert (cfg.ppo.kl_coef, cfg.rollout.top_k, cfg.gil.known_groups) == (0.2, 5, {"copy": 0})
    assert cfg.algo == "gil" and cfg.actor_optim.lr == 1e-6 and cfg.critic_optim.lr == 5e-6  # documented defaults
    yaml = tmp_path / "run.yaml"
    yaml.write_text("ppo:\n  kl_coef: 0.3\ndata:\n  eval_prompts:\n    eval: /e.jsonl\n    ood: /o.jsonl\n")
    cfg = load_config(PPOConfig, str(yaml), REQUIRED + ["ppo.kl_coef=0.4", "data.eval_prompts.ood=/o2.jsonl"])
    assert cfg.ppo.kl_coef == 0.4  # the command line wins over the YAML
    # a dict merges key by key: an override replaces one set and keeps the others
    assert cfg.data.eval_prompts == {"eval": "/e.jsonl", "ood": "/o2.jsonl"}
    assert to_dict(cfg)["ppo"]["kl_coef"] == 0.4


def test_overrides_from_argv():
    assert overrides_from_argv(["run.yaml", "a.b=1", "c=2"]) == ("run.yaml", ["a.b=1", "c=2"])
    assert overrides_from_argv(["a.b=1"]) == (None, ["a.b=1"])
    assert overrides_from_argv([]) == (None, [])
    assert "must look like key.path=value" in error_of(PPOConfig, *REQUIRED, "ppo.kl_coef")


@pytest.mark.parametrize("override, needles", [
    ("ppo.kl_coeff=1", ("unknown config key 'ppo.kl_coeff'", "check the spelling")),
    ("ppo.kl_coef=abc", ("ppo.kl_coef", "abc")),
    ("rollout.batch_size=1.5", ("rollout.batch_size",)),
    ("ppo.kl_estimator=k4", ("ppo.kl_estimator='k4'", "valid: k1, k2, k3")),
    ("ppo.loss_agg_mode=sum", ("ppo.loss_agg_mode='sum'", "token_mean")),
    ("gil.variance=median", ("gil.variance='median'", "mass_weighted")),
    ("models.dtype=fp8", ("models.dtype='fp8'", "valid: auto, fp32, bf16")),
    ("algo=dapo", ("algo='dapo'", "gil", "grpo")),
    ("rollout.top_p=1.5", ("rollout.top_p=1.5", "(0, 1]")),
    ("rollout.temperature=0", ("rollout.temperature=0", "rollout.greedy=true")),
    ("gil.min_group_mass=0.6", ("gil.min_group_mass=0.6", "[0, 1/num_groups)")),
    ("gil.known_groups={copy: 2}", ("gil.known_groups", "[0, gil.num_groups=2)")),
    ("train.max_bad_steps=0", ("train.max_bad_steps=0", ">= 1")),
    ("critic_optim.lr=0", ("critic_optim.lr=0", "> 0")),  # the optimizer section's real path
    ("actor_optim.decay_style=step", ("actor_optim.decay_style='step'", "cosine")),
    ("models.reward_fn=not_a_spec", ("models.reward_fn='not_a_spec'", "package.module:function")),
    ("train.iterations=5", ("config key train.iterations was renamed: use train.steps",)),
    ("gil.adaptive_kl_normalize=true", ("gil.adaptive_kl_normalize was renamed: use gil.group_kl_normalize",)),
    ("algo=gil_no_adaptive_kl", ("algo=gil_no_adaptive_kl was renamed: use algo=gil_no_group_kl",)),
    ("ppo.target_kl=0", ("ppo.target_kl=0", "> 0")),
    ("data.too_long=truncate", ("data.too_long='truncate'", "valid: error, drop")),
])
def test_errors_name_the_field_and_the_fix(override, needles):
    message = error_of(PPOConfig, *REQUIRED, override)
    for needle in needles:
        assert needle in message, (override, message)


def test_a_renamed_key_in_a_yaml_names_the_new_one(tmp_path):
    yaml = tmp_path / "old.yaml"
    yaml.write_text("train:\n  iterations: 20\n")
    assert error_of(PPOConfig, *REQUIRED, yaml_path=str(yaml)) == "config key train.iterations was renamed: use train.steps"


def test_cross_field_checks():
    assert "exactly one of models.reward_model" in error_of(PPOConfig, *REQUIRED, "models.reward_model=/rm")
    assert "models.actor has no value" in error_of(PPOConfig, "models.reward_fn=a:b", "data.train_prompts=x")
    message = error_of(PPOConfig, *REQUIRED, "rollout.batch_size=6", "ppo.mini_batch_size=4")
    assert "ppo.mini_batch_size=4" in message and "= 6" in message
    message = error_of(PPOConfig, *REQUIRED, "algo=grpo")
    assert "algo=grpo" in message and "rollout.n_samples_per_prompt >= 2" in message
    load_config(PPOConfig, None, REQUIRED + ["algo=grpo", "rollout.n_samples_per_prompt=2"])
    assert "config file /no/such.yaml not found" in error_of(PPOConfig, yaml_path="/no/such.yaml")


def test_world_size_checks():
    cfg = load_config(PPOConfig, None, REQUIRED + ["parallel.tp=2", "rollout.batch_size=8", "ppo.mini_batch_size=8",
                                                   "ppo.micro_batch_size=2"])
    assert cfg.check_world(2) == 1 and cfg.check_world(4) == 2
    with pytest.raises(ConfigError, match=r"world size 3 is not divisible by parallel.tp\*parallel.pp=2\*1"):
        cfg.check_world(3)
    with pytest.raises(ConfigError, match="ppo.micro_batch_size=2 must divide the per-rank mini-batch"):
        cfg.check_world(16)  # dp 8: one sequence per rank per mini-batch
    cfg.rollout.batch_size = 12
    with pytest.raises(ConfigError, match="rollout.batch_size=12 must be divisible by data-parallel size 8"):
        cfg.check_world(16)
    train = StageTrainConfig(global_batch_size=8, micro_batch_size=4)
    train.check_world(2)
    with pytest.raises(ConfigError, match="train.micro_batch_size=4 must divide the per-rank batch"):
        train.check_world(4)


def test_stage_configs():
    cfg = load_config(SFTConfig, None, ["init=/ckpt", "data.train=/sft.jsonl", "train.steps=3"])
    assert (cfg.run_dir, cfg.train.steps, cfg.train.max_bad_steps) == ("runs/sft", 3, 3)
    assert "beta=0.0 must be > 0" in error_of(DPOConfig, "init=/ckpt", "data.train=/p.jsonl", "beta=0")
    assert "unknown config key 'train.stepz'" in error_of(SFTConfig, "init=/ckpt", "data.train=/x", "train.stepz=3")
    assert "data.too_long='cut'" in error_of(SFTConfig, "init=/ckpt", "data.train=/x", "data.too_long=cut")
    assert "train.max_bad_steps=0" in error_of(SFTConfig, "init=/ckpt", "data.train=/x", "train.max_bad_steps=0")


def test_config_imports_no_megatron():
    """config.py is read by the launcher before any worker starts: it must not pull in megatron."""
    code = ("import sys, gil_megatron.config as c; c.load_config(c.PPOConfig, None, %r); "
            "bad = sorted(m for m in sys.modules if m.startswith('megatron')); assert not bad, bad" % REQUIRED)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
