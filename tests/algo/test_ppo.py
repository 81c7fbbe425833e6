"""Tests for gil_megatron/algo/ppo.py: every function against hand numbers or a plain loop."""

import math

import pytest
import torch

from gil_megatron.algo import ppo
from gil_megatron.algo.kl import kl_per_token

pytestmark = pytest.mark.usefixtures("float64_default")  # tests/algo/conftest.py




def _mask(rows, T):
    """Response mask [B, T] from (start, end) per row: 1 on [start, end)."""
    m = torch.zeros(len(rows), T)
    for b, (s, e) in enumerate(rows):
        m[b, s:e] = 1.0
    return m


# --------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------


def test_masked_sum_mean_var_match_selected_entries():
    torch.manual_seed(0)
    x = torch.randn(3, 5)
    mask = _mask([(0, 5), (1, 3), (2, 5)], 5)
    sel = x[mask.bool()]
    assert torch.allclose(ppo.masked_sum(x, mask), sel.sum())
    assert torch.allclose(ppo.masked_mean(x, mask), sel.mean())
    assert torch.allclose(ppo.masked_var(x, mask, unbiased=True), sel.var(unbiased=True))
    assert torch.allclose(ppo.masked_var(x, mask, unbiased=False), sel.var(unbiased=False))
    rows = [x[b][mask[b].bool()].mean() for b in range(3)]
    assert torch.allclose(ppo.masked_mean(x, mask, dim=-1), torch.stack(rows))


def test_masked_stats_ignore_nan_and_inf_off_mask():
    x = torch.tensor([[1.0, float("nan"), float("inf")]])
    mask = torch.tensor([[1.0, 0.0, 0.0]])
    assert ppo.masked_sum(x, mask) == 1.0
    assert ppo.masked_mean(x, mask.bool()) == 1.0


def test_masked_whiten():
    torch.manual_seed(1)
    x = torch.randn(4, 6) * 3 + 2
    mask = _mask([(0, 6), (2, 6), (1, 4), (0, 2)], 6)
    w = ppo.masked_whiten(x, mask)
    assert torch.allclose(ppo.masked_mean(w, mask), torch.tensor(0.0), atol=1e-12)
    assert torch.allclose(ppo.masked_var(w, mask), torch.tensor(1.0), atol=1e-6)
    assert (w[mask == 0] == 0).all()
    # shift_mean=False: rescaled around the original mean
    w2 = ppo.masked_whiten(x, mask, shift_mean=False)
    assert torch.allclose(ppo.masked_mean(w2, mask), ppo.masked_mean(x, mask))
    assert torch.allclose(ppo.masked_var(w2, mask), torch.tensor(1.0), atol=1e-6)
    # precomputed (e.g. all-reduced) statistics are used as given
    w3 = ppo.masked_whiten(x, mask, mean=torch.tensor(1.0), var=torch.tensor(4.0), eps=0.0)
    assert torch.allclose(w3[mask.bool()], (x[mask.bool()] - 1.0) / 2.0)


# --------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------


def test_compute_token_rewards_hand_numbers():
    # row 0: prompt 1 token, response positions 1..3; row 1: response 0..1, then padding
    mask = _mask([(1, 4), (0, 2)], 4)
    kl = torch.tensor([[9.0, 0.1, 0.2, 0.3], [0.5, -0.5, 7.0, 7.0]])
    scores = torch.tensor([2.0, -1.0])
    r = ppo.compute_token_rewards(scores, kl, 0.5, mask)
    expected = torch.tensor([[0.0, -0.05, -0.1, -0.15 + 2.0], [-0.25, 0.25 - 1.0, 0.0, 0.0]])
    assert torch.allclose(r, expected)
    # per-sample coefficients [B]
    r = ppo.compute_token_rewards(scores, kl, torch.tensor([1.0, 0.0]), mask)
    expected = torch.tensor([[0.0, -0.1, -0.2, -0.3 + 2.0], [0.0, -1.0, 0.0, 0.0]])
    assert torch.allclose(r, expected)


