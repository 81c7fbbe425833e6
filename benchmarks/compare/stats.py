"""The comparison's statistics: pure functions of numbers (no files, no models).

Frontiers (gold vs KL to the SFT policy, one point per run) are compared only by interpolation
inside the KL range both methods cover, never by extrapolation:

    frontier(points)       the piecewise-linear curve through a method's points sorted by KL (points
                           at the same KL averaged); defined on [min KL, max KL] only
    common_range(a, b)     [max of the two minima, min of the two maxima]; None when it is empty or
                           a single point (then any comparison would extrapolate one method)
    frontier_gap(a, b)     (1 / (hi - lo)) * integral_lo^hi (f_a(x) - f_b(x)) dx over the common
                           range: the mean vertical gap, exact for piecewise-linear curves

Uncertainty: paired bootstraps over seeds and prompts. Seeds are paired by index (run k of every
arm shares resample draw k); prompts are resampled within their group with the same draw for every
run, so group sizes stay fixed and both methods see the same prompts.

    frontier_gap_bootstrap    the gap's point estimate and percentile CI, refused resamples counted
    paired_bootstrap          A - B per prompt at equal settings: mean and worst-group differences

Conventions: a run's per-prompt values are arrays [P] in one fixed prompt order; ``groups`` [P]
labels them. ``mean_sd`` is the across-seed summary of table.json (sample sd; None below 2 runs).
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

Point = Tuple[float, float]  # (KL to SFT, metric)


class ExtrapolationError(ValueError):
    """The two frontiers share no KL range of positive length: comparing them would extrapolate."""


def mean_sd(values: Sequence[Optional[float]]) -> Dict[str, Optional[float]]:
    """{"mean", "sd", "n"} of the finite values (sample sd, None with fewer than 2; mean None with 0)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return {"mean": None, "sd": None, "n": 0}
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return {"mean": m, "sd": sd, "n": len(xs)}


# ---------------------------------------------------------------------------------------------
# Frontiers
# ---------------------------------------------------------------------------------------------


def frontier(points: Sequence[Point]) -> Tuple[np.ndarray, np.ndarray]:
    """(xs, ys): the knots of the piecewise-linear frontier, xs strictly increasing. Points with
    equal KL are averaged (two seeds at the same KL are one noisy reading of one point)."""
    if not points:
        raise ValueError("a frontier needs at least one point")
    pts = sorted((float(x), float(y)) for x, y in points)
    xs: List[float] = []
    ys: List[List[float]] = []
    for x, y in pts:
        if xs and x == xs[-1]:
            ys[-1].append(y)
        else:
            xs.append(x)
            ys.append([y])
    return np.asarray(xs), np.asarray([sum(v) / len(v) for v in ys])


def interpolate(points: Sequence[Point], x):
    """The frontier's value at KL ``x`` (a number or an array); raises ExtrapolationError for any x
    outside [min KL, max KL]."""
    xs, ys = frontier(points)
    x_arr = np.asarray(x, dtype=np.float64)
    if x_arr.size and (x_arr.min() < xs[0] or x_arr.max() > xs[-1]):
        raise ExtrapolationError(f"KL {x_arr.min():g}..{x_arr.max():g} is outside the frontier's range "
                                 f"[{xs[0]:g}, {xs[-1]:g}]")
    out = np.interp(x_arr, xs, ys)
    return float(out) if out.ndim == 0 else out


def common_range(a: Sequence[Point], b: Sequence[Point]) -> Optional[Tuple[float, float]]:
    """The KL interval both frontiers cover, or None when it has no positive length."""
    lo = max(min(x for x, _ in a), min(x for x, _ in b))
    hi = min(max(x for x, _ in a), max(x for x, _ in b))
    return (lo, hi) if hi > lo else None


