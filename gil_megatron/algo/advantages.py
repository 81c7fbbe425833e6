"""Advantage estimators, registered by name, with one signature (the way veRL registers them):

    estimator(token_rewards, values, response_mask, prompt_index, gamma, lam) -> (advantages, returns)

token_rewards, values, response_mask [B, T]: per-token rewards (the score at the last response
token, minus any in-reward KL penalty), critic values (ignored by the critic-free estimators);
prompt_index [B] long: rows with the same index are n samples of one prompt
(rollout.n_samples_per_prompt). Outputs [B, T], 0 off the mask, detached.

    gae            Schulman et al. 2016 (arXiv 1506.02438); needs a critic
    grpo           Shao et al. 2024 (DeepSeekMath, arXiv 2402.03300): A_i = (R_i - mean_grp R) / (std_grp R + eps)
    rloo           Ahmadian et al. 2024 (arXiv 2402.14740): A_i = R_i - mean_{j != i in grp} R_j
    reinforce_pp   Hu 2025 (REINFORCE++, arXiv 2501.03262): discounted token returns (per-token
                   KL in the reward), whitened over the whole batch

R_i = sum_t token_rewards[i, t]: the sequence's return (score minus in-reward KL penalty).
"""

from typing import Callable, Dict, Tuple

import torch

from gil_megatron.algo.ppo import apply_mask, compute_gae, masked_whiten

Estimator = Callable[..., Tuple[torch.Tensor, torch.Tensor]]
ADVANTAGE_ESTIMATORS: Dict[str, Estimator] = {}


def register_advantage_estimator(name: str):
    def wrap(fn: Estimator) -> Estimator:
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return wrap


def get_advantage_estimator(name: str) -> Estimator:
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; valid: {', '.join(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name]


def group_mean_std(x: torch.Tensor, index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (mean, unbiased std, count) of x [B] over the rows sharing its index [B]."""
    _, inverse = torch.unique(index, return_inverse=True)
    k = int(inverse.max()) + 1 if inverse.numel() else 0
    count = torch.zeros(k, dtype=x.dtype).index_add_(0, inverse, torch.ones_like(x))
    total = torch.zeros(k, dtype=x.dtype).index_add_(0, inverse, x)
    mean = total / count
    sq = torch.zeros(k, dtype=x.dtype).index_add_(0, inverse, (x - mean[inverse]).square())
    std = (sq / (count - 1).clamp_min(1)).sqrt()
    return mean[inverse], std[inverse], count[inverse]


def _broadcast(per_seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return apply_mask(per_seq[:, None].expand_as(mask).to(mask.dtype), mask)


@register_advantage_estimator("gae")
def gae(token_rewards, values, response_mask, prompt_index, gamma, lam):
    return compute_gae(token_rewards, values, response_mask, gamma, lam)


@register_advantage_estimator("grpo")
def grpo(token_rewards, values, response_mask, prompt_index, gamma, lam, eps: float = 1e-6):
    """Group-normalised outcome advantage, the same for every token of a response."""
    mask = response_mask.to(token_rewards.dtype)
    ret = (token_rewards * mask).sum(-1).detach()
    mean, std, _ = group_mean_std(ret, prompt_index)
    adv = _broadcast((ret - mean) / (std + eps), mask)
    return adv, adv


@register_advantage_estimator("rloo")
def rloo(token_rewards, values, response_mask, prompt_index, gamma, lam):
    """Leave-one-out baseline: A_i = R_i - mean of the other samples of its prompt
    = n / (n - 1) * (R_i - mean_grp R). A prompt with one sample gets A = 0."""
    mask = response_mask.to(token_rewards.dtype)
    ret = (token_rewards * mask).sum(-1).detach()
    mean, _, n = group_mean_std(ret, prompt_index)
    adv = torch.where(n > 1, (ret - mean) * n / (n - 1).clamp_min(1), torch.zeros_like(ret))
    adv = _broadcast(adv, mask)
    return adv, adv


@register_advantage_estimator("reinforce_pp")
def reinforce_pp(token_rewards, values, response_mask, prompt_index, gamma, lam):
    """Discounted return-to-go of the per-token rewards (G_t = r_t + gamma G_{t+1}), no critic;
    the advantages are those returns whitened over the whole batch's response tokens."""
    _, returns = compute_gae(token_rewards, torch.zeros_like(token_rewards), response_mask, gamma, 1.0)
    return masked_whiten(returns, response_mask), returns