def test_compute_token_rewards_empty_row_gets_nothing():
    mask = _mask([(0, 2), (0, 0)], 3)
    r = ppo.compute_token_rewards(torch.tensor([1.0, 5.0]), torch.zeros(2, 3), 0.1, mask)
    assert torch.equal(r, torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))


def test_running_moments_match_torch_on_concatenated_batches():
    torch.manual_seed(2)
    batches = [torch.randn(n) * s + m for n, s, m in [(7, 1.0, 0.0), (1, 1.0, 5.0), (30, 3.0, -2.0), (4, 0.1, 1.0)]]
    rm = ppo.RunningMoments()
    rm_sums = ppo.RunningMoments()
    for b in batches:
        rm.update_from_batch(b)
        # the data-parallel path: SUM-reducible (count, sum, sum of squares)
        rm_sums.update(*ppo.RunningMoments.moments_from_sums(torch.tensor(float(b.numel())), b.sum(), b.square().sum()))
    allx = torch.cat(batches)
    for r in (rm, rm_sums):
        assert r.count == allx.numel()
        assert torch.allclose(r.mean, allx.mean())
        assert torch.allclose(r.var, allx.var(unbiased=False))
        assert torch.allclose(r.var_unbiased, allx.var(unbiased=True))
    # masked batches: only masked entries count
    rm2 = ppo.RunningMoments()
    x = torch.tensor([1.0, 2.0, 100.0])
    rm2.update_from_batch(x, torch.tensor([1.0, 1.0, 0.0]))
    assert torch.allclose(rm2.mean, torch.tensor(1.5)) and rm2.count == 2
    # checkpoint / resume
    restored = ppo.RunningMoments()
    restored.load_state_dict(rm.state_dict())
    for key in ("count", "mean", "m2"):
        assert torch.equal(getattr(restored, key), getattr(rm, key))
    # an empty batch changes nothing
    before = rm.state_dict()
    rm.update(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0))
    assert all(torch.equal(before[k], rm.state_dict()[k]) for k in before)


def test_normalize_and_clip_rewards():
    rm = ppo.RunningMoments()
    rm.update_from_batch(torch.tensor([0.0, 2.0, 4.0]))  # mean 2, population std sqrt(8/3)
    std = math.sqrt(8.0 / 3.0)
    s = torch.tensor([2.0, 2.0 + std, 10.0])
    out = ppo.normalize_and_clip_rewards(s, rm, clip=2.0, eps=0.0)
    assert torch.allclose(out, torch.tensor([0.0, 1.0, 2.0]))
    out = ppo.normalize_and_clip_rewards(s, rm, clip=None, shift_mean=False, eps=0.0)
    assert torch.allclose(out, s / std)


# --------------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------------


def _gae_loop(rewards, values, mask, gamma, lam):
    """Plain double loop over rows and response tokens, on Python floats."""
    B, T = rewards.shape
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t] != 0]
        last_gae = 0.0
        for k in reversed(range(len(idx))):
            t = idx[k]
            next_v = float(values[b, idx[k + 1]]) if k + 1 < len(idx) else 0.0
            delta = float(rewards[b, t]) + gamma * next_v - float(values[b, t])
            last_gae = delta + gamma * lam * last_gae
            adv[b][t] = last_gae
    adv = torch.tensor(adv)
    return adv, (adv + values) * mask


def test_gae_hand_numbers():
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.6, 0.7]])
    m = torch.ones(1, 3)
    adv, ret = ppo.compute_gae(r, v, m, gamma=1.0, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[0.5, 0.4, 0.3]]))
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0, 1.0]]))
    # gamma=0.9, lam=0.8: deltas (0.04, 0.03, 0.3); A2=0.3, A1=0.03+0.72*0.3, A0=0.04+0.72*A1
    adv, ret = ppo.compute_gae(r, v, m, gamma=0.9, lam=0.8)
    a1 = 0.03 + 0.72 * 0.3
    assert torch.allclose(adv, torch.tensor([[0.04 + 0.72 * a1, a1, 0.3]]))
    assert torch.allclose(ret, adv + v)