def frontier_gap(a: Sequence[Point], b: Sequence[Point]) -> float:
    """Mean vertical gap f_a - f_b over the common KL range (exact: both curves are linear between
    the union of their knots, so the trapezoid rule on those knots is the integral)."""
    rng = common_range(a, b)
    if rng is None:
        xa, xb = [x for x, _ in a], [x for x, _ in b]
        raise ExtrapolationError(f"no common KL range: A covers [{min(xa):g}, {max(xa):g}], "
                                 f"B covers [{min(xb):g}, {max(xb):g}]")
    lo, hi = rng
    xa, xb = frontier(a)[0], frontier(b)[0]
    knots = np.unique(np.concatenate([[lo, hi], xa[(xa > lo) & (xa < hi)], xb[(xb > lo) & (xb < hi)]]))
    diff = interpolate(a, knots) - interpolate(b, knots)
    return float(np.sum((diff[1:] + diff[:-1]) / 2 * np.diff(knots)) / (hi - lo))


# ---------------------------------------------------------------------------------------------
# Bootstrap resamples
# ---------------------------------------------------------------------------------------------


def prompt_resamples(groups: Sequence[str], n: int, rng: np.random.Generator) -> np.ndarray:
    """[n, P] prompt indices: each group's prompts drawn with replacement, in place (group sizes fixed)."""
    groups = np.asarray(groups)
    out = np.empty((n, len(groups)), dtype=np.int64)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        out[:, idx] = idx[rng.integers(0, len(idx), (n, len(idx)))]
    return out


def run_statistic(values: np.ndarray, groups: Sequence[str], metric: str, prompt_idx: np.ndarray) -> np.ndarray:
    """A per-run statistic of per-prompt ``values`` [P] on each prompt resample [n, P] -> [n]:
    mean (the mean over prompts) or worst_group (the lowest group mean)."""
    x = values[prompt_idx]
    if metric == "mean":
        return x.mean(axis=1)
    if metric == "worst_group":
        groups = np.asarray(groups)
        return np.stack([x[:, groups == g].mean(axis=1) for g in np.unique(groups)], axis=1).min(axis=1)
    raise ValueError(f"run statistic {metric!r}; valid: mean, worst_group")


def percentile_ci(values: Sequence[float], confidence: float = 0.95) -> Tuple[float, float]:
    lo, hi = np.percentile(np.asarray(values, dtype=np.float64), [50 * (1 - confidence), 50 * (1 + confidence)])
    return float(lo), float(hi)


def frontier_gap_bootstrap(a_runs: Sequence[Sequence[Tuple[np.ndarray, np.ndarray]]],
                           b_runs: Sequence[Sequence[Tuple[np.ndarray, np.ndarray]]],
                           groups: Sequence[str], metric: str, *,
                           anchor: Optional[Tuple[np.ndarray, np.ndarray]] = None, n: int = 2000, seed: int = 0,
                           confidence: float = 0.95) -> dict:
    """Mean frontier gap of method A over method B with a paired bootstrap over seeds and prompts.

    a_runs[j][k] = (y [P], kl [P]): per-prompt metric values and KL to SFT of method A's arm j (a
    grid value), seed index k; the same for B. Only seed indices every arm has are used (pairing by
    index). ``anchor``: a run in every frontier (the SFT start at KL 0). Each resample draws S seed
    indices with replacement (one draw for all arms of both methods) and the prompts within their
    groups (one draw for all runs); a resample whose frontiers share no KL range is refused and
    counted. Returns {gap, ci_low, ci_high, n, refused, seeds, range: [lo, hi]}; gap None (and no
    CI) when the point estimate itself would extrapolate."""
    S = min(len(r) for r in (*a_runs, *b_runs))
    P = len(groups)
    ident = np.arange(P)[None, :]

    def points(runs, prompt_idx):
        # per-run (kl, y) on these prompts: [n] arrays for every (arm, seed index)
        return [[(run_statistic(kl, groups, "mean", prompt_idx), run_statistic(y, groups, metric, prompt_idx))
                 for y, kl in arm[:S]] for arm in runs]

    def gaps(seed_idx, prompt_idx):
        pa, pb = points(a_runs, prompt_idx), points(b_runs, prompt_idx)
        anc = None
        if anchor is not None:
            anc = (run_statistic(anchor[1], groups, "mean", prompt_idx),
                   run_statistic(anchor[0], groups, metric, prompt_idx))
        out = []
        for r in range(prompt_idx.shape[0]):
            sel = seed_idx[r]
            fa = [(float(arm[k][0][r]), float(arm[k][1][r])) for arm in pa for k in sel]
            fb = [(float(arm[k][0][r]), float(arm[k][1][r])) for arm in pb for k in sel]
            if anc is not None:
                fa.append((float(anc[0][r]), float(anc[1][r])))
                fb.append((float(anc[0][r]), float(anc[1][r])))
            try:
                out.append(frontier_gap(fa, fb))
            except ExtrapolationError:
                out.append(float("nan"))
        return np.asarray(out), (fa, fb)

    point, (fa, fb) = gaps(np.arange(S)[None, :], ident)
    result = {"gap": None, "ci_low": None, "ci_high": None, "n": n, "refused": None, "seeds": S,
              "range": list(common_range(fa, fb) or ()) or None}
    if math.isnan(point[0]):
        return result
    rng = np.random.default_rng(seed)
    seed_idx = rng.integers(0, S, (n, S))
    boot, _ = gaps(seed_idx, prompt_resamples(groups, n, rng))
    ok = boot[~np.isnan(boot)]
    result.update(gap=float(point[0]), refused=int(n - len(ok)))
    if len(ok):
        result["ci_low"], result["ci_high"] = percentile_ci(ok, confidence)
    return result


