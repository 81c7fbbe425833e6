#!/usr/bin/env python
"""Plot a run's curves from RUN_DIR/metrics.jsonl into one PNG.

    python tools/plot_run.py runs/miniature/gil_ppo [--out curves.png] [--smooth 5]

Panels (each drawn when the run logged its metrics):
  reward      reward/mean (the trained-on reward) and reward/gold_mean (the true reward, when a gold
              function is set), with the held-out sets' eval/<set>/reward and /gold as markers
  KL          kl/mean (sum over the response, nats) and the effective KL coefficient
  known groups   per known group (the data's `group` field): gold if logged, else reward
  inferred groups  per GIL group (the critic's group head): reward, and each group's mass
Stage runs (SFT, reward model, DPO) get their train/ and eval/ curves instead. Writes
RUN_DIR/curves.png by default and prints the path.
"""

import argparse
import json
import math
import os
import re
import sys
from typing import Dict, List


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    p.add_argument("--out", default=None, help="output PNG (default RUN_DIR/curves.png)")
    p.add_argument("--smooth", type=int, default=0, help="moving-average window over iterations (0 = off)")
    return p.parse_args(argv)


def read_metrics(path: str) -> List[Dict[str, float]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no metrics.jsonl; fix: pass a run directory (run_dir of a config)")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ValueError(f"{path}: line {n} is not JSON (a run still writing it?)") from None
    if not rows:
        raise ValueError(f"{path}: empty; fix: plot after the run has logged an iteration")
    return rows


def series(rows, key):
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["iteration"])
            ys.append(float(v))
    return xs, ys


def smooth(ys, window):
    if window <= 1 or len(ys) < window:
        return ys
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _keys(rows, pattern):
    rx = re.compile(pattern)
    found = {}
    for r in rows:
        for k in r:
            m = rx.fullmatch(k)
            if m:
                found[k] = m.group(1)
    return dict(sorted(found.items(), key=lambda kv: kv[1]))


def panels(rows):
    """[(title, ylabel, [(key, label, style)])] for whatever the run logged."""
    out = []
    if any("reward/mean" in r for r in rows):  # PPO / GIL
        lines = [("reward/mean", "reward (trained on)", "-"), ("reward/gold_mean", "gold (true)", "-")]
        for k, name in _keys(rows, r"eval/([^/]+)/(?:reward|gold)").items():
            lines.append((k, f"{name} {k.rsplit('/', 1)[1]} (held-out eval)", "o"))
        out.append(("reward", "score", lines))
        out.append(("KL to the reference", "nats / response",
                    [("kl/mean", "kl/mean", "-"), ("kl/coef_effective_mean", "effective coefficient", "--")]))
        score = "gold" if any(k.endswith("/gold") for r in rows for k in r if k.startswith("known/")) else "reward"
        known = _keys(rows, rf"known/([^/]+)/{score}")
        if known:
            out.append((f"known groups ({score})", score, [(k, g, "-") for k, g in known.items()]))
        inferred = _keys(rows, r"group/([^/]+)/reward")
        if inferred:
            out.append(("inferred groups (reward)", "reward", [(k, f"group {g}", "-") for k, g in inferred.items()]))
    else:  # a stage run
        train = _keys(rows, r"train/((?:loss|accuracy|margin|reward_margin))")
        out.append(("train", "", [(k, n, "-") for k, n in train.items()]))
        ev = _keys(rows, r"eval/([^/]+)")
        if ev:
            out.append(("eval", "", [(k, n, "o-") for k, n in ev.items() if n not in ("tokens", "pairs", "examples")]))
        groups = _keys(rows, r"eval/group/([^/]+/(?:loss|accuracy))")
        if groups:
            out.append(("eval per known group", "", [(k, g, "o-") for k, g in groups.items()]))
    return [p for p in out if any(series(rows, k)[0] for k, _, _ in p[2])]


def plot(rows, out_path: str, window: int = 0) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ps = panels(rows)
    if not ps:
        raise ValueError("metrics.jsonl has none of the plotted metrics (reward/, kl/, group/, train/, eval/)")
    cols = 2 if len(ps) > 1 else 1
    nrows = (len(ps) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 3.6 * nrows), squeeze=False)
    for ax, (title, ylabel, lines) in zip(axes.flat, ps):
        for key, label, style in lines:
            xs, ys = series(rows, key)
            if xs:
                ax.plot(xs, ys if style.startswith("o") else smooth(ys, window), style, label=label,
                        markersize=4, linewidth=1.4)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        if ylabel:
            ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    for ax in list(axes.flat)[len(ps):]:
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def main(argv=None) -> str:
    args = parse_args(argv)
    rows = read_metrics(os.path.join(args.run_dir, "metrics.jsonl"))
    out = plot(rows, args.out or os.path.join(args.run_dir, "curves.png"), args.smooth)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from gil_megatron.cli import run_cli

    run_cli(main)
