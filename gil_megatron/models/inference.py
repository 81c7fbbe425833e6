"""Inference-only forward of a LlamaModel for autoregressive decoding, on the model's own weights.

    decoder = KVCacheDecoder(model, batch_size=b, max_length=s_max)
    out = decoder.step(input_ids [b, s], start)   # tokens at positions start .. start+s-1
    # last stage: the last position's vocab-parallel logits [b, V/tp]; other stages: hidden [b, s, h]

Why not megatron's own KV cache (StaticInferenceContext)? Measured on CPU it cost a third of a
decode step in work that a decoder does not need: it caches keys BEFORE RoPE, so every step
re-rotates the whole cached prefix, and the local attention expands the GQA key/value heads over
the whole prefix (``repeat_interleave``) every step. This path instead:

- rotates only the new positions' queries and keys and caches the rotated keys;
- keeps GQA unexpanded: scaled_dot_product_attention with ``enable_gqa`` (kv head g serves query
  heads g*np/ng .. (g+1)*np/ng - 1, megatron's grouping of its fused qkv projection);
- preallocates the cache once per batch: [layers, b, kv_heads/tp, s_max, head_dim] keys and values,
  written in place;
- calls the linear layers as plain matmuls on their weights (megatron's ColumnParallelLinear /
  RowParallelLinear forward is an autograd Function with per-call bookkeeping), with the row-parallel
  all-reduce over the TP group exactly where megatron does it, so every TP rank holds the same numbers;
- computes the output layer for the last position only.

The training forward is untouched: this module only reads the modules' weights. The math is the
same as GPTModel's forward (RMSNorm, fused qkv split per query group, Qwen3's per-head q/k norms,
RoPE, causal softmax attention, output projection, residual, SwiGLU MLP, residual, final norm,
head); tests/ppo/test_rollout.py (Llama) and tests/models/test_qwen3_decode.py (Qwen3) check that
its logits equal the megatron forward's at TP1 and TP2 (fp32) and that greedy tokens are identical.
Scope: the local (non-TE) layer spec, which is what runs on CPU; a model built with
another spec (transformer-engine, where the norm lives inside the qkv linear) goes through the
module's own forward calls for those layers (``_linear`` below), untested here without a GPU.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from gil_megatron.models import rope
from gil_megatron.models.llama import mask_padded_vocab
from gil_megatron.parallel import collectives


class KVCacheDecoder:
    """This rank's stage of ``model`` as a decoder with a preallocated, rotated key/value cache for
    ``batch_size`` rows of up to ``max_length`` columns; column ``c`` of every row lives at cache
    slot ``c``. ``left_pad`` [b] (optional): row i starts with that many pad columns, which no real
    token attends to, and its position 0 is column left_pad[i] (RoPE is relative, so the scores
    equal those of the unpadded row)."""

    def __init__(self, model: torch.nn.Module, batch_size: int, max_length: int,
                 left_pad: Optional[torch.Tensor] = None):
        config = model.config
        self.model = model
        self.first = model.pre_process
        self.last = model.post_process
        self.layers = list(model.decoder.layers)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.heads = config.num_attention_heads // tp
        self.kv_heads = config.num_query_groups // tp
        self.head_dim = config.kv_channels
        self.tp_group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
        self.scale = self.head_dim ** -0.5
        device = next(model.parameters()).device
        dtype = config.params_dtype
        shape = (len(self.layers), batch_size, self.kv_heads, max_length, self.head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)  # rotated keys
        self.values = torch.empty(shape, dtype=dtype, device=device)
        # RoPE angles for every position once: megatron's own rotary module (llama3 / linear
        # scaling included), [s_max, 1, 1, d] -> cos/sin [s_max, d]
        freqs = model.rotary_pos_emb(max_length).reshape(max_length, -1).float()
        self.cos = freqs.cos().to(dtype)
        self.sin = freqs.sin().to(dtype)
        self.left_pad = left_pad if left_pad is not None and bool(left_pad.any()) else None
        if self.last:
            self.output_weight = (model.shared_embedding_or_output_weight()
                                  if model.share_embeddings_and_output_weights else model.output_layer.weight)

    # ---- building blocks ------------------------------------------------------------------
    def _linear(self, module, x: torch.Tensor) -> torch.Tensor:
        if type(module) is ColumnParallelLinear:  # output stays split over TP: no collective
            return F.linear(x, module.weight, module.bias)
        if type(module) is RowParallelLinear:  # partial sums of this rank's input shard
            out = F.linear(x, module.weight)
            if self.tp_group is not None:
                collectives.all_reduce(out, self.tp_group)
            return out if module.bias is None else out + module.bias
        return module(x)[0]  # another spec's linear (e.g. TE with the norm fused in)

    def _angles(self, start: int, s: int):
        """cos, sin of columns start..start+s-1: [s, d], or [b, 1, s, d] with per-row positions."""
        if self.left_pad is None:
            return self.cos[start:start + s], self.sin[start:start + s]
        columns = torch.arange(start, start + s, device=self.left_pad.device)
        positions = (columns.unsqueeze(0) - self.left_pad.unsqueeze(1)).clamp(min=0)  # [b, s]
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def _mask(self, start: int, s: int) -> Optional[torch.Tensor]:
        """None (plain causal) without left padding; else bool [b, 1, s, start+s], True = attend:
        causal, real keys only, and every query its own key (a pad query would otherwise attend to
        nothing and turn its row into NaN)."""
        if self.left_pad is None:
            return None
        keys = torch.arange(start + s, device=self.left_pad.device)
        queries = keys[start:].unsqueeze(1)  # [s, 1]
        real = keys.unsqueeze(0) >= self.left_pad.unsqueeze(1)  # [b, start+s]
        allowed = (real.unsqueeze(1) & (keys <= queries).unsqueeze(0)) | (keys == queries).unsqueeze(0)
        return allowed.unsqueeze(1)

    def _attention(self, index: int, attn, x: torch.Tensor, start: int, angles, mask) -> torch.Tensor:
        """x [b, s, h] (normed) -> attention output [b, s, h] (after the output projection)."""
        b, s, _ = x.shape
        qkv = self._linear(attn.linear_qkv, x)  # [b, s, ng * (np/ng + 2) * d]
        per_group = self.heads // self.kv_heads
        qkv = qkv.view(b, s, self.kv_heads, per_group + 2, self.head_dim)
        q = qkv[:, :, :, :per_group].reshape(b, s, self.heads, self.head_dim)  # [b, s, np, d]
        k = qkv[:, :, :, per_group]  # [b, s, ng, d]
        if attn.q_layernorm is not None:  # Qwen3: per-head RMSNorm over d, before RoPE (megatron's order)
            q, k = attn.q_layernorm(q), attn.k_layernorm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [b, np, s, d], [b, ng, s, d]
        v = qkv[:, :, :, per_group + 1].transpose(1, 2)
        end = start + s
        self.keys[index, :, :, start:end] = rope.rotate(k, *angles)
        self.values[index, :, :, start:end] = v
        q = rope.rotate(q, *angles)
        keys, values = self.keys[index, :, :, :end], self.values[index, :, :, :end]
        # without padding: one new position attends to the whole prefix, a prefill is causal
        context = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None and s > 1,
                                                 scale=self.scale, enable_gqa=per_group > 1)  # [b, np, s, d]
        context = context.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
        return self._linear(attn.linear_proj, context)

    def _mlp(self, mlp, x: torch.Tensor) -> torch.Tensor:
        gate, up = self._linear(mlp.linear_fc1, x).chunk(2, dim=-1)
        return self._linear(mlp.linear_fc2, mlp.config.activation_func(gate) * up)

    # ---- one step ---------------------------------------------------------------------------
    def step(self, input_ids: torch.Tensor, start: int, hidden: torch.Tensor = None) -> torch.Tensor:
        """Tokens ``input_ids`` [b, s] at positions start..start+s-1 (the first stage embeds them;
        later stages take the previous stage's ``hidden`` [b, s, h]). Returns the last position's
        vocab-parallel logits [b, V/tp] (padded entries -inf) on the last stage, hidden [b, s, h]
        elsewhere."""
        s = input_ids.shape[1]
        if s > 1 and start != 0:
            raise ValueError("a multi-token step must start at column 0 (the prefill)")
        angles, mask = self._angles(start, s), self._mask(start, s)
        if self.first:
            hidden = self.model.embedding.word_embeddings(input_ids)  # [b, s, h]
        for index, layer in enumerate(self.layers):
            hidden = hidden + self._attention(index, layer.self_attention, layer.input_layernorm(hidden), start,
                                              angles, mask)
            hidden = hidden + self._mlp(layer.mlp, layer.pre_mlp_layernorm(hidden))
        if not self.last:
            return hidden
        last = self.model.decoder.final_layernorm(hidden[:, -1])  # [b, h]
        return mask_padded_vocab(F.linear(last, self.output_weight), self.model.arch.vocab_size)
