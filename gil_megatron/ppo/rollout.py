"""Rollout: autoregressive generation with a KV cache under tensor and pipeline parallelism.

    settings = SamplingSettings(max_new_tokens=64, temperature=1.0, top_p=0.9, eos_token_id=2)
    batch = generate(actor, prompt_ids, prompt_lengths, settings, generator)
    batch.sequences [b, s]   batch.lengths [b]   batch.response_mask [b, s]   (same on every rank)

How one batch is decoded:

- Prompts come right-padded ([b, s_p] + lengths) and the result is right-padded too, but the
  decoder works on LEFT-padded rows, so that every prompt ends at the same column: one prefill
  forward over the longest prompt's columns, then exactly one sampled token per row per step
  (max_new_tokens steps at most). Each row's positions start at its first real token (RoPE per
  row) and an attention mask keeps the pad columns out of every real token, so each row's logits
  equal those of the row alone. (megatron's scheme - start at the shortest prompt and "force" the
  prompt tokens of longer rows - costs one decode step per token of length spread: 48 instead of
  32 steps for prompts of 8-24 tokens and 32 new tokens.) Equal-length prompts need no mask.
- A row stops at its first ``eos_token_id`` (kept, and counted in ``lengths``) or after
  ``max_new_tokens`` generated tokens; finished rows are fed pad tokens (they sit after the row's
  end, so causal attention keeps them out of its real tokens). The loop ends when all rows stop:
  one host sync per step (``done.all()``), unavoidable for early stopping.

KV cache: our own decode path, ``models/inference.KVCacheDecoder``, on the model's own weights
(the training forward is untouched). It preallocates [layers, b, kv_heads/tp, s_max, head_dim]
key/value buffers per batch, rotates only the new positions and caches rotated keys, keeps GQA
heads unexpanded, and computes the output layer for the last position only. Its logits equal the
megatron forward's (tests/ppo/test_rollout.py). Why not megatron's ``StaticInferenceContext``: it caches
keys before RoPE, so every step re-rotated the whole cached prefix, and its local attention expanded
the GQA heads over the prefix every step; on CPU that made our generation 0.60-0.65x transformers'
generate, and 1.14-1.34x with this path (benchmarks/bench_generate.py, CPU-time ratio, three
alternating runs each on a shared 2-core machine).

Sampling: the last position's vocab-parallel logits [b, V_pad/tp] are all-gathered over TP
([b, V_pad] once per step), then temperature, top-k, top-p (in HF's order) and one draw per row
by inverse CDF from a uniform of the caller's generator. Every TP rank holds the same full logits and the same generator
state, so every TP rank samples the same token; padded vocabulary entries are -inf (the actor head
masks them), get probability 0 and are never drawn. Only the last pipeline stage samples; the
token goes to every stage with one broadcast on the pipeline group, and at the end the generator
state is copied from the last stage so it agrees on every rank afterwards.

Pipeline parallelism: stage k receives the hidden states [b, s_step, h] from stage k-1
(``torch.distributed.recv`` on the pipeline group) and sends its output to stage k+1 without
waiting (``isend``). The rows decode as pp groups so that the stages work at once on different
groups (``_decode``; 1.28x tokens/s at PP2 on a 2-core CPU, benchmarks/bench_pp_decode.py). With a
virtual pipeline the stages are the chunks in virtual-stage order (rank 0 chunk 0, rank 1 chunk 0,
..., rank 0 chunk 1, ...), one KV-cache decoder per chunk, and the rows decode as one group.
"""

import dataclasses
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel

from gil_megatron.models.chunks import model_chunks
from gil_megatron.models.inference import KVCacheDecoder
from gil_megatron.ops.logprob import vocab_parallel_logprobs
from gil_megatron.parallel import collectives


