"""`python -m benchmarks.compare --quick` end to end on the tiny miniature (tests/miniature_runs.py):
it trains and evaluates every arm's first seed, writes table.json in its schema, the samples and the
plots; a second launch reuses every finished run; a change of the protocol's arm re-runs that arm."""

import gzip
import json
import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def tiny_task(mini, tmp_path):
    task = {"name": "tiny", "policy": str(mini / "actor"), "reward": str(mini / "reward"),
            "prompts": {s: str(mini / "data" / f"prompts_{s}.jsonl") for s in ("train", "eval", "ood")},
            "gold": "gil_megatron.miniature.task:gold_reward", "hack": "miniature_hacks:evasive",
            "pythonpath": [os.path.join(ROOT, "examples", "tasks", "miniature")],
            "max_prompt_length": 12, "max_new_tokens": 6,
            "easy_groups": ["copy", "shift"], "hard_groups": ["reverse", "sort", "reverse_shift"],
            "overrides": {"rollout.batch_size": 16, "rollout.micro_batch_size": 16, "ppo.mini_batch_size": 16,
                          "ppo.micro_batch_size": 16, "actor_optim.lr": 1e-3, "critic_optim.lr": 1e-3}}
    protocol = {"name": "tiny", "iterations": 100, "seeds": [7, 8],
                "arms": [{"name": "ppo", "algo": "ppo"}, {"name": "gil", "algo": "gil"},
                         {"name": "sft", "policy": "sft"}],
                "matching": {"arms": ["ppo", "gil"], "grid": {"ppo.target_kl": [2]},
                             "overrides": {"ppo.kl_horizon": 50}, "name": "{arm}_t{value}"},
                "anchor": "sft",
                "comparisons": {"frontier": [{"a": "gil", "b": "ppo"}], "paired": [{"a": "gil", "b": "ppo"}]},
                "win_rule": {"text": "gil above ppo", "all": ["frontier gil vs ppo gold_eval ci_low > 0"]},
                "bootstrap": {"samples": 200}}
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(task))
    (tmp_path / "protocol.yaml").write_text(yaml.safe_dump(protocol))
    return protocol


def launch(tmp_path, *extra, quick=True, status=0):
    cmd = [sys.executable, "-m", "benchmarks.compare", "--task", str(tmp_path / "task.yaml"),
           "--protocol", str(tmp_path / "protocol.yaml"), "--workdir", str(tmp_path / "work"),
           *(["--quick"] if quick else []), "--iterations", "2", "--eval-per-group", "4", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == status, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout if status == 0 else proc.stderr


def test_quick_command_end_to_end_and_reuse(mini, tmp_path):
    protocol = tiny_task(mini, tmp_path)
    out = launch(tmp_path)
    work = tmp_path / "work"
    assert "3 run(s) to train/evaluate: ppo_t2_s7, gil_t2_s7, sft" in out
    doc = json.loads((work / "table.json").read_text())
    assert set(doc["arms"]) == {"ppo_t2", "gil_t2", "sft"}
    for name, arm in doc["arms"].items():
        assert arm["runs"] == 1 and arm["planned"] == 1
        for key in ("gold_eval", "worst_group_eval", "gold_ood", "worst_group_ood", "kl_to_sft", "hack_rate"):
            assert set(arm[key]) == {"mean", "sd"} and isinstance(arm[key]["mean"], float), (name, key)
        assert set(arm["per_group"]) == {"copy", "shift", "reverse", "sort", "reverse_shift"}
        for g in arm["per_group"].values():
            assert {"gold_eval", "kl", "hack_rate"} <= set(g)
    assert 0 <= doc["arms"]["gil_t2"]["agreement_easy_hard"]["mean"] <= 1  # the critic's groups vs easy/hard
    assert doc["arms"]["sft"]["kl_to_sft"]["mean"] == 0.0 and doc["arms"]["ppo_t2"]["kl_to_sft"]["mean"] > 0
    assert {c["kind"] for c in doc["comparisons"]} == {"frontier", "paired"}
    assert doc["verdict"] and doc["command"].startswith("python -m benchmarks.compare") and doc["git"]["commit"]
    with gzip.open(work / "runs" / "gil_t2_s7" / "samples.jsonl.gz", "rt") as f:
        recs = [json.loads(line) for line in f]
    assert len(recs) == 2 * 5 * 4  # eval and ood, 4 prompts of each of the 5 groups
    assert {"set", "prompt", "group", "response", "reward", "gold", "hack", "kl", "inferred_group"} <= set(recs[0])
    metrics = [json.loads(line) for line in open(work / "runs" / "gil_t2_s7" / "metrics.jsonl")]
    assert len(metrics) == 2  # --iterations 2
    # the matching reached the engine: the config as the run loaded it, and the KL controller moved eta
    cfg = json.loads((work / "runs" / "gil_t2_s7" / "config.json").read_text())
    assert (cfg["ppo"]["target_kl"], cfg["ppo"]["kl_horizon"], cfg["seed"], cfg["algo"]) == (2, 50, 7, "gil")
    assert metrics[0]["kl/coef"] == pytest.approx(0.05) and metrics[1]["kl/coef"] != pytest.approx(0.05)
    for plot in ("frontier.png", "per_group_gold.png", "per_group_kl.png", "training_curves.png"):
        assert (work / plot).stat().st_size > 1000, plot
    table = (work / "table.md").read_text()
    assert "| gil_t2 | 1/1 |" in table and "Verdict:" in table

    # a second launch trains nothing: every run is reused by its fingerprint
    stamps = {p: os.path.getmtime(work / "runs" / p / "eval.json") for p in ("ppo_t2_s7", "gil_t2_s7", "sft")}
    out = launch(tmp_path)
    assert "every selected run is finished already" in out and "run(s) to train" not in out
    assert stamps == {p: os.path.getmtime(work / "runs" / p / "eval.json") for p in stamps}

    # a full (not --quick) launch refuses to train under task / protocol files that git does not hold
    err = launch(tmp_path, quick=False, status=2)
    assert err.strip().splitlines() == [f"error: {tmp_path / 'task.yaml'} is not committed as it is (pre-registration: "
                                        "commit the task and protocol files before their runs); --quick or "
                                        "--allow-uncommitted run anyway"]
    assert not (work / "runs" / "gil_t2_s8").exists()

    # changing one arm's overrides re-runs that arm only (its fingerprint changed)
    protocol["arms"][1]["overrides"] = {"gil.beta_policy": 0.5}
    (tmp_path / "protocol.yaml").write_text(yaml.safe_dump(protocol))
    out = launch(tmp_path, "--arms", "gil", "ppo")
    assert "1 run(s) to train/evaluate: gil_t2_s7" in out
    assert os.path.getmtime(work / "runs" / "ppo_t2_s7" / "eval.json") == stamps["ppo_t2_s7"]
