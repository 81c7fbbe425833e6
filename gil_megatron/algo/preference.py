"""The losses of the stages around PPO, as pure functions of tensors: SFT, reward model, DPO.

Reading order follows the paper's pipeline (SFT -> reward model -> RL) and its DPO baseline:

    sft_loss               next-token NLL on the response tokens only (prompt and padding masked)
    bradley_terry_loss     pairwise reward-model loss  -log sigmoid(r(x, y_c) - r(x, y_r) - m)
    sequence_logprobs      log pi(y | x) = sum of the response tokens' log-probs
    dpo_loss               DPO, sigmoid loss on the policy/reference log-ratio difference

Shapes: B sequences (or B pairs), T token positions. Token log-probs [B, T] are aligned with
``response_mask`` [B, T] (1 on the response tokens whose log-prob counts, 0 elsewhere): position
t holds log p(token_{t+1} | tokens_{<=t}), so callers pass the mask shifted the same way.

Normalisation for distributed training lives in two arguments, never in hidden state:
``weights`` [B] (1 for a real example, 0 for the filler rows of a last eval batch) and
``normalizer``, the denominator of the loss (by default the local count). The trainer passes
the data-parallel count so that the micro-batch losses of all ranks add up to the mean over the
global batch. Metrics are detached 0-dim weighted means over THIS batch, independent of
``normalizer``; the trainer turns them into sums (mean * count) and reduces them once per step.

Sources: Ouyang et al. 2022 (InstructGPT, arXiv 2203.02155: SFT, pairwise RM); Bradley & Terry
1952; Rafailov et al. 2023 (DPO, arXiv 2305.18290, eq. 7).
"""

from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from gil_megatron.algo.ppo import aggregate_loss, masked_mean, masked_sum

Metrics = Dict[str, torch.Tensor]
Scalar = Union[float, torch.Tensor]


