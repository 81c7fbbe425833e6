"""Log-probs of sampled tokens and the entropy from vocab-parallel logits.

PPO needs, several times per iteration, ``logprobs[t] = log softmax(z_t)[target_t]`` for logits
``z`` [tokens, vocab] (and the policy entropy). Done naively
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

The CPU and CUDA kernels (csrc/logprob/) and the readable pure-torch reference here (which
materialises a [tokens, vocab_local] fp32 temporary) answer the same API; ops/extension.py says
which one runs.

Evaluation needs more than the sampled tokens: the exact KL between two whole next-token
distributions. ``vocab_parallel_log_softmax`` gives the log-softmax of a shard from the same
partials (max and sum-exp, all-reduced the same way) and ``vocab_parallel_kl`` sums
p (log p - log p_ref) over the vocabulary; both materialise the shard in fp32 (readable torch).

The masked KL of the sampled tokens' log-probs is its own op: ops/kl.py.
"""

from typing import NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from gil_megatron.ops.extension import HAVE_KERNEL, backend_for
from gil_megatron.parallel import collectives

LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = [
    "LogprobPartials",
    "finalize_logprobs",
    "reference_logprob_partials",
    "reference_vocab_parallel_logprobs",
    "rescale_partials",
    "vocab_parallel_kl",
    "vocab_parallel_log_softmax",
    "vocab_parallel_logprobs",
]


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
    backend = backend_for(logits.device)
    if backend == "reference":
        return reference_vocab_parallel_logprobs(logits, targets, tp_group, compute_entropy)
    return _FusedLogprobs.apply(logits, targets, tp_group, compute_entropy)


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
