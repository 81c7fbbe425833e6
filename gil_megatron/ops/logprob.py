"""Log-probs of sampled tokens, entropy and masked KL from vocab-parallel logits.

PPO needs, several times per iteration, ``logprobs[t] = log softmax(z_t)[target_t]`` for logits
``z`` [tokens, vocab] (and the policy entropy, and a KL to the reference policy). Done naively
(``log_softmax`` + ``gather``) that materialises a [tokens, vocab] fp32 tensor, and under tensor
parallelism (TP) it needs the whole vocabulary on one rank. Here each TP rank reads its vocab shard
once and produces four per-token scalars; only those cross the TP group:

    per rank r (math, csrc/logprob or ``reference_logprob_partials``), over its shard j in V_r:
        m_r = max_j z_j      s_r = sum_j exp(z_j - m_r)      w_r = sum_j exp(z_j - m_r) (z_j - m_r)
        t_r = z_target if the target id falls in the shard, else 0
    across ranks (``_all_reduce_partials``, the only place with collectives):
        M = all_reduce_max(m_r)
        S, W, T = all_reduce_sum(s_r e^(m_r - M),  e^(m_r - M) (w_r + (m_r - M) s_r),  t_r)
    finalise (``finalize_logprobs``):
        logprob = (T - M) - log S      entropy = log S - W / S   (= -sum_j p_j log p_j)
    (M and log S are kept apart rather than summed into lse = M + log S: with huge logits the sum
    would round away the precision that log p_j = (z_j - M) - log S keeps.)

The backward needs no communication: with the global M and log S saved, each rank writes its slice
    d logprob / d z_j = 1[j = target] - p_j          d entropy / d z_j = -p_j (log p_j + entropy)
in one pass over its logits (megatron-core's tensor_parallel/cross_entropy.py has the same split:
math without collectives, a thin wrapper that all-reduces).

Three implementations answer the same API; ``kernel_backend(device)`` says which one runs:
    "cpu"        C++ kernel (OpenMP over rows, vectorised online softmax), csrc/logprob/logprob_cpu.cpp
    "cuda"       CUDA kernel (a row per block or per warp), csrc/logprob/logprob_cuda.cu
    "reference"  the readable pure-torch code in this file (materialises a [tokens, vocab_local]
                 fp32 temporary); used when gil_megatron._C is not built, with one warning.
                 GIL_MEGATRON_REQUIRE_KERNEL=1 turns that fallback into an error (CI sets it).
The dispatcher picks the CPU or CUDA kernel from the tensors' device: no device branches here.

Evaluation needs more than the sampled tokens: the exact KL between two whole next-token
distributions. ``vocab_parallel_log_softmax`` gives the log-softmax of a shard from the same
partials (max and sum-exp, all-reduced the same way) and ``vocab_parallel_kl`` sums
p (log p - log p_ref) over the vocabulary; both materialise the shard in fp32 (readable torch).

KL estimators are the ones of gil_megatron/algo/kl.py (the single definition); the kernels implement
the same formulas and the tests compare them.
"""

import os
import warnings
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from gil_megatron import collectives
from gil_megatron.algo.kl import get_kl_estimator, kl_per_token

try:  # loading the library registers torch.ops.gil_megatron.*
    from gil_megatron import _C  # noqa: F401

    HAVE_KERNEL = True
    _KERNEL_IMPORT_ERROR: Optional[BaseException] = None
except ImportError as _err:  # not built
    HAVE_KERNEL = False
    _KERNEL_IMPORT_ERROR = _err

REQUIRE_KERNEL_ENV = "GIL_MEGATRON_REQUIRE_KERNEL"
BUILD_COMMAND = "pip install -e . --no-build-isolation"
LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_warned_fallback = False

