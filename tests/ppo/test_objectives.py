"""The objective registry and the two losses, without a trainer: every registered algorithm is
called through the shared signature; the KL coefficient is decided in one place; the policy loss
really uses the GIL weights and the in-loss KL; the critic's linearised group gradient equals
autograd of the whole-batch group objective, across mini-batches and data-parallel ranks."""

import pytest
import torch

from gil_megatron.algo import gil, ppo
from gil_megatron.algo.registry import ALGORITHMS, get_algorithm
from gil_megatron.config import ConfigError, PPOConfig, load_config
from gil_megatron.ppo import objectives
from gil_megatron.ppo.experience import make_experience

from objective_params import make_params
from test_experience import rollout_batch


def test_registry_lists_every_algorithm_and_rejects_unknown_names():
    assert {"ppo", "ppo_no_kl", "gil", "gil_v1", "gil_no_group_kl", "gil_no_invariance",
            "gil_shuffled_weights"} <= set(ALGORITHMS)
    with pytest.raises(ValueError, match="valid: ppo, ppo_no_kl, gil"):
        get_algorithm("gill")


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_every_algorithm_runs_through_the_shared_signature(name):
    algo = get_algorithm(name)
    cfg = load_config(PPOConfig, None, ["models.actor=x", "models.reward_model=y", "data.train_prompts=z",
                                        f"algo={name}", "rollout.n_samples_per_prompt=2"])
    params = objectives.ObjectiveParams.from_config(cfg)
    batch, _ = rollout_batch()
    batch["prompt_index"] = torch.arange(8) // 2
    exp = make_experience(batch, algo, params, eta=0.05, generator=torch.Generator().manual_seed(0))
    mb = {**batch, **exp}
    logprobs = batch["old_logprobs"].clone().requires_grad_(True)
    loss, metrics = objectives.actor_loss(mb, logprobs, torch.zeros_like(logprobs), params)
    loss.backward()
    assert torch.isfinite(loss) and logprobs.grad.abs().sum() > 0 and "policy/clipfrac" in metrics
    values = batch["values"].clone().requires_grad_(True)
    head = torch.softmax(batch["group_logits"], 1).requires_grad_(True)
    c_loss, c_metrics = objectives.critic_loss(mb, values, head if algo.group_inference else None, params)
    c_loss.backward()
    assert torch.isfinite(c_loss) and "value/loss" in c_metrics
    assert (head.grad is not None and head.grad.abs().sum() > 0) == algo.group_inference


def test_gil_v1_fixes_its_options_and_min_mass_follows_the_variance():
    base = ["models.actor=x", "models.reward_model=y", "data.train_prompts=z"]
    v1 = objectives.ObjectiveParams.from_config(load_config(PPOConfig, None, base + ["algo=gil_v1"])).gil
    assert (v1.variance, v1.group_level, v1.performance, v1.beta_policy, v1.weight_max, v1.group_mass_floor()) == \
        ("unweighted", "response", "whitened_score", 1.0, None, 0.1)
    v2 = objectives.ObjectiveParams.from_config(load_config(PPOConfig, None, base + ["algo=gil"])).gil
    assert (v2.variance, v2.group_level, v2.performance, v2.beta_policy, v2.group_mass_floor()) == \
        ("mass_weighted", "prompt", "prompt_value", 0.25, 0.0)
    unweighted = load_config(PPOConfig, None, base + ["gil.variance=unweighted"]).gil
    assert unweighted.group_mass_floor() == 0.1


def test_a_preset_is_never_overridden_silently():
    """A key the algorithm fixes, set by the user to another value, stops the config with one line
    naming the key, the algorithm and the value it requires; the same value is accepted."""
    base = ["models.actor=x", "models.reward_model=y", "data.train_prompts=z"]
    with pytest.raises(ConfigError, match=r"gil.beta_policy=0.3 conflicts with algo=gil_v1, which requires "
                                          r"gil.beta_policy=1.0"):
        load_config(PPOConfig, None, base + ["algo=gil_v1", "gil.beta_policy=0.3"])
    with pytest.raises(ConfigError, match="ppo.kl_in='reward' conflicts with algo=grpo, which requires ppo.kl_in='loss'"):
        load_config(PPOConfig, None, base + ["algo=grpo", "rollout.n_samples_per_prompt=2", "ppo.kl_in=reward"])
    cfg = load_config(PPOConfig, None, base + ["algo=grpo", "rollout.n_samples_per_prompt=2", "ppo.kl_in=loss"])
    assert (cfg.ppo.kl_in, cfg.ppo.whiten_advantages) == ("loss", False)