@dataclass
class SamplingSettings:
    """How responses are drawn. Defaults sample from the model's own distribution."""

    max_new_tokens: int
    """Most tokens generated per row (the eos, when produced, counts as one of them)."""
    temperature: float = 1.0
    """Logits are divided by this before top-k / top-p. Ignored when greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = off)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off)."""
    greedy: bool = False
    """Argmax decoding; temperature, top-k and top-p are ignored."""
    eos_token_id: Optional[int] = None
    """A row stops after producing this token (None: rows run to max_new_tokens)."""
    pad_token_id: int = 0
    """Written after each row's last token."""
    decode_batch_size: int = 0
    """Rows decoded at once (0 = all rows of the call). The KV cache holds this many rows; the rest
    wait their turn. Draws depend on it (rows take their uniforms chunk by chunk)."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"rollout.max_new_tokens={self.max_new_tokens} must be >= 1")
        if not self.temperature > 0:
            raise ValueError(
                f"rollout.temperature={self.temperature} must be > 0; for argmax decoding set rollout.greedy=true"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p={self.top_p} must be in (0, 1]; 1 turns nucleus sampling off")
        if self.top_k < 0:
            raise ValueError(f"rollout.top_k={self.top_k} must be >= 0; 0 turns top-k off")
        if self.eos_token_id is not None and self.eos_token_id < 0:
            raise ValueError(f"rollout.eos_token_id={self.eos_token_id} must be >= 0 or null")
        if self.pad_token_id < 0:
            raise ValueError(f"rollout.pad_token_id={self.pad_token_id} must be >= 0")
        if self.decode_batch_size < 0:
            raise ValueError(f"rollout.decode_batch_size={self.decode_batch_size} must be >= 0; 0 decodes all rows at once")


@dataclass
class RolloutBatch:
    """Generated sequences, identical on every rank. s = the longest row (prompt + response)."""

    sequences: torch.Tensor
    """[b, s] prompt, then response (eos included when produced), then pad_token_id."""
    prompt_lengths: torch.Tensor
    """[b] real prompt tokens of each row."""
    lengths: torch.Tensor
    """[b] real tokens of each row: prompt + response (incl. eos)."""
    response_mask: torch.Tensor
    """[b, s] 1 on generated tokens (incl. eos), 0 on prompt and pad; dtype long."""
    logprobs: Optional[torch.Tensor] = None
    """[b, s-1] on the action axis (position t: log p(token t+1)), only when asked for: the sampling
    policy's log-probs of the generated tokens at temperature 1, from the decode step's own logits;
    0 outside the response."""

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.lengths - self.prompt_lengths


# ---- sampling math (no collectives: testable on one process) -----------------------------------
def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus. logits [b, V]."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [b, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the more likely ones before it already reach top_p (the first never is)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, settings: SamplingSettings, generator: Optional[torch.Generator],
                  uniform: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Next token per row from full-vocabulary logits [b, V] (-inf entries are never drawn) -> [b].
    ``uniform`` [b, 1]: the rows' draws, when the caller took them (else drawn here)."""
    logits = logits.float()
    if settings.greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / settings.temperature, settings.top_k, settings.top_p)
    probs = torch.softmax(logits, dim=-1)
    if uniform is None:
        uniform = draw_uniforms(probs.shape[0], generator)
    return draw_by_inverse_cdf(probs, uniform.to(probs.device))


