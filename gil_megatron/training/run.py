"""One run, whatever the job: PPO (ppo/trainer.py) and the SFT, reward-model and DPO stages
(stages/common.py) go through the same setup around the same loop.

    memory.check_run(...)     before any model is built: the per-rank memory estimate (each job
                              names its models and its micro-batch)
    train(job, ...)           RUN_DIR/config.json (the config as loaded, presets applied)
                              the loop (training/loop.py): steps, evaluation, checkpoints
                              evaluation when no step is left (train.steps reached or 0)
                              the final model directory (``output``, default RUN_DIR/model)
                              one summary line: "<name>: <unit> N key value ... -> OUTPUT"

A job is a loop.Job that also says where it stands (``step``, ``bad_steps``, ``resumed_from``:
what its checkpoint restored) and which model is the run's product (``final_model()``).
"""

import json
import os
import shutil
from typing import Dict, Optional, Protocol, Sequence

import torch.distributed as dist

from gil_megatron.config import LoopConfig, RunConfig, to_dict
from gil_megatron.models.convert import copy_tokenizer_files  # the one list of tokenizer files
from gil_megatron.models.weights import model_dir_stages, save_model_weights, write_meta
from gil_megatron.parallel import collectives, distributed
from gil_megatron.parallel.distributed import ParallelLayout
from gil_megatron.training import loop

Metrics = Dict[str, float]


class RunJob(loop.Job, Protocol):
    layout: ParallelLayout
    step: int
    """Steps done (restored by a resume)."""
    bad_steps: int
    """Consecutive skipped steps before ``step`` (restored by a resume)."""
    resumed_from: Optional[str]
    """The checkpoint the job resumed from, or None."""
    tokenizer_dir: str
    """Tokenizer files copied into the final model directory."""

    def final_model(self):
        """The trained model written as the run's output (PPO: the actor)."""


def loop_settings(train: LoopConfig, name: str, unit: str, fix: str, show: Sequence[str]) -> loop.LoopSettings:
    """The loop's settings from a job's ``train`` section: the same knobs for every job."""
    return loop.LoopSettings(train.steps, train.eval_every, train.save_every, train.max_bad_steps, name=name,
                             unit=unit, fix=fix, show=tuple(show))


def write_config(cfg: RunConfig) -> None:
    """RUN_DIR/config.json on rank 0: the config as this run loaded it (defaults, YAML, overrides,
    an algorithm's presets)."""
    if distributed.is_rank0():
        os.makedirs(cfg.run_dir, exist_ok=True)
        with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
            json.dump(to_dict(cfg), f, indent=2)


def train(job: RunJob, cfg: RunConfig, settings: loop.LoopSettings, *, summary: Sequence[str], source: str,
          skipped: Optional[Metrics] = None) -> Metrics:
    """Run ``job`` from its current step to ``settings.steps`` and write its final model.

    Returns the last logged metrics (the evaluation's when no step was left) plus ``step``, on
    every rank. ``summary``: the metrics of the closing line (the first present ones); ``source``:
    what the final model directory's metadata says it is."""
    start = job.step
    logger = loop.open_logger(cfg.run_dir, cfg.logging, settings, to_dict(cfg), start)
    write_config(cfg)
    last = loop.run(job, settings, logger, start, job.bad_steps, job.resumed_from, skipped=skipped)
    last = {"step": job.step, **last}
    if job.step == start:  # nothing left to train (steps=0, or resumed at the end): evaluate what we have
        metrics = job.evaluate()
        if metrics is not None:
            if start == 0:  # a resumed run already logged its last step
                logger.log(start, metrics, show=settings.show)
                logger.print_eval(start, metrics, settings.unit)
            last.update(metrics)
    output = cfg.output or os.path.join(cfg.run_dir, "model")
    save_model_dir(output, job.layout, job.final_model(), job.tokenizer_dir, source=f"{source}, {settings.unit} {job.step}")
    shown = [k for k in summary if k in last]
    logger.print(f"{settings.name}: {settings.unit} {job.step} " + " ".join(f"{k} {last[k]:.4f}" for k in shown)
                 + f" -> {output}")
    logger.close()
    return last


def _barrier() -> None:
    if dist.is_initialized():
        collectives.barrier(collectives.world_group())


def save_model_dir(out_dir: str, layout: ParallelLayout, model, tokenizer_dir: str, source: str) -> str:
    """Write a trained model as a model directory in our format, atomically across ranks: every
    dp_rank-0 rank writes its shard into a temporary sibling, rank 0 adds the metadata and the
    tokenizer, and renames it into place after a barrier. Every rank calls this."""
    out_dir = os.path.abspath(out_dir)
    tmp = os.path.join(os.path.dirname(out_dir), f".tmp-{os.path.basename(out_dir)}")
    if distributed.is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    if layout.dp_rank == 0:
        save_model_weights(model, tmp, layout.tp_rank, layout.pp_rank)
    _barrier()
    if distributed.is_rank0():
        write_meta(tmp, model.arch, model.role, layout.tp, model_dir_stages(model), source=source)
        copy_tokenizer_files(tokenizer_dir, tmp)
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as fh:
                os.fsync(fh.fileno())
        old = out_dir + ".old"
        if os.path.exists(out_dir):
            shutil.rmtree(old, ignore_errors=True)
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return out_dir
