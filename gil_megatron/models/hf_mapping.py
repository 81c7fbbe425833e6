"""Hugging Face Llama / Mistral / Qwen2 / Qwen3 <-> megatron-core GPTModel (local spec) parameter
mapping, per TP/PP shard.

Pure tensor code, no process groups: the converter runs it offline and the engine runs it when a
rank loads its shard. Conventions (megatron-core 0.19, verified by tests against transformers):
- linear_qkv is the per-KV-group concatenation [q heads of group g; k_g; v_g], no RoPE permutation;
  TP splits whole KV groups. Qwen2's q/k/v biases are grouped the same way (linear_qkv.bias).
- Qwen3's q_norm / k_norm ([head_dim], shared by all heads) are q_layernorm / k_layernorm, whole on
  every TP rank.
- linear_fc1 = cat[gate, up] of this rank's slice of each; linear_proj / linear_fc2 split inputs.
- the vocabulary is zero-padded to padded_vocab_size(tp) and split in contiguous rows.
- layer indices are local to each pipeline stage.
- critic / reward heads are LlamaForSequenceClassification's ``score.weight``.

A rank reads only its own shard: the reader takes an index (a tuple of slices, as
safetensors' ``get_slice`` does), so a TP rank's slice of a matrix is all that leaves the file.
"""

from typing import Callable, Dict, Iterator, Mapping, Optional, Tuple

import torch

from gil_megatron.models.config import CRITIC_ROWS, LlamaArchConfig

Index = Optional[Tuple[slice, ...]]
Reader = Callable[..., torch.Tensor]
"""read(name, index=None) -> the HF tensor ``name``, or its ``tensor[index]`` part."""

HF_LAYER = "model.layers.{}."
MG_LAYER = "decoder.layers.{}."


def dict_reader(tensors: Mapping[str, torch.Tensor]) -> Reader:
    """A Reader over HF-named tensors already in memory."""
    def read(name: str, index: Index = None) -> torch.Tensor:
        return tensors[name] if index is None else tensors[name][index]
    return read


