"""Per-token log-probs (and entropies) of a sequence's own tokens from the vocab-parallel logits of
a forward: the one helper every job calls (PPO scoring and loss, SFT, DPO). Only per-token scalars
cross the tensor-parallel group (ops/logprob.py)."""

from typing import Optional

import torch
from megatron.core import parallel_state

from gil_megatron.models.packing import Packing
from gil_megatron.ops.logprob import vocab_parallel_logprobs


def action_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, with_entropy: bool = False,
                    packing: Optional[Packing] = None):
    """Vocab-parallel logits [b, s, V/tp] -> (log-probs, entropy or None) of tokens 1..s-1: [b, s-1];
    position t holds log p(input_ids[t+1] | input_ids[<=t]). The one log-prob helper: scoring, the
    PPO policy loss and the SFT / DPO stages call it; only per-token scalars cross the TP group.
    ``packing``: the micro-batch ran packed and ``logits`` are the packed row's [1, T, V/tp]; the
    result has the same [b, s-1] layout, zeros where a row has no action."""
    if packing is None:
        if logits.shape[:2] != input_ids.shape:
            raise ValueError(f"action_logprobs: logits {tuple(logits.shape)} do not match input_ids "
                             f"{tuple(input_ids.shape)}; packed logits [1, T, V] need "
                             "packing=<the micro-batch's Packing>")
        logits, targets = logits[:, :-1], input_ids[:, 1:]
    else:
        logits, targets = logits[0, :-1], packing.input_ids[0, 1:]
    group = parallel_state.get_tensor_model_parallel_group()
    logprobs, entropy = vocab_parallel_logprobs(logits, targets, tp_group=group, compute_entropy=with_entropy)
    if packing is None:
        return logprobs, entropy
    return packing.unpack_actions(logprobs), packing.unpack_actions(entropy) if with_entropy else None