__all__ = [
    "HAVE_KERNEL",
    "KL_REDUCTIONS",
    "LogprobPartials",
    "finalize_logprobs",
    "kernel_backend",
    "masked_kl",
    "reduce_masked",
    "reference_logprob_partials",
    "reference_masked_kl",
    "reference_vocab_parallel_logprobs",
    "rescale_partials",
    "vocab_parallel_kl",
    "vocab_parallel_log_softmax",
    "vocab_parallel_logprobs",
]


# ---------------------------------------------------------------------------------------------------
# Backend choice


_BACKEND_CACHE: Dict[Tuple[bool, str], str] = {}


def kernel_backend(device) -> str:
    """Which implementation runs for tensors on ``device``: "cuda", "cpu" or "reference"."""
    device_type = torch.device(device).type
    key = (HAVE_KERNEL, device_type)
    if key not in _BACKEND_CACHE:  # asked on every call: keep the dispatcher lookup out of the hot path
        has = HAVE_KERNEL and device_type in ("cpu", "cuda") and torch._C._dispatch_has_kernel_for_dispatch_key(
            "gil_megatron::logprob_partials", "CUDA" if device_type == "cuda" else "CPU"
        )
        _BACKEND_CACHE[key] = device_type if has else "reference"
    return _BACKEND_CACHE[key]


def _why_no_kernel(device: torch.device) -> str:
    if not HAVE_KERNEL:
        return f"the compiled extension gil_megatron._C could not be imported ({_KERNEL_IMPORT_ERROR})"
    return f"gil_megatron._C was built without kernels for {device.type} tensors"


def _backend_for(device: torch.device) -> str:
    """kernel_backend(), plus the one-time warning (or the error under GIL_MEGATRON_REQUIRE_KERNEL=1)."""
    global _warned_fallback
    backend = kernel_backend(device)
    if backend != "reference":
        return backend
    why = _why_no_kernel(device)
    if os.environ.get(REQUIRE_KERNEL_ENV, "0") == "1":
        raise RuntimeError(
            f"{REQUIRE_KERNEL_ENV}=1 but {why}. Build it from the repository root with `{BUILD_COMMAND}`"
            " (with nvcc on PATH / CUDA_HOME set for the CUDA kernels)."
        )
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"gil_megatron: {why}; falling back to the pure-torch reference for log-probs and KL "
            f"(slower, materialises [tokens, vocab] fp32). Build the kernels with `{BUILD_COMMAND}`.",
            RuntimeWarning,
            stacklevel=3,
        )
    return backend


# ---------------------------------------------------------------------------------------------------
# Input checks


def _check_logprob_inputs(logits: torch.Tensor, targets: torch.Tensor, dtypes) -> None:
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError(f"logits and targets must be tensors, got {type(logits)} and {type(targets)}")
    if logits.dim() < 1 or logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)}: logits must be "
            "[..., vocab_local] and targets [...] (the logits' shape without the vocab dim)"
        )
    if logits.shape[-1] == 0:
        raise ValueError(f"logits {tuple(logits.shape)} have an empty vocab dim")
    if logits.dtype not in dtypes:
        hint = " (for float64, e.g. gradcheck, use reference_vocab_parallel_logprobs)" * (
            logits.dtype == torch.float64
        )
        raise TypeError(f"logits must be one of {[str(d) for d in dtypes]}, got {logits.dtype}{hint}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be integer token ids (torch.long), got {targets.dtype}")
    if targets.device != logits.device:
        raise ValueError(f"targets are on {targets.device} but logits on {logits.device}")


def _check_target_range(targets: torch.Tensor, vocab_size: int) -> None:
    """Targets must be global ids in [0, vocab_size). Asynchronous on GPU (no host sync)."""
    if targets.numel() == 0:
        return
    ok = ((targets >= 0) & (targets < vocab_size)).all()
    torch._assert_async(ok, f"targets must be token ids in [0, {vocab_size}) (the global vocab size)")


def _tp_rank_and_size(tp_group) -> Tuple[int, int]:
    if tp_group is None:
        return 0, 1
    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


# ---------------------------------------------------------------------------------------------------
# Math on one rank's shard (no collectives). The kernels compute exactly these quantities.


