"""benchmarks/compare/stats.py against hand-computed cases: interpolation, the common KL range, the
mean frontier gap (and its refusal to extrapolate), the paired bootstraps."""

import numpy as np
import pytest

from benchmarks.compare import stats


def test_mean_sd():
    assert stats.mean_sd([1.0, 2.0, 3.0]) == {"mean": 2.0, "sd": 1.0, "n": 3}
    assert stats.mean_sd([5.0, None, float("nan")]) == {"mean": 5.0, "sd": None, "n": 1}
    assert stats.mean_sd([]) == {"mean": None, "sd": None, "n": 0}


def test_interpolation_inside_the_range_only():
    pts = [(2.0, 0.7), (0.0, 0.5), (1.0, 0.6)]
    assert stats.interpolate(pts, 0.5) == pytest.approx(0.55)
    assert stats.interpolate(pts, 1.5) == pytest.approx(0.65)
    assert stats.interpolate(pts, 2.0) == pytest.approx(0.7)
    assert stats.interpolate(pts, [0.0, 0.25, 1.75]).tolist() == pytest.approx([0.5, 0.525, 0.675])
    with pytest.raises(stats.ExtrapolationError):
        stats.interpolate(pts, [0.5, 2.5])
    for x in (-0.1, 2.01):
        with pytest.raises(stats.ExtrapolationError):
            stats.interpolate(pts, x)


def test_points_at_the_same_kl_are_averaged():
    xs, ys = stats.frontier([(1.0, 0.2), (0.0, 0.0), (1.0, 0.4)])
    assert xs.tolist() == [0.0, 1.0] and ys.tolist() == pytest.approx([0.0, 0.3])


def test_common_range():
    a, b = [(0.0, 0), (4.0, 0)], [(2.0, 0), (6.0, 0), (3.0, 0)]
    assert stats.common_range(a, b) == (2.0, 4.0)
    assert stats.common_range(b, a) == (2.0, 4.0)
    assert stats.common_range([(0.0, 0), (1.0, 0)], [(2.0, 0), (3.0, 0)]) is None  # disjoint
    assert stats.common_range([(0.0, 0), (2.0, 0)], [(2.0, 0), (3.0, 0)]) is None  # one point: no length


def test_frontier_gap_hand_computed():
    # f_a(x) = x on [0, 2]; f_b = 1 on [1, 3]; common range [1, 2]; mean of x - 1 there = 0.5
    assert stats.frontier_gap([(0.0, 0.0), (2.0, 2.0)], [(1.0, 1.0), (3.0, 1.0)]) == pytest.approx(0.5)
    # a tent (0,0) (1,1) (2,0) against the flat 0.5 on [0, 2]: areas 1 and 1, gap 0 -- although at B's
    # own knots (x = 0 and 2) A is 0.5 below and at A's peak 0.5 above
    assert stats.frontier_gap([(0.0, 0.0), (1.0, 1.0), (2.0, 0.0)], [(0.0, 0.5), (2.0, 0.5)]) == pytest.approx(0.0)
    # knots of both curves inside the range: A (0,0) (3,3); B (1,2) (2,0) (4,0) -> range [1, 3]
    # on [1, 2]: A - B = x - (2 - 2(x - 1)) = 3x - 4, integral 0.5; on [2, 3]: A - B = x, integral 2.5
    assert stats.frontier_gap([(0.0, 0.0), (3.0, 3.0)], [(1.0, 2.0), (2.0, 0.0), (4.0, 0.0)]) == pytest.approx(1.5)
    assert stats.frontier_gap([(1.0, 2.0), (2.0, 0.0), (4.0, 0.0)], [(0.0, 0.0), (3.0, 3.0)]) == pytest.approx(-1.5)


def test_a_gap_that_needs_extrapolation_is_refused():
    """GIL's points all lie beyond PPO's largest KL: the old harness extended PPO's curve flat to
    judge them; here there is nothing to compare."""
    ppo = [(0.0, 0.87), (1.4, 0.91), (3.8, 0.83)]
    gil = [(9.4, 0.70), (16.5, 0.56), (19.6, 0.47)]
    with pytest.raises(stats.ExtrapolationError, match="no common KL range"):
        stats.frontier_gap(gil, ppo)
    # with the SFT start (KL 0) in both frontiers the range [0, 3.8] is shared: interpolation only.
    # gil's line from (0, 0.87) to (9.4, 0.70) at x in [0, 3.8]: 0.87 - 0.17 x / 9.4
    gil0 = [(0.0, 0.87)] + gil
    xs = np.linspace(0.0, 3.8, 20001)
    want = np.mean([np.interp(x, *zip(*gil0)) - np.interp(x, *zip(*ppo)) for x in xs])
    assert stats.frontier_gap(gil0, ppo) == pytest.approx(want, abs=1e-4)


