"""The training loop every job shares: PPO / GIL (trainer.py) and SFT, reward model, DPO (stages/).

A job says what one step is, how it evaluates and how it saves; the loop says when, in this order:

    for step in start + 1 .. settings.steps:
        faults.maybe_fail("before_iteration", step)   reliability tests kill a rank here
        metrics, updated = job.train_step()           one optimizer step (PPO: one iteration)
        non-finite guard                              a NonFiniteError or a skipped update is one more
                                                      bad step in a row; max_bad_steps in a row stop
                                                      the run with FloatingPointError
        job.advance(step, bad_steps)                  the counters the job's checkpoint holds
        job.evaluate()                                every eval_every steps and after the last one
        logger.log, logger.print_eval                 metrics.jsonl, progress, the evaluation summary
        job.save()                                    every save_every steps and after the last one

``time/step_s`` (the step, metric reduction included) and ``time/eval_s`` are measured here. Every
rank runs the loop; the step and evaluation metrics must already be equal on every rank
(gil_megatron/training/metrics.py's reducer gives every pipeline stage the totals).
"""

import time
from dataclasses import dataclass
from typing import Dict, Optional, Protocol, Tuple

from gil_megatron.training import faults
from gil_megatron.training.logging import MetricsLogger

Metrics = Dict[str, float]


class NonFiniteError(FloatingPointError):
    """Non-finite values met before any update (e.g. in a rollout batch): the step is skipped."""


@dataclass
class LoopSettings:
    """When the loop steps, evaluates, saves and gives up; and the words of its messages."""

    steps: int
    """Run until this many steps are done (train.steps; a PPO step is one iteration)."""
    eval_every: int = 0
    """Evaluate every N steps (0: only after the last step)."""
    save_every: int = 0
    """Checkpoint every N steps (0: only after the last step)."""
    max_bad_steps: int = 3
    """Stop after this many consecutive steps with non-finite values (each one is skipped)."""
    name: str = "train"
    """Prefix of the loop's messages (the algorithm or stage name)."""
    unit: str = "step"
    """What a step is called in messages ("iteration" for PPO)."""
    fix: str = "Lower the learning rate or check the data"
    """What the non-finite guard's error suggests."""
    show: Tuple[str, ...] = ("reward/mean", "kl/mean", "loss")
    """Metrics shown on the progress bar or line."""

    def due(self, step: int, every: int) -> bool:
        """Whether a cadence of ``every`` steps (0: none) falls on ``step``; the last step always does."""
        return step == self.steps or (every > 0 and step % every == 0)


class Job(Protocol):
    """What a training job gives the loop."""

    def train_step(self) -> Tuple[Metrics, bool]:
        """One step: (metrics, whether every update went through). May raise NonFiniteError."""

    def advance(self, step: int, bad_steps: int) -> None:
        """Record that ``step`` steps are done and ``bad_steps`` of the last ones were skipped
        (both belong in the job's checkpoint: a resumed run continues the count)."""

    def evaluate(self) -> Optional[Metrics]:
        """Evaluation metrics (``eval/...``), or None when the job has nothing to evaluate."""

    def save(self) -> None:
        """A checkpoint of the step recorded by ``advance``."""


def open_logger(run_dir: str, logging_cfg, settings: LoopSettings, config: dict, start: int) -> MetricsLogger:
    """The run's MetricsLogger (rank 0 writes; a resumed run appends after ``start``)."""
    return MetricsLogger(run_dir, settings.steps, config, progress=logging_cfg.progress, use_wandb=logging_cfg.wandb,
                         wandb_project=logging_cfg.wandb_project, initial_step=start, desc=settings.name)


def run(job: Job, settings: LoopSettings, logger: MetricsLogger, start: int = 0, bad_steps: int = 0,
        resumed_from: Optional[str] = None, skipped: Optional[Metrics] = None) -> Metrics:
    """Steps ``start + 1 .. settings.steps`` of ``job``; returns the last step's metrics ({} when no
    step was left). ``bad_steps``: skipped steps in a row before ``start`` (from the checkpoint).
    ``skipped``: the metrics logged for a step stopped by a NonFiniteError (plus ``bad_value``)."""
    if resumed_from is not None:
        logger.print(f"{settings.name}: resumed from {resumed_from} at {settings.unit} {start}")
    last: Metrics = {}
    for step in range(start + 1, settings.steps + 1):
        faults.maybe_fail("before_iteration", step)
        t0 = time.perf_counter()
        try:
            metrics, updated = job.train_step()
            bad_steps = 0 if updated else bad_steps + 1
        except NonFiniteError as exc:
            bad_steps += 1
            metrics = {**(skipped or {}), "bad_value": str(exc)}
            logger.print(f"{settings.unit} {step}: {exc}; update skipped ({bad_steps} in a row)")
        metrics["time/step_s"] = time.perf_counter() - t0
        if bad_steps >= settings.max_bad_steps:
            raise FloatingPointError(
                f"{bad_steps} consecutive {settings.unit}s with non-finite values (last: "
                f"{metrics.get('bad_value', 'gradients')}); stopping (train.max_bad_steps={settings.max_bad_steps}). "
                f"{settings.fix}")
        job.advance(step, bad_steps)
        if settings.due(step, settings.eval_every):
            t1 = time.perf_counter()
            evaluated = job.evaluate()
            if evaluated is not None:
                metrics.update(evaluated)
                metrics["time/eval_s"] = time.perf_counter() - t1
        logger.log(step, metrics, show=settings.show)
        logger.print_eval(step, metrics, settings.unit)  # per evaluated set: score, worst group, each group
        if settings.due(step, settings.save_every):
            job.save()
        last = metrics
    return last


__all__ = ["Job", "LoopSettings", "Metrics", "NonFiniteError", "open_logger", "run"]