def test_gae_skips_prompt_and_padding():
    # same response as above placed after a 2-token prompt and before padding with junk values
    r = torch.tensor([[5.0, 5.0, 0.0, 0.0, 1.0, 5.0]])
    v = torch.tensor([[100.0, 100.0, 0.5, 0.6, 0.7, 100.0]])
    m = _mask([(2, 5)], 6)
    adv, ret = ppo.compute_gae(r, v, m, gamma=0.9, lam=0.8)
    a1 = 0.03 + 0.72 * 0.3
    assert torch.allclose(adv, torch.tensor([[0.0, 0.0, 0.04 + 0.72 * a1, a1, 0.3, 0.0]]))
    assert torch.allclose(ret[0, 2:5], adv[0, 2:5] + v[0, 2:5])
    assert (ret[m == 0] == 0).all()


def test_gae_matches_loop_on_random_batches():
    torch.manual_seed(3)
    T = 9
    m = _mask([(0, 9), (2, 7), (4, 5), (1, 1), (3, 9)], T)
    m[0, 4] = 0.0  # a gap inside a response
    r, v = torch.randn(5, T), torch.randn(5, T)
    for gamma, lam in [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0)]:
        adv, ret = ppo.compute_gae(r, v, m, gamma, lam)
        adv_ref, ret_ref = _gae_loop(r, v, m, gamma, lam)
        assert torch.allclose(adv, adv_ref) and torch.allclose(ret, ret_ref)


def test_gae_with_zero_values_and_lambda_one_is_monte_carlo_return():
    r = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    m = torch.ones(1, 4)
    _, ret = ppo.compute_gae(r, torch.zeros_like(r), m, gamma=0.5, lam=1.0)
    assert torch.allclose(ret, torch.tensor([[1 * 0.5 + 2 * 0.25 + 3 * 0.125, 1 + 2 * 0.5 + 3 * 0.25, 2 + 1.5, 3.0]]))


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


def test_aggregate_loss_modes_hand_numbers():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [7.0, 7.0, 7.0]])
    mask = _mask([(0, 3), (0, 1), (0, 0)], 3)  # last row empty
    assert torch.allclose(ppo.aggregate_loss(loss, mask, "token_mean"), torch.tensor(10.0 / 4))
    assert torch.allclose(ppo.aggregate_loss(loss, mask, "seq_mean_token_mean"), torch.tensor((2.0 + 4.0) / 2))
    assert torch.allclose(ppo.aggregate_loss(loss, mask, "seq_mean_token_sum"), torch.tensor((6.0 + 4.0) / 2))
    assert torch.allclose(ppo.per_sequence_mean(loss, mask), torch.tensor([2.0, 4.0, 0.0]))
    with pytest.raises(ValueError, match="seq_mean_token_mean"):
        ppo.aggregate_loss(loss, mask, "sum_everything")


@pytest.mark.parametrize("mode", sorted(ppo.LOSS_AGG_MODES))
def test_aggregate_normalizer_makes_micro_batches_add_up(mode):
    torch.manual_seed(4)
    loss = torch.randn(6, 5)
    mask = _mask([(0, 5), (1, 4), (2, 3), (0, 2), (3, 5), (0, 5)], 5)
    full = ppo.aggregate_loss(loss, mask, mode)
    normalizer = mask.sum() if mode == "token_mean" else torch.tensor(6.0)
    parts = sum(ppo.aggregate_loss(loss[i : i + 2], mask[i : i + 2], mode, normalizer) for i in (0, 2, 4))
    assert torch.allclose(parts, full)


# --------------------------------------------------------------------------------------------
# Policy losses
# --------------------------------------------------------------------------------------------


