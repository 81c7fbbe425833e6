"""The objective registry: what each ``algo:`` trains, and the losses the loop minimises.

An algorithm is a registry entry (data, not an ``if`` chain): which advantage estimator it uses,
whether a KL term exists, and which parts of GIL are on. The loop calls three functions with the
batch tensors and plain scalars (``ObjectiveParams``), never with config objects:

    make_experience (experience.py)   rollout batch -> advantages, returns, KL coefficients, GIL weights
    actor_loss(mb, logprobs, entropy, params)        -> (loss, metrics)
    critic_loss(mb, values, group_logits, params)    -> (loss, metrics)

Every knob is resolved once, in ``params_from_config``; the KL coefficient of every sample (fixed
or controller-driven eta, in the reward or in the loss, scaled per sample by GIL's p_high) is
decided once, in ``kl_coefficients``. `python -m gil_megatron.ppo.objectives` lists the algorithms.
"""

from dataclasses import dataclass, replace
from typing import Dict, Mapping, Optional, Tuple

import torch

from gil_megatron.algo import gil, ppo
from gil_megatron.algo.registry import Algorithm, get_algorithm
from gil_megatron.ops.kl import masked_kl

Metrics = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class ObjectiveParams:
    """Every scalar the objectives read, resolved once from the config (``params_from_config``)."""

    # PPO
    clip_eps: float = 0.2
    clip_ratio_c: Optional[float] = None
    value_clip: Optional[float] = 0.2
    vf_coef: float = 1.0
    entropy_coef: float = 0.0
    loss_agg_mode: str = "seq_mean_token_mean"
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    kl_estimator: str = "k1"
    kl_in: str = "reward"
    # GIL
    num_groups: int = 2
    group_level: str = "prompt"
    performance: str = "prompt_value"
    variance: str = "mass_weighted"
    inference: str = "head"
    beta_policy: float = 0.25
    beta_critic: float = 1.0
    weight_min: Optional[float] = 0.0
    weight_max: Optional[float] = 2.0
    min_group_mass: float = 0.0
    mass_penalty_coef: float = 1.0
    group_entropy_coef: float = 0.0
    adaptive_kl_normalize: bool = False


def params_from_config(cfg) -> ObjectiveParams:
    """PPOConfig -> ObjectiveParams: the one place where an algorithm's fixed options and the
    variance-dependent default of min_group_mass are applied."""
    algo = get_algorithm(cfg.algo)
    p, g = cfg.ppo, cfg.gil
    params = ObjectiveParams(
        clip_eps=p.clip_eps, clip_ratio_c=p.clip_ratio_c, value_clip=p.value_clip, vf_coef=p.vf_coef,
        entropy_coef=p.entropy_coef, loss_agg_mode=p.loss_agg_mode, gamma=p.gamma, lam=p.lam,
        whiten_advantages=p.whiten_advantages, kl_estimator=p.kl_estimator, kl_in=p.kl_in,
        num_groups=g.num_groups, group_level=g.group_level, performance=g.performance, variance=g.variance,
        inference=g.inference, beta_policy=g.beta_policy, beta_critic=g.beta_critic, weight_min=g.weight_min,
        weight_max=g.weight_max, min_group_mass=g.min_group_mass, mass_penalty_coef=g.mass_penalty_coef,
        group_entropy_coef=g.entropy_coef, adaptive_kl_normalize=g.adaptive_kl_normalize,
    )
    params = replace(params, **algo.fixed)
    if params.min_group_mass is None:
        params = replace(params, min_group_mass=0.0 if params.variance == "mass_weighted" else 0.1)
    return params


# ---- the KL coefficient: decided here and nowhere else ------------------------------------------
def kl_coefficients(algo: Algorithm, params: ObjectiveParams, eta: float, p_high: torch.Tensor
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(in-reward coefficients [N], in-loss coefficients [N]) for the batch.

    eta is the KL controller's current value (fixed, or Ziegler's adaptive controller); GIL scales
    it per sample by p_high,i (optionally normalised to mean eta); ``kl_in`` puts it either in the
    per-token reward or in the loss; the other is zero. No KL term: both zero."""
    n = p_high.shape[0]
    zeros = torch.zeros(n)
    if not algo.kl_penalty:
        return zeros, zeros
    if algo.adaptive_kl:
        coef = gil.adaptive_kl_coef(eta, p_high, normalize=params.adaptive_kl_normalize)
    else:
        coef = torch.full((n,), float(eta))
    return (coef, zeros) if params.kl_in == "reward" else (zeros, coef)


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
    mode = params.loss_agg_mode
    loss, metrics = gil.gil_policy_loss(
        logprobs, mb["old_logprobs"], mb["advantages"], mask, mb["sample_weights"],
        clip_eps=params.clip_eps, clip_ratio_c=params.clip_ratio_c, loss_agg_mode=mode, normalizer=normalizer)
    # the weight statistics are logged once per batch by make_experience, not per micro-batch
    metrics = {k: v.detach() for k, v in metrics.items() if not k.startswith("gil/weight")}
    if entropy is not None:
        ent = ppo.aggregate_loss(entropy, mask, mode, normalizer)
        loss = loss - params.entropy_coef * ent
        metrics["policy/entropy"] = ent.detach()
    if params.kl_in == "loss":
        coef = mb["kl_loss_coef"]
        kl = masked_kl(logprobs, mb["ref_logprobs"], mask, params.kl_estimator, reduction="none")
        kl_term = ppo.aggregate_loss(coef[:, None].to(kl.dtype) * kl, mask, mode, normalizer)
        loss = loss + kl_term
        metrics["policy/kl_loss"] = kl_term.detach()
    metrics["policy/loss"] = loss.detach()
    return loss, metrics


def critic_loss(mb: Mapping[str, torch.Tensor], values: torch.Tensor, head_probs: Optional[torch.Tensor],
                params: ObjectiveParams, normalizer: Optional[torch.Tensor] = None, group_scale: float = 1.0
                ) -> Tuple[torch.Tensor, Metrics]:
    """Critic loss of one micro-batch: vf_coef * clipped value loss, plus the group objective.

    mb: values (rollout-time), returns, action_mask [b, T]; group_coeffs [b, M] when groups are
    inferred. values [b, T] current; head_probs [b, M] = q_i(phi) read where ``group_level`` says.

    The group objective (-beta_critic * V, or a label cross-entropy) is a function of the WHOLE
    rollout batch, so it does not split into micro-batch losses; its gradient does. experience.py
    computes c = dL_group/dq at the rollout-time assignments, and each micro-batch adds
    sum_i c_i . q_i(phi), whose gradient is exactly the batch gradient at that point (first order,
    like every other rollout-time target). ``group_scale`` undoes the averaging of the gradient
    over data-parallel ranks and mini-batches (the coefficients are already per-batch totals).
    """
    v_loss, metrics = ppo.value_loss(values, mb["values"], mb["returns"], mb["action_mask"], params.value_clip,
                                     mode="token_mean", normalizer=normalizer)
    loss = params.vf_coef * v_loss
    metrics["value/loss"] = v_loss.detach()
    if head_probs is not None and "group_coeffs" in mb:
        loss = loss + (mb["group_coeffs"] * head_probs).sum() * group_scale
    return loss, metrics
