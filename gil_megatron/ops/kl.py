"""Masked KL between the policy's and the reference's log-probs of the sampled tokens, per token,
reduced: the loop's per-token KL (ppo/experience.py) and the in-loss KL term (ppo/objectives.py).

The estimators are those of gil_megatron/algo/kl.py (the single definition); the csrc kernel
(torch.ops.gil_megatron.masked_kl, with its backward) implements the same formulas and
``reference_masked_kl`` beside it is what the tests compare against.
"""

from typing import Callable, Dict

import torch
from torch.autograd.function import once_differentiable

from gil_megatron.algo.kl import get_kl_estimator, kl_per_token
from gil_megatron.ops.extension import HAVE_KERNEL, backend_for

__all__ = ["KL_REDUCTIONS", "masked_kl", "reduce_masked", "reference_masked_kl"]


def _reduce_none(values, mask):
    return values


def _reduce_sum(values, mask):
    return values.sum()


def _safe_count(count: torch.Tensor) -> torch.Tensor:
    """A denominator that is never 0: where the count is 0 the numerator is 0 too, so x / it = 0."""
    return count.clamp_min(torch.finfo(count.dtype).tiny)


def _reduce_mean(values, mask):
    """Sum over all unmasked tokens / number of unmasked tokens (0 if none)."""
    return values.sum() / _safe_count(mask.sum())


def _reduce_seq_mean_token_mean(values, mask):
    """Mean over tokens within each sequence (last dim), then over the sequences that have any."""
    tokens = mask.sum(dim=-1)  # [...]
    per_seq = values.sum(dim=-1) / _safe_count(tokens)
    has_tokens = (tokens > 0).to(values.dtype)
    return (per_seq * has_tokens).sum() / _safe_count(has_tokens.sum())


KL_REDUCTIONS: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "none": _reduce_none,
    "sum": _reduce_sum,
    "mean": _reduce_mean,
    "seq_mean_token_mean": _reduce_seq_mean_token_mean,
}


def reduce_masked(values: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce already-masked per-token ``values`` [..., T] with weights ``mask`` [..., T]."""
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {sorted(KL_REDUCTIONS)}")
    return KL_REDUCTIONS[reduction](values, mask.to(values.dtype))


def _check_kl_inputs(logprobs, ref_logprobs, mask, estimator, reduction) -> None:
    get_kl_estimator(estimator)  # raises ValueError listing the valid names
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {sorted(KL_REDUCTIONS)}")
    if ref_logprobs.shape != logprobs.shape or mask.shape != logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, ref_logprobs {tuple(ref_logprobs.shape)} and mask "
            f"{tuple(mask.shape)} must have the same shape [..., T]"
        )
    if reduction == "seq_mean_token_mean" and logprobs.dim() == 0:
        raise ValueError("seq_mean_token_mean needs at least one (token) dim")


def _kl_dtype(logprobs: torch.Tensor) -> torch.dtype:
    return torch.float64 if logprobs.dtype == torch.float64 else torch.float32


def reference_masked_kl(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, estimator: str = "k1",
    reduction: str = "none",
) -> torch.Tensor:
    """Pure-torch masked KL from gil_megatron.algo.kl.kl_per_token. Masked tokens give exactly 0 and
    no gradient, whatever their log-probs hold (the estimator sees 0 vs 0 there)."""
    _check_kl_inputs(logprobs, ref_logprobs, mask, estimator, reduction)
    dtype = _kl_dtype(logprobs)
    mask = mask.to(dtype)
    keep = mask != 0
    logprobs = torch.where(keep, logprobs.to(dtype), torch.zeros((), dtype=dtype, device=mask.device))
    ref_logprobs = torch.where(keep, ref_logprobs.to(dtype), torch.zeros((), dtype=dtype, device=mask.device))
    per_token = kl_per_token(logprobs, ref_logprobs, estimator) * mask
    return reduce_masked(per_token, mask, reduction)


class _MaskedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logprobs, ref_logprobs, mask, estimator):
        ctx.save_for_backward(logprobs, ref_logprobs, mask)
        ctx.estimator = estimator
        return torch.ops.gil_megatron.masked_kl(logprobs, ref_logprobs, mask, estimator)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        logprobs, ref_logprobs, mask = ctx.saved_tensors
        grad_lp = torch.ops.gil_megatron.masked_kl_backward(
            grad.contiguous(), logprobs, ref_logprobs, mask, ctx.estimator
        )
        grad_ref = -grad_lp if ctx.needs_input_grad[1] else None  # every estimator is f(lp - ref)
        return grad_lp, grad_ref, None, None


def masked_kl(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    estimator: str = "k1",
    reduction: str = "none",
) -> torch.Tensor:
    """KL estimate between policy and reference per token, masked and reduced.

    Args:
        logprobs, ref_logprobs: [..., T] log-probs of the sampled tokens (policy, reference).
        mask: [..., T] response mask (bool, int or float weights); masked tokens contribute 0.
        estimator: "k1" | "k2" | "k3" (gil_megatron.algo.kl).
        reduction: "none" -> kl * mask [..., T]; "sum"; "mean" (over unmasked tokens);
            "seq_mean_token_mean" (mean over tokens within a sequence, then over non-empty sequences;
            0 if all are empty).
    Differentiable w.r.t. logprobs (and ref_logprobs).
    """
    _check_kl_inputs(logprobs, ref_logprobs, mask, estimator, reduction)
    if backend_for(logprobs.device) == "reference":
        return reference_masked_kl(logprobs, ref_logprobs, mask, estimator, reduction)
    dtype = _kl_dtype(logprobs)
    mask = mask.to(dtype)
    per_token = _MaskedKL.apply(logprobs.to(dtype), ref_logprobs.to(dtype), mask, estimator)
    return reduce_masked(per_token, mask, reduction)


# torch.compile / meta-tensor support: shapes of the kernel outputs.
if HAVE_KERNEL:

    @torch.library.register_fake("gil_megatron::masked_kl")
    def _(logprobs, ref_logprobs, mask, estimator):
        return torch.empty_like(logprobs)

    @torch.library.register_fake("gil_megatron::masked_kl_backward")
    def _(grad, logprobs, ref_logprobs, mask, estimator):
        return torch.empty_like(logprobs)
