"""Group Invariant Learning for PPO (GIL-PPO), as pure functions of tensors.

Zheng et al., "Improving Generalization of Alignment with Human Preferences through Group
Invariant Learning", ICLR 2024, arXiv 2310.11971. The paper has three parts; each maps to a
section below, and docs/design.md ("The method as built") fixes our reading of it (decisions are
marked there and in the docstrings):

    1. group label inference   a classifier p_phi(g | x, y) on the critic trunk is trained to
                               MAXIMISE the variance of performance across the groups it induces
                               -> performance, group_means, group_variance, group_inference_loss
    2. group invariant policy  the policy is trained to maximise return AND to minimise that
                               variance (help the hard group, stop over-optimising the easy one)
                               -> group_invariant_policy_loss, group_invariant_weights, gil_policy_loss
    3. group-scaled KL         samples likely to belong to the high-performing group get a larger
                               KL penalty: kl_coef_i = eta * p_phi(g_high | x_i, y_i) (the paper's
                               "adaptive KL penalty"; named apart from the adaptive KL controller
                               of Ziegler et al., which moves eta itself)
                               -> high_group, p_high, group_kl_coef

Notation (one rollout batch): N sequences i, M groups g (default 2).

    q_ig  = p_phi(g | x_i)   (group_level=prompt)      group_probs [N, M], rows sum to 1
          = p_phi(g | x_i, y_i)   (group_level=response, v1)
    G_i   = performance of sequence i (detached)       perf [N]
    S_g   = sum_i q_ig                                 soft group size
    pi_g  = S_g / N                                    group mass
    R_g   = sum_i q_ig G_i / (S_g + eps)               soft group mean performance

    variance="mass_weighted" (v2 default; Fisher/Otsu between-group variance)
        Rbar = sum_g pi_g R_g  (= mean_i G_i),   V = sum_g pi_g (R_g - Rbar)^2
    variance="unweighted" (v1, paper-literal)
        Rbar = (1/M) sum_g R_g,                  V = (1/M) sum_g (R_g - Rbar)^2

The unweighted variance rewards a tiny extreme group (its gradient in q carries 1/S_g), so a head
trained on it isolates outliers; the mass-weighted one has dV/dq_ig = ((G_i - Rbar)^2 -
(G_i - R_g)^2) / N, no 1/S_g, and its ascent is soft 1-D k-means.

Everything here is math on local tensors: sums over i that must span data-parallel ranks are
exposed separately (``group_sums``) so the trainer can all-reduce them and then call
``group_means_from_sums``. Metrics are dicts of detached 0-dim tensors (gil/, group/ namespaces).
"""

import itertools
from typing import Dict, Optional, Tuple, Union

import torch

from gil_megatron.algo.ppo import (
    Metrics,
    aggregate_loss,
    get_policy_loss,
    masked_whiten,
    per_sequence_mean,
)

