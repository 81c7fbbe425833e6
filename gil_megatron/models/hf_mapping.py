"""Hugging Face Llama / Mistral / Qwen2 <-> megatron-core GPTModel (local spec) parameter mapping, per TP/PP shard.

Pure tensor code, no process groups: the converter runs it offline and the engine runs it when a
rank loads its shard. Conventions (megatron-core 0.19, verified by tests against transformers):
- linear_qkv is the per-KV-group concatenation [q heads of group g; k_g; v_g], no RoPE permutation;
  TP splits whole KV groups. Qwen2's q/k/v biases are grouped the same way (linear_qkv.bias).
- linear_fc1 = cat[gate, up] of this rank's slice of each; linear_proj / linear_fc2 split inputs.
- the vocabulary is zero-padded to padded_vocab_size(tp) and split in contiguous rows.
- layer indices are local to each pipeline stage.
- critic / reward heads are LlamaForSequenceClassification's ``score.weight``.
"""

from typing import Callable, Dict, Iterator, Tuple

import torch

from gil_megatron.models.config import CRITIC_ROWS, LlamaArchConfig

Reader = Callable[[str], torch.Tensor]

HF_LAYER = "model.layers.{}."
MG_LAYER = "decoder.layers.{}."


def _rows(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return t.chunk(world, dim=0)[rank]


def _cols(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return t.chunk(world, dim=1)[rank]


def _pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    if t.shape[0] == padded:
        return t
    pad = t.new_zeros(padded - t.shape[0], *t.shape[1:])
    return torch.cat([t, pad], dim=0)


def qkv_from_hf(arch: LlamaArchConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[q; k; v] HF projections -> megatron's grouped [q_g; k_g; v_g] for every KV group g.
    Weights [rows, h] and biases [rows] alike (the trailing dims ride along)."""
    d, rest = arch.head_dim, q.shape[1:]
    qg = q.reshape(arch.num_kv_heads, arch.heads_per_group * d, *rest)
    kg = k.reshape(arch.num_kv_heads, d, *rest)
    vg = v.reshape(arch.num_kv_heads, d, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def qkv_to_hf(arch: LlamaArchConfig, qkv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d, rest = arch.head_dim, qkv.shape[1:]
    grouped = qkv.reshape(arch.num_kv_heads, (arch.heads_per_group + 2) * d, *rest)
    q, k, v = grouped.split([arch.heads_per_group * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def megatron_shard_from_hf(
    arch: LlamaArchConfig, role: str, read: Reader, tp_rank: int, tp: int, pp_rank: int, pp: int,
    has_head: Callable[[str], bool] = lambda name: True,
) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield (megatron name, tensor) for one rank's shard, reading HF tensors one at a time."""
    padded = arch.padded_vocab_size(tp)
    first, last = pp_rank == 0, pp_rank == pp - 1
    if first:
        yield "embedding.word_embeddings.weight", _rows(_pad_vocab(read("model.embed_tokens.weight"), padded), tp_rank, tp)
    for local, layer in enumerate(arch.layers_of_stage(pp_rank, pp)):
        hf, mg = HF_LAYER.format(layer), MG_LAYER.format(local)
        yield mg + "input_layernorm.weight", read(hf + "input_layernorm.weight")
        qkv = qkv_from_hf(arch, read(hf + "self_attn.q_proj.weight"), read(hf + "self_attn.k_proj.weight"),
                          read(hf + "self_attn.v_proj.weight"))
        yield mg + "self_attention.linear_qkv.weight", _rows(qkv, tp_rank, tp)
        if arch.qkv_bias:
            bias = qkv_from_hf(arch, read(hf + "self_attn.q_proj.bias"), read(hf + "self_attn.k_proj.bias"),
                               read(hf + "self_attn.v_proj.bias"))
            yield mg + "self_attention.linear_qkv.bias", _rows(bias, tp_rank, tp)
        yield mg + "self_attention.linear_proj.weight", _cols(read(hf + "self_attn.o_proj.weight"), tp_rank, tp)
        yield mg + "pre_mlp_layernorm.weight", read(hf + "post_attention_layernorm.weight")
        gate = _rows(read(hf + "mlp.gate_proj.weight"), tp_rank, tp)
        up = _rows(read(hf + "mlp.up_proj.weight"), tp_rank, tp)
        yield mg + "mlp.linear_fc1.weight", torch.cat([gate, up], dim=0)
        yield mg + "mlp.linear_fc2.weight", _cols(read(hf + "mlp.down_proj.weight"), tp_rank, tp)
    if last:
        yield "decoder.final_layernorm.weight", read("model.norm.weight")
        if role == "actor":
            if not arch.tie_word_embeddings:
                yield "output_layer.weight", _rows(_pad_vocab(read("lm_head.weight"), padded), tp_rank, tp)
            elif pp > 1:  # the last stage keeps its own copy of the tied embedding
                yield "output_layer.weight", _rows(_pad_vocab(read("model.embed_tokens.weight"), padded), tp_rank, tp)
        elif has_head("score.weight"):
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
