"""Fault injection for reliability tests: kill a rank at a chosen point of a chosen iteration.

    GIL_MEGATRON_FAULTS="rank1:iter3:attempt0:before_iteration,rank0:iter4:attempt1:during_save"

Each entry fires once, on the named global rank, iteration and torchrun attempt
(TORCHELASTIC_RESTART_COUNT), with SIGKILL: no cleanup, no flush, exactly like a dead node.
Unset (the normal case) this module does nothing.
"""

import os
import signal

POINTS = ("before_iteration", "during_save")


def _faults():
    spec = os.environ.get("GIL_MEGATRON_FAULTS", "")
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        rank, iteration, attempt, point = entry.split(":")
        if point not in POINTS:
            raise ValueError(f"GIL_MEGATRON_FAULTS entry {entry!r}: point must be one of {POINTS}")
        yield int(rank.removeprefix("rank")), int(iteration.removeprefix("iter")), int(attempt.removeprefix("attempt")), point


def maybe_fail(point: str, iteration: int) -> None:
    if "GIL_MEGATRON_FAULTS" not in os.environ:
        return
    rank = int(os.environ.get("RANK", "0"))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    for f_rank, f_iter, f_attempt, f_point in _faults():
        if (f_rank, f_iter, f_attempt, f_point) == (rank, iteration, attempt, point):
            os.kill(os.getpid(), signal.SIGKILL)