def _policy_mb(seed=0, B=6, T=5):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T)
    mask[0, 3:] = 0
    old = -torch.rand(B, T, generator=g)
    return {"old_logprobs": old, "ref_logprobs": old - 0.3, "advantages": torch.randn(B, T, generator=g),
            "action_mask": mask, "sample_weights": torch.ones(B), "kl_loss_coef": torch.zeros(B)}, g


def test_policy_loss_applies_the_sample_weights():
    mb, g = _policy_mb()
    params = make_params()
    logprobs = (mb["old_logprobs"] + 0.3 * torch.randn(6, 5, generator=g)).requires_grad_(True)
    w = torch.tensor([0.0, 2.0, 1.0, 0.5, 1.5, 1.0])
    weighted, _ = objectives.actor_loss({**mb, "sample_weights": w}, logprobs, None, params)
    per_token, _ = ppo.POLICY_LOSSES["ppo_clip"](logprobs, mb["old_logprobs"], mb["advantages"], mb["action_mask"],
                                                 clip_eps=0.2)
    expected = (w * ppo.per_sequence_mean(per_token, mb["action_mask"])).mean()
    assert torch.allclose(weighted, expected)
    (grad,) = torch.autograd.grad(weighted, logprobs)
    assert grad[0].abs().sum() == 0 and grad[1].abs().sum() > 0  # weight 0 removes a sequence


def test_in_loss_kl_uses_per_sample_coefficients_and_penalises():
    mb, g = _policy_mb(1)
    params = make_params(kl_in="loss", kl_estimator="k3")
    logprobs = mb["old_logprobs"].clone().requires_grad_(True)
    coef = torch.tensor([0.0, 0.1, 0.2, 0.0, 0.1, 0.3])
    with_kl, metrics = objectives.actor_loss({**mb, "kl_loss_coef": coef}, logprobs, None, params)
    without, _ = objectives.actor_loss(mb, logprobs, None, params)
    k3 = torch.exp(mb["ref_logprobs"] - logprobs) - 1 - (mb["ref_logprobs"] - logprobs)
    expected = (coef * ppo.per_sequence_mean(k3, mb["action_mask"])).mean()
    assert float(metrics["policy/kl_loss"]) > 0
    assert torch.allclose(with_kl - without, expected, atol=1e-6)