def _weighted_mean(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(w x) / sum(w), 0 when every weight is 0 (metrics only: detached)."""
    return masked_mean(x.detach(), weights)


def _weights_like(x: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    if weights is None:
        return torch.ones_like(x)
    if weights.shape != x.shape:
        raise ValueError(f"weights {tuple(weights.shape)} must have the per-example shape {tuple(x.shape)}")
    return weights.to(x.dtype)


def _reduce(per_example: torch.Tensor, weights: torch.Tensor, normalizer: Optional[Scalar]) -> torch.Tensor:
    """sum_i w_i l_i / normalizer (normalizer defaults to sum_i w_i)."""
    denom = weights.sum() if normalizer is None else torch.as_tensor(normalizer, dtype=per_example.dtype)
    return masked_sum(per_example, weights) / denom.clamp_min(1e-8)


# ---------------------------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------------------------


def sft_loss(
    token_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    mode: str = "token_mean",
    normalizer: Optional[Scalar] = None,
) -> Tuple[torch.Tensor, Metrics]:
    """Supervised fine-tuning loss: the negative log-likelihood of the response tokens.

        loss = aggregate_{i,t} [ -log p(y_t | x, y_<t) ]  over response tokens only

    token_logprobs [B, T] (log-prob of the token that follows position t), response_mask [B, T]
    (1 where that token is a response token: prompt tokens and padding are masked, so the model is
    never trained to produce the prompt). ``mode`` is one of ``algo.ppo.LOSS_AGG_MODES``
    (token_mean: the mean over all response tokens of the batch, the usual SFT objective);
    ``normalizer`` replaces its local denominator (see aggregate_loss).

    Metrics: loss (mean NLL per response token of this batch) and tokens (their count).
    """
    nll = -token_logprobs
    loss = aggregate_loss(nll, response_mask, mode, normalizer)
    metrics = {
        "loss": masked_mean(nll.detach(), response_mask),
        "tokens": response_mask.to(token_logprobs.dtype).sum().detach(),
    }
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# Reward model
# ---------------------------------------------------------------------------------------------


def bradley_terry_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    margin: Scalar = 0.0,
    weights: Optional[torch.Tensor] = None,
    normalizer: Optional[Scalar] = None,
) -> Tuple[torch.Tensor, Metrics]:
    """Pairwise Bradley-Terry loss of a scalar reward model (InstructGPT eq. 1, with a margin):

        loss_i = -log sigmoid(r_c,i - r_r,i - m)          loss = sum_i w_i loss_i / normalizer

    chosen_scores, rejected_scores [B]: r(x_i, y_chosen) and r(x_i, y_rejected); margin m a scalar
    or [B] (Llama-2's margin loss: the pair must be won by at least m).

    Metrics (weighted means): loss, accuracy (fraction with r_c > r_r; a tie counts as wrong),
    margin_mean (mean r_c - r_r), chosen_mean, rejected_mean.
    """
    if chosen_scores.shape != rejected_scores.shape or chosen_scores.dim() != 1:
        raise ValueError(
            f"chosen_scores {tuple(chosen_scores.shape)} and rejected_scores "
            f"{tuple(rejected_scores.shape)} must both be [B]"
        )
    w = _weights_like(chosen_scores, weights)
    diff = chosen_scores - rejected_scores
    per_pair = -F.logsigmoid(diff - margin)
    loss = _reduce(per_pair, w, normalizer)
    metrics = {
        "loss": _weighted_mean(per_pair, w),
        "accuracy": _weighted_mean((diff > 0).to(diff.dtype), w),
        "margin_mean": _weighted_mean(diff, w),
        "chosen_mean": _weighted_mean(chosen_scores, w),
        "rejected_mean": _weighted_mean(rejected_scores, w),
    }
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------------


def sequence_logprobs(token_logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """log pi(y | x) = sum of the response tokens' log-probs: [B, T] -> [B]."""
    return masked_sum(token_logprobs, response_mask, dim=-1)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    weights: Optional[torch.Tensor] = None,
    normalizer: Optional[Scalar] = None,
) -> Tuple[torch.Tensor, Metrics]:
    """Direct Preference Optimization, sigmoid loss (Rafailov et al. 2023, eq. 7):

        h_i    = beta * [ (log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x)) ]
        loss_i = -log sigmoid(h_i)                        loss = sum_i w_i loss_i / normalizer

    Every argument is [B] sequence log-probs (``sequence_logprobs``: summed over response tokens);
    the reference log-probs are constants (computed without grad). The implicit rewards are
    beta * (log pi - log pi_ref) of each response.

    Metrics (weighted means): loss, rewards/chosen, rewards/rejected, rewards/margin
    (chosen - rejected), accuracy (fraction with rewards/chosen > rewards/rejected),
    logps/chosen, logps/rejected (the policy's).
    """
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    shapes = {tuple(t.shape) for t in logps}
    if len(shapes) != 1 or policy_chosen_logps.dim() != 1:
        raise ValueError(f"dpo_loss needs four [B] tensors of sequence log-probs; got shapes {sorted(shapes)}")
    if beta <= 0:
        raise ValueError(f"beta={beta} must be > 0")
    w = _weights_like(policy_chosen_logps, weights)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps.detach())
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps.detach())
    h = chosen_rewards - rejected_rewards
    per_pair = -F.logsigmoid(h)
    loss = _reduce(per_pair, w, normalizer)
    metrics = {
        "loss": _weighted_mean(per_pair, w),
        "rewards/chosen": _weighted_mean(chosen_rewards, w),
        "rewards/rejected": _weighted_mean(rejected_rewards, w),
        "rewards/margin": _weighted_mean(h, w),
        "accuracy": _weighted_mean((h > 0).to(h.dtype), w),
        "logps/chosen": _weighted_mean(policy_chosen_logps, w),
        "logps/rejected": _weighted_mean(policy_rejected_logps, w),
    }
    return loss, metrics
