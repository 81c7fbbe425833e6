"""Spawn gloo process groups from pytest: one thread per rank, results returned to the test."""

import os
import tempfile
from typing import Any, Callable, List

import torch
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    from gil_megatron.parallel import distributed

    try:
        result = fn(*args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.destroy()


def spawn(fn: Callable, world_size: int, *args: Any) -> List[Any]:
    """Run ``fn(*args)`` on ``world_size`` ranks (env set as torchrun would); return each rank's
    result. ``fn`` must be importable (a module-level function) and call distributed.initialize."""
    from gil_megatron.parallel import distributed

    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world_size, distributed.free_port(), fn, args, out_dir),
                           nprocs=world_size, join=True, start_method="spawn")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def run_single(fn: Callable, *args: Any) -> Any:
    """Run ``fn`` in a fresh single-rank process (megatron's global state never leaks into pytest)."""
    return spawn(fn, 1, *args)[0]