class LogprobPartials(NamedTuple):
    """Per-token scalars of one vocab shard, all [N] fp32 (fp64 for fp64 reference inputs)."""

    max: torch.Tensor  # m = max_j z_j  (-inf if the whole shard is -inf)
    sumexp: torch.Tensor  # s = sum_j exp(z_j - m)
    target_logit: torch.Tensor  # z_target if the target is in this shard, else 0
    entropy: Optional[torch.Tensor]  # w = sum_j exp(z_j - m) (z_j - m); None unless requested


def reference_logprob_partials(
    logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, compute_entropy: bool
) -> LogprobPartials:
    """Pure-torch partials of a shard. logits [N, V_local], targets [N] global ids (long).

    Differentiable w.r.t. logits (the max is detached: the finalised values do not depend on it).
    """
    z = logits if logits.dtype == torch.float64 else logits.float()  # [N, V]
    V = z.shape[-1]
    m = z.max(dim=-1).values.detach()  # [N]
    m_safe = torch.where(m == float("-inf"), torch.zeros_like(m), m)  # all -inf row: no mass
    shifted = z - m_safe.unsqueeze(-1)  # [N, V], <= 0
    e = shifted.exp()  # -inf -> 0
    s = e.sum(dim=-1)
    local = targets - vocab_start
    in_shard = (local >= 0) & (local < V)
    picked = z.gather(-1, local.clamp(0, V - 1).unsqueeze(-1)).squeeze(-1)
    t = torch.where(in_shard, picked, torch.zeros_like(picked))
    w = None
    if compute_entropy:
        w = (e * shifted.masked_fill(z == float("-inf"), 0.0)).sum(dim=-1)
    return LogprobPartials(m, s, t, w)


