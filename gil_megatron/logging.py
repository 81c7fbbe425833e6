"""Run output on rank 0: metrics.jsonl (one JSON object per step), a tqdm bar, optional wandb."""

import json
import math
import os
import time
from typing import Dict, Optional

from gil_megatron.distributed import is_rank0


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
        if progress:
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
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({k: f"{record[k]:.3g}" for k in show if isinstance(record.get(k), float)})

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


def _clean(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf
    return value


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return elapsed