Index = Union[int, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Performance and group statistics
# ---------------------------------------------------------------------------------------------

PERFORMANCE_MODES = ("prompt_value", "whitened_score", "mc_return", "surrogate")
GROUP_LEVELS = ("prompt", "response")  # where the group head reads the critic trunk (gil.group_level)
INFERENCE_MODES = ("head", "exact", "known")  # how the groups are inferred (gil.inference)


def performance(
    mode: str = "prompt_value",
    *,
    prompt_values: Optional[torch.Tensor] = None,
    scores: Optional[torch.Tensor] = None,
    returns: Optional[torch.Tensor] = None,
    old_logprobs: Optional[torch.Tensor] = None,
    response_mask: Optional[torch.Tensor] = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Per-sample performance G_i [N], detached, over the WHOLE rollout batch (decision).

    mode="prompt_value" (default): the critic's estimate of the prompt's task return at the last
        prompt token, V_task(x_i) (``prompt_values`` [N]; the critic's task-value output, fitted to
        returns of the task reward alone), whitened over the batch. The paper's classifier splits
        the returns the critic estimates; reading them at the prompt makes G a property of the
        prompt, not of one sampled response.
    mode="whitened_score" (v1): the reward score r(x_i, y_i) (``scores`` [N]), whitened.
    mode="mc_return": the task-reward return at the first response token (``returns`` [N, T] built
        from the task reward only, ``response_mask`` [N, T]), whitened.
    mode="surrogate": the slides' literal sum_t log pi_old(a_t | s_t) * R_t over the response
        (``old_logprobs``, ``returns`` = Monte-Carlo returns of the task reward, ``response_mask``;
        [N, T]); not whitened.

    Whitening keeps beta_policy / beta_critic on one scale across modes and makes G invariant to
    the reward's offset and scale. Every mode is a function of the task reward only, never of the
    KL penalty: that term is eta * p_high_i * KL with p_high defined through G itself (circular),
    and the penalty, largest on the high group, would shrink exactly the gap group inference is
    meant to find. (The critic's value head fits returns that include the penalty, which is why
    prompt_value reads a separate task-value output.)
    """
    def need(**tensors):
        missing = [k for k, v in tensors.items() if v is None]
        if missing:
            raise ValueError(f"performance(mode={mode!r}) needs {', '.join(missing)}")

    if mode == "prompt_value":
        need(prompt_values=prompt_values)
        raw = prompt_values
    elif mode == "whitened_score":
        need(scores=scores)
        raw = scores
    elif mode == "mc_return":
        need(returns=returns, response_mask=response_mask)
        first = (response_mask != 0).to(torch.long).argmax(dim=-1)  # [N] first response token
        raw = returns.gather(-1, first[:, None]).squeeze(-1)
    elif mode == "surrogate":
        need(old_logprobs=old_logprobs, returns=returns, response_mask=response_mask)
        return (old_logprobs * returns * response_mask).sum(dim=-1).detach()
    else:
        raise ValueError(f"unknown performance mode {mode!r}; valid: {', '.join(PERFORMANCE_MODES)}")
    raw = raw.detach()
    return masked_whiten(raw, torch.ones_like(raw), shift_mean=True, eps=eps)


def group_sums(q: torch.Tensor, perf: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(S_g, sum_i q_ig G_i), both [M]: the sums behind R_g (all-reduce these across ranks).
    q [N, M], perf [N]."""
    return q.sum(dim=0), (q * perf[:, None]).sum(dim=0)


def group_means_from_sums(mass: torch.Tensor, weighted_perf: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """R_g = sum_i q_ig G_i / (S_g + eps) from the sums of ``group_sums``: [M]."""
    return weighted_perf / (mass + eps)


def group_means(q: torch.Tensor, perf: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Soft group means of performance (group label inference, arXiv 2310.11971):

        S_g = sum_i q_ig,    R_g = sum_i q_ig G_i / (S_g + eps)

    q [N, M] soft assignments, perf [N] -> R [M]. Differentiable in q (and in perf, which callers
    detach). With hard labels q in {0, 1} these are the plain per-group means.
    """
    return group_means_from_sums(*group_sums(q, perf), eps=eps)


VARIANCES = ("mass_weighted", "unweighted")


def group_variance(means: torch.Tensor) -> torch.Tensor:
    """Unweighted (v1) variance across groups: (1/M) sum_g (R_g - mean_g R_g)^2.
    means [M] -> 0-dim. For M = 2 it equals (R_1 - R_2)^2 / 4."""
    return (means - means.mean()).square().mean()


def centred_group_means(q: torch.Tensor, perf: torch.Tensor, variance: str = "mass_weighted",
                        eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pi [M], R [M], R - Rbar [M]) with Rbar as ``variance`` defines it (see the module notation)."""
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; valid: {', '.join(VARIANCES)}")
    mass, weighted = group_sums(q, perf)
    means = group_means_from_sums(mass, weighted, eps)
    pi = mass / q.shape[0]
    rbar = (pi * means).sum() if variance == "mass_weighted" else means.mean()
    return pi, means, means - rbar


def between_group_variance(q: torch.Tensor, perf: torch.Tensor, variance: str = "mass_weighted",
                           eps: float = 1e-6) -> torch.Tensor:
    """V(q) over the batch: mass_weighted sum_g pi_g (R_g - Rbar)^2 (M = 2: pi_1 pi_2 (R_1 - R_2)^2)
    or unweighted (1/M) sum_g (R_g - Rbar)^2. q [N, M] (differentiable), perf [N] -> 0-dim."""
    pi, _, centred = centred_group_means(q, perf, variance, eps)
    if variance == "mass_weighted":
        return (pi * centred.square()).sum()
    return centred.square().mean()


def exact_group_labels(perf: torch.Tensor, num_groups: int, variance: str = "mass_weighted") -> torch.Tensor:
    """The hard split of the batch that maximises V (gil.inference=exact): labels [N] long.

    Groups are intervals of sorted G (true for both variances' optimum). M = 2: Otsu's threshold,
    every cut of the sorted G tried. M > 2 (mass_weighted only): 1-D k-means, exact by dynamic
    programming over cuts (maximising the between-group variance = minimising the within-group sum
    of squares). Label 0 is the lowest-performing group.
    """
    perf = perf.detach().to(torch.float64)
    n = perf.shape[0]
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; valid: {', '.join(VARIANCES)}")
    if num_groups > n:
        raise ValueError(f"cannot split {n} samples into {num_groups} groups")
    order = torch.argsort(perf, stable=True)
    g = perf[order]
    prefix = torch.cat([g.new_zeros(1), g.cumsum(0)])
    prefix_sq = torch.cat([g.new_zeros(1), g.square().cumsum(0)])
    labels_sorted = torch.zeros(n, dtype=torch.long)
    if num_groups == 2:
        k = torch.arange(1, n, dtype=torch.float64)  # size of the low group
        low, high = prefix[1:n] / k, (prefix[n] - prefix[1:n]) / (n - k)
        delta2 = (high - low).square()
        score = (k / n) * ((n - k) / n) * delta2 if variance == "mass_weighted" else delta2 / 4.0
        cut = int(torch.argmax(score)) + 1
        labels_sorted[cut:] = 1
    else:
        if variance != "mass_weighted":
            raise ValueError("exact group labels for num_groups > 2 need variance='mass_weighted'")

        def sse(i: int, j: int) -> float:  # within-group sum of squares of sorted g[i:j]
            s, s2 = prefix[j] - prefix[i], prefix_sq[j] - prefix_sq[i]
            return float(s2 - s * s / (j - i))

        inf = float("inf")
        cost = [[inf] * (n + 1) for _ in range(num_groups + 1)]
        back = [[0] * (n + 1) for _ in range(num_groups + 1)]
        cost[0][0] = 0.0
        for m in range(1, num_groups + 1):
            for j in range(m, n + 1):
                for i in range(m - 1, j):
                    c = cost[m - 1][i] + sse(i, j)
                    if c < cost[m][j]:
                        cost[m][j], back[m][j] = c, i
        j = n
        for m in range(num_groups, 0, -1):
            i = back[m][j]
            labels_sorted[i:j] = m - 1
            j = i
    labels = torch.empty_like(labels_sorted)
    labels[order] = labels_sorted
    return labels


def high_group(means: torch.Tensor) -> torch.Tensor:
    """g_high = argmax_g R_g on the current rollout batch: a 0-dim long tensor (no host sync)."""
    return means.detach().argmax()


def p_high(group_probs: torch.Tensor, g_high: Index) -> torch.Tensor:
    """p_high,i = q_{i, g_high}, detached: [N, M] -> [N]."""
    index = torch.as_tensor(g_high, device=group_probs.device, dtype=torch.long).reshape(1, 1)
    return group_probs.detach().gather(1, index.expand(group_probs.shape[0], 1)).squeeze(1)


def group_kl_coef(eta: float, p_high: torch.Tensor, normalize: bool = False, eps: float = 1e-8) -> torch.Tensor:
    """Group-scaled KL (the paper's adaptive KL penalty, arXiv 2310.11971): per-sample coefficient kl_coef_i = eta * p_high,i,
    detached, [N]. Feed it to ``ppo.compute_token_rewards`` as kl_coef. With the group head off pass
    p_high = ones(N): plain PPO with a fixed KL coefficient eta; eta = 0: no KL term.

    normalize=True: eta * p_high,i / mean_i p_high,i, so the batch's mean coefficient equals PPO's
    eta (KL-matched comparisons): p = [1, 1, 0, 0], eta = 0.1 -> [0.2, 0.2, 0, 0]."""
    p = p_high.detach()
    if normalize:
        p = p / p.mean().clamp_min(eps)
    return eta * p


# ---------------------------------------------------------------------------------------------
# Group label inference (critic side, trains phi)
# ---------------------------------------------------------------------------------------------


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) over the last dim."""
    return -(p * p.clamp_min(1e-12).log()).sum(dim=-1)


def group_inference_loss(
    group_probs: torch.Tensor,
    perf: torch.Tensor,
    beta_critic: float,
    min_group_mass: float = 0.0,
    mass_penalty_coef: float = 1.0,
    entropy_coef: float = 0.0,
    variance: str = "mass_weighted",
    eps: float = 1e-6,
) -> Tuple[torch.Tensor, Metrics]:
    """The term ADDED to the critic's value loss: gradient ascent on V(phi) plus collapse guards.

        qbar_g = (1/N) sum_i q_ig                               batch-mean assignment
        loss   = beta_critic * ( - V(phi)                       (``variance``: see the notation)
                                 + mass_penalty_coef * sum_g max(0, min_group_mass - qbar_g)
                                 - entropy_coef * H(qbar) )

    group_probs [N, M] = p_phi(g | x_i, y_i) (carries the gradient to phi); perf [N] (detached
    here). beta_critic = 1 in the paper.

    Decision (collapse guards): maximising the UNWEIGHTED variance is solved by isolating a few
    outliers in a tiny group (a group of one extreme sample has a large |R_g - Rbar|); the
    mass-weighted variance has no such optimum and needs no guard (min_group_mass 0). The hinge
    keeps every group's batch-mean mass above ``min_group_mass``; the entropy of the batch-mean
    assignment (not of each q_i, which should become confident) pushes towards balanced groups.
    Both default to off, and both sit INSIDE the beta_critic factor: beta_critic = 0 switches group
    inference off entirely (no gradient reaches the head), and the guards keep their strength
    relative to R_var whatever beta_critic is.

    Returns (0-dim loss, metrics gil/head_r_var, gil/head_mass_min, gil/head_mass_penalty,
    gil/head_assign_entropy, gil/head_sample_entropy).
    """
    perf = perf.detach()
    r_var = between_group_variance(group_probs, perf, variance, eps)
    qbar = group_probs.mean(dim=0)  # [M]
    mass_penalty = torch.relu(min_group_mass - qbar).sum()
    assign_entropy = _entropy(qbar)
    loss = beta_critic * (-r_var + mass_penalty_coef * mass_penalty - entropy_coef * assign_entropy)
    metrics = {
        "gil/head_r_var": r_var.detach(),
        "gil/head_mass_min": qbar.detach().min(),
        "gil/head_mass_penalty": mass_penalty.detach(),
        "gil/head_assign_entropy": assign_entropy.detach(),
        "gil/head_sample_entropy": _entropy(group_probs.detach()).mean(),
    }
    return loss, metrics


def align_labels(labels: torch.Tensor, group_probs: torch.Tensor) -> torch.Tensor:
    """Relabel hard group labels [N] by the permutation that best matches the head's current argmax
    (groups are defined up to permutation; training the head towards permuted labels would only
    make it swap its groups)."""
    M = group_probs.shape[1]
    pred = group_probs.detach().argmax(dim=1)
    perms = torch.tensor(list(itertools.permutations(range(M))))  # [P, M]: label -> group
    best = (perms[:, labels.long()] == pred[None, :]).sum(dim=1).argmax()
    return perms[best][labels.long()]


def group_label_loss(group_probs: torch.Tensor, labels: torch.Tensor, beta_critic: float) -> Tuple[torch.Tensor, Metrics]:
    """Cross-entropy of the group head against given hard labels (gil.inference = exact | known):
    beta_critic * mean_i -log q_{i, label_i}. group_probs [N, M], labels [N] long."""
    picked = group_probs.gather(1, labels[:, None].long()).squeeze(1)
    loss = -beta_critic * picked.clamp_min(1e-12).log().mean()
    return loss, {"gil/head_label_nll": loss.detach() / max(beta_critic, 1e-12)}


# ---------------------------------------------------------------------------------------------
# Group invariant policy (policy side, trains theta)
# ---------------------------------------------------------------------------------------------


def group_invariant_policy_loss(
    seq_surrogate: torch.Tensor,
    group_probs: torch.Tensor,
    perf: torch.Tensor,
    beta_policy: float,
    variance: str = "mass_weighted",
    eps: float = 1e-6,
) -> torch.Tensor:
    """The group-invariant policy term L_var(theta) (the definition; decision):

        R_g(theta) = sum_i sg(q_ig) s_i(theta) / (sum_i sg(q_ig) + eps)
        L_var      = beta_policy * sum_g sg(dV/dR_g) * R_g(theta)
                     dV/dR_g = 2 pi_g (R_g - Rbar)        mass_weighted
                             = (2/M) (R_g - Rbar)         unweighted

    sg = stop-gradient, so grad_theta L_var = beta_policy * grad_theta V: minimising
    (PPO loss + L_var) maximises return while shrinking the gap between groups. s_i is the
    per-sequence mean of the PPO surrogate (``sequence_surrogate``). seq_surrogate [N] carries the
    gradient; group_probs [N, M] and perf [N] are detached (no gradient to phi). The trainer uses
    the equivalent per-sample weights (``group_invariant_weights``).
    """
    q = group_probs.detach()
    M = q.shape[1]
    pi, _, centred = centred_group_means(q, perf.detach(), variance, eps)
    dv_dr = 2.0 * pi * centred if variance == "mass_weighted" else (2.0 / M) * centred
    r_theta = (q * seq_surrogate[:, None]).sum(dim=0) / (q.sum(dim=0) + eps)  # [M]
    return beta_policy * (dv_dr.detach() * r_theta).sum()


def group_invariant_weights(
    group_probs: torch.Tensor,
    perf: torch.Tensor,
    beta_policy: float,
    variance: str = "mass_weighted",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-sample weights w [N] on the PPO sequence loss that reproduce PPO + L_var (detached,
    UNCLIPPED; ``clip_weights`` bounds them):

        mass_weighted   w_i = 1 - 2 beta_policy sum_g q_ig (R_g - Rbar)               mean_i w_i = 1
        unweighted (v1) w_i = 1 - N beta_policy (2/M) sum_g q_ig (R_g - Rbar) / (S_g + eps)

    Why: with the PPO loss aggregated per sequence (``seq_mean_token_mean``: -(1/N) sum_i s_i),
    -(1/N) sum_i w_i s_i = -(1/N) sum_i s_i + L_var exactly (L_var is linear in s_i). The high
    group's PPO gradient is damped, the low group's amplified. The weights are computed once per
    rollout batch from the whole batch's R_g and carried with each sample like its advantages, so
    gradient accumulation and data parallelism need nothing special.

    beta_policy = 0.25 by a rule: at a median split of a standard-normal G (R_g = +-0.80) the
    mass-weighted weights are {0.6, 1.4}. The unweighted form multiplies by N / S_g, so a tiny
    group gets a huge weight (v1's failure); at beta_policy = 1 even an ideal split makes the high
    group's weights negative.
    """
    q = group_probs.detach()
    N, M = q.shape
    _, _, centred = centred_group_means(q, perf.detach(), variance, eps)
    if variance == "mass_weighted":
        return 1.0 - 2.0 * beta_policy * (q * centred[None, :]).sum(dim=1)
    per_sample = (q * (centred / (q.sum(dim=0) + eps))[None, :]).sum(dim=1)  # [N]
    return 1.0 - N * beta_policy * (2.0 / M) * per_sample


def clip_weights(weights: torch.Tensor, weight_min: Optional[float], weight_max: Optional[float]
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(clipped weights [N], fraction clipped 0-dim). A weight below 0 would push DOWN the
    probability of that sample's responses (un-learning the easy group), so weight_min defaults to 0;
    weight_max bounds how much one sample can dominate an update. None = that side unbounded.
    While a clip binds, the weighted loss is no longer exactly PPO + L_var (logged as
    gil/weight_clip_frac)."""
    lo = -float("inf") if weight_min is None else weight_min
    hi = float("inf") if weight_max is None else weight_max
    clipped = weights.clamp(lo, hi)
    return clipped, (clipped != weights).to(weights.dtype).mean()


def gil_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    sample_weights: Optional[torch.Tensor] = None,
    *,
    clip_eps: float,
    clip_ratio_c: Optional[float] = None,
    policy_loss: str = "ppo_clip",
    loss_agg_mode: str = "seq_mean_token_mean",
    normalizer: Optional[float] = None,
) -> Tuple[torch.Tensor, Metrics]:
    """GIL-PPO policy loss for one (micro-)batch: the PPO per-token loss, each sequence weighted
    by its group-invariant weight w_i (``group_invariant_weights``, clipped, from the rollout batch):

        loss = aggregate(w_i * pg_loss_it)      (= PPO loss + L_var for seq_mean_token_mean, no clamp)

    logprobs, old_logprobs, advantages, response_mask [B, T]; sample_weights [B] (None: plain PPO).
    With any other loss_agg_mode the weights still damp/amplify each sequence but the identity with
    L_var is exact only for "seq_mean_token_mean" (tokens within a sequence first, then sequences).
    Returns (0-dim loss, metrics of the policy loss plus gil/weight_mean|min|max|zero_frac).
    """
    per_token, metrics = get_policy_loss(policy_loss)(
        logprobs, old_logprobs, advantages, response_mask, clip_eps=clip_eps, clip_ratio_c=clip_ratio_c
    )
    if sample_weights is not None:
        w = sample_weights.detach().to(per_token.dtype)
        per_token = per_token * w[:, None]
        metrics = dict(metrics)
        metrics.update(
            {
                "gil/weight_mean": w.mean(),
                "gil/weight_min": w.min(),
                "gil/weight_max": w.max(),
                "gil/weight_zero_frac": (w <= 0).to(w.dtype).mean(),
            }
        )
    return aggregate_loss(per_token, response_mask, loss_agg_mode, normalizer), metrics


def sequence_surrogate(per_token_loss: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """s_i = - per-sequence mean of the per-token policy loss: [B, T] -> [B]."""
    return -per_sequence_mean(per_token_loss, response_mask)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def group_metrics(
    group_probs: torch.Tensor,
    per_sample: Dict[str, torch.Tensor],
    perf: Optional[torch.Tensor] = None,
    variance: str = "mass_weighted",
    eps: float = 1e-6,
) -> Metrics:
    """Per-group soft means and GIL health numbers (detached 0-dim tensors).

        group/{g}/mass    (1/N) sum_i q_ig
        group/{g}/{name}  sum_i q_ig x_i / (S_g + eps)      for each per_sample[name] = x [N]
                          (e.g. reward, kl, advantage, value_error, true_reward)

    With ``perf`` (or per_sample["perf"]) also:
        gil/r_var (``variance``), gil/delta (max_g R_g - min_g R_g), gil/high_group, gil/minority_mass,
        gil/p_high_mean, gil/p_high_min, gil/p_high_max.
    """
    q = group_probs.detach()
    M = q.shape[1]
    out: Metrics = {}
    mass = q.mean(dim=0)
    for g in range(M):
        out[f"group/{g}/mass"] = mass[g]
    for name, x in per_sample.items():
        means = group_means(q, x.detach().to(q.dtype), eps)
        for g in range(M):
            out[f"group/{g}/{name}"] = means[g]
    if perf is None:
        perf = per_sample.get("perf")
    if perf is not None:
        means = group_means(q, perf.detach().to(q.dtype), eps)
        g_high = high_group(means)
        ph = p_high(q, g_high)
        out.update(
            {
                "gil/r_var": between_group_variance(q, perf.detach().to(q.dtype), variance, eps),
                "gil/minority_mass": mass.min(),
                "gil/delta": means.max() - means.min(),
                "gil/high_group": g_high.to(q.dtype),
                "gil/p_high_mean": ph.mean(),
                "gil/p_high_min": ph.min(),
                "gil/p_high_max": ph.max(),
            }
        )
    return out


def assignment_agreement(
    group_probs: torch.Tensor, known_labels: torch.Tensor, num_labels: Optional[int] = None
) -> torch.Tensor:
    """Accuracy of argmax_g q_ig against known labels under the best one-to-one relabelling of the
    inferred groups (groups are only defined up to permutation): 0-dim tensor in [0, 1].

    group_probs [N, M]; known_labels [N] long in [0, num_labels) (num_labels defaults to M; passed
    explicitly to avoid a host sync). Brute force over permutations: M is small.
    """
    pred = group_probs.detach().argmax(dim=1)  # [N]
    M = group_probs.shape[1]
    L = max(M, M if num_labels is None else num_labels)
    perms = torch.tensor(list(itertools.permutations(range(L), M)), device=pred.device)  # [P, M]
    mapped = perms[:, pred]  # [P, N]: label assigned to each sample under each relabelling
    return (mapped == known_labels[None, :]).to(group_probs.dtype).mean(dim=1).max()


def majority_share(known_labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """The agreement a constant assignment gets: the largest known group's share of the batch.
    An inferred grouping is informative only above this baseline."""
    counts = torch.bincount(known_labels.long(), minlength=num_labels)
    return counts.max().to(torch.float32) / max(known_labels.numel(), 1)