def rescale_partials(
    partials: LogprobPartials, global_max: torch.Tensor
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Re-express a shard's sum-exp and entropy partial relative to the global max M.

    s' = s e^(m - M),  w' = e^(m - M) (w + (m - M) s); a shard that is all -inf contributes 0.
    """
    has_mass = partials.max != float("-inf")
    delta = torch.where(has_mass, partials.max - global_max, torch.zeros_like(global_max))
    scale = torch.where(has_mass, delta.exp(), torch.zeros_like(delta))
    sumexp = partials.sumexp * scale
    entropy = None
    if partials.entropy is not None:
        entropy = scale * (partials.entropy + delta * partials.sumexp)
    return sumexp, entropy


def finalize_logprobs(
    global_max: torch.Tensor,
    sumexp: torch.Tensor,
    target_logit: torch.Tensor,
    entropy_partial: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(logprobs, log S, entropy) from globally reduced partials: logprob = (T - M) - log S,
    entropy = log S - W / S. (log Z = M + log S.)"""
    log_s = sumexp.log()
    logprobs = (target_logit - global_max) - log_s
    entropy = None if entropy_partial is None else log_s - entropy_partial / sumexp
    return logprobs, log_s, entropy


# ---------------------------------------------------------------------------------------------------
# The collectives (thin wrapper)


class _AllReduceSumIdentityGrad(torch.autograd.Function):
    """Sum over the TP group; the backward is the identity, as in megatron's
    reduce_from_tensor_model_parallel_region: every rank holds the same reduced value and the same
    gradient of it, which is its local contribution's gradient."""

    @staticmethod
    def forward(ctx, x, group):
        return collectives.all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _all_reduce_partials(partials: LogprobPartials, tp_group):
    """(M, S, T, W) over the TP group: a MAX all-reduce of [N], then one SUM all-reduce of [2 or 3, N]."""
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return partials.max, partials.sumexp, partials.target_logit, partials.entropy
    global_max = collectives.all_reduce(partials.max.clone(), tp_group, op=dist.ReduceOp.MAX)
    sumexp, entropy = rescale_partials(partials, global_max)
    rows = [sumexp, partials.target_logit] + ([entropy] if entropy is not None else [])
    reduced = _AllReduceSumIdentityGrad.apply(torch.stack(rows), tp_group)  # [2 or 3, N]
    return global_max, reduced[0], reduced[1], (reduced[2] if entropy is not None else None)


# ---------------------------------------------------------------------------------------------------
# Reference (pure torch, autograd does the backward; float64-gradcheckable)


def reference_vocab_parallel_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    tp_group: Optional[dist.ProcessGroup] = None,
    compute_entropy: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Same API as ``vocab_parallel_logprobs``, in readable torch (accepts float64 too)."""
    _check_logprob_inputs(logits, targets, LOGITS_DTYPES + (torch.float64,))
    rank, size = _tp_rank_and_size(tp_group)
    V = logits.shape[-1]
    _check_target_range(targets, V * size)
    partials = reference_logprob_partials(
        logits.reshape(-1, V), targets.reshape(-1).long(), rank * V, compute_entropy
    )
    global_max, sumexp, target_logit, entropy_partial = _all_reduce_partials(partials, tp_group)
    logprobs, _, entropy = finalize_logprobs(global_max, sumexp, target_logit, entropy_partial)
    return logprobs.view(targets.shape), (None if entropy is None else entropy.view(targets.shape))


# ---------------------------------------------------------------------------------------------------
# Whole distributions (evaluation): log-softmax of a shard and the exact KL between two


def vocab_parallel_log_softmax(logits: torch.Tensor, tp_group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """log softmax over the FULL vocabulary of this rank's shard: [..., V_local] -> [..., V_local],
    fp32 (fp64 for fp64 input). Under TP only the per-token max and sum-exp cross ranks (the
    partials above). Padded vocabulary entries (-inf) get -inf; a shard of padding only is fine."""
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits {tuple(logits.shape)} must be [..., vocab_local] with a non-empty vocab dim")
    rows = logits.reshape(-1, logits.shape[-1])
    rows = rows if rows.dtype == torch.float64 else rows.float()  # [N, V_local]
    no_targets = torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device)
    partials = reference_logprob_partials(rows, no_targets, 0, compute_entropy=False)
    global_max, sumexp, _, _ = _all_reduce_partials(partials, tp_group)
    return (rows - global_max.unsqueeze(-1) - sumexp.log().unsqueeze(-1)).view(logits.shape)


def vocab_parallel_kl(logits: torch.Tensor, ref_logits: torch.Tensor,
                      tp_group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Exact KL(p || p_ref) = sum_v p(v) (log p(v) - log p_ref(v)) at every position, from two
    vocab shards [..., V_local] -> [...] fp32 (not a sampled estimate: meaningful for greedy
    responses too). Entries where p is 0 (padded vocabulary) add 0."""
    if logits.shape != ref_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} must have the same shape")
    logp = vocab_parallel_log_softmax(logits, tp_group)
    logr = vocab_parallel_log_softmax(ref_logits, tp_group)
    p = logp.exp()
    local = torch.where(p > 0, p * (logp - logr), torch.zeros_like(p)).sum(dim=-1)  # this shard's terms
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return local
    return _AllReduceSumIdentityGrad.apply(local, tp_group)


# ---------------------------------------------------------------------------------------------------
# Kernel path


