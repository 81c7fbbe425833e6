"""PPO for RLHF, as pure functions of tensors (the pieces NeMo-Aligner / veRL / OpenRLHF users know).

Reading order follows one PPO iteration (docs/design.md, one iteration's data flow):

    masked statistics            masked_sum / masked_mean / masked_var / masked_whiten
    rewards                      compute_token_rewards, RunningMoments, normalize_and_clip_rewards
    advantages                   compute_gae
    losses                       POLICY_LOSSES["ppo_clip"], aggregate_loss, value_loss, entropy_bonus, kl_loss
    KL coefficient               FixedKLController, AdaptiveKLController
    health checks                explained_variance (plus the metrics each loss returns)

Shapes: B sequences, T token positions. Every [B, T] tensor is aligned with ``response_mask``
([B, T], float or bool, 1 on response tokens, 0 on prompt and padding). Per-token outputs are 0
where the mask is 0. Metrics are dicts of detached 0-dim tensors under the namespaces policy/,
value/, kl/; the trainer reduces them once per step (no host syncs here).

Sources: Schulman et al. 2017 (PPO, arXiv 1707.06347); Schulman et al. 2016 (GAE, arXiv
1506.02438); Ziegler et al. 2019 (adaptive KL, arXiv 1909.08593); Ye et al. 2020 (dual-clip PPO,
arXiv 1912.09729); Chan, Golub & LeVeque 1979 (parallel variance).
"""

from typing import Callable, Dict, Optional, Tuple, Union

import torch

from gil_megatron.algo.kl import kl_per_token

