"""The old harness' results (benchmarks/gil_vs_ppo.py's runs.json) as RunResults for the new report.

That runs.json kept every run's summary numbers but no samples, so the report rebuilds the table,
the per-group gold and the frontier gaps' point estimates from it; bootstrap CIs and paired
differences need samples and come out "not computable". Its own recorded win-rule verdict is
quoted beside the new one.
"""

import json
import re
from typing import Dict, List, Tuple

from benchmarks.compare.report import RunResult
from benchmarks.compare.spec import Protocol, SpecError

# the old per-run key -> the new summary's dotted key
KEYS = {"gold": "gold_eval", "worst_group": "worst_group_eval", "worst_group_name": "worst_group_eval_name",
        "gap": "gap_eval", "ood_gold": "gold_ood", "ood_worst_group": "worst_group_ood",
        "ood_worst_group_name": "worst_group_ood_name", "rm_score": "reward_eval", "evasion": "hard.hack_rate",
        "kl_to_sft": "kl_to_sft", "ood_kl_to_sft": "kl_to_sft_ood", "collapsed": "collapsed",
        "agreement_easy_hard": "agreement_easy_hard", "agreement_baseline": "agreement_baseline",
        "proxy_minus_gold": "proxy_minus_gold", "response_length": "response_length", "iter_per_min": "iter_per_min"}


def _put(d: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[last] = value


def summary_of(old: dict, diagnostics: Dict[str, str]) -> dict:
    """One old per-run dict -> the new run summary (report.summarize_run's keys)."""
    s: dict = {}
    for old_key, new_key in KEYS.items():
        if old.get(old_key) is not None:
            _put(s, new_key, old[old_key])
    per_group: Dict[str, dict] = {}
    for old_key, new_key in (("families", "gold_eval"), ("ood_families", "gold_ood")):
        for g, v in (old.get(old_key) or {}).items():
            per_group.setdefault(g, {})[new_key] = v
    s["per_group"] = per_group
    diag = {name: old[name] for name in (*diagnostics, "minority_mass") if old.get(name) is not None}
    if diag:
        s["diagnostics"] = diag
    return s


def load_legacy(path: str, protocol: Protocol) -> Tuple[List[RunResult], Dict[str, int], dict]:
    """(results, planned runs per arm, the old file's header) of an old runs.json, under a protocol
    whose arm names are the old ones."""
    with open(path) as f:
        old = json.load(f)
    if "per_run" not in old or "arms" not in old:
        raise SpecError(f"{path}: not a runs.json of benchmarks/gil_vs_ppo.py (no per_run / arms)")
    names = {a.name for a in protocol.arms}
    missing = sorted(set(old["arms"]) - names)
    if missing:
        raise SpecError(f"{path}: arm {missing[0]!r} is not in protocol {protocol.path}; use the protocol "
                        "that re-expresses this file's arms")
    results, planned = [], {}
    for arm_name, arm in old["arms"].items():
        planned[arm_name] = len(arm["runs"])
        for run in arm["runs"]:
            m = re.search(r"_s(\d+)$", run)
            per = old["per_run"].get(run) or {}
            if not per:
                continue
            results.append(RunResult(run, arm_name, int(m.group(1)) if m else None,
                                     summary_of(per, protocol.diagnostics), failed=bool(per.get("failed")),
                                     info={k: per.get(k) for k in ("train_s", "eval_s", "iterations")}))
    return results, planned, {k: old.get(k) for k in ("protocol", "iterations", "eval_limit", "win_rule",
                                                      "win_rule_text", "timing")}


def legacy_note(header: dict) -> str:
    """The old harness' own verdict, quoted."""
    wr = header.get("win_rule")
    if not wr:
        return "The legacy runs.json recorded no win rule."
    passing = sum(e["passes"] for e in wr["per_kl"].values())
    margins = ", ".join(f"{k}: {v:+.3f}" for k, v in wr["frontier_margin"].items())
    return (f"Legacy verdict as recorded by benchmarks/gil_vs_ppo.py: {'GIL WINS' if wr['win'] else 'GIL does not win'}"
            f" (kl_coefs passing {passing}/{len(wr['per_kl'])}; its frontier margins, flat beyond PPO's largest "
            f"KL: {margins}). Its rule: {header.get('win_rule_text')}")
