"""benchmarks/compare/report.py on synthetic runs: a run's numbers from its samples, the arms'
mean and sd, the comparisons, and the win rule / predictions deciding held and not held."""

import json

import pytest
import yaml

from benchmarks.compare import report
from benchmarks.compare.spec import Task, load_protocol

GROUPS = ["easy_a", "hard_b"]


def task(**kw):
    base = dict(path="t.yaml", name="t", policy="p", prompts={"train": "a", "eval": "b", "ood": "c"}, reward="r",
                reward_is_function=False, gold="m:gold", hack="m:hack", scores={"proxy": "m:proxy"},
                max_prompt_length=8, max_new_tokens=8, easy_groups=("easy_a",), hard_groups=("hard_b",),
                pythonpath=(), config=None, overrides=())
    return Task(**{**base, **kw})


def samples(gold_easy, gold_hard, kl, hack_hard=0.0, n=10):
    """{set: records}: n prompts per group, alternating; hard prompts hack at the given rate."""
    out = {}
    for set_name in ("eval", "ood"):
        recs = []
        for i in range(2 * n):
            hard = i % 2 == 1
            g = gold_hard if hard else gold_easy
            recs.append({"index": i, "prompt": f"p{i}", "group": GROUPS[hard], "response": "r", "gold": g,
                         "reward": g + 1.0, "proxy": g + 0.1, "kl": kl * (1.5 if hard else 0.5),
                         "hack": float(hard and (i // 2) < hack_hard * n), "response_length": 3.0})
        out[set_name] = recs
    return out


def test_summarize_run():
    metrics = [{"reward/gold_mean": 0.8 if i < 5 else 0.3, "policy/entropy": float(i), "group/0/mass": 0.7,
                "group/1/mass": 0.3} for i in range(10)]
    s = report.summarize_run(samples(1.0, 0.4, kl=2.0, hack_hard=0.5), metrics, task(), {"entropy": "policy/entropy"})
    assert s["gold_eval"] == pytest.approx(0.7) and s["worst_group_eval"] == pytest.approx(0.4)
    assert s["worst_group_eval_name"] == "hard_b" and s["gap_eval"] == pytest.approx(0.6)
    assert s["kl_to_sft"] == pytest.approx(2.0) and s["kl_to_sft_ood"] == pytest.approx(2.0)
    assert s["proxy_minus_gold"] == pytest.approx(0.1) and s["reward_eval"] == pytest.approx(1.7)
    assert s["hack_rate"] == pytest.approx(0.25) and s["hard"]["hack_rate"] == pytest.approx(0.5)
    assert s["easy"] == {"gold_eval": 1.0, "kl": 1.0, "hack_rate": 0.0}
    assert s["per_group"]["hard_b"] == pytest.approx({"gold_eval": 0.4, "gold_ood": 0.4, "kl": 3.0, "hack_rate": 0.5})
    assert s["collapsed"] == 1.0  # the last 10% of training gold below half of the first 10%
    assert s["diagnostics"] == {"entropy": pytest.approx(8.5), "minority_mass": pytest.approx(0.3)}


PROTOCOL = {
    "name": "synthetic", "iterations": 5, "seeds": [1, 2, 3],
    "arms": [{"name": "ppo", "algo": "ppo"}, {"name": "gil", "algo": "gil"}, {"name": "sft", "policy": "sft"}],
    "matching": {"arms": ["ppo", "gil"], "grid": {"ppo.target_kl": [1, 4]}, "name": "{arm}_t{value}"},
    "anchor": "sft",
    "comparisons": {"frontier": [{"a": "gil", "b": "ppo", "metrics": ["gold_eval", "worst_group_eval"]}]},
    "win_rule": {"text": "gil wins", "all": ["frontier gil vs ppo gold_eval ci_low > 0",
                                             "paired gil vs ppo worst_group_eval ci_low > 0"]},
    "predictions": [{"text": "ppo hacks hard prompts", "all": ["arm ppo_t4 hard.hack_rate mean > 0.1"]},
                    {"text": "gil stays near sft", "all": ["arm gil_t4 kl_to_sft mean <= arm sft kl_to_sft mean + 1"]},
                    "a prediction in words only"],
    "bootstrap": {"samples": 200},
}


def build(tmp_path, gil_hard):
    """ppo: hard gold 0.5 at KL 1 and 4 (and hacks at the loose target); gil: hard gold ``gil_hard``
    at the same KLs; a little per-seed noise so that the sd is defined."""
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(PROTOCOL))
    p = load_protocol(str(tmp_path / "p.yaml"))
    t = task()
    results = [report.RunResult("sft", "sft", None, {}, samples(0.9, 0.5, kl=0.0))]
    for arm in p.arms:
        if not arm.trains:
            continue
        for k, seed in enumerate(arm.seeds):
            kl = float(arm.grid_value) + 0.1 * k
            hard = (gil_hard if arm.method == "gil" else 0.5) + 0.01 * k
            hack = 0.4 if arm.name == "ppo_t4" else 0.0
            results.append(report.RunResult(f"{arm.name}_s{seed}", arm.name, seed, {},
                                            samples(0.9, hard, kl=kl, hack_hard=hack)))
    for r in results:
        r.summary = report.summarize_run(r.samples, [], t, {})
    planned = {a.name: len(a.seeds) or 1 for a in p.arms}
    doc = report.build_document(t, p, results, planned, command="cmd", git={"commit": "c", "dirty": False},
                                provenance={}, eval_per_group=0, iterations=5)
    return t, p, results, doc


def test_a_win_and_a_loss(tmp_path):
    _, p, _, doc = build(tmp_path, gil_hard=0.7)
    arm = doc["arms"]["gil_t1"]
    assert arm["runs"] == 3 and arm["per_group"]["hard_b"]["gold_eval"]["mean"] == pytest.approx(0.71)
    assert arm["per_group"]["hard_b"]["gold_eval"]["sd"] == pytest.approx(0.01)
    assert doc["arms"]["sft"]["gold_eval"]["sd"] is None  # one run: no sd
    front = [c for c in doc["comparisons"] if c["kind"] == "frontier"]
    assert [c["metric"] for c in front] == ["gold_eval", "worst_group_eval"]
    assert front[0]["gap"] > 0 and front[0]["ci_low"] > 0 and front[0]["range"][0] == 0.0
    paired = [c for c in doc["comparisons"] if c["kind"] == "paired"]
    assert [(c["a"], c["b"]) for c in paired] == [("gil_t1", "ppo_t1"), ("gil_t4", "ppo_t4")]
    assert paired[0]["metrics"]["worst_group_eval"]["diff"] == pytest.approx(0.2)
    assert paired[0]["win_tie_lose"]["eval"] == {"n": 60, "win": 0.5, "tie": 0.5, "lose": 0.0}
    assert doc["win_rule"]["held"] is True and doc["verdict"].startswith("WIN")
    assert [r["held"] for r in doc["predictions"]] == [True, False, None]
    _, _, _, doc = build(tmp_path, gil_hard=0.4)
    assert doc["win_rule"]["held"] is False and doc["verdict"].startswith("NO WIN")
    assert [c["held"] for c in doc["win_rule"]["conditions"]] == [False, False]


def test_a_method_paired_condition_holds_only_at_every_grid_value(tmp_path):
    _, p, results, doc = build(tmp_path, gil_hard=0.7)
    # gil loses at the loose target only: its hard gold drops below ppo's there
    for r in results:
        if r.arm == "gil_t4":
            for recs in r.samples.values():
                for x in recs:
                    if x["group"] == "hard_b":
                        x["gold"] = 0.3
    cond = p.win_rule.conditions[1]
    held = report.check_condition(cond, doc["arms"], report.compare(p, results))
    assert len(held["left"]) == 2 and held["left"][0] > 0 > held["left"][1] and held["held"] is False


def test_files(tmp_path):
    t, p, results, doc = build(tmp_path, gil_hard=0.7)
    text = report.write_report(str(tmp_path / "out"), t, p, results, doc)
    assert "| gil_t1 | 3/3 |" in text and "**Verdict: WIN" in text and "hack rate hard" in text
    table = json.loads((tmp_path / "out" / "table.json").read_text())
    assert set(table) >= {"arms", "comparisons", "verdict", "command", "git", "win_rule", "predictions"}
    runs = json.loads((tmp_path / "out" / "runs.json").read_text())["runs"]
    assert runs["gil_t4_s3"]["seed"] == 3 and runs["gil_t4_s3"]["summary"]["kl_to_sft"] == pytest.approx(4.2)
    from benchmarks.compare import plots

    names = {p.split("/")[-1] for p in plots.make_plots(str(tmp_path / "out"), t, p, results, doc)}
    assert {"frontier.png", "per_group_gold.png", "per_group_kl.png", "hack_rate.png"} <= names
