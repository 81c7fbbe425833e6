"""The report's figures (matplotlib, written next to table.md).

    frontier.png         gold vs KL to SFT, one point per run; each compared method's frontier (the
                         interpolation stats.frontier_gap uses) with its KL range shaded; other arms
                         as points; the anchor (SFT start) as a star
    per_group_gold.png   gold per group on eval (and OOD), mean over seeds, one bar per arm
    per_group_kl.png     KL to SFT per group on eval
    hack_rate.png        the hack indicator's rate per group on eval
    training_curves.png  trained-on reward, gold and KL over iterations (mean over seeds, smoothed)
    diagnostics_curves.png  the protocol's diagnostics (training metrics) over iterations
"""

import os
from typing import Dict, List, Sequence

from benchmarks.compare import stats
from benchmarks.compare.report import METRIC_OF, RunResult
from benchmarks.compare.spec import Protocol, Task

CURVES = (("reward/mean", "trained-on reward"), ("reward/gold_mean", "gold"), ("kl/mean", "KL to SFT (k1, nats)"))


def _colors(protocol: Protocol) -> Dict[str, str]:
    palette = ["tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink",
               "tab:olive", "tab:cyan", "tab:gray"]
    methods = [m for m in protocol.methods if m != protocol.anchor]
    return {m: palette[i % len(palette)] for i, m in enumerate(methods)} | (
        {protocol.anchor: "black"} if protocol.anchor else {})


def _point(r: RunResult, metric: str):
    kl = r.summary.get(METRIC_OF[metric][2])
    y = r.summary.get(metric)
    return (kl, y) if kl is not None and y is not None else None


FOOTER = {"text": ""}  # the commit and command, stamped on every figure (make_plots sets it)


def _save(fig, workdir: str, name: str) -> str:
    path = os.path.join(workdir, name)
    fig.text(0.005, 0.003, FOOTER["text"], fontsize=5, color="gray", ha="left", va="bottom")
    fig.savefig(path, dpi=80)
    return path


def frontier_plot(plt, workdir: str, protocol: Protocol, results: Sequence[RunResult]) -> str:
    metrics = list(dict.fromkeys(m for _, _, ms in protocol.frontiers for m in ms)) or ["gold_eval"]
    compared = list(dict.fromkeys(x for a, b, _ in protocol.frontiers for x in (a, b)))
    colors = _colors(protocol)
    method_of = {a.name: a.method for a in protocol.arms}
    anchor = [r for r in results if protocol.anchor and r.arm == protocol.anchor and not r.failed]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        anc = _point(anchor[0], metric) if anchor else None
        for m in compared:
            pts = [p for r in results if method_of.get(r.arm) == m and not r.failed
                   for p in [_point(r, metric)] if p is not None]
            if not pts:
                continue
            ax.scatter(*zip(*pts), color=colors[m], s=22, label=m, zorder=3)
            line = pts + ([anc] if anc else [])
            xs, ys = stats.frontier(line)
            ax.plot(xs, ys, color=colors[m], lw=1.2, alpha=0.8)
            if m in compared[:2]:  # the first comparison's two ranges; their overlap is where it is measured
                ax.axvspan(xs[0], xs[-1], color=colors[m], alpha=0.08)
        for r in results:  # the other arms: one point per run, labelled once
            if method_of.get(r.arm) in compared or r.arm == protocol.anchor or r.failed:
                continue
            p = _point(r, metric)
            if p is not None:
                ax.scatter(*p, color=colors.get(method_of.get(r.arm), "gray"), marker="s", s=18, alpha=0.8)
                if r.seed is None or r.name.endswith(f"_s{protocol.arm(r.arm).seeds[0]}"):
                    ax.annotate(r.arm, p, fontsize=6, xytext=(3, 3), textcoords="offset points")
        if anc:
            ax.scatter(*anc, color="black", marker="*", s=120, zorder=4, label=protocol.anchor)
        ax.set_xlabel(f"KL to SFT (nats, {METRIC_OF[metric][0]})")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Frontiers: one point per run, lines = the interpolation the gaps use; shaded = the KL ranges of "
                 f"{' and '.join(compared[:2]) or 'no comparison'} (a gap is measured only where they overlap)",
                 fontsize=9)
    fig.tight_layout()
    return _save(fig, workdir, "frontier.png")


