"""Running micro-batches through megatron's pipeline schedules, and moving results between stages.

The schedule never knows the loss (megatron's contract): ``forward_step`` returns the model output
and a loss function with the micro-batch bound. Loss functions here return (loss, metrics) where
``loss`` is already this micro-batch's share of the mini-batch objective; we multiply by the number
of micro-batches to undo the schedule's own averaging, so the gradient is exactly that of the
objective, whatever the micro-batch split.
"""

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from gil_megatron import collectives
from gil_megatron.models import packing

LossFn = Callable[[Dict[str, torch.Tensor], torch.Tensor], Tuple[torch.Tensor, Dict[str, torch.Tensor]]]


def _collect_output(batch, output):
    # forward-only scoring: keep the last stage's output, no loss
    return torch.zeros((), device=output.device), {"output": output.detach()}


def run_microbatches(
    model: torch.nn.Module,
    microbatches: Sequence[Dict[str, torch.Tensor]],
    loss_fn: Optional[LossFn] = None,
    forward_only: bool = False,
) -> List[Dict[str, torch.Tensor]]:
    """Run micro-batches (dicts holding at least ``input_ids`` [b, s]) forward (and backward unless
    forward_only) through the pipeline. Returns, on the last stage, one metrics dict per micro-batch
    (with ``output`` when loss_fn is None); on other stages an empty list."""
    n = len(microbatches)
    if n == 0:
        return []
    loss_fn = loss_fn or _collect_output
    forward_only = forward_only or loss_fn is _collect_output

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        output = packing.forward_chunk(chunk, batch)

        def loss_func(out):
            loss, metrics = loss_fn(batch, out)
            return loss * n, metrics

        return output, loss_func

    seq_length = max(mb["input_ids"].shape[1] for mb in microbatches)
    micro_batch_size = max(mb["input_ids"].shape[0] for mb in microbatches)
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=[model],
        num_microbatches=n,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def broadcast_from_last_stage(tensors: Optional[List[torch.Tensor]]) -> List[torch.Tensor]:
    """Give every pipeline stage the last stage's tensors (shapes travel first, as objects).
    The last stage's tensors may be views (e.g. ``logits[..., :vocab]``): collectives sends a
    contiguous copy."""
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp == 1:
        return tensors
    group = parallel_state.get_pipeline_model_parallel_group()
    src = parallel_state.get_pipeline_model_parallel_last_rank()
    meta = [(tuple(t.shape), t.dtype) for t in tensors] if tensors is not None else None
    meta = collectives.broadcast_object(meta, src=src, group=group)
    if tensors is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        tensors = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in meta]
    return [collectives.broadcast(t, src=src, group=group) for t in tensors]


def gather_vocab_shards(logits: torch.Tensor) -> torch.Tensor:
    """[..., V/tp] -> [..., V] (debugging and tests only: production code never gathers logits)."""
    group = parallel_state.get_tensor_model_parallel_group()
    return collectives.all_gather_into(logits, group=group, dim=-1)
