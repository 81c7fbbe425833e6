"""No-grad scoring of rollout sequences on every layout: log-probs, critic outputs, rewards.

Everything runs through the pipeline schedule in micro-batches; per-token results are computed on
the last stage (log-probs straight from vocab-parallel logits through the fused kernel, so full
logits never exist) and then given to every stage. Shapes use the action axis: sequences [b, s]
give per-action tensors [b, s-1], action t being token t+1 predicted at position t.
"""

import importlib
from typing import Callable, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from gil_megatron import collectives
from gil_megatron.models.llama import score_at_last, split_critic_output
from gil_megatron.models.packing import PACKING_KEY, Packing, pack_microbatches
from gil_megatron.models.pipeline import broadcast_from_last_stage, run_microbatches
from gil_megatron.ops.logprob import vocab_parallel_logprobs


def microbatches_of(sequences: torch.Tensor, size: int, packed_lengths: Optional[torch.Tensor] = None,
                    **per_row: torch.Tensor) -> List[dict]:
    """Split [b, ...] tensors into micro-batches of ``size`` rows. ``packed_lengths`` [b] (each row's
    real length; train.sequence_packing): each micro-batch then runs packed (models/packing.py)."""
    out = []
    for start in range(0, sequences.shape[0], size):
        mb = {"input_ids": sequences[start:start + size]}
        mb.update({k: v[start:start + size] for k, v in per_row.items()})
        out.append(mb)
    if packed_lengths is not None:
        lengths = packed_lengths.cpu()  # one host sync for the whole batch
        pack_microbatches(out, [lengths[start:start + size] for start in range(0, sequences.shape[0], size)])
    return out


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


def _forward_collect(model, microbatches: List[dict], fn: Callable[[dict, torch.Tensor], List[torch.Tensor]]):
    """Run forward-only, apply ``fn`` to each micro-batch's last-stage output, concatenate along
    the batch and give the results to every pipeline stage."""
    def loss_fn(batch, output):
        return torch.zeros(()), {f"out{i}": t.detach() for i, t in enumerate(fn(batch, output))}

    with torch.no_grad():
        outs = run_microbatches(model, microbatches, loss_fn, forward_only=True)
    if outs:
        n = len(outs[0])
        tensors = [torch.cat([o[f"out{i}"] for o in outs]) for i in range(n)]
    else:
        tensors = None
    return broadcast_from_last_stage(tensors)


def score_logprobs(model, sequences: torch.Tensor, micro_batch_size: int, with_entropy: bool = False,
                   packed_lengths: Optional[torch.Tensor] = None):
    """Per-action log-probs [b, s-1] (and entropy) under ``model`` (actor or reference).
    ``packed_lengths`` (every function here): run packed, see microbatches_of; the values at
    pad positions are then zeros, where padded runs leave garbage: both are off every mask."""
    def fn(batch, logits):
        logprobs, entropy = action_logprobs(logits, batch["input_ids"], with_entropy, batch.get(PACKING_KEY))
        return [logprobs] + ([entropy] if with_entropy else [])

    out = _forward_collect(model, microbatches_of(sequences, micro_batch_size, packed_lengths), fn)
    return (out[0], out[1]) if with_entropy else (out[0], None)


def score_critic(model, sequences: torch.Tensor, lengths: torch.Tensor, micro_batch_size: int,
                 packed_lengths: Optional[torch.Tensor] = None):
    """Critic values per action position [b, s-1] and group logits at the last real token [b, M]."""
    def fn(batch, out):
        values, group_logits = split_critic_output(out.float())
        return [values[:, :-1], score_at_last(group_logits, batch["lengths"])]

    microbatches = microbatches_of(sequences, micro_batch_size, packed_lengths, lengths=lengths)
    values, group_logits = _forward_collect(model, microbatches, fn)
    return values, group_logits


def score_reward_model(model, sequences: torch.Tensor, lengths: torch.Tensor, micro_batch_size: int,
                       packed_lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reward-model score at the last real token of each sequence: [b]."""
    def fn(batch, out):
        return [score_at_last(out.float(), batch["lengths"])]

    microbatches = microbatches_of(sequences, micro_batch_size, packed_lengths, lengths=lengths)
    (scores,) = _forward_collect(model, microbatches, fn)
    return scores


class RewardFunction:
    """A Python reward ``module:function(prompts: list[str], responses: list[str]) -> list[float]``.

    Call it through ``shared()``: the first rank of each tensor/pipeline replica runs it and the
    scores (or its error) reach every rank of the replica, so a slow or stateful function runs once
    per data-parallel replica and a bad return value stops all ranks with the same message."""

    def __init__(self, spec: str):
        module_name, _, func_name = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ImportError(f"models.reward_fn={spec!r}: cannot import module {module_name!r} ({exc})") from None
        if not hasattr(module, func_name):
            raise ImportError(f"models.reward_fn={spec!r}: module {module_name!r} has no function {func_name!r}")
        self.spec = spec
        self.fn = getattr(module, func_name)

    def __call__(self, prompts: List[str], responses: List[str]) -> torch.Tensor:
        scores = self.fn(prompts, responses)
        try:
            scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"models.reward_fn={self.spec!r} must return a list of floats ({exc})") from None
        if scores.numel() != len(prompts):
            raise ValueError(f"models.reward_fn={self.spec!r} returned {scores.numel()} scores for "
                             f"{len(prompts)} responses; it must return one float per response")
        return scores  # non-finite scores are caught by the trainer's guard (skip + count)

    def shared(self, prompts: List[str], responses: List[str]) -> torch.Tensor:
        result = [None]
        if is_model_parallel_src():
            try:
                result[0] = self(prompts, responses)
            except Exception as exc:  # re-raised on every rank below
                result[0] = exc
        group = parallel_state.get_model_parallel_group()
        result = collectives.broadcast_object(result[0], dist.get_global_rank(group, 0), group)
        if isinstance(result, Exception):
            raise result
        return result


def is_model_parallel_src() -> bool:
    return dist.get_rank(parallel_state.get_model_parallel_group()) == 0