def _rows(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [N, V] with a unit vocab stride (a view for the usual contiguous logits)."""
    rows = logits.reshape(-1, logits.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] == 1 else rows.contiguous()


class _FusedLogprobs(torch.autograd.Function):
    """Forward: one pass of the kernel over the shard + scalar all-reduces. Backward: one pass of the
    kernel writing grad-logits from the saved global max and log-sum-exp (and entropy); no
    communication."""

    @staticmethod
    def forward(ctx, logits, targets, tp_group, compute_entropy):
        rank, size = _tp_rank_and_size(tp_group)
        V = logits.shape[-1]
        logits_2d = _rows(logits)  # [N, V_local]
        targets_1d = targets.reshape(-1)  # [N]
        m, s, t, w = torch.ops.gil_megatron.logprob_partials(  # also checks 0 <= targets < V * tp
            logits_2d, targets_1d, rank * V, V * size, compute_entropy
        )
        partials = LogprobPartials(m, s, t, w if compute_entropy else None)
        global_max, sumexp, target_logit, entropy_partial = _all_reduce_partials(partials, tp_group)
        logprobs, log_s, entropy = finalize_logprobs(global_max, sumexp, target_logit, entropy_partial)
        ctx.save_for_backward(logits, targets, global_max, log_s, entropy)
        ctx.vocab_start = rank * V
        ctx.set_materialize_grads(False)
        return logprobs.view(targets.shape), (None if entropy is None else entropy.view(targets.shape))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, targets, global_max, log_s, entropy = ctx.saved_tensors
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(log_s)
        grad_logprobs = grad_logprobs.reshape(-1).float().contiguous()
        if grad_entropy is None or entropy is None:
            entropy = grad_entropy = None
        else:
            grad_entropy = grad_entropy.reshape(-1).float().contiguous()
        grad_logits = torch.ops.gil_megatron.logprob_backward(
            _rows(logits),
            targets.reshape(-1),
            ctx.vocab_start,
            global_max,
            log_s,
            grad_logprobs,
            entropy,
            grad_entropy,
        )
        return grad_logits.view(logits.shape), None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    tp_group: Optional[dist.ProcessGroup] = None,
    compute_entropy: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-probs of ``targets`` (and optionally the entropy) under vocab-parallel ``logits``.

    Args:
        logits: this rank's vocab shard [..., V_local] in fp32, bf16 or fp16. Rank r of ``tp_group``
            holds global ids [r * V_local, (r + 1) * V_local) (megatron's VocabUtility convention).
        targets: global token ids [...] (integer).
        tp_group: the tensor-parallel group; None (or a group of size 1) means the whole vocab is local.
        compute_entropy: also return the entropy of softmax(logits) per token.

    Returns:
        (logprobs [...], entropy [...] or None), fp32, differentiable w.r.t. logits only.
    """
    _check_logprob_inputs(logits, targets, LOGITS_DTYPES)
    targets = targets.long()
    backend = _backend_for(logits.device)
    if backend == "reference":
        return reference_vocab_parallel_logprobs(logits, targets, tp_group, compute_entropy)
    return _FusedLogprobs.apply(logits, targets, tp_group, compute_entropy)


# ---------------------------------------------------------------------------------------------------
# Masked KL


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
    if _backend_for(logprobs.device) == "reference":
        return reference_masked_kl(logprobs, ref_logprobs, mask, estimator, reduction)
    dtype = _kl_dtype(logprobs)
    mask = mask.to(dtype)
    per_token = _MaskedKL.apply(logprobs.to(dtype), ref_logprobs.to(dtype), mask, estimator)
    return reduce_masked(per_token, mask, reduction)


# torch.compile / meta-tensor support: shapes of the kernel outputs.
if HAVE_KERNEL:

    @torch.library.register_fake("gil_megatron::logprob_partials")
    def _(logits, targets, vocab_start, vocab_size, compute_entropy):
        n = logits.shape[0]
        new = lambda k: logits.new_empty((k,), dtype=torch.float32)  # noqa: E731
        return new(n), new(n), new(n), new(n if compute_entropy else 0)

    @torch.library.register_fake("gil_megatron::logprob_backward")
    def _(logits, targets, vocab_start, max, log_sumexp, grad_logprobs, entropy, grad_entropy):
        return logits.new_empty(logits.shape)

    @torch.library.register_fake("gil_megatron::masked_kl")
    def _(logprobs, ref_logprobs, mask, estimator):
        return torch.empty_like(logprobs)

    @torch.library.register_fake("gil_megatron::masked_kl_backward")
    def _(grad, logprobs, ref_logprobs, mask, estimator):
        return torch.empty_like(logprobs)

