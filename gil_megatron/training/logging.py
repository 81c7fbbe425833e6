"""Run output on rank 0: metrics.jsonl (one JSON object per step), progress, optional wandb.

Progress is a tqdm bar when stderr is a terminal, and otherwise (a log file, CI) one summary line
about every tenth of the run (and at the end), so a log never holds a redrawn bar.
`eval_summary_lines` renders evaluation metrics (per set: score, worst group, each group) for the
console.
"""

import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

from gil_megatron.parallel.distributed import is_rank0


class MetricsLogger:
    def __init__(self, run_dir: str, total_steps: int, config: Optional[dict] = None, *, progress: bool = True,
                 use_wandb: bool = False, wandb_project: str = "gil_megatron", initial_step: int = 0,
                 desc: str = "train"):
        self.enabled = is_rank0()
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.bar = None
        self.wandb = None
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if initial_step == 0 and os.path.exists(self.path):
            os.remove(self.path)  # a fresh run starts a fresh file; a resumed one appends
        elif initial_step > 0:
            self._truncate_after(initial_step)
        self.desc, self.total, self.started, self.start_step = desc, total_steps, time.perf_counter(), initial_step
        self.every = max(1, round(total_steps / 10))  # summary lines when there is no terminal
        self.lines = progress and not _is_tty()
        if progress and not self.lines:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True)
        if use_wandb:
            os.environ.setdefault("WANDB_MODE", "offline")
            import wandb

            self.wandb = wandb.init(project=wandb_project, dir=run_dir, config=config or {}, resume="allow")

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines of iterations after the checkpoint (they will be redone)."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [line for line in f if json.loads(line).get("iteration", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(keep)

    def log(self, step: int, metrics: Dict[str, float], show=("reward/mean", "kl/mean", "loss")) -> None:
        if not self.enabled:
            return
        record = {"iteration": step, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=step)
        shown = {k: record[k] for k in show if isinstance(record.get(k), float)}
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()})
        elif self.lines and (step % self.every == 0 or step == self.total):
            print(self.progress_line(step, shown), flush=True)

    def progress_line(self, step: int, shown: Dict[str, float]) -> str:
        """'gil: 30/100 (30%) 41s, ETA 1m35s | reward/mean 1.43 kl/mean 0.396'"""
        elapsed = time.perf_counter() - self.started
        done = step - self.start_step
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        pct = 100.0 * step / self.total if self.total else 100.0
        values = " ".join(f"{k} {v:.4g}" for k, v in shown.items())
        return (f"{self.desc}: {step}/{self.total} ({pct:.0f}%) {_duration(elapsed)}, ETA {_duration(eta)}"
                + (f" | {values}" if values else ""))

    def print_eval(self, step: int, metrics: Dict[str, float], unit: str = "iteration") -> None:
        """The evaluation summary of ``metrics`` (its eval/ keys), if there is one, on the console."""
        lines = eval_summary_lines(metrics)
        if lines:
            self.print(f"evaluation at {unit} {step}:")
            for line in lines:
                self.print("  " + line)

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def _is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def eval_summary_lines(metrics: Dict[str, float], order: Sequence[str] = ("gold", "reward", "accuracy", "loss"),
                       ) -> List[str]:
    """One line per evaluated set from ``eval/...`` metrics, e.g.

        eval: gold 0.612 reward 1.52 | worst group reverse 0.402 | copy 0.91 reverse 0.402 sort 0.55
        ood: gold 0.587 reward 1.49 | worst group sort 0.311 | ...

    Keys understood: PPO's eval/<set>/<score>, eval/<set>/group/<g>, eval/<set>/worst_group; the
    stages' eval/<metric> and eval/group/<g>/<metric> (set "eval")."""
    sets: Dict[str, Dict[str, float]] = {}
    groups: Dict[str, Dict[str, float]] = {}
    for key, value in metrics.items():
        if not key.startswith("eval/") or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        parts = key.split("/")[1:]
        if parts[0] == "group" and len(parts) == 3:  # stage: eval/group/<g>/<metric>
            if parts[2] == _first_present(metrics, "eval/", order):
                groups.setdefault("eval", {})[parts[1]] = float(value)
        elif len(parts) == 1:  # stage: eval/<metric>
            sets.setdefault("eval", {})[parts[0]] = float(value)
        elif len(parts) == 3 and parts[1] == "group":  # ppo: eval/<set>/group/<g>
            groups.setdefault(parts[0], {})[parts[2]] = float(value)
        elif len(parts) == 2:  # ppo: eval/<set>/<score>
            sets.setdefault(parts[0], {})[parts[1]] = float(value)
    lines = []
    for name in sorted(set(sets) | set(groups)):
        scores = sets.get(name, {})
        shown = [k for k in order if k in scores] + sorted(k for k in scores if k not in order and k != "worst_group"
                                                             and not k.endswith(("_s", "examples", "pairs", "tokens")))
        text = f"{name}: " + " ".join(f"{k} {scores[k]:.4g}" for k in shown)
        per_group = groups.get(name, {})
        if per_group:
            lowest = "loss" not in (_first_present(metrics, "eval/", order) or "")
            worst = (min if lowest else max)(per_group, key=per_group.get)
            text += f" | worst group {worst} {per_group[worst]:.4g} | " + " ".join(
                f"{g} {v:.4g}" for g, v in sorted(per_group.items()))
        lines.append(text)
    return lines


def _first_present(metrics: Dict[str, float], prefix: str, order: Sequence[str]) -> Optional[str]:
    for name in order:
        if prefix + name in metrics:
            return name
    return None


def _clean(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf
    return value
