"""Thin torch.distributed wrappers: an explicit process group, and contiguous buffers always.

Why this module exists: gloo (our CPU backend) reads and writes a tensor's storage as if it were
contiguous. A non-contiguous view (``logits[..., :vocab]``, ``out[..., 0]``) is sent and received
as the wrong elements, without any error; a PP2 checkpoint with an odd vocabulary once verified as
``max_abs_diff inf`` that way. nccl refuses such tensors instead. Every collective here therefore
runs on a contiguous buffer: a contiguous tensor is used as is (no copy), a non-contiguous one is
copied into a buffer, and in-place results are copied back into the caller's view, so callers
keep torch.distributed's in-place semantics.

Every function takes the process group explicitly (``group=None`` is not accepted: it would
silently mean the whole world; ``world_group()`` names it when the whole job is meant). A group of
one rank returns at once, without communication. Every collective of the engine goes through here,
except megatron-core's own (its pipeline schedules' p2p, DDP's gradient all-reduce, its optimizer's
norm reductions and dist_checkpointing), which take megatron's process groups themselves.
"""

from typing import Any, List

import torch
import torch.distributed as dist

ReduceOp = dist.ReduceOp


def _size(group) -> int:
    if group is None:
        raise ValueError("collectives need an explicit process group (got group=None)")
    return dist.get_world_size(group)


def _contiguous(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.is_contiguous() else tensor.contiguous()


def _in_place(tensor: torch.Tensor, run) -> torch.Tensor:
    """Run ``run(buffer)`` on a contiguous buffer of ``tensor``; write the result back into it."""
    buffer = _contiguous(tensor)
    run(buffer)
    if buffer is not tensor:
        tensor.copy_(buffer)
    return tensor


def world_group():
    """The default group of every rank in the job (for the few things that are job-wide: a
    checkpoint's barriers, the per-node tokenization cache)."""
    return dist.group.WORLD


def barrier(group) -> None:
    """Every rank of ``group`` waits for all the others."""
    if _size(group) == 1:
        return
    dist.barrier(group=group)


def broadcast(tensor: torch.Tensor, src: int, group) -> torch.Tensor:
    """In place: every rank of ``group`` ends with ``src``'s values (``src`` is a global rank)."""
    if _size(group) == 1:
        return tensor
    return _in_place(tensor, lambda buf: dist.broadcast(buf, src=src, group=group))


def all_reduce(tensor: torch.Tensor, group, op=ReduceOp.SUM) -> torch.Tensor:
    """In place: ``tensor`` becomes the reduction (default sum) over ``group``."""
    if _size(group) == 1:
        return tensor
    return _in_place(tensor, lambda buf: dist.all_reduce(buf, op=op, group=group))


def all_gather(tensor: torch.Tensor, group) -> List[torch.Tensor]:
    """One contiguous tensor per rank of ``group`` (same shape on every rank), in rank order."""
    size = _size(group)
    if size == 1:
        return [tensor]
    local = _contiguous(tensor)
    # torch.empty, not empty_like: empty_like keeps a permuted input's strides (non-contiguous)
    parts = [torch.empty(local.shape, dtype=local.dtype, device=local.device) for _ in range(size)]
    dist.all_gather(parts, local, group=group)
    return parts


def all_gather_into(tensor: torch.Tensor, group, dim: int = 0) -> torch.Tensor:
    """The ranks' tensors concatenated along ``dim`` (e.g. vocab shards [..., V/tp] -> [..., V])."""
    return torch.cat(all_gather(tensor, group), dim=dim)


def broadcast_object(obj: Any, src: int, group) -> Any:
    """``src``'s picklable object on every rank of ``group`` (``src`` is a global rank)."""
    if _size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_object(obj: Any, group) -> List[Any]:
    """Every rank's picklable object, in rank order."""
    size = _size(group)
    if size == 1:
        return [obj]
    out = [None] * size
    dist.all_gather_object(out, obj, group=group)
    return out


def recv(tensor: torch.Tensor, src: int, group) -> torch.Tensor:
    """Point to point, in place: ``tensor`` receives what global rank ``src`` sends."""
    return _in_place(tensor, lambda buf: dist.recv(buf, src=src, group=group))


def isend(tensor: torch.Tensor, dst: int, group):
    """Non-blocking send to global rank ``dst``; returns the work handle. ``tensor`` must be
    contiguous and stay alive until the handle's ``wait()`` (a hidden copy could be freed early)."""
    if not tensor.is_contiguous():
        raise ValueError(f"isend needs a contiguous tensor (got strides {tensor.stride()}); call .contiguous() "
                         "and keep the result alive until the send completes")
    return dist.isend(tensor, dst=dst, group=group)


__all__ = ["ReduceOp", "all_gather", "all_gather_into", "all_gather_object", "all_reduce", "barrier", "broadcast",
           "broadcast_object", "isend", "recv", "world_group"]