def group_bars(plt, workdir: str, task: Task, arms: Dict[str, dict], key: str, title: str, name: str):
    groups = sorted({g for e in arms.values() for g in (e.get("per_group") or {})
                     if (e["per_group"][g].get(key) or {}).get("mean") is not None})
    if not groups:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) + 0.25 * len(arms)), 4.2))
    width = 0.8 / max(1, len(arms))
    for i, (arm, e) in enumerate(arms.items()):
        vals = [((e.get("per_group") or {}).get(g, {}).get(key) or {}).get("mean") for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], [v if v is not None else 0.0 for v in vals], width,
               label=arm)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{g}\n({task.difficulty[g]})" if g in task.difficulty else g for g in groups], fontsize=8)
    ax.set_title(title + " (mean over seeds)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return _save(fig, workdir, name)


def _smoothed_mean(series: List[List[float]]):
    n = min(len(s) for s in series)
    w = max(1, n // 15)
    sm = [[sum(s[max(0, i - w + 1):i + 1]) / len(s[max(0, i - w + 1):i + 1]) for i in range(n)] for s in series]
    return list(range(1, n + 1)), [sum(c) / len(c) for c in zip(*sm)]


def curves_plot(plt, workdir: str, protocol: Protocol, results: Sequence[RunResult]):
    if not any(r.metrics for r in results):
        return None
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 4))
    for ax, (key, title) in zip(axes, CURVES):
        for i, arm in enumerate(protocol.arms):  # one colour per arm in every panel
            series = [[m[key] for m in r.metrics if isinstance(m.get(key), (int, float))]
                      for r in results if r.arm == arm.name and r.metrics]
            series = [s for s in series if s]
            if series:
                ax.plot(*_smoothed_mean(series), lw=1.2, label=arm.name, color=f"C{i % 10}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, workdir, "training_curves.png")


def diagnostics_plot(plt, workdir: str, protocol: Protocol, results: Sequence[RunResult]):
    """The protocol's diagnostics (training metrics) over iterations, one panel each."""
    keys = [(name, key) for name, key in protocol.diagnostics.items()
            if any(key in m for r in results for m in r.metrics)]
    if not keys:
        return None
    cols = min(4, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, key) in zip(axes.ravel(), keys):
        for i, arm in enumerate(protocol.arms):
            series = [[m[key] for m in r.metrics if isinstance(m.get(key), (int, float))]
                      for r in results if r.arm == arm.name and r.metrics]
            series = [x for x in series if x]
            if series:
                ax.plot(*_smoothed_mean(series), lw=1.0, label=arm.name, color=f"C{i % 10}")
        ax.set_title(f"{name} ({key})", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(keys):]:
        ax.axis("off")
    handles = {h.get_label(): h for ax in axes.ravel() for h in ax.get_lines()}
    axes[0][0].legend(handles.values(), handles.keys(), fontsize=6)
    fig.tight_layout()
    return _save(fig, workdir, "diagnostics_curves.png")


def make_plots(workdir: str, task: Task, protocol: Protocol, results: Sequence[RunResult], doc: dict) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = doc["arms"]
    git = doc.get("git") or {}
    FOOTER["text"] = f"commit {str(git.get('commit'))[:12]}{'+dirty' if git.get('dirty') else ''}: {doc['command']}"
    out = [frontier_plot(plt, workdir, protocol, results)]
    for key, title, name in (("gold_eval", "gold per group, eval", "per_group_gold.png"),
                             ("gold_ood", "gold per group, OOD", "per_group_gold_ood.png"),
                             ("kl", "KL to SFT per group, eval", "per_group_kl.png"),
                             ("hack_rate", "hack rate per group, eval", "hack_rate.png")):
        out.append(group_bars(plt, workdir, task, arms, key, title, name))
    out.append(curves_plot(plt, workdir, protocol, results))
    out.append(diagnostics_plot(plt, workdir, protocol, results))
    plt.close("all")
    return [p for p in out if p]