Metrics = Dict[str, torch.Tensor]
Scalar = Union[float, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------


def apply_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x * mask elementwise, with masked entries exactly 0 (even where x is NaN/inf)."""
    mask = mask.to(x.dtype)
    return torch.where(mask != 0, x * mask, torch.zeros_like(x))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """sum(x * mask) over ``dim`` (all dims if None). Masked entries never contribute, even NaN/inf."""
    x = apply_mask(x, mask)
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """sum(x * mask) / sum(mask) over ``dim``; 0 where the mask is empty."""
    denom = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    return masked_sum(x, mask, dim) / denom.clamp_min(1e-8)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries (0-dim). ``unbiased`` divides by (count - 1), clamped to >= 1
    so a single element gives 0 rather than NaN."""
    mean = masked_mean(x, mask)
    sq = masked_sum((x - mean).square(), mask)
    count = mask.to(x.dtype).sum()
    denom = (count - 1.0).clamp_min(1.0) if unbiased else count.clamp_min(1e-8)
    return sq / denom


def masked_whiten(
    x: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    shift_mean: bool = True,
    eps: float = 1e-8,
    mean: Optional[torch.Tensor] = None,
    var: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries; 0 where the mask is 0.

    shift_mean=False keeps the mean (rescale only): x' = (x - mean) / std + mean, as in veRL/trl.
    ``mean``/``var`` may be given precomputed (e.g. all-reduced over data-parallel ranks by the
    trainer); otherwise they are the masked mean and unbiased variance of ``x``.
    """
    if mask is None:
        mask = torch.ones_like(x)
    if mean is None:
        mean = masked_mean(x, mask)
    if var is None:
        var = masked_var(x, mask, unbiased=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask != 0, out, torch.zeros_like(out))


# ---------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------


def last_token_index(response_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last response token of each row, [B] long (0 for rows without response tokens)."""
    T = response_mask.shape[-1]
    positions = torch.arange(T, device=response_mask.device).expand_as(response_mask)
    return torch.where(response_mask != 0, positions, torch.zeros_like(positions)).amax(dim=-1)


def compute_token_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    kl_coef: Scalar,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """Per-token rewards with the KL penalty in the reward (Ziegler et al. 2019):

        r_t = -kl_coef_i * KL_t            on every response token t
        r_T += score_i                     at the last response token T of row i

    scores [B]; kl [B, T] (a per-token estimator, see algo/kl.py); kl_coef a scalar (plain PPO with
    a fixed or adaptive coefficient) or [B] per sample (GIL: eta * p_high_i, see algo/gil.py);
    response_mask [B, T]. Returns rewards [B, T], 0 off the response. A row with no response token
    receives nothing.
    """
    mask = response_mask.to(kl.dtype)
    coef = torch.as_tensor(kl_coef, dtype=kl.dtype, device=kl.device)
    if coef.dim() == 1:
        coef = coef[:, None]  # [B, 1]
    rewards = apply_mask(-coef * kl, mask)
    last = last_token_index(response_mask)  # [B]
    has_response = (mask.sum(-1) > 0).to(kl.dtype)  # [B]
    score_at_end = torch.zeros_like(rewards).scatter(
        -1, last[:, None], (scores.to(kl.dtype) * has_response)[:, None]
    )
    return rewards + score_at_end


class RunningMoments:
    """Running count / mean / M2 of a scalar stream (reward-model scores), for reward normalisation.

    Batches are merged with Chan et al.'s parallel update, so a batch is summarised by
    (count, mean, M2) and the trainer may build that summary from all-reduced sums
    (``moments_from_sums``) before calling ``update`` — no collective lives here:

        delta = mean_b - mean;  n = count + count_b
        mean <- mean + delta * count_b / n
        M2   <- M2 + M2_b + delta^2 * count * count_b / n

    State is float64 tensors; ``state_dict``/``load_state_dict`` for checkpoint/resume.
    """

    def __init__(self) -> None:
        self.count = torch.zeros((), dtype=torch.float64)
        self.mean = torch.zeros((), dtype=torch.float64)
        self.m2 = torch.zeros((), dtype=torch.float64)

    @staticmethod
    def batch_moments(x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, ...]:
        """(count, mean, M2) of the (masked) entries of ``x``, float64 0-dim tensors."""
        x = x.detach().to(torch.float64)
        mask = torch.ones_like(x) if mask is None else mask.detach().to(torch.float64)
        count = mask.sum()
        mean = masked_mean(x, mask)
        m2 = masked_sum((x - mean).square(), mask)
        return count, mean, m2

    @staticmethod
    def moments_from_sums(
        count: torch.Tensor, total: torch.Tensor, total_sq: torch.Tensor
    ) -> Tuple[torch.Tensor, ...]:
        """(count, mean, M2) from (count, sum x, sum x^2) — the form that all-reduces by SUM.
        M2 = sum x^2 - (sum x)^2 / count; pass float64 sums to avoid cancellation."""
        count, total, total_sq = (t.detach().to(torch.float64) for t in (count, total, total_sq))
        safe = count.clamp_min(1.0)
        return count, total / safe, (total_sq - total.square() / safe).clamp_min(0.0)

    def update(self, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Merge a batch summarised by (count, mean, M2) into the running moments."""
        count, mean, m2 = (torch.as_tensor(t, dtype=torch.float64).detach() for t in (count, mean, m2))
        total = self.count + count
        safe = torch.where(total > 0, total, torch.ones_like(total))
        delta = mean - self.mean
        self.mean = self.mean + delta * count / safe
        self.m2 = self.m2 + m2 + delta.square() * self.count * count / safe
        self.count = total

    def update_from_batch(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """Single-process convenience: ``update(*batch_moments(x, mask))``."""
        self.update(*self.batch_moments(x, mask))

    @property
    def var(self) -> torch.Tensor:
        """Population variance M2 / count (0 before any data)."""
        return self.m2 / self.count.clamp_min(1.0)

    @property
    def var_unbiased(self) -> torch.Tensor:
        """Sample variance M2 / (count - 1)."""
        return self.m2 / (self.count - 1.0).clamp_min(1.0)

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"count": self.count.clone(), "mean": self.mean.clone(), "m2": self.m2.clone()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        for key in ("count", "mean", "m2"):
            setattr(self, key, torch.as_tensor(state[key], dtype=torch.float64).clone())


def normalize_and_clip_rewards(
    scores: torch.Tensor,
    running: RunningMoments,
    clip: Optional[float] = None,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """score' = clip((score - mean) / (std + eps), -clip, clip) with the running moments.

    Does not update ``running``: the trainer updates it with the (all-reduced) batch first, then
    normalises. shift_mean=False only rescales. clip=None disables clipping. scores [B] -> [B].
    """
    mean = running.mean.to(scores.dtype) if shift_mean else 0.0
    out = (scores - mean) / (running.std.to(scores.dtype) + eps)
    if clip is not None:
        out = out.clamp(-clip, clip)
    return out


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (Schulman et al. 2016, eq. 16):

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t

    where t+1 is the next *response* token of the row; after the last response token V = 0 and
    A = 0 (the episode ends with the response). Positions off the mask are skipped (they neither
    read nor pass on values), so a response with gaps is handled too. rewards, values,
    response_mask [B, T] -> (advantages [B, T], returns [B, T]), both detached and 0 off the mask.
    Vectorised over the batch, a loop over time. With values = 0 and lam = 1, ``returns`` is the
    discounted Monte-Carlo return.
    """
    rewards, values = rewards.detach(), values.detach()
    mask = response_mask.to(rewards.dtype)
    B, T = rewards.shape
    next_value = rewards.new_zeros(B)
    next_adv = rewards.new_zeros(B)
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        # off the mask: keep carrying the state of the next response token unchanged
        next_adv = m * adv + (1.0 - m) * next_adv
        next_value = m * values[:, t] + (1.0 - m) * next_value
        advantages[:, t] = m * adv
    returns = apply_mask(advantages + values, mask)
    return advantages, returns


# ---------------------------------------------------------------------------------------------
# Loss aggregation (the one place that decides how tokens and sequences are averaged)
# ---------------------------------------------------------------------------------------------


def per_sequence_mean(per_token: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean over each row's response tokens: [B, T] -> [B] (0 for an empty row)."""
    return masked_mean(per_token, response_mask, dim=-1)


def _token_mean(per_token, mask, normalizer):
    total = masked_sum(per_token, mask)
    denom = mask.to(per_token.dtype).sum() if normalizer is None else normalizer
    return total / torch.as_tensor(denom, dtype=per_token.dtype).clamp_min(1e-8)


def _seq_mean(per_seq, mask, normalizer):
    nonempty = (mask.to(per_seq.dtype).sum(-1) > 0).to(per_seq.dtype)
    denom = nonempty.sum() if normalizer is None else normalizer
    return (per_seq * nonempty).sum() / torch.as_tensor(denom, dtype=per_seq.dtype).clamp_min(1e-8)


def _seq_mean_token_mean(per_token, mask, normalizer):
    return _seq_mean(per_sequence_mean(per_token, mask), mask, normalizer)


def _seq_mean_token_sum(per_token, mask, normalizer):
    return _seq_mean(masked_sum(per_token, mask, dim=-1), mask, normalizer)


# Where the KL-to-reference term goes (ppo.kl_in): a per-token penalty in the reward (Ziegler et al.,
# InstructGPT, the GIL paper) or a term of the policy loss (GRPO).
KL_PLACEMENTS = ("reward", "loss")

LOSS_AGG_MODES: Dict[str, Callable[..., torch.Tensor]] = {
    "token_mean": _token_mean,  # sum over all tokens / number of tokens
    "seq_mean_token_mean": _seq_mean_token_mean,  # mean within a sequence, then over sequences
    "seq_mean_token_sum": _seq_mean_token_sum,  # sum within a sequence, then mean over sequences
}


def aggregate_loss(
    per_token_loss: torch.Tensor,
    response_mask: torch.Tensor,
    mode: str = "seq_mean_token_mean",
    normalizer: Optional[Scalar] = None,
) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a 0-dim loss, by name (LOSS_AGG_MODES):

        token_mean           sum_{i,t} m l / sum_{i,t} m
        seq_mean_token_mean  (1/B') sum_i [sum_t m l / sum_t m]     (GIL's s_i lives at this level)
        seq_mean_token_sum   (1/B') sum_i  sum_t m l

    B' counts rows with at least one response token. ``normalizer`` replaces the local denominator
    (total tokens, or total sequences) — for gradient accumulation over micro-batches the trainer
    passes the count over the whole mini-batch so the micro-batch losses add up to its mean.
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; valid: {sorted(LOSS_AGG_MODES)}")
    return LOSS_AGG_MODES[mode](per_token_loss, response_mask, normalizer)


# ---------------------------------------------------------------------------------------------
# Policy losses (registered by name; shared signature)
# ---------------------------------------------------------------------------------------------

PolicyLossFn = Callable[..., Tuple[torch.Tensor, Metrics]]
POLICY_LOSSES: Dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str):
    """Register ``fn(logprobs, old_logprobs, advantages, response_mask, *, clip_eps,
    clip_ratio_c=None) -> (per_token_loss [B, T], metrics)`` under ``name``."""

    def wrap(fn):
        POLICY_LOSSES[name] = fn
        return fn

    return wrap


def get_policy_loss(name: str) -> PolicyLossFn:
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; valid: {sorted(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


@register_policy_loss("ppo_clip")
def ppo_clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_eps: float,
    clip_ratio_c: Optional[float] = None,
) -> Tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate, per token (Schulman et al. 2017, eq. 7), as a loss to minimise:

        ratio    = exp(logprobs - old_logprobs)
        pg_loss1 = -A * ratio
        pg_loss2 = -A * clip(ratio, 1 - clip_eps, 1 + clip_eps)
        loss     = max(pg_loss1, pg_loss2)

    Dual clip (Ye et al. 2020), when clip_ratio_c (> 1) is given: for A < 0 the loss is further
    bounded by pg_loss3 = -A * clip_ratio_c, i.e. loss = min(loss, pg_loss3), so a huge ratio on a
    bad token cannot produce an unbounded update.

    All inputs [B, T]; returns (per_token_loss [B, T], 0 off the mask; metrics):
        policy/clipfrac        fraction of tokens where the clipped term is the active one
        policy/clipfrac_lower  fraction where the dual clip is active (0 without dual clip)
        policy/approx_kl       KL(pi_old || pi_theta) by the k3 estimator, mean((ratio - 1) - log ratio)
        policy/ratio_mean, policy/ratio_max, policy/ratio_min
    """
    if clip_ratio_c is not None and not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 for dual-clip PPO, got {clip_ratio_c}")
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    clip_loss = torch.maximum(pg_loss1, pg_loss2)
    if clip_ratio_c is not None:
        pg_loss3 = -advantages * clip_ratio_c
        loss = torch.where(advantages < 0, torch.minimum(clip_loss, pg_loss3), clip_loss)
        lower = ((advantages < 0) & (pg_loss3 < clip_loss)).to(logprobs.dtype)
    else:
        loss = clip_loss
        lower = torch.zeros_like(logprobs)
    loss = apply_mask(loss, response_mask)

    with torch.no_grad():
        on = response_mask != 0
        metrics = {
            "policy/clipfrac": masked_mean((pg_loss2 > pg_loss1).to(logprobs.dtype), response_mask),
            "policy/clipfrac_lower": masked_mean(lower, response_mask),
            "policy/approx_kl": masked_mean(kl_per_token(old_logprobs, logprobs, "k3"), response_mask),
            "policy/ratio_mean": masked_mean(ratio, response_mask),
            "policy/ratio_max": torch.where(on, ratio, torch.full_like(ratio, -float("inf"))).amax(),
            "policy/ratio_min": torch.where(on, ratio, torch.full_like(ratio, float("inf"))).amin(),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------
# Value, entropy and KL losses
# ---------------------------------------------------------------------------------------------


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    clip_eps_value: Optional[float] = None,
    mode: str = "token_mean",
    normalizer: Optional[Scalar] = None,
) -> Tuple[torch.Tensor, Metrics]:
    """Clipped value loss (PPO2 baselines / OpenAI summarize-from-feedback):

        vf_loss1 = (V - R)^2
        vf_loss2 = (old_V + clip(V - old_V, -eps, eps) - R)^2
        loss     = aggregate(0.5 * max(vf_loss1, vf_loss2))      (0.5 * vf_loss1 when eps is None)

    values (current critic), old_values (rollout critic), returns [B, T] -> (0-dim loss, metrics:
    value/vf_clipfrac, value/vpred_mean, value/error = masked mean of (V - R)^2).
    """
    vf_loss1 = (values - returns).square()
    if clip_eps_value is not None:
        clipped = old_values + torch.clamp(values - old_values, -clip_eps_value, clip_eps_value)
        vf_loss2 = (clipped - returns).square()
        per_token = 0.5 * torch.maximum(vf_loss1, vf_loss2)
        # where the clamp is inactive, clipped == values up to one rounding of old + (V - old): not a clip
        clipped_active = (values - old_values).abs() > clip_eps_value
        clipfrac = masked_mean(((vf_loss2 > vf_loss1) & clipped_active).to(values.dtype), response_mask)
    else:
        per_token = 0.5 * vf_loss1
        clipfrac = torch.zeros((), dtype=values.dtype, device=values.device)
    loss = aggregate_loss(per_token, response_mask, mode, normalizer)
    with torch.no_grad():
        metrics = {
            "value/vf_clipfrac": clipfrac.detach(),
            "value/vpred_mean": masked_mean(values, response_mask).detach(),
            "value/error": masked_mean(vf_loss1, response_mask).detach(),
        }
    return loss, metrics


def explained_variance(values: torch.Tensor, returns: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over response tokens (0-dim; NaN when Var[R] = 0, as in CleanRL).
    1 is a perfect critic, 0 no better than a constant, < 0 worse."""
    values, returns = values.detach(), returns.detach()
    var_r = masked_var(returns, response_mask)
    return 1.0 - masked_var(returns - values, response_mask) / var_r


def entropy_bonus(entropy: torch.Tensor, response_mask: torch.Tensor, mode: str = "token_mean") -> torch.Tensor:
    """Aggregated policy entropy [B, T] -> 0-dim; the trainer subtracts entropy_coef * this."""
    return aggregate_loss(entropy, response_mask, mode)


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    estimator: str = "k3",
    mode: str = "token_mean",
    normalizer: Optional[Scalar] = None,
) -> torch.Tensor:
    """KL to the reference as a loss term (GRPO-style, instead of in the reward):
    aggregate(KL_estimator(logprobs, ref_logprobs)) -> 0-dim. k3 is the usual choice here: it is
    non-negative and its gradient is well behaved. ``normalizer`` as in aggregate_loss."""
    return aggregate_loss(kl_per_token(logprobs, ref_logprobs, estimator), response_mask, mode, normalizer)


# ---------------------------------------------------------------------------------------------
# KL coefficient controllers (host-side floats, updated once per iteration by the trainer)
# ---------------------------------------------------------------------------------------------


class FixedKLController:
    """Constant KL coefficient."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> Dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, section 2.2):

        e_t    = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta  <- beta * (1 + e_t * n_steps / horizon)

    ``current_kl`` is the measured KL(policy || reference) per sequence (a Python float the trainer
    has already reduced); ``n_steps`` the number of samples (or steps) since the last update.
    """

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: float) -> None:
        if target_kl <= 0 or horizon <= 0:
            raise ValueError(f"target_kl and horizon must be > 0, got target_kl={target_kl}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target_kl)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> Dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.value = float(state["value"])
