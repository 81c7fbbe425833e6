"""The losses the PPO job minimises, for one micro-batch, with the batch tensors and the run's
settings (``ObjectiveParams``: the config's ``ppo`` and ``gil`` sections, the algorithm's presets
already applied by config.load_config):

    make_experience (experience.py)   rollout batch -> advantages, returns, KL coefficients, GIL weights
    actor_loss(mb, logprobs, entropy, params)        -> (loss, metrics)
    critic_loss(mb, values, head_probs, params)      -> (loss, metrics)

What each ``algo:`` trains is the registry's entry (gil_megatron/algo/registry.py); the KL
coefficient of every sample is decided in kl_penalty.py.
"""

import copy
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

import torch

from gil_megatron.algo import gil, ppo
from gil_megatron.config import GILSettings, PPOConfig, PPOSettings
from gil_megatron.ops.kl import masked_kl

Metrics = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class ObjectiveParams:
    """The settings the objectives and experience.py read: the run's ``ppo`` and ``gil`` config
    sections as loaded (defaults, the user's values and the algorithm's presets), never re-typed."""

    ppo: PPOSettings = field(default_factory=PPOSettings)
    gil: GILSettings = field(default_factory=GILSettings)

    @classmethod
    def from_config(cls, cfg: PPOConfig) -> "ObjectiveParams":
        return cls(ppo=copy.deepcopy(cfg.ppo), gil=copy.deepcopy(cfg.gil))


# ---- losses for one micro-batch -----------------------------------------------------------------
def actor_loss(mb: Mapping[str, torch.Tensor], logprobs: torch.Tensor, entropy: Optional[torch.Tensor],
               params: ObjectiveParams, normalizer: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Metrics]:
    """Policy loss of one micro-batch: the PPO clip loss with each sequence weighted by its GIL
    weight (ones for PPO), minus the entropy bonus, plus the in-loss KL (per-sample coefficients).

    mb: old_logprobs, ref_logprobs, advantages, action_mask [b, T]; sample_weights, kl_loss_coef [b].
    logprobs (and entropy) [b, T] under the current policy, differentiable. ``normalizer``: the
    mini-batch count that turns micro-batch sums into the mini-batch mean (gradient accumulation).
    """
    mask = mb["action_mask"]
    mode = params.ppo.loss_agg_mode
    loss, metrics = gil.gil_policy_loss(
        logprobs, mb["old_logprobs"], mb["advantages"], mask, mb["sample_weights"],
        clip_eps=params.ppo.clip_eps, clip_ratio_c=params.ppo.clip_ratio_c, loss_agg_mode=mode, normalizer=normalizer)
    # the weight statistics are logged once per batch by make_experience, not per micro-batch
    metrics = {k: v.detach() for k, v in metrics.items() if not k.startswith("gil/weight")}
    if entropy is not None:
        ent = ppo.aggregate_loss(entropy, mask, mode, normalizer)
        loss = loss - params.ppo.entropy_coef * ent
        metrics["policy/entropy"] = ent.detach()
    if params.ppo.kl_in == "loss":
        coef = mb["kl_loss_coef"]
        kl = masked_kl(logprobs, mb["ref_logprobs"], mask, params.ppo.kl_estimator, reduction="none")
        kl_term = ppo.aggregate_loss(coef[:, None].to(kl.dtype) * kl, mask, mode, normalizer)
        loss = loss + kl_term
        metrics["policy/kl_loss"] = kl_term.detach()
    metrics["policy/loss"] = loss.detach()
    return loss, metrics


def critic_loss(mb: Mapping[str, torch.Tensor], values: torch.Tensor, head_probs: Optional[torch.Tensor],
                params: ObjectiveParams, normalizer: Optional[torch.Tensor] = None, group_scale: float = 1.0,
                task_values: Optional[torch.Tensor] = None, sequence_normalizer: Optional[torch.Tensor] = None,
                ) -> Tuple[torch.Tensor, Metrics]:
    """Critic loss of one micro-batch: vf_coef * (clipped value loss + task-value loss), plus the
    group objective.

    mb: values (rollout-time), returns, action_mask [b, T]; task_returns [b]; group_coeffs [b, M]
    when groups are inferred. values [b, T] current; head_probs [b, M] = q_i(phi) read where
    ``group_level`` says; task_values [b] = V_task(x_i) at the last prompt token, or None when
    nothing reads it.

    The task value is GIL's performance signal (gil.performance=prompt_value): it regresses the
    return of the task reward alone (experience.py's task_returns, no KL penalty), so G does not
    depend on the KL coefficients that G itself assigns (the value head's returns carry
    -eta_i KL_t). It is a plain squared error per sequence, ``sequence_normalizer`` the mini-batch's
    sequence count that turns micro-batch sums into its mean.

    The group objective (-beta_critic * V, or a label cross-entropy) is a function of the WHOLE
    rollout batch, so it does not split into micro-batch losses; its gradient does. experience.py
    computes c = dL_group/dq at the rollout-time assignments, and each micro-batch adds
    sum_i c_i . q_i(phi), whose gradient is exactly the batch gradient at that point (first order,
    like every other rollout-time target). ``group_scale`` undoes the averaging of the gradient
    over data-parallel ranks and mini-batches (the coefficients are already per-batch totals).
    """
    v_loss, metrics = ppo.value_loss(values, mb["values"], mb["returns"], mb["action_mask"], params.ppo.value_clip,
                                     mode="token_mean", normalizer=normalizer)
    loss = params.ppo.vf_coef * v_loss
    metrics["value/loss"] = v_loss.detach()
    if task_values is not None:
        ones = torch.ones_like(task_values)[:, None]
        task_loss, _ = ppo.value_loss(task_values[:, None], task_values[:, None].detach(), mb["task_returns"][:, None],
                                      ones, None, mode="token_mean", normalizer=sequence_normalizer)
        loss = loss + params.ppo.vf_coef * task_loss
        metrics["value/task_loss"] = task_loss.detach()
    if head_probs is not None and "group_coeffs" in mb:
        loss = loss + (mb["group_coeffs"] * head_probs).sum() * group_scale
    return loss, metrics