def _part(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous 1/world of n (``chunk(world)[rank]``; check_layout makes it exact)."""
    per = n // world
    return slice(rank * per, (rank + 1) * per)


def _rows(read: Reader, name: str, n: int, rank: int, world: int) -> torch.Tensor:
    return read(name, (_part(n, rank, world),))


def _cols(read: Reader, name: str, n: int, rank: int, world: int) -> torch.Tensor:
    return read(name, (slice(None), _part(n, rank, world)))


def _vocab_rows(arch: LlamaArchConfig, read: Reader, name: str, rank: int, tp: int) -> torch.Tensor:
    """Rows of the vocabulary zero-padded to padded_vocab_size(tp), split in contiguous rows: the
    real rows that fall in this rank's part, then zeros."""
    part = _part(arch.padded_vocab_size(tp), rank, tp)
    real = read(name, (slice(min(part.start, arch.vocab_size), min(part.stop, arch.vocab_size)),))
    missing = part.stop - part.start - real.shape[0]
    return real if missing == 0 else torch.cat([real, real.new_zeros(missing, *real.shape[1:])], dim=0)


def qkv_from_hf(arch: LlamaArchConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[q; k; v] HF projections of some whole KV groups (all, or one TP rank's) -> megatron's
    grouped [q_g; k_g; v_g] for each of those groups g. Weights [rows, h] and biases [rows] alike
    (the trailing dims ride along)."""
    d, rest = arch.head_dim, q.shape[1:]
    qg = q.reshape(-1, arch.heads_per_group * d, *rest)
    kg = k.reshape(-1, d, *rest)
    vg = v.reshape(-1, d, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def _qkv_shard(arch: LlamaArchConfig, read: Reader, prefix: str, suffix: str, rank: int, tp: int) -> torch.Tensor:
    """This TP rank's linear_qkv rows (its KV groups), reading only those rows of q, k and v."""
    d = arch.head_dim
    q = _rows(read, prefix + "q_proj." + suffix, arch.num_attention_heads * d, rank, tp)
    k = _rows(read, prefix + "k_proj." + suffix, arch.num_kv_heads * d, rank, tp)
    v = _rows(read, prefix + "v_proj." + suffix, arch.num_kv_heads * d, rank, tp)
    return qkv_from_hf(arch, q, k, v)


def qkv_to_hf(arch: LlamaArchConfig, qkv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d, rest = arch.head_dim, qkv.shape[1:]
    grouped = qkv.reshape(arch.num_kv_heads, (arch.heads_per_group + 2) * d, *rest)
    q, k, v = grouped.split([arch.heads_per_group * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def megatron_shard_from_hf(
    arch: LlamaArchConfig, role: str, read: Reader, tp_rank: int, tp: int, pp_rank: int, pp: int,
    load_head: bool = True,
) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield (megatron name, tensor) for one rank's shard, reading from ``read`` only this rank's
    part of each HF tensor, one tensor at a time."""
    first, last = pp_rank == 0, pp_rank == pp - 1
    d, f = arch.head_dim, arch.intermediate_size
    if first:
        yield "embedding.word_embeddings.weight", _vocab_rows(arch, read, "model.embed_tokens.weight", tp_rank, tp)
    for local, layer in enumerate(arch.layers_of_stage(pp_rank, pp)):
        hf, mg = HF_LAYER.format(layer), MG_LAYER.format(local)
        yield mg + "input_layernorm.weight", read(hf + "input_layernorm.weight")
        yield mg + "self_attention.linear_qkv.weight", _qkv_shard(arch, read, hf + "self_attn.", "weight", tp_rank, tp)
        if arch.qkv_bias:
            yield mg + "self_attention.linear_qkv.bias", _qkv_shard(arch, read, hf + "self_attn.", "bias", tp_rank, tp)
        if arch.qk_norm:
            yield mg + "self_attention.q_layernorm.weight", read(hf + "self_attn.q_norm.weight")
            yield mg + "self_attention.k_layernorm.weight", read(hf + "self_attn.k_norm.weight")
        yield mg + "self_attention.linear_proj.weight", _cols(read, hf + "self_attn.o_proj.weight",
                                                              arch.num_attention_heads * d, tp_rank, tp)
        yield mg + "pre_mlp_layernorm.weight", read(hf + "post_attention_layernorm.weight")
        gate = _rows(read, hf + "mlp.gate_proj.weight", f, tp_rank, tp)
        up = _rows(read, hf + "mlp.up_proj.weight", f, tp_rank, tp)
        yield mg + "mlp.linear_fc1.weight", torch.cat([gate, up], dim=0)
        yield mg + "mlp.linear_fc2.weight", _cols(read, hf + "mlp.down_proj.weight", f, tp_rank, tp)
    if last:
        yield "decoder.final_layernorm.weight", read("model.norm.weight")
        if role == "actor":
            if not arch.tie_word_embeddings:
                yield "output_layer.weight", _vocab_rows(arch, read, "lm_head.weight", tp_rank, tp)
            elif pp > 1:  # the last stage keeps its own copy of the tied embedding
                yield "output_layer.weight", _vocab_rows(arch, read, "model.embed_tokens.weight", tp_rank, tp)
        elif load_head:
            yield "output_layer.score.weight", read("score.weight")


def hf_from_megatron_stage(
    arch: LlamaArchConfig, role: str, shards: Dict[int, Dict[str, torch.Tensor]], pp_rank: int, pp: int
) -> Iterator[Tuple[str, torch.Tensor]]:
    """Merge the TP shards {tp_rank: state_dict} of one pipeline stage back into HF tensors."""
    tp = len(shards)
    ranks = [shards[r] for r in range(tp)]
    first, last = pp_rank == 0, pp_rank == pp - 1

    def cat(name, dim):
        return torch.cat([s[name] for s in ranks], dim=dim)

    if first:
        yield "model.embed_tokens.weight", cat("embedding.word_embeddings.weight", 0)[: arch.vocab_size].clone()
    for local, layer in enumerate(arch.layers_of_stage(pp_rank, pp)):
        hf, mg = HF_LAYER.format(layer), MG_LAYER.format(local)
        yield hf + "input_layernorm.weight", ranks[0][mg + "input_layernorm.weight"]
        q, k, v = qkv_to_hf(arch, cat(mg + "self_attention.linear_qkv.weight", 0))
        yield hf + "self_attn.q_proj.weight", q.contiguous()
        yield hf + "self_attn.k_proj.weight", k.contiguous()
        yield hf + "self_attn.v_proj.weight", v.contiguous()
        if arch.qkv_bias:
            q, k, v = qkv_to_hf(arch, cat(mg + "self_attention.linear_qkv.bias", 0))
            yield hf + "self_attn.q_proj.bias", q.contiguous()
            yield hf + "self_attn.k_proj.bias", k.contiguous()
            yield hf + "self_attn.v_proj.bias", v.contiguous()
        if arch.qk_norm:
            yield hf + "self_attn.q_norm.weight", ranks[0][mg + "self_attention.q_layernorm.weight"]
            yield hf + "self_attn.k_norm.weight", ranks[0][mg + "self_attention.k_layernorm.weight"]
        yield hf + "self_attn.o_proj.weight", cat(mg + "self_attention.linear_proj.weight", 1)
        yield hf + "post_attention_layernorm.weight", ranks[0][mg + "pre_mlp_layernorm.weight"]
        gates, ups = zip(*(s[mg + "mlp.linear_fc1.weight"].chunk(2, dim=0) for s in ranks))
        yield hf + "mlp.gate_proj.weight", torch.cat(gates, dim=0)
        yield hf + "mlp.up_proj.weight", torch.cat(ups, dim=0)
        yield hf + "mlp.down_proj.weight", cat(mg + "mlp.linear_fc2.weight", 1)
    if last:
        yield "model.norm.weight", ranks[0]["decoder.final_layernorm.weight"]
        if role == "actor":
            if not arch.tie_word_embeddings:
                yield "lm_head.weight", cat("output_layer.weight", 0)[: arch.vocab_size].clone()
        else:
            yield "score.weight", ranks[0]["output_layer.score.weight"]


def init_hf_state_dict(arch: LlamaArchConfig, role: str, seed: int, std: float = 0.02) -> Dict[str, torch.Tensor]:
    """A fresh random model in HF naming (fp32), identical for every layout: the single source of
    initial weights, so TP/PP runs start from the same numbers as single-rank runs."""
    gen = torch.Generator().manual_seed(seed)
    h, f, d = arch.hidden_size, arch.intermediate_size, arch.head_dim

    def normal(*shape):
        return torch.randn(*shape, generator=gen) * std

    sd = {"model.embed_tokens.weight": normal(arch.vocab_size, h)}
    for layer in range(arch.num_layers):
        p = HF_LAYER.format(layer)
        sd[p + "input_layernorm.weight"] = torch.ones(h)
        sd[p + "self_attn.q_proj.weight"] = normal(arch.num_attention_heads * d, h)
        sd[p + "self_attn.k_proj.weight"] = normal(arch.num_kv_heads * d, h)
        sd[p + "self_attn.v_proj.weight"] = normal(arch.num_kv_heads * d, h)
        if arch.qkv_bias:  # zero, as transformers initialises them
            sd[p + "self_attn.q_proj.bias"] = torch.zeros(arch.num_attention_heads * d)
            sd[p + "self_attn.k_proj.bias"] = torch.zeros(arch.num_kv_heads * d)
            sd[p + "self_attn.v_proj.bias"] = torch.zeros(arch.num_kv_heads * d)
        if arch.qk_norm:
            sd[p + "self_attn.q_norm.weight"] = torch.ones(d)
            sd[p + "self_attn.k_norm.weight"] = torch.ones(d)
        # scaled init of residual-branch outputs (GPT-2 / megatron's output_layer_init_method)
        sd[p + "self_attn.o_proj.weight"] = normal(h, arch.num_attention_heads * d) / (2 * arch.num_layers) ** 0.5
        sd[p + "post_attention_layernorm.weight"] = torch.ones(h)
        sd[p + "mlp.gate_proj.weight"] = normal(f, h)
        sd[p + "mlp.up_proj.weight"] = normal(f, h)
        sd[p + "mlp.down_proj.weight"] = normal(h, f) / (2 * arch.num_layers) ** 0.5
    sd["model.norm.weight"] = torch.ones(h)
    if role == "actor" and not arch.tie_word_embeddings:
        sd["lm_head.weight"] = normal(arch.vocab_size, h)
    if role != "actor":
        sd["score.weight"] = fresh_score_head(arch, role, seed)
    return sd


def fresh_score_head(arch: LlamaArchConfig, role: str, seed: int) -> torch.Tensor:
    """Value / task-value / reward rows start at zero (no prior on the score); group rows small and
    random so the GIL assignment starts near, but not exactly at, uniform (the stationary point)."""
    rows = arch.score_rows(role)
    head = torch.zeros(rows, arch.hidden_size)
    groups = rows - (1 if role == "reward" else len(CRITIC_ROWS))
    if groups > 0:
        gen = torch.Generator().manual_seed(seed + 1)
        head[rows - groups:] = torch.randn(groups, arch.hidden_size, generator=gen) / arch.hidden_size**0.5
    return head


def critic_head_from_reward(arch: LlamaArchConfig, reward_row: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A critic's score head started from a reward model's score row [1, h]: the row seeds both
    the value and the task value (both estimate returns of that reward); group rows start fresh."""
    head = fresh_score_head(arch, "critic", seed)
    head[:len(CRITIC_ROWS)] = reward_row[0]
    return head
