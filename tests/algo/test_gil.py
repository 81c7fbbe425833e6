"""Tests for gil_megatron/algo/gil.py: the 8 oracles of DESIGN.md section 4, plus every GIL
statistic against a slow, obvious loop."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gil_megatron.algo import gil, ppo


@pytest.fixture(autouse=True)
def float64_default():
    """Exact checks run in float64; restore the global default so other test modules are unaffected."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# --------------------------------------------------------------------------------------------
# Slow, obvious reference versions (Python loops over samples and groups)
# --------------------------------------------------------------------------------------------


def group_means_loop(q, perf, eps=1e-6):
    N, M = q.shape
    out = []
    for g in range(M):
        mass, total = 0.0, 0.0
        for i in range(N):
            mass += float(q[i, g])
            total += float(q[i, g]) * float(perf[i])
        out.append(total / (mass + eps))
    return torch.tensor(out)


def group_variance_loop(means):
    M = len(means)
    mean = sum(float(m) for m in means) / M
    return torch.tensor(sum((float(m) - mean) ** 2 for m in means) / M)


def l_var_loop(seq_surrogate, q, perf, beta, eps=1e-6):
    N, M = q.shape
    R = group_means_loop(q, perf, eps)
    Rbar = sum(float(r) for r in R) / M
    total = 0.0
    for g in range(M):
        mass = sum(float(q[i, g]) for i in range(N))
        S_g = sum(float(q[i, g]) * float(seq_surrogate[i]) for i in range(N)) / (mass + eps)
        total += (float(R[g]) - Rbar) * S_g
    return torch.tensor(beta * 2.0 / M * total)


def weights_loop(q, perf, beta, eps=1e-6):
    N, M = q.shape
    R = group_means_loop(q, perf, eps)
    Rbar = sum(float(r) for r in R) / M
    w = []
    for i in range(N):
        acc = 0.0
        for g in range(M):
            mass = sum(float(q[j, g]) for j in range(N))
            acc += (float(R[g]) - Rbar) * float(q[i, g]) / (mass + eps)
        w.append(1.0 - N * beta * 2.0 / M * acc)
    return torch.tensor(w)


def _random_q(N, M, seed, temperature=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(N, M, generator=g) / temperature, dim=1)


def _policy_batch(B=6, T=5, seed=0):
    """A small PPO batch with some ratios far enough from 1 to be clipped."""
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(B, T, generator=g) * 0.5 - 1.0
    logprobs = (old + 0.4 * torch.randn(B, T, generator=g)).requires_grad_(True)
    adv = torch.randn(B, T, generator=g)
    mask = torch.zeros(B, T)
    for b in range(B):
        mask[b, b % 2 : T - (b % 3)] = 1.0
    return logprobs, old, adv, mask


# --------------------------------------------------------------------------------------------
# Vectorised statistics vs loops
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("N,M,seed", [(1, 2, 0), (7, 2, 1), (20, 3, 2), (33, 5, 3)])
def test_group_statistics_match_loops(N, M, seed):
    q = _random_q(N, M, seed)
    perf = torch.randn(N, generator=torch.Generator().manual_seed(seed + 100))
    s = torch.randn(N, generator=torch.Generator().manual_seed(seed + 200))
    R = gil.group_means(q, perf)
    assert torch.allclose(R, group_means_loop(q, perf))
    assert torch.allclose(gil.group_variance(R), group_variance_loop(R))
    assert torch.allclose(gil.group_invariant_policy_loss(s, q, perf, 0.3), l_var_loop(s, q, perf, 0.3))
    assert torch.allclose(gil.group_invariant_weights(q, perf, 0.3, clamp_min=None), weights_loop(q, perf, 0.3))


def test_group_sums_compose_across_shards():
    """What the trainer all-reduces: per-shard sums add up to the full-batch group means."""
    q, perf = _random_q(12, 3, 4), torch.randn(12)
    a, b = gil.group_sums(q[:5], perf[:5]), gil.group_sums(q[5:], perf[5:])
    R = gil.group_means_from_sums(a[0] + b[0], a[1] + b[1])
    assert torch.allclose(R, gil.group_means(q, perf))