def test_linearised_group_gradient_equals_whole_batch_autograd_across_ranks_and_minibatches():
    """The critic sees the group objective only through sum_i c_i . q_i(phi) on its micro-batches,
    scaled by dp * n_minibatches, with DDP averaging over ranks. Averaged over the mini-batch steps
    (each an unbiased piece), the gradient equals autograd of L_group(q(phi)) on the whole batch."""
    N, M, D, dp, n_mini = 16, 2, 3, 2, 2
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, D, generator=g)
    phi = torch.randn(D, M, generator=g).requires_grad_(True)
    perf = gil.performance("whitened_score", scores=torch.randn(N, generator=g))
    params = make_params()

    def q_of(rows):
        return torch.softmax(x[rows] @ phi, dim=1)

    full_loss, _ = gil.group_inference_loss(q_of(torch.arange(N)), perf, params.gil.beta_critic)
    (full_grad,) = torch.autograd.grad(full_loss, phi)

    batch = {"group_logits": (x @ phi).detach(), "scores": perf, "raw_scores": perf,
             "old_logprobs": torch.zeros(N, 2), "ref_logprobs": torch.zeros(N, 2),
             "values": perf[:, None].repeat(1, 2), "action_mask": torch.ones(N, 2)}
    coeffs = make_experience(batch, get_algorithm("gil"),
                             make_params(performance="whitened_score"), eta=0.0)["group_coeffs"]
    order = torch.randperm(N, generator=g)
    steps = []
    for k in range(n_mini):
        mini = order[k * N // n_mini:(k + 1) * N // n_mini]
        per_rank = []
        for rank in range(dp):
            rows = mini[rank::dp]
            mb = {"values": torch.zeros(len(rows), 2), "returns": torch.zeros(len(rows), 2),
                  "action_mask": torch.ones(len(rows), 2), "group_coeffs": coeffs[rows]}
            loss, _ = objectives.critic_loss(mb, torch.zeros(len(rows), 2), q_of(rows), params,
                                             group_scale=dp * n_mini)
            per_rank.append(torch.autograd.grad(loss, phi)[0])
        steps.append(sum(per_rank) / dp)  # DDP's average over data-parallel ranks
    assert torch.allclose(sum(steps) / n_mini, full_grad, atol=1e-6)
    assert full_grad.abs().max() > 1e-3


def test_every_objective_parameter_is_read_from_its_config_key():
    """Each ppo.* / gil.* setting, set to a non-default value in the YAML/overrides, arrives in the
    params the objectives read (a setting silently left at its default would fail here)."""
    overrides = {
        "ppo.clip_eps": 0.3, "ppo.clip_ratio_c": 4.0, "ppo.value_clip": 0.3, "ppo.vf_coef": 0.7,
        "ppo.entropy_coef": 0.01, "ppo.loss_agg_mode": "token_mean", "ppo.gamma": 0.99, "ppo.lam": 0.9,
        "ppo.whiten_advantages": "false", "ppo.kl_estimator": "k3", "ppo.kl_in": "loss",
        "gil.num_groups": 3, "gil.group_level": "response", "gil.performance": "mc_return",
        "gil.variance": "unweighted", "gil.inference": "known", "gil.beta_policy": 0.5, "gil.beta_critic": 2.0,
        "gil.weight_min": 0.1, "gil.weight_max": 3.0, "gil.min_group_mass": 0.2, "gil.mass_penalty_coef": 2.0,
        "gil.entropy_coef": 0.1, "gil.group_kl_normalize": "true",
    }
    base = ["models.actor=x", "models.reward_model=y", "data.train_prompts=z", "algo=gil"]
    params = objectives.ObjectiveParams.from_config(
        load_config(PPOConfig, None, base + [f"{k}={v}" for k, v in overrides.items()]))
    default = make_params()

    def value(p, key):
        section, name = key.split(".")
        return getattr(getattr(p, section), name)

    unchanged = [key for key in overrides if value(params, key) == value(default, key)]
    assert unchanged == [], unchanged
    assert (params.gil.beta_policy, params.gil.group_level, params.ppo.clip_ratio_c) == (0.5, "response", 4.0)


def test_critic_loss_micro_batches_add_up_to_the_mini_batch_loss():
    """With the mini-batch normaliser, the critic's value loss over two micro-batches sums to the
    loss of the whole mini-batch (gradient accumulation)."""
    batch, _ = rollout_batch()
    exp = make_experience(batch, get_algorithm("ppo"), make_params(), eta=0.05)
    mb = {**batch, **exp}
    params = make_params(value_clip=None)
    values = batch["values"] + 0.3 * torch.randn(8, batch["values"].shape[1], generator=torch.Generator().manual_seed(1))
    whole, _ = objectives.critic_loss(mb, values, None, params)
    normalizer = batch["action_mask"].sum()
    parts = [objectives.critic_loss({k: v[sl] for k, v in mb.items()}, values[sl], None, params, normalizer)[0]
             for sl in (slice(0, 3), slice(3, 8))]
    assert torch.allclose(sum(parts), whole, atol=1e-6)
    assert not torch.allclose(parts[0], objectives.critic_loss({k: v[:3] for k, v in mb.items()}, values[:3],
                                                               None, params)[0])


def test_task_value_term_fits_task_returns_and_splits_over_micro_batches():
    """The critic's task value regresses experience's task_returns (the task reward alone): its
    gradient points at them, and with the sequence normaliser two micro-batches add up to the
    mini-batch's loss."""
    batch, _ = rollout_batch()
    exp = make_experience(batch, get_algorithm("gil"), make_params(), eta=0.05)
    mb = {**batch, **exp}
    params = make_params(value_clip=None, vf_coef=0.5)
    task = torch.zeros(8, requires_grad=True)
    without, _ = objectives.critic_loss(mb, batch["values"], None, params)
    with_task, metrics = objectives.critic_loss(mb, batch["values"], None, params, task_values=task)
    expected = 0.5 * 0.5 * (exp["task_returns"]).square().mean()
    assert torch.allclose(with_task - without, expected, atol=1e-6)
    assert torch.allclose(metrics["value/task_loss"], 0.5 * exp["task_returns"].square().mean(), atol=1e-6)
    (grad,) = torch.autograd.grad(with_task, task)
    assert torch.allclose(grad, -0.5 * exp["task_returns"] / 8, atol=1e-6)  # descent moves V_task toward R_task
    n_seq = torch.tensor(8.0)
    parts = [objectives.critic_loss({k: v[sl] for k, v in mb.items() if v.dim()}, batch["values"][sl], None, params,
                                    batch["action_mask"].sum(), task_values=task[sl], sequence_normalizer=n_seq)[1]
             ["value/task_loss"] for sl in (slice(0, 3), slice(3, 8))]
    assert torch.allclose(sum(parts), metrics["value/task_loss"], atol=1e-6)
