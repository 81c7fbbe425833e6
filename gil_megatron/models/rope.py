"""Rotary position embedding by precomputed angles, for the two paths that rotate outside
megatron-core's attention (the packed forward and the KV-cache decoder): cos and sin are computed
once per forward (megatron's own RoPE takes the angles and recomputes both in every attention call,
for queries and keys, in every layer)."""

import torch


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` [..., d] rotated by the angles whose cos/sin broadcast against it: megatron-core's
    rotate-half form (``_apply_rotary_pos_emb_bshd`` with full-width, non-interleaved RoPE, the Llama
    layout), the same operations in the same order, so the results agree bit for bit. Callers pass
    cos/sin already in x's dtype (the casts below are then no-ops)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat((-x2, x1), dim=-1) * sin.to(x.dtype)
