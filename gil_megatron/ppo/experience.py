"""From a scored rollout batch to training targets: steps 3-4 of an iteration, in order
(docs/design.md, "One iteration").

Pure tensor code over the WHOLE rollout batch (the trainer all-gathers the per-sample tensors of
every data-parallel rank first), so the GIL statistics (whitening, group means over the batch,
g_high) are exactly those of the single-rank algorithm. Per-action tensors are [N, T].
"""

from typing import Dict, Optional

import torch

from gil_megatron.algo import gil, ppo
from gil_megatron.algo.advantages import get_advantage_estimator
from gil_megatron.algo.registry import Algorithm
from gil_megatron.ops.kl import masked_kl
from gil_megatron.ppo.kl_penalty import sample_kl_coefficients
from gil_megatron.ppo.objectives import ObjectiveParams


def make_experience(
    batch: Dict[str, torch.Tensor],
    algo: Algorithm,
    params: ObjectiveParams,
    eta: float,
    generator: Optional[torch.Generator] = None,
) -> Dict[str, torch.Tensor]:
    """batch (whole rollout batch):
        scores [N]         trained-on reward (after normalisation / clipping)
        raw_scores [N]     the reward before normalisation (G_i for performance=whitened_score)
        old_logprobs, ref_logprobs, values, action_mask [N, T]
        task_values [N]    the critic's task value V_task(x_i) at the last prompt token (G for
                           gil.performance=prompt_value)
        group_logits [N, M] the critic's group head where gil.group_level reads it
        oracle_group [N]   the data's `group` mapped by gil.known_groups (-1: none); for inference=known
        prompt_index [N]   rows with equal index are samples of one prompt (default: all distinct)
    eta: the KL coefficient of this iteration (kl_penalty.KLPenalty.eta). generator: draws the
    permutation of the shuffled-weights control. Returns kl, rewards, advantages, returns [N, T];
    sample_kl_coef (eta_i, wherever ppo.kl_in puts it), kl_loss_coef (eta_i in the loss, else 0),
    task_returns (the task reward's return at the first response action: the task value's
    target, no KL in it), p_high, sample_weights [N] and, with group inference, group_probs, perf,
    group_coeffs, weight_clip_frac.
    """
    mask = batch["action_mask"].float()
    old_logprobs, values = batch["old_logprobs"], batch["values"]
    n = mask.shape[0]
    # 1. per-token KL_t between the rollout policy and the reference (the fused kernel's masked KL)
    kl = masked_kl(old_logprobs, batch["ref_logprobs"], mask, params.ppo.kl_estimator, reduction="none")

    # 2. GIL bookkeeping: G_i, soft group means R_g, g_high, p_high,i, the head's target
    out: Dict[str, torch.Tensor] = {}
    p_high = torch.ones(n)
    if algo.group_inference:
        q = torch.softmax(batch["group_logits"].float(), dim=-1)
        perf = _performance(batch, params, mask)
        _, means, _ = gil.centred_group_means(q, perf, params.gil.variance)
        p_high = gil.p_high(q, gil.high_group(means))
        out.update(group_probs=q, perf=perf, group_coeffs=_group_coefficients(q, perf, batch, params))

    # the task value's target: the return of the task reward alone, never the KL penalty (it would
    # make G depend on the coefficients G assigns: docs/design.md 4.1)
    task_returns = _first_action(_task_returns(batch["scores"], mask, params.ppo.gamma), mask)

    # 3. per-token rewards with the KL penalty (eta_i: kl_penalty.py); advantages and returns
    reward_coef, loss_coef = sample_kl_coefficients(algo, params.ppo.kl_in, eta, p_high, params.gil.group_kl_normalize)
    rewards = ppo.compute_token_rewards(batch["scores"], kl, reward_coef, mask)
    prompt_index = batch.get("prompt_index", torch.arange(n))
    advantages, returns = get_advantage_estimator(algo.advantage)(rewards, values, mask, prompt_index,
                                                                  params.ppo.gamma, params.ppo.lam)
    if params.ppo.whiten_advantages:
        advantages = ppo.masked_whiten(advantages, mask)

    # 4. the group-invariant policy term as per-sample weights (ones without it)
    weights = torch.ones(n)
    if algo.invariance != "none":
        g = params.gil
        raw = gil.group_invariant_weights(out["group_probs"], out["perf"], g.beta_policy, g.variance)
        weights, clip_frac = gil.clip_weights(raw, g.weight_min, g.weight_max)
        if algo.invariance == "shuffled":
            weights = weights[torch.randperm(n, generator=generator)]
        out["weight_clip_frac"] = clip_frac

    out.update(kl=kl, rewards=rewards, advantages=advantages, returns=returns, sample_kl_coef=reward_coef + loss_coef,
               kl_loss_coef=loss_coef, task_returns=task_returns, p_high=p_high, sample_weights=weights)
    return out


def _task_returns(scores: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Monte-Carlo returns [N, T] of the task reward alone (the score at the last response action;
    no KL term, no critic)."""
    task_rewards = ppo.compute_token_rewards(scores, torch.zeros_like(mask), 0.0, mask)
    _, returns = ppo.compute_gae(task_rewards, torch.zeros_like(mask), mask, gamma, 1.0)
    return returns


def _first_action(per_action: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N, T] -> [N]: the value at each row's first response action."""
    return per_action.gather(1, mask.argmax(dim=-1)[:, None]).squeeze(1)


def _performance(batch: Dict[str, torch.Tensor], params: ObjectiveParams, mask: torch.Tensor) -> torch.Tensor:
    """G_i from the rollout batch (gil.performance): a function of the task reward only, never of
    the KL penalty (whose coefficients depend on G through g_high)."""
    mode = params.gil.performance
    if mode == "prompt_value":  # the critic's task value, fitted to task-reward returns
        return gil.performance(mode, prompt_values=batch["task_values"])
    if mode == "whitened_score":
        return gil.performance(mode, scores=batch["raw_scores"])
    returns = _task_returns(batch["raw_scores"], mask, params.ppo.gamma)
    if mode == "mc_return":
        return gil.performance(mode, returns=returns, response_mask=mask)
    return gil.performance(mode, returns=returns, old_logprobs=batch["old_logprobs"], response_mask=mask)


def _group_coefficients(q: torch.Tensor, perf: torch.Tensor, batch: Dict[str, torch.Tensor],
                        params: ObjectiveParams) -> torch.Tensor:
    """c = dL_group/dq [N, M] at the rollout-time assignments (see objectives.critic_loss).

    inference=head: L_group = -beta_critic * V(q) + guards; exact: cross-entropy to the batch's
    variance-maximising hard split; known: cross-entropy to the data's groups."""
    g = params.gil
    q = q.detach().clone().requires_grad_(True)
    if g.inference == "head":
        loss, _ = gil.group_inference_loss(
            q, perf, g.beta_critic, min_group_mass=g.group_mass_floor(), mass_penalty_coef=g.mass_penalty_coef,
            entropy_coef=g.entropy_coef, variance=g.variance)
    else:
        if g.inference == "exact":
            labels = gil.exact_group_labels(perf, g.num_groups, g.variance)
        else:
            labels = batch["oracle_group"]
            if bool((labels < 0).any()) or bool((labels >= g.num_groups).any()):
                raise ValueError(f"gil.inference=known needs every prompt's `group` mapped to one of "
                                 f"gil.num_groups={g.num_groups} groups (set gil.known_groups)")
        loss, _ = gil.group_label_loss(q, gil.align_labels(labels, q), g.beta_critic)
    (coeffs,) = torch.autograd.grad(loss, q)
    return coeffs.detach()
