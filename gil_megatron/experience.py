"""From a scored rollout batch to training targets: DESIGN.md section 3, steps 3-4, in order.

Pure tensor code over the WHOLE rollout batch (the trainer all-gathers the per-sample tensors of
every data-parallel rank first), so the GIL statistics (group means over the batch, whitening,
g_high) are exactly those of the single-rank algorithm. Per-action tensors are [N, T].
"""

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from gil_megatron.algo import gil, ppo
from gil_megatron.algo.kl import kl_per_token
from gil_megatron.config import GILSettings, PPOSettings


@dataclass
class AlgoSwitches:
    """What each ``algo`` name turns on (the paper's baselines and ablations)."""

    kl_penalty: bool        # a KL term at all (off: ppo_no_kl)
    group_inference: bool   # train the group head on the critic (R_var ascent)
    adaptive_kl: bool       # per-sample KL coefficient eta * p_high
    invariance: bool        # the group-invariant policy term

    @classmethod
    def of(cls, algo: str) -> "AlgoSwitches":
        table = {
            "ppo": cls(True, False, False, False),
            "ppo_no_kl": cls(False, False, False, False),
            "gil": cls(True, True, True, True),
            "gil_no_adaptive_kl": cls(True, True, False, True),
            "gil_no_invariance": cls(True, True, True, False),
        }
        if algo not in table:
            raise ValueError(f"unknown algo {algo!r}; valid: {sorted(table)}")
        return table[algo]


def make_experience(
    *,
    scores: torch.Tensor,          # [N] reward (after normalisation / clipping)
    raw_scores: torch.Tensor,      # [N] reward-model score before normalisation (for G_i)
    old_logprobs: torch.Tensor,    # [N, T]
    ref_logprobs: torch.Tensor,    # [N, T]
    values: torch.Tensor,          # [N, T] critic values at action positions
    action_mask: torch.Tensor,     # [N, T] 1 on response actions
    group_logits: Optional[torch.Tensor],  # [N, M] critic group head at the last token
    switches: AlgoSwitches,
    ppo_cfg: PPOSettings,
    gil_cfg: GILSettings,
    kl_coef: float,                # eta: current value of the (fixed or adaptive) KL controller
) -> Dict[str, torch.Tensor]:
    mask = action_mask.float()
    # per-token KL_t between the rollout policy and the reference
    kl = kl_per_token(old_logprobs, ref_logprobs, ppo_cfg.kl_estimator) * mask

    # GIL bookkeeping: G_i, soft group means R_g, g_high, p_high,i
    n = scores.shape[0]
    group_probs = perf = None
    p_high = torch.ones(n)
    if switches.group_inference:
        group_probs = torch.softmax(group_logits.float(), dim=-1)
        if gil_cfg.performance == "mc_return":
            task_rewards = ppo.compute_token_rewards(raw_scores, kl, 0.0, mask)
            _, mc_returns = ppo.compute_gae(task_rewards, torch.zeros_like(task_rewards), mask, ppo_cfg.gamma, 1.0)
            perf = gil.performance(returns=mc_returns, response_mask=mask, mode="mc_return")
        else:
            perf = gil.performance(raw_scores, mode="whitened_score")
        means = gil.group_means(group_probs, perf)
        p_high = gil.p_high(group_probs, gil.high_group(means))

    # per-token rewards with the (adaptive) KL penalty; GAE advantages and returns
    if not switches.kl_penalty or ppo_cfg.kl_in == "loss":
        coef = torch.zeros(n)
    elif switches.adaptive_kl:
        coef = gil.adaptive_kl_coef(kl_coef, p_high)
    else:
        coef = torch.full((n,), kl_coef)
    rewards = ppo.compute_token_rewards(scores, kl, coef, mask)
    advantages, returns = ppo.compute_gae(rewards, values, mask, ppo_cfg.gamma, ppo_cfg.lam)
    if ppo_cfg.whiten_advantages:
        advantages = ppo.masked_whiten(advantages, mask)

    out = {
        "kl": kl, "rewards": rewards, "advantages": advantages, "returns": returns,
        "kl_coef": coef, "p_high": p_high,
        "sample_weights": torch.ones(n),
    }
    if switches.group_inference:
        out["group_probs"] = group_probs
        out["perf"] = perf
        if switches.invariance:
            out["sample_weights"] = gil.group_invariant_weights(group_probs, perf, gil_cfg.beta_policy)
        out["group_coeffs"] = group_objective_coefficients(group_probs, perf, gil_cfg)
    return out


def group_objective_coefficients(group_probs: torch.Tensor, perf: torch.Tensor, gil_cfg: GILSettings) -> torch.Tensor:
    """c = d L_group / d q [N, M] at the rollout-time assignments.

    The group objective (-beta_critic * R_var plus the collapse guards) is a function of the whole
    batch's q, so it does not split into micro-batch losses. Its gradient does: each micro-batch
    adds sum_i c_i . q_i(phi), whose gradient w.r.t. phi is exactly that of L_group at the rollout
    assignments (first order, like every other PPO target computed at rollout time)."""
    q = group_probs.detach().clone().requires_grad_(True)
    loss, _ = gil.group_inference_loss(
        q, perf, gil_cfg.beta_critic, min_group_mass=gil_cfg.min_group_mass,
        mass_penalty_coef=gil_cfg.mass_penalty_coef, entropy_coef=gil_cfg.entropy_coef,
    )
    (coeffs,) = torch.autograd.grad(loss, q)
    return coeffs.detach()
