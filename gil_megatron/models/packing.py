"""Sequence packing: a micro-batch's real tokens run through the model as one row, no padding.

A right-padded micro-batch ``input_ids`` [b, s] with real lengths [b] becomes one row [1, T],
T = sum(lengths) (rounded up to a multiple of the TP size with a filler segment), described to
megatron-core by ``PackedSeqParams`` in the ``thd`` layout (cu_seqlens = segment boundaries).
Every layer then works on T tokens instead of b * s. The last pipeline stage's output is unpacked
back to [b, s, ...] with zeros at the pad positions, so losses and scorers never see packing, except
for the language-model head: its vocab-sized logits stay packed [1, T, V/tp] (padding them back would
copy the largest tensor of the step into b * s rows), and ``models.logprobs.action_logprobs`` unpacks the
per-token log-probs computed from them instead (``Packing.unpack_actions``).

What each piece does:
- ``pack`` builds a ``Packing`` (the packed row, its segments, the way back) from CPU lengths, once
  per micro-batch before the pipeline schedule runs, so no host sync happens inside the model.
- ``PackedSegments`` is megatron's ``PackedSeqParams`` plus what our CPU path precomputes: each
  token's position within its own sequence (RoPE) and length buckets for attention.
- ``PackedDotProductAttention`` is megatron's local core attention (unchanged for padded input)
  that also runs ``thd``: causal attention within each segment, GQA heads unexpanded. Segments of
  similar length (within ``BUCKET_RATIO``) are gathered into one right-padded batch and run through
  ``scaled_dot_product_attention`` together: a handful of calls per layer instead of one per
  sequence, at most BUCKET_RATIO^2 wasted attention area per bucket. On GPU with
  transformer-engine, megatron's own TEDotProductAttention handles ``thd`` and this class is unused.
- ``forward_chunk`` is the pipeline's call into a model chunk (packed when the micro-batch says so).

See docs/design.md (sequence packing) for the limits.
"""

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention

from gil_megatron.models import rope

# Segments whose lengths are within this factor share one attention call. Measured on CPU (64 skewed
# rows, 4 heads / 2 kv heads, forward + backward, shared machine): ratios 1.5-3 within noise of each
# other, 3-5x faster than one call per row and ~1.5x faster than re-padding all rows into one call.
BUCKET_RATIO = 2.0
PACKING_KEY = "packing"  # the micro-batch entry that asks forward_chunk for a packed forward