# --------------------------------------------------------------------------------------------
# Oracle 1: uniform q -> R_var = 0, grad_phi R_var = 0, GIL update == PPO update
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("M", [2, 3])
def test_oracle1_uniform_q(M):
    N = 10
    logits = torch.zeros(N, M, requires_grad=True)
    q = torch.softmax(logits, dim=1)
    perf = torch.randn(N)
    r_var = gil.group_variance(gil.group_means(q, perf))
    assert torch.allclose(r_var, torch.tensor(0.0), atol=1e-14)
    (grad,) = torch.autograd.grad(r_var, logits, retain_graph=True)
    assert torch.allclose(grad, torch.zeros_like(grad), atol=1e-12)
    loss, _ = gil.group_inference_loss(q, perf, beta_critic=1.0)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.allclose(grad, torch.zeros_like(grad), atol=1e-12)

    logprobs, old, adv, mask = _policy_batch(B=N)
    ppo_per_token, _ = ppo.POLICY_LOSSES["ppo_clip"](logprobs, old, adv, mask, clip_eps=0.2)
    ppo_loss = ppo.aggregate_loss(ppo_per_token, mask, "seq_mean_token_mean")
    (g_ppo,) = torch.autograd.grad(ppo_loss, logprobs, retain_graph=True)
    w = gil.group_invariant_weights(q, perf, beta_policy=0.7)
    assert torch.allclose(w, torch.ones(N))
    gil_loss, _ = gil.gil_policy_loss(logprobs, old, adv, mask, w, clip_eps=0.2)
    (g_gil,) = torch.autograd.grad(gil_loss, logprobs)
    assert torch.allclose(gil_loss, ppo_loss) and torch.allclose(g_gil, g_ppo)
    # the L_var form gives the same update
    s = gil.sequence_surrogate(ppo_per_token, mask)
    l_var = gil.group_invariant_policy_loss(s, q, perf, beta_policy=0.7)
    (g_lvar,) = torch.autograd.grad(ppo_loss + l_var, logprobs)
    assert torch.allclose(g_lvar, g_ppo)


# --------------------------------------------------------------------------------------------
# Oracle 2: beta_policy = 0 -> PPO loss; beta_critic = 0 -> no gradient to the group head
# --------------------------------------------------------------------------------------------


def test_oracle2_beta_zero():
    N, M = 6, 2
    q, perf = _random_q(N, M, 5, temperature=0.3), torch.randn(N)
    logprobs, old, adv, mask = _policy_batch(B=N, seed=1)
    ppo_per_token, _ = ppo.POLICY_LOSSES["ppo_clip"](logprobs, old, adv, mask, clip_eps=0.2)
    ppo_loss = ppo.aggregate_loss(ppo_per_token, mask, "seq_mean_token_mean")
    w = gil.group_invariant_weights(q, perf, beta_policy=0.0)
    assert torch.equal(w, torch.ones(N))
    gil_loss, _ = gil.gil_policy_loss(logprobs, old, adv, mask, w, clip_eps=0.2)
    assert torch.equal(gil_loss, ppo_loss)
    s = gil.sequence_surrogate(ppo_per_token, mask)
    assert gil.group_invariant_policy_loss(s, q, perf, beta_policy=0.0) == 0
    # no weights at all is plain PPO too
    assert torch.equal(gil.gil_policy_loss(logprobs, old, adv, mask, None, clip_eps=0.2)[0], ppo_loss)

    logits = torch.randn(N, M, requires_grad=True)
    loss, _ = gil.group_inference_loss(
        torch.softmax(logits, 1), perf, beta_critic=0.0, min_group_mass=0.45, entropy_coef=0.1
    )
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


# --------------------------------------------------------------------------------------------
# Oracle 3: p_high == c -> fixed-KL rewards with eta*c; eta = 0 -> no KL term
# --------------------------------------------------------------------------------------------


