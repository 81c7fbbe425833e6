"""Evaluation reports: summaries of evaluated policies -> report.json, report.md and samples.jsonl.

    build_report     settings, one summary per (policy, prompt set) and, for two policies, the
                     win/tie/lose comparison (gil_megatron/ppo/evaluation.py computes all of them)
    report_markdown  the report as markdown tables (what a reader looks at)
    write_report     report.json (machine-readable; NaN/inf written as null), report.md, samples.jsonl

Plain Python on records and summaries, without models or collectives (``tools/evaluate.py`` calls
it on rank 0).
"""

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from gil_megatron.ppo.evaluation import SCORE_NAMES, compare_policies, primary_score, summarize_set


@dataclass
class PolicyResult:
    name: str
    path: str
    samples: Dict[str, List[dict]]  # set name -> records
    summaries: Dict[str, dict] = field(default_factory=dict)


def build_report(policies: Sequence[PolicyResult], settings: dict, *, judge: Optional[str] = None,
                 tie_margin: float = 0.0, known_group_map: Optional[Dict[str, str]] = None) -> dict:
    """report.json's content: settings, one summary per (policy, set), and win/tie/lose of the first
    policy against the second when there are two (judged by ``judge``, default the primary score)."""
    for p in policies:
        p.summaries = {name: summarize_set(recs, known_group_map) for name, recs in p.samples.items()}
    report = {"settings": settings,
              "policies": {p.name: {"path": p.path, "sets": p.summaries} for p in policies}}
    if len(policies) == 2:
        a, b = policies
        first = next(iter(a.samples.values()), [])
        judge = judge or primary_score([n for n in SCORE_NAMES if first and n in first[0]])
        if judge is None:
            raise ValueError("win/tie/lose needs a score to judge by: pass a reward model or a reward function")
        report["comparison"] = {
            "a": a.name, "b": b.name, "judge": judge, "tie_margin": tie_margin,
            "sets": {name: compare_policies(a.samples[name], b.samples[name], judge, tie_margin) for name in a.samples},
        }
    return report


def _f(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def _pct(x) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def report_markdown(report: dict) -> str:
    """The report as markdown tables: per set a summary row per policy, per-known-group and
    per-inferred-group tables, and the win/tie/lose table."""
    s = report["settings"]
    lines = ["# Evaluation report", ""]
    for name, pol in report["policies"].items():
        lines.append(f"- **{name}**: `{pol['path']}`")
    decoding = "greedy" if s.get("greedy", True) else f"sampled at temperature {s.get('temperature')}"
    lines += ["", f"Responses: {decoding}, at most {s.get('max_new_tokens')} new tokens. "
              "Worst group and gap: of the primary score over the known groups (gap = best - worst group mean). "
              "KL to the reference: exact KL summed over response tokens (nats).", ""]
    set_names = list(next(iter(report["policies"].values()))["sets"])
    for set_name in set_names:
        sums = {p: pol["sets"][set_name] for p, pol in report["policies"].items()}
        first = next(iter(sums.values()))
        primary = first["primary"]
        score_names = list(first["scores"])
        lines += [f"## `{set_name}` ({first['n']} prompts; primary score: {primary})", ""]
        header = ["policy"] + [f"{n} mean ± std" for n in score_names]
        gaps = [n for n in score_names if n != "gold" and "gold" in score_names]
        header += ["worst group", "gap"] + [f"{n} − gold" for n in gaps]
        header += ["KL to ref", "length"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for p, sm in sums.items():
            sc = sm["scores"]
            row = [p] + [f"{_f(sc[n]['mean'])} ± {_f(sc[n]['std'])}" for n in score_names]
            ps = sc.get(primary, {})
            row += [f"{ps.get('worst_known_group', '–')} {_f(ps.get('worst_known'))}", _f(ps.get("known_gap"))]
            row += [_f(sm.get(f"{n}_minus_gold")) for n in gaps]
            row += [_f(sm["kl_to_ref"]["mean"]) if "kl_to_ref" in sm else "–", _f(sm["response_length"], 2)]
            lines.append("| " + " | ".join(row) + " |")
        groups = list(first["known_groups"])
        if groups and primary:
            lines += ["", f"Per known group ({primary}):", "",
                      "| policy | " + " | ".join(groups) + " |", "|" + "---|" * (len(groups) + 1)]
            for p, sm in sums.items():
                means = sm["scores"][primary].get("known_groups", {})
                lines.append(f"| {p} | " + " | ".join(_f(means.get(g)) for g in groups) + " |")
        if "inferred_groups" in first:
            lines += ["", f"Inferred groups (critic's group head; {primary} mean and counts per known group):", "",
                      "| policy | group | mass | " + (f"{primary} | " if primary else "") + " | ".join(groups)
                      + " | agreement |", "|" + "---|" * (len(groups) + 4 + bool(primary))]
            for p, sm in sums.items():
                ig = sm["inferred_groups"]
                means = sm["scores"][primary].get("inferred_groups", {}) if primary else {}
                agree = f"{_f(ig.get('agreement'))} (one group: {_f(ig.get('agreement_one_group'))})"
                if "agreement_mapped" in ig:
                    agree += (f"; mapped {_f(ig['agreement_mapped'])} "
                              f"(one group: {_f(ig.get('agreement_mapped_one_group'))})")
                for g in range(ig["num_groups"]):
                    counts = [str(ig["crosstab"].get(k, {}).get(str(g), 0)) for k in groups]
                    row = [p, str(g), _f(ig["mass"].get(str(g)))] + ([_f(means.get(str(g)))] if primary else [])
                    lines.append("| " + " | ".join(row + counts + [agree if g == 0 else ""]) + " |")
        lines.append("")
    comp = report.get("comparison")
    if comp:
        lines += [f"## Win / tie / lose: {comp['a']} vs {comp['b']} "
                  f"(judge: {comp['judge']}, tie margin {comp['tie_margin']:g})", "",
                  "| set | group | win | tie | lose | n |", "|---|---|---|---|---|---|"]
        for set_name, wtl in comp["sets"].items():
            for g, x in [("all", wtl), *wtl.get("known_groups", {}).items()]:
                lines.append(f"| {set_name if g == 'all' else ''} | {g} | {_pct(x['win'])} | {_pct(x['tie'])} | "
                             f"{_pct(x['lose'])} | {x['n']} |")
        lines.append("")
    return "\n".join(lines)


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_report(out_dir: str, report: dict, policies: Sequence[PolicyResult] = ()) -> Dict[str, str]:
    """Write report.json, report.md and samples.jsonl (one line per policy, set and prompt) into
    ``out_dir``; returns their paths. Call on one rank."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "report.json"), "markdown": os.path.join(out_dir, "report.md"),
             "samples": os.path.join(out_dir, "samples.jsonl")}
    with open(paths["json"], "w") as f:
        json.dump(_json_safe(report), f, indent=2)
        f.write("\n")
    with open(paths["markdown"], "w") as f:
        f.write(report_markdown(report))
    with open(paths["samples"], "w") as f:
        for p in policies:
            for set_name, recs in p.samples.items():
                for r in recs:
                    f.write(json.dumps(_json_safe({"policy": p.name, "set": set_name, **r})) + "\n")
    return paths


__all__ = ["PolicyResult", "build_report", "report_markdown", "write_report"]
