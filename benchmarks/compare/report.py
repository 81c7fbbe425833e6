"""The report: per-run numbers -> per-arm table, comparisons, win rule and predictions -> files.

    summarize_run     one run's numbers from its samples (and training metrics.jsonl)
    aggregate_arms    mean and sd over each arm's runs (table.json's "arms")
    compare           frontier gaps and paired per-prompt differences (stats.py), as the protocol asks
    check_rules       the win rule's and the predictions' conditions: held / not held / not computable
    write_report      table.json, table.md and runs.json in the work directory

Everything here is a function of RunResult records, so a report can be rebuilt from finished runs
without training (--report-only) and from the old harness's runs.json (legacy.py), which carries
per-run summaries but no samples: there, statistics that need samples are "not computable".
"""

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from benchmarks.compare import stats
from benchmarks.compare.spec import Condition, Protocol, Ref, Rule, Task

LAST_FRACTION = 0.2  # training diagnostics: mean over the last 20% of iterations
COLLAPSE_FRACTION = 0.1  # collapsed: the last 10% of training gold fell below half of the first 10%
GOLD_CURVE, REWARD_CURVE = "reward/gold_mean", "reward/mean"  # training metrics (gil_megatron/ppo/trainer.py)
# comparison metric -> (prompt set, run statistic, the KL key of that set)
METRIC_OF = {"gold_eval": ("eval", "mean", "kl_to_sft"), "worst_group_eval": ("eval", "worst_group", "kl_to_sft"),
             "gold_ood": ("ood", "mean", "kl_to_sft_ood"), "worst_group_ood": ("ood", "worst_group", "kl_to_sft_ood")}