@dataclasses.dataclass
class PackedSegments(PackedSeqParams):
    """PackedSeqParams (qkv_format 'thd') plus our precomputed extras; megatron reads only its own
    fields, so TE's attention and megatron's RoPE take this as they take PackedSeqParams."""

    positions: Optional[torch.Tensor] = None
    """[T] long: each token's position within its own sequence (0 at every segment start)."""
    buckets: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None
    """Per bucket of similar-length segments: (gather [n, m] token index into the row, right-padded
    to the bucket's longest segment m; keep [n_real] flat positions of real tokens in [n * m])."""
    inverse: Optional[torch.Tensor] = None
    """[T]: the concatenated buckets' real tokens put back in row order."""
    rotary: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    """cos, sin [T, 1, d] of each packed token's RoPE angles, set by the model once per forward
    (LlamaModel._preprocess); PackedDotProductAttention rotates every layer's queries and keys with them."""

    def per_token_rotary(self, freqs: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """RoPE angles [max_seqlen, 1, 1, d] -> cos, sin of each packed token's angles [T, 1, d], in
        the activations' ``dtype`` (cast once here, not in every layer)."""
        angles = freqs.index_select(0, self.positions).squeeze(1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


@dataclasses.dataclass
class Packing:
    """One packed micro-batch: what the model runs and how its output goes back to [b, s, ...]."""

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    params: PackedSegments
    index: torch.Tensor  # [n_real] flat index in [b * s] of each real token, in row order
    shape: Tuple[int, int]  # (b, s) of the padded micro-batch
    action_src: torch.Tensor  # [n_actions] packed positions t whose token t+1 is in the same sequence
    action_dst: torch.Tensor  # [n_actions] their flat index in [b * (s-1)] (action axis: t predicts t+1)

    def unpack(self, output: torch.Tensor) -> torch.Tensor:
        """Last-stage output [1, T, ...] -> [b, s, ...] with zeros at pad positions (differentiable)."""
        b, s = self.shape
        real = output[0, :self.index.numel()]
        padded = real.new_zeros((b * s,) + tuple(real.shape[1:]))
        return padded.index_copy(0, self.index, real).view(b, s, *real.shape[1:])

    def unpack_actions(self, per_position: torch.Tensor) -> torch.Tensor:
        """Per-position values of the packed row's next-token predictions [T-1] (position t scores
        token t+1) -> the action axis [b, s-1] with zeros where row i has no action (differentiable).
        Predictions across a sequence boundary are dropped."""
        b, s = self.shape
        actions = per_position.new_zeros(b * (s - 1))
        return actions.index_copy(0, self.action_dst, per_position.index_select(0, self.action_src)).view(b, s - 1)


def pack(input_ids: torch.Tensor, lengths: torch.Tensor, multiple_of: int = 1,
         bucket_ratio: float = BUCKET_RATIO) -> Packing:
    """Pack right-padded ``input_ids`` [b, s] whose row i holds ``lengths[i]`` real tokens (a CPU
    tensor: the bookkeeping is done on the host, then moved to input_ids' device in one go). T is
    rounded up to ``multiple_of`` with a filler segment (token 0) that is dropped on unpack."""
    b, s = input_ids.shape
    lengths = lengths.to("cpu", torch.long)
    if lengths.shape != (b,) or bool((lengths < 1).any()) or bool((lengths > s).any()):
        raise ValueError(f"pack: lengths must be [b] = [{b}] with values in [1, {s}]; got {lengths.tolist()}")
    n_real = int(lengths.sum())
    total = -(-n_real // multiple_of) * multiple_of
    seg_lengths = lengths if total == n_real else torch.cat([lengths, torch.tensor([total - n_real])])
    starts = torch.cumsum(seg_lengths, 0) - seg_lengths
    cu_seqlens = torch.cat([starts, torch.tensor([total])]).to(torch.int32)
    positions = torch.arange(total) - torch.repeat_interleave(starts, seg_lengths)
    rows = torch.repeat_interleave(torch.arange(b), lengths)
    index = rows * s + positions[:n_real]  # flat [b * s] position of each real token
    has_action = positions[:n_real] < lengths[rows] - 1  # not the last token of its sequence
    action_src = has_action.nonzero().squeeze(1)
    action_dst = rows[has_action] * (s - 1) + positions[:n_real][has_action]
    buckets, order = _buckets(starts, seg_lengths, bucket_ratio)
    inverse = torch.empty(total, dtype=torch.long)
    inverse[order] = torch.arange(total)

    device = input_ids.device
    to = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    packed_ids = torch.zeros(total, dtype=input_ids.dtype, device=device)
    packed_ids[:n_real] = input_ids.reshape(-1)[to(index)]
    max_seqlen = int(seg_lengths.max())
    params = PackedSegments(
        qkv_format="thd", cu_seqlens_q=to(cu_seqlens), cu_seqlens_kv=to(cu_seqlens),
        max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen,
        positions=to(positions), buckets=[(to(g), to(k)) for g, k in buckets], inverse=to(inverse))
    return Packing(input_ids=packed_ids.unsqueeze(0), position_ids=to(positions).unsqueeze(0), params=params,
                   index=to(index), shape=(b, s), action_src=to(action_src), action_dst=to(action_dst))


def _buckets(starts: torch.Tensor, seg_lengths: torch.Tensor, ratio: float):
    """Group segments, longest first, into buckets whose lengths are within ``ratio`` of the
    bucket's longest. Returns [(gather [n, m], keep [n_real])] and the row index of the buckets'
    real tokens in concatenation order."""
    order = torch.argsort(seg_lengths, descending=True, stable=True)
    sorted_lengths = seg_lengths[order].tolist()
    buckets, real_tokens, i = [], [], 0
    while i < len(sorted_lengths):
        longest = sorted_lengths[i]
        j = i
        while j < len(sorted_lengths) and sorted_lengths[j] * ratio >= longest:
            j += 1
        segs = order[i:j]
        offsets = torch.arange(longest)
        gather = starts[segs, None] + offsets  # [n, m]; past a segment's end: never kept, see below
        is_real = offsets < seg_lengths[segs, None]
        # the pad slots of a row read the following tokens of the packed row (clamped to stay in
        # range); causal attention keeps them out of the real queries, whose outputs alone are kept
        gather = gather.clamp(max=int(seg_lengths.sum()) - 1)
        buckets.append((gather, is_real.reshape(-1).nonzero().squeeze(1)))
        real_tokens.append(gather[is_real])
        i = j
    return buckets, torch.cat(real_tokens)


def packed_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, params: PackedSegments,
                            scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention within each packed segment. query [T, np, hn], key/value [T, ng, hn]
    (ng divides np: GQA) -> [T, np, hn]."""
    gqa = query.shape[1] != key.shape[1]
    outs = []
    for gather, keep in params.buckets:
        n, m = gather.shape
        # [n, m, heads, hn] -> [n, heads, m, hn]
        q, k, v = (x[gather].transpose(1, 2) for x in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale,
                                             enable_gqa=gqa)
        outs.append(out.transpose(1, 2).reshape(n * m, *query.shape[1:]).index_select(0, keep))
    return torch.cat(outs).index_select(0, params.inverse)


class PackedDotProductAttention(DotProductAttention):
    """megatron-core's local core attention (padded input: its own code, unchanged) that also takes
    packed input (``packed_seq_params`` in the thd layout, which megatron's class rejects)."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params: Optional[PackedSeqParams] = None):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias)
        if not isinstance(packed_seq_params, PackedSegments) or packed_seq_params.qkv_format != "thd":
            raise ValueError("PackedDotProductAttention takes packed input built by gil_megatron.models.packing.pack "
                             f"(thd); got {type(packed_seq_params).__name__} "
                             f"qkv_format={packed_seq_params.qkv_format!r}")
        if (attention_bias is not None or self.softmax_offset is not None
                or getattr(self.scale_mask_softmax, "window_size", None) or self.config.rotary_interleaved):
            raise ValueError("packed attention supports plain causal softmax attention with rotate-half RoPE only "
                             "(no attention bias, softmax offset, sliding window or interleaved RoPE)")
        if packed_seq_params.rotary is not None:  # RoPE here, in one pass over the packed row (see LlamaModel)
            cos, sin = packed_seq_params.rotary
            query, key = rope.rotate(query, cos, sin), rope.rotate(key, cos, sin)
        # megatron divides softmax_scale by the layer number under query-key layer scaling and
        # multiplies it back inside its softmax; SDPA takes the net scale
        scale = self.softmax_scale * (self.layer_number if self.config.apply_query_key_layer_scaling else 1)
        dropout_p = self.attention_dropout.p if self.training else 0.0
        if dropout_p > 0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = packed_causal_attention(query, key, value, packed_seq_params, scale, dropout_p)
        else:
            context = packed_causal_attention(query, key, value, packed_seq_params, scale, dropout_p)
        return context.reshape(context.shape[0], self.hidden_size_per_partition)  # [T, np * hn]


def pack_microbatches(microbatches: List[Dict[str, torch.Tensor]], lengths: List[torch.Tensor]) -> None:
    """Attach a ``Packing`` to each micro-batch (in place) from its rows' real lengths. T is padded
    to the TP size, which sequence parallelism needs (at most tp - 1 filler tokens otherwise)."""
    multiple = parallel_state.get_tensor_model_parallel_world_size()
    for mb, mb_lengths in zip(microbatches, lengths):
        mb[PACKING_KEY] = pack(mb["input_ids"], mb_lengths, multiple_of=multiple)


def forward_chunk(chunk: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The pipeline schedule's forward of one model chunk on one micro-batch: packed when the
    micro-batch carries a Packing (LlamaModel unpacks on the last stage), padded otherwise."""
    packing = batch.get(PACKING_KEY)
    if packing is None:
        return chunk(batch["input_ids"], batch.get("position_ids"))
    return chunk(batch["input_ids"], packing=packing)
