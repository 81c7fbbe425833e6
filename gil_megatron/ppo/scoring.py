"""No-grad scoring of rollout sequences on every layout: log-probs, critic outputs, reward-model scores.

Everything runs through the pipeline schedule in micro-batches; per-token results are computed on
the last stage (log-probs straight from vocab-parallel logits through the fused kernel, so full
logits never exist) and then given to every stage. Shapes use the action axis: sequences [b, s]
give per-action tensors [b, s-1], action t being token t+1 predicted at position t.
"""

from typing import Callable, List, Optional

import torch

from gil_megatron.models.llama import score_at_last, split_critic_output
from gil_megatron.models.logprobs import action_logprobs
from gil_megatron.models.packing import PACKING_KEY, pack_microbatches
from gil_megatron.models.pipeline import broadcast_from_last_stage, run_microbatches


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


def score_critic(model, sequences: torch.Tensor, lengths: torch.Tensor, prompt_lengths: torch.Tensor,
                 micro_batch_size: int, packed_lengths: Optional[torch.Tensor] = None):
    """The critic's outputs: values per action position [b, s-1]; the task value at the last
    prompt token [b] (V_task(x): the expected task reward of the prompt, without the KL penalty);
    the group logits at the last of ``lengths`` [b, M] (the prompt's or the response's last token,
    as gil.group_level says)."""
    def fn(batch, out):
        values, task_values, group_logits = split_critic_output(out.float())
        return [values[:, :-1], score_at_last(task_values, batch["prompt_lengths"]),
                score_at_last(group_logits, batch["lengths"])]

    microbatches = microbatches_of(sequences, micro_batch_size, packed_lengths, lengths=lengths,
                                   prompt_lengths=prompt_lengths)
    values, task_values, group_logits = _forward_collect(model, microbatches, fn)
    return values, task_values, group_logits


def score_reward_model(model, sequences: torch.Tensor, lengths: torch.Tensor, micro_batch_size: int,
                       packed_lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reward-model score at the last real token of each sequence: [b]."""
    def fn(batch, out):
        return [score_at_last(out.float(), batch["lengths"])]

    microbatches = microbatches_of(sequences, micro_batch_size, packed_lengths, lengths=lengths)
    (scores,) = _forward_collect(model, microbatches, fn)
    return scores