def test_oracle3_adaptive_kl_reduces_to_fixed_kl():
    B, T = 4, 6
    kl = torch.randn(B, T)
    scores = torch.randn(B)
    mask = torch.zeros(B, T)
    for b in range(B):
        mask[b, 1 : T - b] = 1.0
    eta, c = 0.3, 0.6
    coef = gil.adaptive_kl_coef(eta, torch.full((B,), c))
    adaptive = ppo.compute_token_rewards(scores, kl, coef, mask)
    fixed = ppo.compute_token_rewards(scores, kl, eta * c, mask)
    assert torch.allclose(adaptive, fixed)
    no_kl = ppo.compute_token_rewards(scores, kl, gil.adaptive_kl_coef(0.0, torch.rand(B)), mask)
    assert torch.allclose(no_kl, ppo.compute_token_rewards(scores, torch.zeros_like(kl), 0.1, mask))
    assert torch.allclose(no_kl.sum(-1), scores)
    # group head off: p_high = 1 is plain PPO-with-KL at eta
    assert torch.allclose(
        ppo.compute_token_rewards(scores, kl, gil.adaptive_kl_coef(eta, torch.ones(B)), mask),
        ppo.compute_token_rewards(scores, kl, eta, mask),
    )


def test_high_group_and_p_high():
    means = torch.tensor([0.1, 0.5, -1.0])
    g = gil.high_group(means)
    assert g.dim() == 0 and g == 1
    q = torch.tensor([[0.2, 0.7, 0.1], [0.5, 0.25, 0.25]], requires_grad=True)
    for index in (g, 1):
        ph = gil.p_high(q, index)
        assert torch.equal(ph, torch.tensor([0.7, 0.25])) and not ph.requires_grad
    assert not gil.adaptive_kl_coef(0.2, q[:, 1]).requires_grad


# --------------------------------------------------------------------------------------------
# Oracle 4: M = 2 -> R_var = Delta^2 / 4; shift invariant; scales by c^2; symmetric in group order
# --------------------------------------------------------------------------------------------


def _r_var(q, perf, eps=0.0):
    return gil.group_variance(gil.group_means(q, perf, eps))


def test_oracle4_two_groups_hand_numbers():
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    perf = torch.tensor([3.0, 1.0, 0.0, -1.0, 4.0])  # R = (2, 1), Delta = 1
    assert torch.allclose(_r_var(q, perf), torch.tensor(0.25))


_probs = st.floats(0.05, 0.95, allow_nan=False)
_values = st.floats(-10.0, 10.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.tuples(_probs, _values), min_size=2, max_size=12),
    shift=st.floats(-100.0, 100.0),
    scale=st.floats(-5.0, 5.0),
)
def test_oracle4_properties(rows, shift, scale):
    p1 = torch.tensor([r[0] for r in rows])
    q = torch.stack([p1, 1.0 - p1], dim=1)
    perf = torch.tensor([r[1] for r in rows])
    R = gil.group_means(q, perf, eps=0.0)
    r_var = _r_var(q, perf)
    assert torch.allclose(r_var, (R[0] - R[1]).square() / 4, atol=1e-12)
    assert torch.allclose(_r_var(q, perf + shift), r_var, atol=1e-8)
    assert torch.allclose(_r_var(q, scale * perf), scale**2 * r_var, atol=1e-9)
    assert torch.allclose(_r_var(q.flip(1), perf), r_var, atol=1e-12)


@pytest.mark.parametrize("M", [3, 4])
def test_r_var_symmetric_in_group_order_for_any_M(M):
    q, perf = _random_q(9, M, 6), torch.randn(9)
    r_var = _r_var(q, perf)
    for perm in itertools.permutations(range(M)):
        assert torch.allclose(_r_var(q[:, list(perm)], perf), r_var)


# --------------------------------------------------------------------------------------------
# Oracle 5: hard labels -> R_g are the plain group means
# --------------------------------------------------------------------------------------------