@dataclass
class RunResult:
    name: str
    arm: str
    seed: Optional[int]
    summary: dict
    samples: Dict[str, List[dict]] = field(default_factory=dict)
    """set -> records sorted by prompt index ({} when the source kept no samples)."""
    metrics: List[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    failed: bool = False


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------


def _mean(xs) -> Optional[float]:
    xs = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    return sum(xs) / len(xs) if xs else None


def _group_means(recs: Sequence[dict], key: str) -> Dict[str, float]:
    groups: Dict[str, List[float]] = {}
    for r in recs:
        if r.get(key) is not None:
            groups.setdefault(str(r["group"]), []).append(r[key])
    return {g: sum(v) / len(v) for g, v in sorted(groups.items())}


def _window(lines: Sequence[dict], key: str, fraction: float, last: bool = True) -> List[float]:
    vals = [m[key] for m in lines if isinstance(m.get(key), (int, float))]
    k = max(1, int(round(len(vals) * fraction)))
    return vals[-k:] if last else vals[:k]


def summarize_run(samples: Dict[str, List[dict]], metrics: Sequence[dict], task: Task,
                  diagnostics: Dict[str, str]) -> dict:
    """Every number of one run: per set (eval, ood) gold, worst group (name too), KL to SFT,
    reward, hack rate; group gap and extra-score-minus-gold on eval; per group; easy / hard pooled;
    the inferred groups' agreement with easy/hard; collapse and the protocol's training diagnostics."""
    s: dict = {}
    for set_name, recs in samples.items():
        sfx = "" if set_name == "eval" else f"_{set_name}"
        gold = _group_means(recs, "gold")
        worst = min(gold, key=gold.get) if gold else None
        s[f"gold_{set_name}"] = _mean(r["gold"] for r in recs)
        s[f"worst_group_{set_name}"] = gold.get(worst)
        s[f"worst_group_{set_name}_name"] = worst
        s[f"reward_{set_name}"] = _mean(r["reward"] for r in recs)
        s[f"kl_to_sft{sfx}"] = _mean(r["kl"] for r in recs)
        s[f"hack_rate{sfx}"] = _mean(r.get("hack") for r in recs)
        if set_name == "eval":
            s["gap_eval"] = max(gold.values()) - gold[worst] if gold else None
            s["response_length"] = _mean(r["response_length"] for r in recs)
            for name in task.scores:
                s[f"{name}_minus_gold"] = _mean(r[name] - r["gold"] for r in recs)
    per_group: Dict[str, dict] = {}
    for set_name, recs in samples.items():
        for g, v in _group_means(recs, "gold").items():
            per_group.setdefault(g, {})[f"gold_{set_name}"] = v
        if set_name == "eval":
            for key, out in (("kl", "kl"), ("hack", "hack_rate")):
                for g, v in _group_means(recs, key).items():
                    per_group[g][out] = v
    s["per_group"] = per_group
    recs = samples.get("eval", [])
    difficulty = task.difficulty
    for level in ("easy", "hard"):
        rows = [r for r in recs if difficulty.get(r["group"]) == level]
        if rows:
            s[level] = {"gold_eval": _mean(r["gold"] for r in rows), "kl": _mean(r["kl"] for r in rows),
                        "hack_rate": _mean(r.get("hack") for r in rows)}
    if recs and "inferred_group" in recs[0] and difficulty:
        from gil_megatron.ppo.evaluation import inferred_group_summary

        ig = inferred_group_summary(recs, difficulty)
        s["agreement_easy_hard"] = ig.get("agreement_mapped")
        s["agreement_baseline"] = ig.get("agreement_mapped_one_group")
    if metrics:
        curve = GOLD_CURVE if any(GOLD_CURVE in m for m in metrics) else REWARD_CURVE
        first = _mean(_window(metrics, curve, COLLAPSE_FRACTION, last=False))
        last = _mean(_window(metrics, curve, COLLAPSE_FRACTION))
        s["collapsed"] = float(last < 0.5 * first) if first is not None and last is not None else None
        diag = {name: _mean(_window(metrics, key, LAST_FRACTION)) for name, key in diagnostics.items()}
        tail = metrics[-max(1, int(round(len(metrics) * LAST_FRACTION))):]
        masses = [[v for k, v in m.items() if k.startswith("group/") and k.endswith("/mass")] for m in tail]
        if any(masses):
            diag["minority_mass"] = _mean(min(ms) for ms in masses if ms)
        s["diagnostics"] = diag
        steps = [m["time/step_s"] for m in metrics if isinstance(m.get("time/step_s"), (int, float))]
        s["iter_per_min"] = 60.0 / _mean(steps) if steps else None
    return s


def run_result(name: str, arm: str, seed: Optional[int], run_dir: str, task: Task,
               diagnostics: Dict[str, str]) -> Optional[RunResult]:
    """A finished run read back from its directory (None when it has no eval.json)."""
    from benchmarks.compare.runner import read_metrics, read_samples

    path = os.path.join(run_dir, "eval.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        info = json.load(f)
    if "failed" in info:
        return RunResult(name, arm, seed, {"collapsed": 1.0}, info=info, failed=True)
    samples = {k: sorted(v, key=lambda r: r["index"]) for k, v in read_samples(run_dir).items()}
    metrics = read_metrics(run_dir)
    return RunResult(name, arm, seed, summarize_run(samples, metrics, task, diagnostics), samples, metrics, info)


# ---------------------------------------------------------------------------------------------
# Arms
# ---------------------------------------------------------------------------------------------


def _numeric_leaves(d: dict, prefix=()) -> Dict[tuple, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_numeric_leaves(v, (*prefix, k)))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[(*prefix, k)] = v
    return out


def aggregate_arms(protocol: Protocol, results: Sequence[RunResult], planned: Dict[str, int]) -> Dict[str, dict]:
    """table.json's "arms": for each arm, every numeric leaf of the run summaries as {mean, sd}
    over its finished runs (sd None below two runs), nested as in the summary (per_group, easy,
    hard, diagnostics), plus runs (finished), planned, failed and collapsed counts."""
    out = {}
    for arm in protocol.arms:
        if arm.name not in planned:
            continue
        rs = [r for r in results if r.arm == arm.name]
        ok = [r for r in rs if not r.failed]
        entry: dict = {"runs": len(ok), "planned": planned[arm.name], "failed": len(rs) - len(ok),
                       "algo": arm.algo, "method": arm.method, "grid_value": arm.grid_value,
                       "seeds": [r.seed for r in ok if r.seed is not None]}
        leaves = sorted({k for r in ok for k in _numeric_leaves(r.summary)})
        for key in leaves:
            vals = []
            for r in ok:
                v = r.summary
                for part in key:
                    v = v.get(part) if isinstance(v, dict) else None
                vals.append(v)
            node = entry
            for part in key[:-1]:
                node = node.setdefault(part, {})
            ms = stats.mean_sd(vals)
            node[key[-1]] = {"mean": ms["mean"], "sd": ms["sd"]}
        entry["collapsed"] = int(sum((r.summary.get("collapsed") or 0) for r in rs)) if arm.trains else None
        out[arm.name] = entry
    return out


# ---------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------


def _arm_runs(results: Sequence[RunResult], arm: str) -> List[RunResult]:
    """An arm's finished runs in seed-index order (its protocol seed list)."""
    return [r for r in results if r.arm == arm and not r.failed]


def _per_prompt(run: RunResult, set_name: str):
    recs = run.samples.get(set_name) or []
    return ([r["index"] for r in recs], np.asarray([r["gold"] for r in recs], dtype=np.float64),
            np.asarray([r["kl"] for r in recs], dtype=np.float64), [str(r["group"]) for r in recs])


def frontier_comparison(protocol: Protocol, results: Sequence[RunResult], a: str, b: str, metric: str) -> dict:
    """Mean frontier gap of method a over method b on ``metric``, with the protocol's anchor; the
    bootstrap CI when every run kept its samples, else the point estimate from the run summaries."""
    set_name, stat, kl_key = METRIC_OF[metric]
    out = {"kind": "frontier", "a": a, "b": b, "metric": metric, "gap": None, "ci_low": None, "ci_high": None,
           "range": None, "note": ""}
    arms = {m: [n for n in protocol.methods[m]] for m in (a, b)}
    runs = {m: [_arm_runs(results, n) for n in arms[m]] for m in (a, b)}
    runs = {m: [rs for rs in v if rs] for m, v in runs.items()}
    anchor = _arm_runs(results, protocol.anchor) if protocol.anchor else []
    if not runs[a] or not runs[b]:
        out["note"] = "no finished runs for " + " and ".join(m for m in (a, b) if not runs[m])
        return out
    everyone = [r for m in (a, b) for rs in runs[m] for r in rs] + anchor
    have_samples = all(r.samples.get(set_name) for r in everyone)
    if have_samples:
        index, _, _, groups = _per_prompt(everyone[0], set_name)
        if any(_per_prompt(r, set_name)[0] != index for r in everyone):
            out["note"] = f"runs were evaluated on different {set_name} prompts"
            return out

        def arrays(rs):  # [(gold [P], kl [P])] per run
            return [_per_prompt(r, set_name)[1:3] for r in rs]

        anc = arrays(anchor[:1])[0] if anchor else None
        res = stats.frontier_gap_bootstrap([arrays(rs) for rs in runs[a]], [arrays(rs) for rs in runs[b]], groups,
                                           stat, anchor=anc, n=protocol.bootstrap_samples,
                                           seed=protocol.bootstrap_seed)
        out.update(gap=res["gap"], ci_low=res["ci_low"], ci_high=res["ci_high"], range=res["range"],
                   seeds=res["seeds"], refused=res["refused"], n=res["n"])
        if res["gap"] is None:
            out["note"] = "no common KL range: refused (it would extrapolate)"
        return out
    pts = {m: [(r.summary.get(kl_key), r.summary.get(metric)) for rs in runs[m] for r in rs] for m in (a, b)}
    if anchor:
        for m in (a, b):
            pts[m].append((anchor[0].summary.get(kl_key), anchor[0].summary.get(metric)))
    pts = {m: [(x, y) for x, y in v if x is not None and y is not None] for m, v in pts.items()}
    out["note"] = "point estimate from run summaries (no samples: no CI)"
    if not pts[a] or not pts[b]:
        out["note"] = f"the runs have no {metric} / {kl_key}"
        return out
    try:
        out["gap"] = stats.frontier_gap(pts[a], pts[b])
        out["range"] = list(stats.common_range(pts[a], pts[b]))
    except stats.ExtrapolationError as exc:
        out["note"] = f"refused: {exc}"
    return out


def _pair_arms(protocol: Protocol, a: str, b: str) -> List[tuple]:
    """[(arm a, arm b, grid value)]: methods pair at each grid value both have, arms with each other."""
    ga, gb = protocol.grid_arms(a), protocol.grid_arms(b)
    if ga and gb:
        return [(ga[v], gb[v], v) for v in protocol.grid_values if v in ga and v in gb]
    return [(a, b, None)]


def paired_comparison(protocol: Protocol, results: Sequence[RunResult], a: str, b: str, grid_value=None) -> dict:
    """Arm a against arm b at equal settings, paired by seed index and prompt: bootstrap CIs of the
    mean and worst-group differences on eval and OOD, and win/tie/lose by gold. A fixed policy
    pairs with every seed of the other arm."""
    ra, rb = _arm_runs(results, a), _arm_runs(results, b)
    if len(rb) == 1 and rb[0].seed is None:
        rb = rb * len(ra)
    if len(ra) == 1 and ra[0].seed is None:
        ra = ra * len(rb)
    n = min(len(ra), len(rb))
    out = {"kind": "paired", "a": a, "b": b, "grid_value": grid_value, "seeds": n, "metrics": {},
           "win_tie_lose": {}, "note": ""}
    if n == 0:
        out["note"] = "no finished runs to pair"
        return out
    for set_name in ("eval", "ood"):
        if not all(r.samples.get(set_name) for r in ra[:n] + rb[:n]):
            continue
        cols = [_per_prompt(r, set_name) for r in ra[:n] + rb[:n]]
        if any(c[0] != cols[0][0] for c in cols):
            out["note"] = f"the arms were evaluated on different {set_name} prompts"
            continue
        A = np.stack([c[1] for c in cols[:n]])
        B = np.stack([c[1] for c in cols[n:]])
        res = stats.paired_bootstrap(A, B, cols[0][3], n=protocol.bootstrap_samples, seed=protocol.bootstrap_seed)
        out["metrics"][f"gold_{set_name}"] = res["mean"]
        out["metrics"][f"worst_group_{set_name}"] = res["worst_group"]
        out["win_tie_lose"][set_name] = stats.win_tie_lose(A, B)
    if not out["metrics"] and not out["note"]:
        out["note"] = "the runs kept no samples: not computable"
    return out


def compare(protocol: Protocol, results: Sequence[RunResult]) -> List[dict]:
    """Every frontier and paired comparison the protocol declares or its conditions read."""
    out = []
    for a, b, metrics in protocol.frontiers:
        out += [frontier_comparison(protocol, results, a, b, m) for m in metrics]
    for a, b in protocol.paired:
        for x, y, v in _pair_arms(protocol, a, b):
            entry = paired_comparison(protocol, results, x, y, v)
            entry["between"] = [a, b]
            out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------
# Win rule and predictions
# ---------------------------------------------------------------------------------------------


def resolve(ref: Ref, arms: Dict[str, dict], comparisons: Sequence[dict]) -> List[Optional[float]]:
    """A reference's values: one, or one per grid value for a paired comparison of methods; None
    where it is not computable."""
    if ref.kind == "arm":
        node = arms.get(ref.a)
        for part in ref.metric.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        v = node.get(ref.stat) if isinstance(node, dict) else None
        return [None if v is None else v + ref.offset]
    if ref.kind == "frontier":
        entry = next((c for c in comparisons if c["kind"] == "frontier" and (c["a"], c["b"], c["metric"])
                      == (ref.a, ref.b, ref.metric)), None)
        v = entry.get(ref.stat) if entry else None
        return [None if v is None else v + ref.offset]
    entries = [c for c in comparisons if c["kind"] == "paired" and c.get("between") == [ref.a, ref.b]]
    vals = []
    for c in entries:
        if ref.stat in ("win", "tie", "lose"):
            v = c["win_tie_lose"].get(METRIC_OF[ref.metric][0], {}).get(ref.stat)
        else:
            v = c["metrics"].get(ref.metric, {}).get(ref.stat)
        vals.append(None if v is None else v + ref.offset)
    return vals or [None]


def _holds(x: float, op: str, y: float) -> bool:
    return {"<": x < y, "<=": x <= y, ">": x > y, ">=": x >= y}[op]


def check_condition(c: Condition, arms: Dict[str, dict], comparisons: Sequence[dict]) -> dict:
    """{text, left, right, held}: held is True / False, or None when a value is not computable. A
    method-paired reference must hold at every grid value."""
    left = resolve(c.left, arms, comparisons)
    right = resolve(c.right, arms, comparisons) if isinstance(c.right, Ref) else [c.right]
    if len(right) == 1:
        right = right * len(left)
    if len(left) == 1 and len(right) > 1:
        left = left * len(right)
    if len(left) != len(right) or any(v is None for v in left + right):
        held = None
    else:
        held = all(_holds(x, c.op, y) for x, y in zip(left, right))
    return {"text": c.text, "left": left, "right": right, "held": held}


def check_rule(rule: Rule, arms: Dict[str, dict], comparisons: Sequence[dict]) -> dict:
    conds = [check_condition(c, arms, comparisons) for c in rule.conditions]
    if not conds:
        held = None
    elif any(c["held"] is False for c in conds):
        held = False
    elif all(c["held"] for c in conds):
        held = True
    else:
        held = None
    return {"text": rule.text, "conditions": conds, "held": held}


def verdict(protocol: Protocol, win: Optional[dict]) -> str:
    if win is None:
        return f"protocol {protocol.name} has no win rule"
    conds = win["conditions"]
    counts = (f"{sum(c['held'] is True for c in conds)} of {len(conds)} conditions hold, "
              f"{sum(c['held'] is None for c in conds)} not computable")
    word = {True: "WIN: the win rule holds", False: "NO WIN: the win rule does not hold",
            None: "UNDECIDED: the win rule cannot be checked on these runs"}[win["held"]]
    return f"{word} ({counts})"


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _fmt(cell: Optional[dict], fmt: str = "{:.3f}") -> str:
    if not isinstance(cell, dict) or cell.get("mean") is None:
        return "–"
    return fmt.format(cell["mean"]) + (f" ± {fmt.format(cell['sd'])}" if cell.get("sd") is not None else "")


def _get(entry: dict, dotted: str):
    node = entry
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def main_columns(task: Task, arms: Dict[str, dict]) -> List[tuple]:
    """(dotted key, header, format) of the main table: what the task and the runs have."""
    cols = [("gold_eval", "gold eval", "{:.3f}"), ("worst_group_eval", "worst group eval", "{:.3f}")]
    if "ood" in task.prompts:
        cols += [("gold_ood", "gold OOD", "{:.3f}"), ("worst_group_ood", "worst group OOD", "{:.3f}")]
    cols += [("gap_eval", "group gap", "{:.3f}")]
    cols += [(f"{n}_minus_gold", f"{n} − gold", "{:.3f}") for n in task.scores]
    cols += [("reward_eval", "reward eval", "{:.3f}")]
    if task.hack:
        cols += [("hack_rate", "hack rate", "{:.3f}")]
        cols += [(f"{lvl}.hack_rate", f"hack rate {lvl}", "{:.3f}") for lvl in ("easy", "hard")
                 if getattr(task, f"{lvl}_groups")]
    cols += [("kl_to_sft", "KL to SFT", "{:.2f}")]
    return [c for c in cols if any(_get(e, c[0]) for e in arms.values())]


def table_markdown(task: Task, protocol: Protocol, doc: dict) -> str:
    arms = doc["arms"]
    lines = [f"# {task.name}: protocol `{protocol.name}`", ""]
    lines += [f"Command: `{doc['command']}`", "",
              f"Code: commit {doc['git']['commit']}{' (with uncommitted changes)' if doc['git']['dirty'] else ''}. "
              f"Protocol file {_prov(doc['protocol'])}. Task file {_prov(doc['task'])}.", ""]
    if protocol.description:
        lines += [protocol.description, ""]
    lines += [f"Budget: {doc['iterations']} iterations per training run. Evaluation: greedy responses on the "
              f"eval{' and OOD' if 'ood' in task.prompts else ''} prompts"
              + (f" (the first {doc['eval_per_group']} of each group)" if doc.get("eval_per_group") else "")
              + "; mean ± sd over seeds. gold = the task's gold function" + ("" if task.gold else " (= the reward)")
              + "; worst group = the lowest group mean; KL to SFT = exact KL summed over response tokens; "
              "hack rate = mean of the task's hack indicator.", ""]
    timed = [r for r in doc.get("timing", [])]
    if timed:
        train = _mean(t.get("train_s") for t in timed)
        evals = _mean(t.get("eval_s") for t in timed)
        speed = _mean(t.get("iter_per_min") for t in timed)
        lines += [f"Timing: {len(timed)} run(s); per run {train or 0:.0f} s training + {evals or 0:.0f} s evaluation"
                  + (f", {speed:.0f} iterations/min" if speed else "") + f" (TP={task.tp} on {task.nproc} rank(s)).",
                  ""]
    cols = main_columns(task, arms)
    head = ["arm", "runs"] + [h for _, h, _ in cols] + ["collapsed"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in arms.items():
        coll = "–" if e["collapsed"] is None else str(e["collapsed"])
        lines.append("| " + " | ".join([name, f"{e['runs']}/{e['planned']}"]
                                       + [_fmt(_get(e, k), f) for k, _, f in cols] + [coll]) + " |")
    groups = sorted({g for e in arms.values() for g in (e.get("per_group") or {})})
    if groups:
        keys = [k for k in ("gold_eval", "gold_ood", "kl", "hack_rate")
                if any(_get(e, f"per_group.{g}.{k}") for e in arms.values() for g in groups)]
        lines += ["", "Per group (" + " | ".join(keys) + "), mean over seeds:", "",
                  "| arm | " + " | ".join(f"{g} ({task.difficulty[g]})" if g in task.difficulty else g
                                          for g in groups) + " |", "|" + "---|" * (len(groups) + 1)]
        for name, e in arms.items():
            cells = [" \\| ".join("–" if (v := _get(e, f"per_group.{g}.{k}.mean")) is None else
                                  (f"{v:.2f}" if k == "kl" else f"{v:.3f}") for k in keys) for g in groups]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    diag = list(dict.fromkeys(k for e in arms.values() for k in (e.get("diagnostics") or {})))
    diag = [("agreement_easy_hard", "groups vs easy/hard"), ("agreement_baseline", "majority share")] + \
           [(f"diagnostics.{k}", k) for k in diag]
    diag = [d for d in diag if any(_get(e, d[0]) for e in arms.values())]
    if diag:
        lines += ["", "Diagnostics (inferred groups on eval; training metrics over the last 20% of iterations):", "",
                  "| arm | " + " | ".join(h for _, h in diag) + " |", "|" + "---|" * (len(diag) + 1)]
        for name, e in arms.items():
            if e["algo"] != "policy":
                lines.append(f"| {name} | " + " | ".join(_fmt(_get(e, k)) for k, _ in diag) + " |")
    lines += comparisons_markdown(doc["comparisons"])
    for title, rule in [("Win rule", doc.get("win_rule"))] + [(f"Prediction {i + 1}", p) for i, p in
                                                               enumerate(doc.get("predictions") or [])]:
        if rule is None:
            continue
        state = {True: "held", False: "NOT held", None: "not checkable" if not rule["conditions"]
                 else "not computable"}[rule["held"]]
        lines += ["", f"**{title}** ({state}): {rule['text']}"]
        for c in rule["conditions"]:
            vals = ", ".join("–" if v is None else f"{v:+.4f}" for v in c["left"])
            mark = {True: "held", False: "NOT held", None: "not computable"}[c["held"]]
            lines.append(f"- `{c['text']}`: {mark} (left: {vals})")
    lines += ["", f"**Verdict: {doc['verdict']}**"]
    if doc.get("legacy"):
        lines += ["", doc["legacy"]]
    return "\n".join(lines) + "\n"


def _prov(p: dict) -> str:
    if not p:
        return "–"
    state = (f"committed in {p['commit'][:12]}" if p.get("committed") else
             "NOT committed as run (not pre-registered in this form)")
    return f"`{p['path']}` (blob {str(p.get('blob'))[:12]}, {state})"


def _ci(e: dict) -> str:
    if e.get("ci_low") is None:
        return "–"
    return f"[{e['ci_low']:+.3f}, {e['ci_high']:+.3f}]"


def comparisons_markdown(comparisons: Sequence[dict]) -> List[str]:
    lines = []
    fr = [c for c in comparisons if c["kind"] == "frontier"]
    if fr:
        lines += ["", "Frontier gaps (mean vertical gap of A's gold-vs-KL frontier over B's, interpolated inside "
                  "the KL range both cover, never extrapolated; 95% paired bootstrap CI over seeds and prompts):", "",
                  "| A | B | metric | KL range | gap A − B | 95% CI | note |", "|---|---|---|---|---|---|---|"]
        for c in fr:
            rng = "–" if not c.get("range") else f"{c['range'][0]:.2f}–{c['range'][1]:.2f}"
            gap = "–" if c["gap"] is None else f"{c['gap']:+.3f}"
            note = c.get("note", "") + (f" ({c['refused']} of {c['n']} resamples refused)" if c.get("refused") else "")
            lines.append(f"| {c['a']} | {c['b']} | {c['metric']} | {rng} | {gap} | {_ci(c)} | {note} |")
    pr = [c for c in comparisons if c["kind"] == "paired"]
    if pr:
        metrics = [m for m in METRIC_OF if any(m in c["metrics"] for c in pr)]
        lines += ["", "Paired per-prompt differences A − B at equal settings (seeds paired by index, prompts "
                  "resampled within their group; 95% CI), and win / tie / lose by gold on eval:", "",
                  "| A | B | seeds | " + "".join(f"{m} | " for m in metrics) + "win / tie / lose | note |",
                  "|" + "---|" * (len(metrics) + 5)]
        for c in pr:
            cells = [(f"{c['metrics'][m]['diff']:+.3f} {_ci(c['metrics'][m])}" if m in c["metrics"] else "–")
                     for m in metrics]
            w = c["win_tie_lose"].get("eval")
            wtl = f"{100 * w['win']:.1f}% / {100 * w['tie']:.1f}% / {100 * w['lose']:.1f}%" if w else "–"
            lines.append(f"| {c['a']} | {c['b']} | {c['seeds']} | " + "".join(f"{x} | " for x in cells)
                         + f"{wtl} | {c['note']} |")
    return lines


def build_document(task: Task, protocol: Protocol, results: Sequence[RunResult], planned: Dict[str, int], *,
                   command: str, git: dict, provenance: dict, eval_per_group: int, iterations: int) -> dict:
    """table.json's content."""
    arms = aggregate_arms(protocol, results, planned)
    comparisons = compare(protocol, results)
    win = check_rule(protocol.win_rule, arms, comparisons) if protocol.win_rule else None
    preds = [check_rule(p, arms, comparisons) for p in protocol.predictions]
    timing = [{"run": r.name, "train_s": r.info.get("train_s"), "eval_s": r.info.get("eval_s"),
               "iter_per_min": r.summary.get("iter_per_min")} for r in results if r.info.get("eval_s") is not None]
    return {"command": command, "git": git, "task": provenance.get("task"), "protocol": provenance.get("protocol"),
            "iterations": iterations, "eval_per_group": eval_per_group, "arms": arms, "comparisons": comparisons,
            "win_rule": win, "predictions": preds, "verdict": verdict(protocol, win), "timing": timing}


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_report(workdir: str, task: Task, protocol: Protocol, results: Sequence[RunResult], doc: dict) -> str:
    """table.json, table.md and runs.json (every run's summary, seed, timing and fingerprint)."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "table.json"), "w") as f:
        json.dump(_json_safe(doc), f, indent=1)
    text = table_markdown(task, protocol, doc)
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(text)
    runs = {r.name: {"arm": r.arm, "seed": r.seed, "failed": r.failed, "summary": r.summary,
                     **{k: r.info.get(k) for k in ("fingerprint", "train_s", "eval_s", "iterations", "git",
                                                   "provenance") if k in r.info}} for r in results}
    with open(os.path.join(workdir, "runs.json"), "w") as f:
        json.dump(_json_safe({"command": doc["command"], "git": doc["git"], "task": doc["task"],
                              "protocol": doc["protocol"], "runs": runs}), f, indent=1)
    return text