def paired_bootstrap(a: np.ndarray, b: np.ndarray, groups: Sequence[str], *, n: int = 2000, seed: int = 0,
                     confidence: float = 0.95) -> Dict[str, Dict[str, float]]:
    """A - B at equal settings, paired by seed index and prompt.

    a, b: [S, P] per-(seed index, prompt) values of two arms on the same prompts. A statistic is
    computed on each arm's [S, P] block (mean over seeds and prompts; worst group = the lowest group
    mean over the block) and the difference taken; each of the n resamples draws S seed indices
    with replacement and the prompts within their groups, the same draw for both arms. Returns
    {mean: {diff, ci_low, ci_high}, worst_group: {...}}."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired arms need the same seeds x prompts; got {a.shape} and {b.shape}")
    S, P = a.shape
    groups = np.asarray(groups)
    labels = np.unique(groups)

    def stats(x, seed_idx, prompt_idx):  # x [S, P]; seed_idx [n, S]; prompt_idx [n, P] -> mean [n], worst [n]
        block = x[seed_idx[:, :, None], prompt_idx[:, None, :]]  # [n, S, P]
        per_group = np.stack([block[:, :, groups == g].mean(axis=(1, 2)) for g in labels], axis=1)
        return block.mean(axis=(1, 2)), per_group.min(axis=1)

    ident = (np.arange(S)[None, :], np.arange(P)[None, :])
    (ma, wa), (mb, wb) = stats(a, *ident), stats(b, *ident)
    rng = np.random.default_rng(seed)
    seed_idx = rng.integers(0, S, (n, S))
    prompt_idx = prompt_resamples(groups, n, rng)
    (xa, ya), (xb, yb) = stats(a, seed_idx, prompt_idx), stats(b, seed_idx, prompt_idx)
    out = {}
    for key, point, diffs in (("mean", ma[0] - mb[0], xa - xb), ("worst_group", wa[0] - wb[0], ya - yb)):
        lo, hi = percentile_ci(diffs, confidence)
        out[key] = {"diff": float(point), "ci_low": lo, "ci_high": hi}
    return out


def win_tie_lose(a: np.ndarray, b: np.ndarray, tie_margin: float = 0.0) -> Dict[str, float]:
    """Shares of paired (seed, prompt) cells where A beats B by more than the margin, ties, loses."""
    d = (np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).ravel()
    n = len(d)
    return {"n": n, "win": float((d > tie_margin).mean()), "tie": float((np.abs(d) <= tie_margin).mean()),
            "lose": float((d < -tie_margin).mean())}
