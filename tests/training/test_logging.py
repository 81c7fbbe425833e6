"""gil_megatron.training.logging: progress lines without a terminal, the evaluation summary; tools/plot_run.py."""

import importlib.util
import json
import os

from gil_megatron.training.logging import MetricsLogger, eval_summary_lines

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_progress_without_a_tty_is_ten_short_lines(tmp_path, capsys):
    log = MetricsLogger(str(tmp_path), 50, progress=True, desc="gil")  # pytest's stderr is not a tty
    for step in range(1, 51):
        log.log(step, {"reward/mean": 0.1 * step, "kl/mean": 0.5})
    log.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10 and all(len(line) < 120 for line in lines)
    assert lines[0].startswith("gil: 5/50 (10%) ") and lines[-1].startswith("gil: 50/50 (100%)")
    assert "| reward/mean 5 kl/mean 0.5" in lines[-1]
    assert len(open(tmp_path / "metrics.jsonl").readlines()) == 50


def test_eval_summary_per_set_worst_group_first():
    metrics = {"eval/eval/reward": 1.5, "eval/eval/gold": 0.61, "eval/eval/group/copy": 0.9,
               "eval/eval/group/sort": 0.4, "eval/eval/worst_group": 0.4, "eval/ood/gold": 0.5,
               "eval/ood/reward": 1.2, "reward/mean": 1.0}
    assert eval_summary_lines(metrics) == [
        "eval: gold 0.61 reward 1.5 | worst group sort 0.4 | copy 0.9 sort 0.4",
        "ood: gold 0.5 reward 1.2",
    ]
    stage = {"eval/loss": 0.7, "eval/tokens": 400.0, "eval/group/copy/loss": 0.5, "eval/group/sort/loss": 0.9}
    assert eval_summary_lines(stage) == ["eval: loss 0.7 | worst group sort 0.9 | copy 0.5 sort 0.9"]
    assert eval_summary_lines({"reward/mean": 1.0}) == []


def test_plot_run_writes_a_png(tmp_path):
    spec = importlib.util.spec_from_file_location("plot_run", os.path.join(ROOT, "tools", "plot_run.py"))
    plot_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_run)
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for i in range(1, 21):
            row = {"iteration": i, "reward/mean": 0.1 * i, "reward/gold_mean": 0.05 * i, "kl/mean": 0.02 * i,
                   "known/copy/gold": 0.9, "known/sort/gold": 0.3 + 0.01 * i, "group/0/reward": 0.2,
                   "group/1/reward": 0.8}
            if i % 10 == 0:
                row.update({"eval/eval/gold": 0.6, "eval/ood/gold": 0.5})
            f.write(json.dumps(row) + "\n")
    out = plot_run.main([str(tmp_path)])
    assert out == str(tmp_path / "curves.png") and os.path.getsize(out) > 10_000
    assert [p[0] for p in plot_run.panels(plot_run.read_metrics(str(tmp_path / "metrics.jsonl")))] == [
        "reward", "KL to the reference", "known groups (gold)", "inferred groups (reward)"]
