"""Running micro-batches through megatron's pipeline schedules, and moving results between stages.

The schedule never knows the loss (megatron's contract): ``forward_step`` returns the model output
and a loss function with the micro-batch bound. Loss functions here return (loss, metrics) where
``loss`` is already this micro-batch's share of the mini-batch objective; we multiply by the number
of micro-batches to undo the schedule's own averaging, so the gradient is exactly that of the
objective, whatever the micro-batch split.

Virtual pipeline (parallel.virtual_pp = V > 1): a model is this rank's V chunks (models/chunks.py)
and the schedule is megatron's interleaved 1F1B. That schedule runs groups of pp contiguous
micro-batches per chunk and refuses fewer than pp micro-batches or a last group of fewer than pp
(megatron/core/pipeline_parallel/schedules.py, forward_backward_pipelining_with_interleaving). A
micro-batch count that is not a multiple of pp is padded with copies of the last micro-batch whose
loss is multiplied by zero and whose results are dropped: gradients and outputs are those of the
caller's micro-batches, at the cost of up to pp - 1 wasted micro-batches. The schedule also gets
fixed activation shapes (see transformer_config in models/llama.py for why): micro-batches of
different sizes are padded to the largest [b, s] and the model output is cut back before the loss.
"""

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from gil_megatron.models import packing
from gil_megatron.models.chunks import model_chunks
from gil_megatron.parallel import collectives

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
    forward_only) through the pipeline; ``model`` is one model or this rank's chunks (see
    ``model_chunks``). Returns, on the last stage, one metrics dict per micro-batch (with ``output``
    when loss_fn is None); on other stages an empty list."""
    n = len(microbatches)
    if n == 0:
        return []
    loss_fn = loss_fn or _collect_output
    forward_only = forward_only or loss_fn is _collect_output
    chunks = model_chunks(model)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    interleaved = len(chunks) > 1
    # the interleaved schedule runs micro-batches in groups of pp per chunk (module docstring)
    padded = list(microbatches) + [microbatches[-1]] * ((-n % pp) if interleaved else 0)
    m = len(padded)
    seq_length = max(mb["input_ids"].shape[1] for mb in microbatches)
    micro_batch_size = max(mb["input_ids"].shape[0] for mb in microbatches)

    def forward_step(data_iterator, chunk):
        index, batch = next(data_iterator)
        shaped = _fixed_shape(batch, micro_batch_size, seq_length) if interleaved else batch
        output = packing.forward_chunk(chunk, shaped)

        def loss_func(out):
            b, s = batch["input_ids"].shape
            loss, metrics = loss_fn(batch, out[:b, :s] if interleaved else out)
            return loss * (m if index < n else 0), metrics  # padding: no gradient

        return output, loss_func

    # one iterator per chunk: each chunk sees every micro-batch, in order
    iterators = [iter(enumerate(padded)) for _ in chunks]
    out = get_forward_backward_func(pp_size=pp, vp_size=len(chunks) if interleaved else None)(
        forward_step_func=forward_step,
        data_iterator=iterators if interleaved else iterators[0],
        model=chunks,
        num_microbatches=m,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    return out[:n]


def _fixed_shape(batch: Dict[str, torch.Tensor], rows: int, columns: int) -> Dict[str, torch.Tensor]:
    """The batch with input_ids (and position_ids) [b, s] padded to [rows, columns]: extra rows
    repeat the last row, extra columns repeat the last column. Right padding never reaches the real
    positions (causal attention) and rows are independent, so the real outputs are unchanged and
    the loss, which only sees them, gets no gradient from the padding."""
    if batch.get(packing.PACKING_KEY) is not None:  # config.py refuses this combination up front
        raise ValueError("packed micro-batches (train.sequence_packing) do not run under parallel.virtual_pp > 1")
    b, s = batch["input_ids"].shape
    if (b, s) == (rows, columns):
        return batch
    shaped = dict(batch)
    for key in ("input_ids", "position_ids"):
        t = batch.get(key)
        if t is not None:
            t = torch.cat([t, t[:, -1:].expand(b, columns - s)], dim=1)
            shaped[key] = torch.cat([t, t[-1:].expand(rows - b, columns)], dim=0)
    return shaped


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
