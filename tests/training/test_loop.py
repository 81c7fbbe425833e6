"""gil_megatron/training/loop.py with a scripted job (no model, no process group): cadence of eval and save,
resume, the fault hook, the non-finite guard and what reaches metrics.jsonl."""

import json

import pytest

from gil_megatron.training import loop
from gil_megatron.training.logging import MetricsLogger


class ScriptedJob:
    """A loop.Job whose steps follow a script: "ok", "skip" (update not applied) or "nan" (raises)."""

    def __init__(self, script, with_eval=True):
        self.script, self.with_eval = list(script), with_eval
        self.calls = []
        self.step = self.bad_steps = 0

    def train_step(self):
        what = self.script[self.step]
        self.calls.append(("step", self.step + 1))
        if what == "nan":
            raise loop.NonFiniteError(f"non-finite scores at {self.step + 1}")
        return {"loss": float(self.step + 1)}, what == "ok"

    def advance(self, step, bad_steps):
        self.step, self.bad_steps = step, bad_steps
        self.calls.append(("advance", step, bad_steps))

    def evaluate(self):
        self.calls.append(("eval", self.step))
        return {"eval/loss": 10.0 + self.step} if self.with_eval else None

    def save(self):
        self.calls.append(("save", self.step))


def run(tmp_path, job, start=0, **settings):
    settings = loop.LoopSettings(**{"steps": len(job.script), **settings})
    logger = MetricsLogger(str(tmp_path), settings.steps, progress=False, initial_step=start)
    last = loop.run(job, settings, logger, start, job.bad_steps, resumed_from="ckpt" if start else None,
                    skipped={"skipped": 1.0})
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")] if (tmp_path / "metrics.jsonl").exists() else []
    return last, lines


def test_cadence_logging_and_timing(tmp_path, capsys):
    job = ScriptedJob(["ok"] * 5)
    last, lines = run(tmp_path, job, eval_every=2, save_every=3)
    assert [c[1] for c in job.calls if c[0] == "eval"] == [2, 4, 5]  # every 2 and after the last
    assert [c[1] for c in job.calls if c[0] == "save"] == [3, 5]
    assert [m["iteration"] for m in lines] == [1, 2, 3, 4, 5]
    assert [("eval/loss" in m, "time/eval_s" in m) for m in lines] == [(False, False), (True, True), (False, False),
                                                                         (True, True), (True, True)]
    assert all(m["time/step_s"] >= 0 for m in lines)
    assert last["loss"] == 5.0 and last["eval/loss"] == 15.0
    assert "evaluation at step 2:" in capsys.readouterr().out  # the eval summary on the console


def test_no_eval_data_and_resume(tmp_path, capsys):
    job = ScriptedJob(["ok"] * 4, with_eval=False)
    job.step = 2
    last, lines = run(tmp_path, job, start=2, name="sft")
    assert [c for c in job.calls if c[0] == "step"] == [("step", 3), ("step", 4)]
    assert all("time/eval_s" not in m for m in lines) and last["loss"] == 4.0
    assert "sft: resumed from ckpt at step 2" in capsys.readouterr().out
    done = ScriptedJob(["ok"] * 2)
    done.step = 2
    assert run(tmp_path / "done", done, start=2)[0] == {} and done.calls == []  # nothing left: nothing runs


def test_fault_hook_before_every_step(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(loop.faults, "maybe_fail", lambda point, step: seen.append((point, step)))
    run(tmp_path, ScriptedJob(["ok"] * 3))
    assert seen == [("before_iteration", 1), ("before_iteration", 2), ("before_iteration", 3)]


def test_non_finite_guard(tmp_path):
    # a skipped update and a raised NonFiniteError both count; a good step resets the count
    job = ScriptedJob(["skip", "nan", "ok", "nan", "skip", "ok"])
    _, lines = run(tmp_path / "a", job, max_bad_steps=3)
    assert [c[2] for c in job.calls if c[0] == "advance"] == [1, 2, 0, 1, 2, 0]
    assert lines[1]["skipped"] == 1.0 and lines[1]["bad_value"] == "non-finite scores at 2"

    job = ScriptedJob(["ok", "skip", "nan", "ok"])
    with pytest.raises(FloatingPointError) as info:
        run(tmp_path / "b", job, max_bad_steps=2, unit="iteration", fix="Lower the learning rates")
    message = str(info.value)
    assert message.startswith("2 consecutive iterations with non-finite values (last: non-finite scores at 3)")
    assert "train.max_bad_steps=2" in message and message.endswith("Lower the learning rates")
    assert job.calls[-1] == ("step", 3) and ("advance", 3, 2) not in job.calls  # stops before recording step 3
