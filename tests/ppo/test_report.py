"""gil_megatron/ppo/report.py on hand-made records: report.json's keys, the comparison, the markdown
tables and the files (NaN written as null), without any model."""

import json
import math

import pytest

from gil_megatron.ppo.report import PolicyResult, build_report, report_markdown, write_report


def _records(shift: float):
    groups = ["copy", "sort", "copy", "sort"]
    return [{"index": i, "prompt": f"p{i}", "response": f"r{i}", "group": g, "gold": 0.1 * i + shift,
             "reward_fn": 0.2 * i, "response_length": 3.0} for i, g in enumerate(groups)]


def _policies():
    return [PolicyResult("a", "/ckpt/a", {"eval": _records(0.5)}), PolicyResult("b", "/ckpt/b", {"eval": _records(0.0)})]


def test_report_summaries_comparison_and_tables():
    report = build_report(_policies(), {"greedy": True, "max_new_tokens": 6}, tie_margin=0.1)
    a = report["policies"]["a"]
    assert a["path"] == "/ckpt/a" and a["sets"]["eval"]["primary"] == "gold"
    assert a["sets"]["eval"]["scores"]["gold"]["mean"] == pytest.approx(0.65)
    comp = report["comparison"]
    assert (comp["a"], comp["b"], comp["judge"]) == ("a", "b", "gold")
    assert comp["sets"]["eval"]["win"] == 1.0  # a's gold is b's + 0.5 > the 0.1 margin everywhere
    md = report_markdown(report)
    assert md.startswith("# Evaluation report")
    assert "## `eval` (4 prompts; primary score: gold)" in md
    assert "| eval | all | 100.0% | 0.0% | 0.0% | 4 |" in md  # the win/tie/lose row
    assert "Per known group (gold):" in md and "| a | 0.600 | 0.700 |" in md


def test_report_needs_a_judge_for_two_policies():
    no_scores = [PolicyResult(n, n, {"eval": [{"index": 0, "group": None, "response_length": 1.0}]}) for n in "ab"]
    with pytest.raises(ValueError, match="needs a score to judge by"):
        build_report(no_scores, {})


def test_write_report_files(tmp_path):
    policies = _policies()
    report = build_report(policies, {"greedy": False, "temperature": 0.7, "max_new_tokens": 6, "nan": math.nan})
    paths = write_report(str(tmp_path / "out"), report, policies)
    assert json.load(open(paths["json"]))["settings"]["nan"] is None  # JSON has no NaN
    assert "sampled at temperature 0.7" in open(paths["markdown"]).read()
    samples = [json.loads(line) for line in open(paths["samples"])]
    assert len(samples) == 8 and {s["policy"] for s in samples} == {"a", "b"} and samples[0]["set"] == "eval"