def test_ppo_clip_hand_numbers():
    ratio = torch.tensor([[1.5, 0.5, 1.5, 0.5, 1.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 2.0]])
    old = torch.zeros(1, 5)
    logp = ratio.log().requires_grad_(True)
    mask = torch.ones(1, 5)
    loss, metrics = ppo.POLICY_LOSSES["ppo_clip"](logp, old, adv, mask, clip_eps=0.2)
    # max(-A r, -A clip(r)): clipped, unclipped, unclipped, clipped, on-policy
    assert torch.allclose(loss, torch.tensor([[-1.2, -0.5, 1.5, 0.8, -2.0]]))
    assert torch.allclose(metrics["policy/clipfrac"], torch.tensor(2 / 5))
    assert torch.allclose(metrics["policy/clipfrac_lower"], torch.tensor(0.0))
    assert torch.allclose(metrics["policy/ratio_max"], torch.tensor(1.5))
    assert torch.allclose(metrics["policy/ratio_min"], torch.tensor(0.5))
    assert torch.allclose(metrics["policy/ratio_mean"], ratio.mean())
    assert torch.allclose(metrics["policy/approx_kl"], ((ratio - 1) - ratio.log()).mean())
    # clipped tokens carry no gradient; unclipped ones d(-A r)/dlogp = -A r
    loss.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -0.5, 1.5, 0.0, -2.0]]))