def test_oracle5_hard_labels_give_plain_means():
    labels = torch.tensor([0, 2, 1, 0, 2, 2, 1, 0, 0])
    perf = torch.randn(9)
    q = torch.nn.functional.one_hot(labels, 3).to(perf.dtype)
    R = gil.group_means(q, perf)
    plain = torch.stack([perf[labels == g].mean() for g in range(3)])
    assert torch.allclose(R, plain, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------------
# Oracle 6: gradient ascent on phi separates the two modes of a bimodal performance
# --------------------------------------------------------------------------------------------


def test_oracle6_group_inference_separates_bimodal_returns():
    gen = torch.Generator().manual_seed(7)
    N = 200
    labels = (torch.rand(N, generator=gen) < 0.4).long()  # 40% hard samples (mode 1)
    perf = torch.where(labels == 1, -1.0, 1.0) + 0.2 * torch.randn(N, generator=gen)
    # the features carry the mode (plus nuisance dimensions); the head never sees perf itself
    centres = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    feats = centres[labels] + 0.3 * torch.randn(N, 3, generator=gen)
    # a softmax classifier, initialised near (but not at) uniform: uniform is a stationary point
    W = (0.01 * torch.randn(3, 2, generator=gen)).requires_grad_(True)
    b = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=0.05)
    for _ in range(150):
        q = torch.softmax(feats @ W + b, dim=1)
        loss, metrics = gil.group_inference_loss(q, gil.performance(perf), beta_critic=1.0, min_group_mass=0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    q = torch.softmax(feats @ W + b, dim=1).detach()
    assert gil.assignment_agreement(q, labels) >= 0.99
    # the inferred split is the mode split: its variance approaches that of the true split
    hard = torch.nn.functional.one_hot(labels, 2).to(q.dtype)
    whitened = gil.performance(perf)
    assert _r_var(q, whitened) > 0.9 * _r_var(hard, whitened)


# --------------------------------------------------------------------------------------------
# Oracle 7: stop-gradients
# --------------------------------------------------------------------------------------------


def test_oracle7_policy_loss_has_no_gradient_to_phi_and_critic_loss_none_to_theta():
    N, M = 6, 2
    phi_logits = torch.randn(N, M, requires_grad=True)
    q = torch.softmax(phi_logits, dim=1)
    logprobs, old, adv, mask = _policy_batch(B=N, seed=2)
    perf = gil.performance(torch.randn(N))

    w = gil.group_invariant_weights(q, perf, beta_policy=0.2)
    policy_loss, _ = gil.gil_policy_loss(logprobs, old, adv, mask, w, clip_eps=0.2)
    per_token, _ = ppo.POLICY_LOSSES["ppo_clip"](logprobs, old, adv, mask, clip_eps=0.2)
    policy_loss = policy_loss + gil.group_invariant_policy_loss(
        gil.sequence_surrogate(per_token, mask), q, perf, beta_policy=0.2
    )
    g_phi, g_theta = torch.autograd.grad(policy_loss, [phi_logits, logprobs], allow_unused=True)
    assert g_phi is None and g_theta is not None

    # critic side: even a performance that depends on theta sends nothing back to theta
    perf_theta = ppo.per_sequence_mean(logprobs, mask)
    assert not gil.performance(perf_theta).requires_grad
    critic_loss, _ = gil.group_inference_loss(q, perf_theta, beta_critic=1.0, min_group_mass=0.1, entropy_coef=0.1)
    g_phi, g_theta = torch.autograd.grad(critic_loss, [phi_logits, logprobs], allow_unused=True)
    assert g_theta is None and g_phi is not None


# --------------------------------------------------------------------------------------------
# Oracle 8: tabular bandit — expected policy-term gradient == beta * finite-difference grad Var_g
# --------------------------------------------------------------------------------------------


def test_oracle8_tabular_bandit_expected_gradient_matches_finite_difference():
    """Setup: C contexts with probabilities rho_c, K actions each, policy pi_theta(a|c) =
    softmax(theta_c), known rewards r(c, a), fixed soft group weights q_cg (contexts 0,1 mostly in
    group 0, contexts 2,3 mostly in group 1). Expected group performance and its variance:

        J_g(theta) = sum_c rho_c q_cg V_c(theta) / sum_c rho_c q_cg,   V_c = sum_a pi(a|c) r(c, a)
        Var_g(theta) = (1/M) sum_g (J_g - mean_g J_g)^2

    Compared: (A) beta * central finite-difference gradient of Var_g w.r.t. theta, against
    (B) the autograd gradient of group_invariant_policy_loss at theta_old = theta on the EXACT
    expectation of a rollout batch: every (c, a) is one single-token sample whose probability
    P(c, a) = rho_c pi_old(a|c) is folded into its group weights (q_i = q_cg P(c, a)), i.e. the
    batch in which each pair appears with its frequency — the large-batch limit of the
    self-normalised sums in R_g and S_g. The surrogate is the real one: s_i from ppo_clip at
    ratio = 1, advantages A = r(c, a) - V_c(theta_old), perf_i = r(c, a) (so R_g = J_g).
    eps = 0 in both so the identity is exact.
    """
    gen = torch.Generator().manual_seed(8)
    C, K, beta = 4, 3, 0.7
    theta0 = torch.randn(C, K, generator=gen)
    reward = torch.randn(C, K, generator=gen)
    rho = torch.tensor([0.1, 0.2, 0.3, 0.4])
    q_ctx = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.1, 0.9]])

    def group_perf(theta):
        V = (torch.softmax(theta, dim=1) * reward).sum(1)  # [C]
        w = rho[:, None] * q_ctx  # [C, M]
        return (w * V[:, None]).sum(0) / w.sum(0)  # J_g [M]

    def var_g(theta):
        J = group_perf(theta)
        return (J - J.mean()).square().mean()

    # (A) finite differences
    h = 1e-6
    fd = torch.zeros(C, K)
    for c in range(C):
        for a in range(K):
            e = torch.zeros(C, K)
            e[c, a] = h
            fd[c, a] = (var_g(theta0 + e) - var_g(theta0 - e)) / (2 * h)

    # (B) the L_var gradient on the enumerated batch
    theta = theta0.clone().requires_grad_(True)
    logp_all = torch.log_softmax(theta, dim=1)  # [C, K]
    pi_old = torch.softmax(theta0, dim=1)
    ctx, act = torch.meshgrid(torch.arange(C), torch.arange(K), indexing="ij")
    ctx, act = ctx.reshape(-1), act.reshape(-1)  # N = C*K samples
    logprobs = logp_all[ctx, act][:, None]  # [N, 1]: one response token per sample
    old_logprobs = logprobs.detach()
    V_old = (pi_old * reward).sum(1)
    advantages = (reward[ctx, act] - V_old[ctx])[:, None]
    mask = torch.ones_like(logprobs)
    per_token, _ = ppo.POLICY_LOSSES["ppo_clip"](logprobs, old_logprobs, advantages, mask, clip_eps=0.2)
    s = gil.sequence_surrogate(per_token, mask)
    prob = rho[ctx] * pi_old[ctx, act]  # P(c, a)
    q = q_ctx[ctx] * prob[:, None]
    assert torch.allclose(gil.group_means(q, reward[ctx, act], eps=0.0), group_perf(theta0))  # R_g = J_g
    l_var = gil.group_invariant_policy_loss(s, q, reward[ctx, act], beta_policy=beta, eps=0.0)
    (grad,) = torch.autograd.grad(l_var, theta)

    assert fd.abs().max() > 1e-3  # the test is not vacuous
    assert torch.allclose(grad, beta * fd, atol=1e-8, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Weights form == L_var form; clamp behaviour
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("M", [2, 3])
def test_weighted_ppo_loss_equals_ppo_plus_l_var_without_clamp(M):
    N = 8
    q, perf = _random_q(N, M, 9, temperature=0.5), gil.performance(torch.randn(N))
    logprobs, old, adv, mask = _policy_batch(B=N, seed=3)
    beta = 0.1
    w = gil.group_invariant_weights(q, perf, beta)
    assert (w > 0).all() and torch.allclose(w.mean(), torch.tensor(1.0), atol=1e-5)
    weighted, metrics = gil.gil_policy_loss(logprobs, old, adv, mask, w, clip_eps=0.2)
    assert metrics["policy/clipfrac"] > 0 and metrics["gil/weight_zero_frac"] == 0
    per_token, _ = ppo.POLICY_LOSSES["ppo_clip"](logprobs, old, adv, mask, clip_eps=0.2)
    combined = ppo.aggregate_loss(per_token, mask, "seq_mean_token_mean") + gil.group_invariant_policy_loss(
        gil.sequence_surrogate(per_token, mask), q, perf, beta
    )
    assert torch.allclose(weighted, combined)
    g_w, g_c = (torch.autograd.grad(x, logprobs, retain_graph=True)[0] for x in (weighted, combined))
    assert torch.allclose(g_w, g_c)


def test_two_equal_hard_groups_weight_formula():
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    q = torch.nn.functional.one_hot(labels, 2).to(torch.float64)
    perf = torch.tensor([2.0, -1.0, 1.0, 0.0, 0.5, 0.0])
    R = gil.group_means(q, perf, eps=0.0)
    delta, beta = R[0] - R[1], 0.2
    w = gil.group_invariant_weights(q, perf, beta, eps=0.0)
    assert torch.allclose(w, 1.0 - beta * delta * (q[:, 0] - q[:, 1]))


def test_clamp_removes_negative_weights_and_is_documented_difference():
    N = 6
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    q = torch.nn.functional.one_hot(labels, 2).to(torch.float64)
    perf = torch.tensor([2.0, 1.5, 1.0, -1.0, -1.5, -2.0])  # Delta = 3
    beta = 0.5  # weights 1 -/+ 1.5: high group negative
    raw = gil.group_invariant_weights(q, perf, beta, eps=0.0, clamp_min=None)
    w = gil.group_invariant_weights(q, perf, beta, eps=0.0)
    assert torch.allclose(raw, torch.tensor([-0.5] * 3 + [2.5] * 3))
    assert torch.equal(w, raw.clamp_min(0.0))
    logprobs, old, adv, mask = _policy_batch(B=N, seed=4)
    weighted, metrics = gil.gil_policy_loss(logprobs, old, adv, mask, w, clip_eps=0.2)
    assert metrics["gil/weight_zero_frac"] == 0.5
    per_token, _ = ppo.POLICY_LOSSES["ppo_clip"](logprobs, old, adv, mask, clip_eps=0.2)
    s = gil.sequence_surrogate(per_token, mask)
    ppo_plus_lvar = ppo.aggregate_loss(per_token, mask, "seq_mean_token_mean") + gil.group_invariant_policy_loss(
        s, q, perf, beta, eps=0.0
    )
    # clamped loss = PPO + L_var + (1/N) sum_{w_i < 0} w_i s_i
    assert torch.allclose(weighted, ppo_plus_lvar + (raw.clamp_max(0.0) * s).sum() / N)


# --------------------------------------------------------------------------------------------
# Performance, group inference guards, metrics
# --------------------------------------------------------------------------------------------


def test_performance_modes():
    scores = torch.tensor([1.0, 3.0, 5.0, 7.0], requires_grad=True)
    G = gil.performance(scores)
    assert not G.requires_grad
    assert torch.allclose(G.mean(), torch.tensor(0.0)) and torch.allclose(G.std(), torch.tensor(1.0), atol=1e-6)
    # Monte-Carlo return of the task reward (no KL), gamma = 1: the whitened score again
    mask = torch.zeros(4, 5)
    for b in range(4):
        mask[b, 1 + b % 2 : 5 - b % 3] = 1.0
    task_rewards = ppo.compute_token_rewards(scores.detach(), torch.randn(4, 5), 0.0, mask)
    _, mc = ppo.compute_gae(task_rewards, torch.zeros(4, 5), mask, gamma=1.0, lam=1.0)
    assert torch.allclose(gil.performance(response_mask=mask, returns=mc, mode="mc_return"), G)
    with pytest.raises(ValueError, match="whitened_score"):
        gil.performance(scores, mode="kl_shaped")
    with pytest.raises(ValueError, match="returns"):
        gil.performance(scores, mode="mc_return")


def test_group_inference_guards():
    q = torch.tensor([[0.95, 0.05], [0.85, 0.15], [0.9, 0.1]], requires_grad=True)  # qbar = (0.9, 0.1)
    perf = torch.tensor([1.0, -1.0, 0.0])
    base, m0 = gil.group_inference_loss(q, perf, beta_critic=1.0)
    guarded, m1 = gil.group_inference_loss(q, perf, beta_critic=1.0, min_group_mass=0.3, mass_penalty_coef=2.0)
    assert torch.allclose(m1["gil/head_mass_penalty"], torch.tensor(0.2))
    assert torch.allclose(guarded - base, torch.tensor(2.0 * 0.2))
    assert torch.allclose(m0["gil/head_mass_min"], torch.tensor(0.1))
    # the hinge alone pushes mass into the starved group
    (g,) = torch.autograd.grad(guarded - base, q, retain_graph=True)
    assert torch.allclose(g, torch.tensor([[0.0, -2.0 / 3]] * 3), atol=1e-12)
    ent, m2 = gil.group_inference_loss(q, perf, beta_critic=2.0, entropy_coef=0.5)
    H = -(0.9 * torch.log(torch.tensor(0.9)) + 0.1 * torch.log(torch.tensor(0.1)))
    assert torch.allclose(m2["gil/head_assign_entropy"], H)
    assert torch.allclose(ent, 2.0 * (base - 0.5 * H))
    assert torch.allclose(m0["gil/head_r_var"], -base)


def test_group_metrics_match_loops():
    N, M = 9, 3
    q, perf = _random_q(N, M, 10), torch.randn(N)
    per_sample = {"reward": torch.randn(N), "kl": torch.rand(N)}
    out = gil.group_metrics(q, per_sample, perf=perf)
    for name, x in per_sample.items():
        ref = group_means_loop(q, x)
        for g in range(M):
            assert torch.allclose(out[f"group/{g}/{name}"], ref[g])
    for g in range(M):
        assert torch.allclose(out[f"group/{g}/mass"], q[:, g].mean())
    R = group_means_loop(q, perf)
    g_high = int(torch.argmax(R))
    assert torch.allclose(out["gil/r_var"], group_variance_loop(R))
    assert torch.allclose(out["gil/delta"], R.max() - R.min())
    assert out["gil/high_group"] == g_high
    assert torch.allclose(out["gil/p_high_mean"], q[:, g_high].mean())
    assert torch.allclose(out["gil/p_high_min"], q[:, g_high].min())
    assert torch.allclose(out["gil/p_high_max"], q[:, g_high].max())
    assert all(v.dim() == 0 and not v.requires_grad for v in out.values())
    # perf may also come in the per-sample dict
    assert torch.equal(gil.group_metrics(q, {"perf": perf})["gil/r_var"], out["gil/r_var"])


def test_assignment_agreement_best_permutation():
    labels = torch.tensor([0, 0, 1, 1])
    swapped = torch.tensor([[0.1, 0.9], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4]])
    assert gil.assignment_agreement(swapped, labels) == 1.0
    one_wrong = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    assert gil.assignment_agreement(one_wrong, labels) == 0.75
    # more known labels than groups (e.g. 3 families, 2 inferred groups)
    labels3 = torch.tensor([0, 0, 2, 2, 1])
    assert gil.assignment_agreement(swapped[[0, 1, 2, 3, 3]], labels3, num_labels=3) == 0.8