def draw_uniforms(rows: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """[rows, 1] uniforms in [0, 1); the generator lives on the CPU (its state is checkpointed and
    identical on every rank)."""
    return torch.rand(rows, 1, generator=generator, device=generator.device if generator else None)


def draw_by_inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One draw per row of ``probs`` [b, V] (unnormalised is fine) from ``uniform`` [b, 1] in [0, 1):
    the first index whose cumulative mass exceeds u * total. torch.multinomial does the same job
    but is ~18x slower on CPU for [64, 1000] (benchmarks/bench_sampling.py). In float64,
    u < 1 gives u * total < total, so the index is always < V, and c[j-1] <= u * total < c[j] means
    p_j > 0: a zero-probability token is never drawn."""
    cumulative = probs.double().cumsum(dim=-1)
    target = uniform.double() * cumulative[:, -1:]
    return torch.searchsorted(cumulative, target, right=True).squeeze(-1)


# ---- one forward step through the pipeline -----------------------------------------------------
class _StageLink:
    """This rank's place in the pipeline and the point-to-point moves of one decode step. With a
    virtual pipeline the rank holds several chunks and a step visits the virtual stages in order:
    rank 0 chunk 0, rank 1 chunk 0, ..., rank pp-1 chunk 0, rank 0 chunk 1, ... (models/chunks.py),
    so the hidden states go round the pipeline ring V times."""

    def __init__(self, model: torch.nn.Module):
        self.pp = parallel_state.get_pipeline_model_parallel_world_size()
        self.chunks = len(model_chunks(model))
        self.first = parallel_state.is_pipeline_first_stage()  # holds the embedding (in chunk 0)
        self.last = parallel_state.is_pipeline_last_stage()  # holds the head (in the last chunk)
        config = model_chunks(model)[0].config
        self.hidden_size = config.hidden_size
        self.dtype = config.pipeline_dtype or config.params_dtype
        self.sends = []  # (handle, tensor) of this rank's pending non-blocking sends
        if self.pp > 1:
            self.group = parallel_state.get_pipeline_model_parallel_group()
            self.prev_rank = parallel_state.get_pipeline_model_parallel_prev_rank()  # a ring: rank 0's is pp-1
            self.next_rank = parallel_state.get_pipeline_model_parallel_next_rank()
            self.last_rank = parallel_state.get_pipeline_model_parallel_last_rank()

    def forward(self, decoders: List[KVCacheDecoder], input_ids: torch.Tensor, start: int) -> Optional[torch.Tensor]:
        """input_ids [b, s_step] at positions start.. through this rank's chunk decoders -> the last
        position's vocab-parallel logits [b, V/tp] on the last stage, None elsewhere."""
        for v, decoder in enumerate(decoders):
            hidden = None
            if not (self.first and v == 0):
                hidden = torch.empty(input_ids.shape[0], input_ids.shape[1], self.hidden_size,
                                     dtype=self.dtype, device=input_ids.device)  # [b, s, h]
                collectives.recv(hidden, src=self.prev_rank, group=self.group)
            output = decoder.step(input_ids, start, hidden)
            if self.last and v == self.chunks - 1:
                return output  # [b, V/tp]
            output = output.contiguous()  # kept alive until the send completes
            self.sends.append((collectives.isend(output, dst=self.next_rank, group=self.group), output))
        return None

    def finish_sends(self, keep: int = 0) -> None:
        """Wait for all but the newest ``keep`` sends. Non-blocking sends let a stage start the next
        decode group while the next stage has not yet received this one's hidden states."""
        while len(self.sends) > keep:
            handle, _ = self.sends.pop(0)
            handle.wait()

    def broadcast_from_last(self, tensor: torch.Tensor) -> torch.Tensor:
        """The last stage's ``tensor`` (sampled tokens, log-probs) on every stage, in place."""
        if self.pp > 1:
            collectives.broadcast(tensor, self.last_rank, self.group)
        return tensor

    def sync_generator(self, generator: Optional[torch.Generator], device: torch.device) -> None:
        """Copy the last stage's generator state to the other stages (they drew nothing)."""
        if self.pp == 1 or generator is None:
            return
        state = generator.get_state().to(device)
        collectives.broadcast(state, self.last_rank, self.group)
        generator.set_state(state.cpu())


# ---- the generation loop -----------------------------------------------------------------------
def generate(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_lengths: torch.Tensor,
             settings: SamplingSettings, generator: Optional[torch.Generator] = None,
             return_logprobs: bool = False) -> RolloutBatch:
    """Generate responses for right-padded prompts ``prompt_ids`` [b, s_p] with ``prompt_lengths``
    [b] on every TP/PP rank of one model replica; every rank passes the same prompts (on the model's
    device) and a generator seeded the same way (None: torch's default generator, which is then the
    caller's job to keep in step across TP ranks). Returns the same RolloutBatch on every rank, with
    the generated tokens' log-probs when ``return_logprobs``. The model is put in eval mode for the
    call and restored after."""
    if prompt_ids.dim() != 2 or prompt_lengths.shape != prompt_ids.shape[:1]:
        raise ValueError(
            f"prompt_ids must be [b, s_p] and prompt_lengths [b]; got {tuple(prompt_ids.shape)} "
            f"and {tuple(prompt_lengths.shape)}"
        )
    b, s_p = prompt_ids.shape
    if 0 < settings.decode_batch_size < b:
        whole = dataclasses.replace(settings, decode_batch_size=0)
        chunks = [generate(model, prompt_ids[i:i + settings.decode_batch_size],
                           prompt_lengths[i:i + settings.decode_batch_size], whole, generator, return_logprobs)
                  for i in range(0, b, settings.decode_batch_size)]
        return _concat(chunks, settings.pad_token_id)
    arch = getattr(model, "arch", None)
    device = prompt_ids.device
    prompt_lengths = prompt_lengths.to(device=device, dtype=torch.long)
    min_len, max_len = int(prompt_lengths.min()), int(prompt_lengths.max())  # one host sync
    if min_len < 1 or max_len > s_p:
        raise ValueError(f"prompt_lengths must be in [1, {s_p}] (the prompt width); got {prompt_lengths.tolist()}")
    prompt_ids = prompt_ids[:, :max_len]  # columns past the longest prompt are pad
    width = max_len + settings.max_new_tokens  # longest possible row
    if arch is not None:
        if width > arch.max_position_embeddings:
            raise ValueError(
                f"longest prompt {max_len} + rollout.max_new_tokens={settings.max_new_tokens} = {width} exceeds "
                f"the model's max_position_embeddings={arch.max_position_embeddings}; shorten prompts or responses"
            )
        for name in ("eos_token_id", "pad_token_id"):
            value = getattr(settings, name)
            if value is not None and value >= arch.vocab_size:
                raise ValueError(f"rollout.{name}={value} is not a token id (vocab_size={arch.vocab_size})")

    positions = torch.arange(width, device=device)
    is_prompt = positions.unsqueeze(0) < prompt_lengths.unsqueeze(1)  # [b, width]
    tokens = torch.full((b, width), settings.pad_token_id, dtype=torch.long, device=device)
    tokens[:, :max_len] = torch.where(is_prompt[:, :max_len], prompt_ids.long(), tokens[:, :max_len])
    lengths = prompt_lengths.clone()
    step_logprobs = torch.zeros(b, settings.max_new_tokens, device=device) if return_logprobs else None

    link = _StageLink(model)
    was_training = model.training
    model.eval()
    try:
        # inference_mode rather than no_grad: it also skips the version-counter and view bookkeeping
        # of every op (megatron's embedding under TP is an autograd Function). Tensors made inside
        # are inference tensors; tokens and lengths were made outside, and what we return is
        # cloned, so training can use it as ordinary input.
        with torch.inference_mode():
            _decode(model, link, tokens, prompt_lengths, lengths, settings, generator, step_logprobs)
    finally:
        model.train(was_training)
    link.sync_generator(generator, device)

    s = int(lengths.max())
    sequences = tokens[:, :s].clone()
    in_row = positions[:s].unsqueeze(0) < lengths.unsqueeze(1)
    response_mask = (in_row & ~is_prompt[:, :s]).long()
    logprobs = None
    if return_logprobs:
        # response token k of row i sits at column p_i + k: action index p_i + k - 1
        step_logprobs = link.broadcast_from_last(step_logprobs)
        rows, ks = _generated(lengths - prompt_lengths, settings.max_new_tokens)
        logprobs = torch.zeros(b, s - 1, device=device)
        logprobs[rows, prompt_lengths[rows] + ks - 1] = step_logprobs[rows, ks]
    return RolloutBatch(sequences=sequences, prompt_lengths=prompt_lengths.clone(), lengths=lengths.clone(),
                        response_mask=response_mask, logprobs=logprobs)


def _concat(batches, pad_token_id: int) -> RolloutBatch:
    """Rows of several RolloutBatches in one, right-padded to the widest."""
    width = max(batch.sequences.shape[1] for batch in batches)

    def cat(name, fill):
        tensors = [getattr(batch, name) for batch in batches]
        if tensors[0] is None:
            return None
        target = width - 1 if name == "logprobs" else width  # logprobs are on the action axis
        return torch.cat([F.pad(t, (0, target - t.shape[1]), value=fill) for t in tensors])

    return RolloutBatch(sequences=cat("sequences", pad_token_id), prompt_lengths=torch.cat([b.prompt_lengths for b in batches]),
                        lengths=torch.cat([b.lengths for b in batches]), response_mask=cat("response_mask", 0),
                        logprobs=cat("logprobs", 0.0))


def decode_groups(pp: int, chunks: int, rows: int) -> int:
    """Row groups the decode loop pipelines across stages: pp (the fewest that keep every stage
    busy) under plain pipeline parallelism; 1 with one stage, with virtual-pipeline chunks (the
    hidden states go round the ring within a step, so a stage cannot run ahead) or too few rows."""
    return pp if pp > 1 and chunks == 1 and rows >= pp else 1


def _decode(model, link: _StageLink, tokens, prompt_lengths, lengths, settings: SamplingSettings,
            generator, step_logprobs: Optional[torch.Tensor] = None) -> None:
    """The decode loop: fills ``tokens`` [b, width] (right-padded prompts in, responses appended)
    and ``lengths`` [b] in place, and on the last stage ``step_logprobs`` [b, max_new_tokens]
    (log-prob of each row's k-th generated token) when given. Internally rows are left-padded so
    that every prompt ends at the same column: one prefill, then exactly one new token per row per
    step.

    Under pipeline parallelism (one chunk per rank) the rows decode as ``pp`` groups, so that the
    stages work on different groups at once: the first stage runs group m+1's step while later
    stages run group m's, and it receives group m's sampled tokens (a broadcast from the last
    stage) only when it next needs them, one round of groups later. Every rank runs the same
    groups' steps and broadcasts in the same order, so the result does not depend on the grouping:
    each step still draws one uniform per row of the batch, as without groups."""
    b, width = tokens.shape
    max_len = width - settings.max_new_tokens
    arch = getattr(model, "arch", None)
    vocab_size = arch.vocab_size if arch is not None else None
    eos = settings.eos_token_id
    device = tokens.device
    left_pad = max_len - prompt_lengths  # [b]
    source = torch.arange(max_len, device=device).unsqueeze(0) - left_pad.unsqueeze(1)  # [b, max_len]
    work = torch.full_like(tokens, settings.pad_token_id)  # [b, width] left-padded prompt, then response
    work[:, :max_len] = torch.where(source >= 0, tokens[:, :max_len].gather(1, source.clamp(min=0)),
                                    settings.pad_token_id)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    n_groups = decode_groups(link.pp, link.chunks, b)
    bounds = torch.linspace(0, b, n_groups + 1).round().long().tolist()
    groups = [slice(bounds[m], bounds[m + 1]) for m in range(n_groups)]
    decoders = [[KVCacheDecoder(chunk, batch_size=rows.stop - rows.start, max_length=width, left_pad=left_pad[rows])
                 for chunk in model_chunks(model)] for rows in groups]
    lagged = n_groups > 1 and not link.last and link.first  # the first stage takes tokens a round late
    pending = [None] * n_groups  # lagged: the step whose tokens group m has yet to receive

    def receive_tokens(rows: slice, t: int, next_tokens: Optional[torch.Tensor]) -> None:
        """Group ``rows``' tokens of step ``t`` from the last stage; update the rows' state."""
        if next_tokens is None:
            next_tokens = torch.empty(rows.stop - rows.start, dtype=torch.long, device=device)
        next_tokens = link.broadcast_from_last(next_tokens)
        row_done = done[rows]
        next_tokens = torch.where(row_done, settings.pad_token_id, next_tokens)
        work[rows, t] = next_tokens
        lengths[rows] += (~row_done).long()
        stop = (lengths[rows] - prompt_lengths[rows]) >= settings.max_new_tokens
        if eos is not None:
            stop |= next_tokens == eos
        done[rows] |= ~row_done & stop

    for t in range(max_len, width):
        # one uniform per row per step while any row runs (only the last stage samples)
        uniform = draw_uniforms(b, generator) if link.last and not settings.greedy else None
        for m, rows in enumerate(groups):
            if pending[m] is not None:
                receive_tokens(rows, pending[m], None)
                pending[m] = None
            if bool(done[rows].all()):  # host sync; every rank holds the same tokens, so all agree
                continue
            # feed columns [start, t): the prefill on the first step, then the one new token
            start = 0 if t == max_len else t - 1
            last_logits = link.forward(decoders[m], work[rows, start:t], start)  # [rows, V/tp] on the last stage
            next_tokens = None
            if link.last:
                full_logits = tensor_parallel.gather_from_tensor_model_parallel_region(last_logits)  # [rows, V_pad]
                # drop the padding (its size depends on tp) so the draw is the same for every layout
                full_logits = full_logits[:, :vocab_size]
                next_tokens = sample_tokens(full_logits, settings, generator,
                                            None if uniform is None else uniform[rows])
                if step_logprobs is not None:  # the scoring path's op on the same vocab shards, at temperature 1
                    step_logprobs[rows, t - max_len] = vocab_parallel_logprobs(
                        last_logits.unsqueeze(1), next_tokens.unsqueeze(1),
                        tp_group=parallel_state.get_tensor_model_parallel_group())[0].squeeze(1)
            if lagged:
                pending[m] = t
            else:
                receive_tokens(rows, t, next_tokens)
        link.finish_sends(keep=n_groups * link.chunks)  # the previous step's sends have been received
        if bool(done.all()) and not any(p is not None for p in pending):
            break
    for m, rows in enumerate(groups):  # lagged: the last round's tokens
        if pending[m] is not None:
            receive_tokens(rows, pending[m], None)
    link.finish_sends()
    # back to the right-padded layout: row i's k-th response token goes to column prompt_length + k
    rows, ks = _generated(lengths - prompt_lengths, settings.max_new_tokens)
    tokens[rows, prompt_lengths[rows] + ks] = work[rows, max_len + ks]


def _generated(response_lengths: torch.Tensor, max_new_tokens: int):
    """(row, k) of every generated token: k < the row's response length. Two [n] index tensors."""
    k = torch.arange(max_new_tokens, device=response_lengths.device)
    return (k.unsqueeze(0) < response_lengths.unsqueeze(1)).nonzero(as_tuple=True)


def decode_rollout(tokenizer, rollout: RolloutBatch):
    """Prompt and response text of every row (special tokens dropped): (prompts, responses)."""
    prompts, responses = [], []
    for row in range(rollout.sequences.shape[0]):
        p_len, length = int(rollout.prompt_lengths[row]), int(rollout.lengths[row])
        ids = rollout.sequences[row].tolist()
        prompts.append(tokenizer.decode(ids[:p_len], skip_special_tokens=True))
        responses.append(tokenizer.decode(ids[p_len:length], skip_special_tokens=True))
    return prompts, responses