def test_ppo_dual_clip_hand_numbers():
    ratio = torch.tensor([[5.0, 5.0, 1.1, 0.1]])
    adv = torch.tensor([[-1.0, 1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    old = torch.zeros(1, 4)
    loss, metrics = ppo.POLICY_LOSSES["ppo_clip"](ratio.log(), old, adv, mask, clip_eps=0.2, clip_ratio_c=3.0)
    # A<0, r=5: standard clip loss max(5, 1.2) = 5, dual clip bounds it at -A*c = 3
    # A>0, r=5: dual clip does not apply: max(-5, -1.2) = -1.2
    # A<0, r=1.1: max(1.1, 1.1) = 1.1 < 3, untouched; last token masked -> 0
    assert torch.allclose(loss, torch.tensor([[3.0, -1.2, 1.1, 0.0]]))
    assert torch.allclose(metrics["policy/clipfrac_lower"], torch.tensor(1 / 3))
    assert torch.allclose(metrics["policy/ratio_max"], torch.tensor(5.0))
    assert torch.allclose(metrics["policy/ratio_min"], torch.tensor(1.1))
    with pytest.raises(ValueError, match="clip_ratio_c"):
        ppo.POLICY_LOSSES["ppo_clip"](ratio.log(), old, adv, mask, clip_eps=0.2, clip_ratio_c=1.0)


@pytest.mark.parametrize("name", sorted(ppo.POLICY_LOSSES))
def test_every_policy_loss_through_the_shared_signature(name):
    torch.manual_seed(5)
    B, T = 3, 4
    logp = (torch.randn(B, T) * 0.1).requires_grad_(True)
    old, adv = torch.randn(B, T) * 0.1, torch.randn(B, T)
    mask = _mask([(0, 4), (1, 3), (0, 1)], T)
    fn = ppo.get_policy_loss(name)
    for c in (None, 3.0):
        loss, metrics = fn(logp, old, adv, mask, clip_eps=0.2, clip_ratio_c=c)
        assert loss.shape == (B, T) and (loss[mask == 0] == 0).all()
        assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in metrics.values())
        assert "policy/clipfrac" in metrics and "policy/approx_kl" in metrics
        # at ratio = 1 every clipped loss equals the vanilla policy-gradient loss -A
        loss0, _ = fn(old, old, adv, mask, clip_eps=0.2, clip_ratio_c=c)
        assert torch.allclose(loss0, -adv * mask)
        ppo.aggregate_loss(loss, mask, "token_mean").backward()


def test_unknown_policy_loss_lists_valid_names():
    with pytest.raises(ValueError, match="ppo_clip"):
        ppo.get_policy_loss("trpo")


# --------------------------------------------------------------------------------------------
# Value, entropy, KL
# --------------------------------------------------------------------------------------------


def test_value_loss_clipping_hand_numbers():
    values = torch.tensor([[1.5, 1.1, 0.5, 2.5]])
    old = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    returns = torch.tensor([[2.0, 2.0, 0.0, 3.0]])
    mask = torch.ones(1, 4)
    # vf1 = (.25, .81, .25, .25); clipped V = (1.2, 1.1, 0.8, 1.2) -> vf2 = (.64, .81, .64, 3.24)
    loss, metrics = ppo.value_loss(values, old, returns, mask, clip_eps_value=0.2, mode="token_mean")
    assert torch.allclose(loss, torch.tensor(0.5 * (0.64 + 0.81 + 0.64 + 3.24) / 4))
    assert torch.allclose(metrics["value/vf_clipfrac"], torch.tensor(3 / 4))
    assert torch.allclose(metrics["value/error"], torch.tensor((0.25 + 0.81 + 0.25 + 0.25) / 4))
    loss, metrics = ppo.value_loss(values, old, returns, mask, clip_eps_value=None, mode="token_mean")
    assert torch.allclose(loss, torch.tensor(0.5 * (0.25 + 0.81 + 0.25 + 0.25) / 4))
    assert metrics["value/vf_clipfrac"] == 0


def test_value_clipfrac_ignores_rounding_ties():
    """Inside the clip range old + (V - old) equals V only up to one rounding; such ties are no clip."""
    g = torch.Generator().manual_seed(0)
    values = 1e-3 * torch.randn(64, 32, generator=g)
    old = values + 0.15 * torch.rand(64, 32, generator=g)  # all within clip_eps_value=0.2; old >> V
    returns = torch.randn(64, 32, generator=g)
    rounded = old + (values - old)
    assert ((rounded - returns).square() > (values - returns).square()).any()  # ties really occur
    _, metrics = ppo.value_loss(values, old, returns, torch.ones(64, 32), clip_eps_value=0.2)
    assert metrics["value/vf_clipfrac"] == 0


def test_explained_variance():
    torch.manual_seed(6)
    ret = torch.randn(3, 5)
    mask = _mask([(0, 5), (1, 4), (0, 3)], 5)
    assert torch.allclose(ppo.explained_variance(ret, ret, mask), torch.tensor(1.0))
    v = ret + 0.3 * torch.randn(3, 5)
    sel = mask.bool()
    expected = 1 - (ret[sel] - v[sel]).var() / ret[sel].var()
    assert torch.allclose(ppo.explained_variance(v, ret, mask), expected)


def test_entropy_bonus_and_kl_loss_are_aggregates():
    torch.manual_seed(7)
    ent, logp, ref = torch.rand(2, 4), torch.randn(2, 4), torch.randn(2, 4)
    mask = _mask([(0, 4), (1, 3)], 4)
    assert torch.allclose(ppo.entropy_bonus(ent, mask, "token_mean"), ent[mask.bool()].mean())
    d = ref - logp
    k3 = (d.exp() - 1 - d)[mask.bool()].mean()
    assert torch.allclose(ppo.kl_loss(logp, ref, mask, "k3", "token_mean"), k3)
    for est in ("k1", "k2", "k3"):
        seq = ppo.kl_loss(logp, ref, mask, est, "seq_mean_token_mean")
        per_seq = ppo.per_sequence_mean(kl_per_token(logp, ref, est), mask)
        assert torch.allclose(seq, per_seq.mean())


# --------------------------------------------------------------------------------------------
# KL controllers
# --------------------------------------------------------------------------------------------


def test_fixed_kl_controller():
    c = ppo.FixedKLController(0.05)
    c.update(current_kl=100.0, n_steps=1000)
    assert c.value == 0.05


def test_adaptive_kl_controller_update_numbers():
    c = ppo.AdaptiveKLController(init_kl_coef=0.2, target_kl=6.0, horizon=10000)
    c.update(current_kl=3.0, n_steps=256)  # error -0.5 clipped to -0.2
    assert c.value == pytest.approx(0.2 * (1 - 0.2 * 256 / 10000))
    v = c.value
    c.update(current_kl=6.6, n_steps=100)  # error +0.1, inside the clip
    assert c.value == pytest.approx(v * (1 + 0.1 * 100 / 10000))
    v = c.value
    c.update(current_kl=60.0, n_steps=100)  # error +9 clipped to +0.2
    assert c.value == pytest.approx(v * (1 + 0.2 * 100 / 10000))
    resumed = ppo.AdaptiveKLController(init_kl_coef=0.2, target_kl=6.0, horizon=10000)
    resumed.load_state_dict(c.state_dict())
    assert resumed.value == c.value
    with pytest.raises(ValueError, match="target_kl"):
        ppo.AdaptiveKLController(0.1, 0.0, 10)
