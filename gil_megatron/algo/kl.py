"""KL estimators between the policy and the reference, per token.

With log-ratio ``d = logprobs - ref_logprobs`` for tokens sampled from the policy
(Schulman, "Approximating KL divergence", 2020):

    k1 = d                       unbiased, high variance, can be negative
    k2 = d**2 / 2                biased, low variance, >= 0
    k3 = exp(-d) - 1 + d         unbiased, low variance, >= 0

This is the single definition of the estimators: the fused kernel (csrc/) implements the same
formulas and is tested against these functions.
"""

from typing import Callable, Dict

import torch

KL_ESTIMATORS: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}


def register_kl_estimator(name: str):
    def wrap(fn):
        KL_ESTIMATORS[name] = fn
        return fn

    return wrap


@register_kl_estimator("k1")
def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return logprobs - ref_logprobs


@register_kl_estimator("k2")
def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logprobs - ref_logprobs).square()


@register_kl_estimator("k3")
def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


def get_kl_estimator(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {name!r}; valid: {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[name]


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate, same shape as the inputs ([B, T] or any)."""
    return get_kl_estimator(estimator)(logprobs, ref_logprobs)