def _runs(kl, y):
    """One run's per-prompt (metric values, KL) arrays."""
    return np.asarray(y, dtype=np.float64), np.asarray(kl, dtype=np.float64)


def test_frontier_bootstrap_exact_shift_and_refusal():
    """Every A run = the matching B run + 0.1 gold at the same per-prompt KL: the gap is 0.1 in every
    resample (CI [0.1, 0.1]); B's KLs far beyond A's: refused, no CI."""
    rng = np.random.default_rng(0)
    groups = ["e"] * 6 + ["h"] * 6
    b_runs, a_runs = [], []
    for level in (1.0, 3.0):  # two grid values, three seeds each
        arm_b, arm_a = [], []
        for s in range(3):
            kl = level + rng.random(12)
            y = rng.random(12)
            arm_b.append(_runs(kl, y))
            arm_a.append(_runs(kl, y + 0.1))
        b_runs.append(arm_b)
        a_runs.append(arm_a)
    res = stats.frontier_gap_bootstrap(a_runs, b_runs, groups, "mean", n=200, seed=1)
    assert res["gap"] == pytest.approx(0.1) and res["refused"] == 0 and res["seeds"] == 3
    assert res["ci_low"] == pytest.approx(0.1) and res["ci_high"] == pytest.approx(0.1)
    far = [[_runs(kl + 100.0, y) for y, kl in arm] for arm in b_runs]
    res = stats.frontier_gap_bootstrap(a_runs, far, groups, "mean", n=200)
    assert res["gap"] is None and res["ci_low"] is None
    # the anchor at KL 0 joins both frontiers: the range [0, min max] is shared, a gap exists
    anchor = _runs(np.zeros(12), np.full(12, 0.5))
    res = stats.frontier_gap_bootstrap(a_runs, far, groups, "mean", anchor=anchor, n=200)
    assert res["gap"] is not None and res["range"][0] == 0.0


def test_frontier_bootstrap_worst_group_is_the_lowest_group_mean():
    groups = ["e", "e", "h", "h"]
    b = [[_runs([1, 1, 1, 1], [1.0, 1.0, 0.2, 0.4])], [_runs([2, 2, 2, 2], [1.0, 1.0, 0.2, 0.4])]]
    a = [[_runs([1, 1, 1, 1], [0.9, 0.9, 0.5, 0.5])], [_runs([2, 2, 2, 2], [0.9, 0.9, 0.5, 0.5])]]
    res = stats.frontier_gap_bootstrap(a, b, groups, "worst_group", n=100)
    assert res["gap"] == pytest.approx(0.5 - 0.3)
    res = stats.frontier_gap_bootstrap(a, b, groups, "mean", n=100)
    assert res["gap"] == pytest.approx(0.7 - 0.65)


def test_prompt_resamples_stay_in_their_group():
    groups = ["a", "b", "a", "c", "b", "a"]
    idx = stats.prompt_resamples(groups, 50, np.random.default_rng(0))
    g = np.asarray(groups)
    assert idx.shape == (50, 6) and (g[idx] == g[None, :]).all()


def test_paired_bootstrap_hand_computed():
    """b: easy prompts 1, hard 0.2 and 0.4; a adds 0.2 on the hard ones. Every resample keeps the
    group sizes, so the mean difference is 0.2 * 2/4 = 0.1 and the worst-group difference 0.2 in
    each of them."""
    groups = ["e", "e", "h", "h"]
    b = np.array([[1.0, 1.0, 0.2, 0.4], [1.0, 1.0, 0.3, 0.5]])
    a = b + np.array([0.0, 0.0, 0.2, 0.2])
    res = stats.paired_bootstrap(a, b, groups, n=300)
    for key, want in (("mean", 0.1), ("worst_group", 0.2)):
        assert res[key]["diff"] == pytest.approx(want)
        assert res[key]["ci_low"] == pytest.approx(want) and res[key]["ci_high"] == pytest.approx(want)
    same = stats.paired_bootstrap(b, b, groups, n=100)
    assert same["mean"] == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0}


def test_paired_bootstrap_sees_a_real_gain_and_no_gain():
    rng = np.random.default_rng(0)
    groups = ["easy", "hard"] * 60
    b = rng.random((5, 120))
    b[:, 1::2] *= 0.5  # hard is b's worst group
    a = b.copy()
    a[:, 1::2] += 0.2
    res = stats.paired_bootstrap(a, b, groups, n=500)
    assert res["worst_group"]["ci_low"] > 0
    noise = b + rng.normal(0, 0.05, b.shape)
    res = stats.paired_bootstrap(noise, b, groups, n=500)
    assert res["mean"]["ci_low"] < 0 < res["mean"]["ci_high"]


def test_win_tie_lose():
    assert stats.win_tie_lose([[1.0, 0.5, 0.0, 0.3]], [[0.0, 0.5, 1.0, 0.2]], tie_margin=0.15) == {
        "n": 4, "win": 0.25, "tie": 0.5, "lose": 0.25}
