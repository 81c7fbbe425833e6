"""Llama on megatron-core's GPTModel: one trunk, three roles.

- actor / reference: causal LM; logits are vocab-parallel [b, s, V_padded/tp] with the padded
  vocabulary entries set to -inf, so every softmax ignores them.
- critic: per-token value, task value and GIL group logits from one head on the trunk's final
  hidden state, returned as [b, s, 2 + M] (channel 0 = value, 1 = task value, 2.. = group logits;
  config.CRITIC_ROWS).
- reward: per-token scalar [b, s]; the score is read at the last non-pad token (score_at_last()).

The heads replace GPTModel's vocab projection (``output_layer``) on the last pipeline stage and are
called through GPTModel's ``output_processor`` hook, so the trunk, TP and PP are megatron's own.
Layer spec: transformer-engine when importable (GPU), megatron-core's local spec otherwise, its
core attention extended to packed (thd) input (models/packing.py).
"""

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig

from gil_megatron.models.config import CRITIC_ROWS, ROLES, LayoutError, LlamaArchConfig
from gil_megatron.models.packing import PackedDotProductAttention, PackedSegments, Packing

try:  # optional GPU accelerator; never required
    import transformer_engine  # noqa: F401
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    HAVE_TE = True
except Exception:  # ImportError, or a TE build that does not match this torch
    HAVE_TE = False


def transformer_config(arch: LlamaArchConfig, params_dtype: torch.dtype = torch.float32) -> TransformerConfig:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    vp = parallel_state.get_virtual_pipeline_model_parallel_world_size()  # None: no interleaving
    arch.check_layout(tp, pp)
    if vp is not None and arch.num_layers % (pp * vp):
        raise LayoutError(f"num_layers={arch.num_layers} is not divisible by parallel.pp * parallel.virtual_pp = "
                          f"{pp}*{vp}; choose a parallel.virtual_pp that divides num_layers / pp")
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,  # Qwen2: q/k/v only
        qk_layernorm=arch.qk_norm,  # Qwen3: RMSNorm of each query / key head over head_dim, before RoPE
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        attention_softmax_in_fp32=True,
        # Weights always come from a (converted or freshly initialised) full state dict, so that
        # every layout starts from identical numbers; megatron's own init would be wasted work.
        perform_initialization=False,
        use_cpu_initialization=not on_gpu,
        # Fusions are CUDA kernels; the unfused paths are exact and run anywhere.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        # Batches of different sequence length go through one pipeline; megatron needs the
        # all-to-all dispatcher setting for that even in a dense model. The interleaved schedule
        # gets fixed shapes instead (models/pipeline.py pads micro-batches): its shape exchange
        # is batched on the pipeline group, and at pp = 2 (previous rank = next rank) the
        # forward and backward shapes sent to one peer are received in each other's place.
        variable_seq_lengths=pp > 1 and vp is None,
        # interleaved: per-direction p2p (Megatron-LM's default there); at pp = 2 it keeps the two
        # directions to one peer on separate process groups (p2p_communication._p2p_ops)
        overlap_p2p_comm=vp is not None,
        batch_p2p_comm=vp is None,
        moe_token_dispatcher_type="alltoall",
        deallocate_pipeline_outputs=False,
    )


class ValueAndGroupHead(torch.nn.Module):
    """Critic head: one bias-free projection hidden -> 2 + M (value, task value, then M group logits).

    Stored in HF as LlamaForSequenceClassification ``score.weight`` with num_labels = 2 + M.
    The group rows start random, so group assignments are not exactly uniform (a stationary point
    of the variance objective)."""

    def __init__(self, hidden_size: int, num_groups: int, dtype: torch.dtype):
        super().__init__()
        self.score = torch.nn.Linear(hidden_size, len(CRITIC_ROWS) + num_groups, bias=False, dtype=dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.score(hidden_states)


class ScalarHead(torch.nn.Module):
    """Reward-model head: bias-free hidden -> 1 (HF LlamaForSequenceClassification, num_labels=1)."""

    def __init__(self, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        self.score = torch.nn.Linear(hidden_size, 1, bias=False, dtype=dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.score(hidden_states).squeeze(-1)


class LlamaModel(GPTModel):
    """GPTModel with a role. forward(input_ids, position_ids=None) -> [b, s, ...] on the last
    stage, hidden states [s, b, h] on the others (megatron's pipeline contract).

    With a virtual pipeline (parallel.virtual_pp > 1) one LlamaModel is one model chunk: ``vp_stage``
    v of this pipeline rank r, holding the layers of virtual stage v * pp + r (megatron's own layer
    offsets); the chunks of one rank share one ``config`` (the schedule reads chunk 0's)."""

    def __init__(self, arch: LlamaArchConfig, role: str, params_dtype: torch.dtype = torch.float32,
                 pre_process: Optional[bool] = None, post_process: Optional[bool] = None,
                 vp_stage: Optional[int] = None, config: Optional[TransformerConfig] = None):
        if role not in ROLES:
            raise ValueError(f"unknown model role {role!r}; valid: {list(ROLES)}")
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if pre_process is None:
            pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        if post_process is None:
            post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        config = config or transformer_config(arch, params_dtype)
        spec = layer_spec(arch.qk_norm)
        tied = arch.tie_word_embeddings and role == "actor"
        super().__init__(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=arch.padded_vocab_size(tp),
            max_sequence_length=arch.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=tied,
            position_embedding_type="rope",
            rotary_base=arch.rope_theta,
            vp_stage=vp_stage,
            **rope_scaling_kwargs(arch),
        )
        _apply_llama3_band_limits(self, arch)
        self.arch = arch
        self.role = role
        self.using_te = spec is not None and HAVE_TE and torch.cuda.is_available()
        self.detach_group_trunk = False  # critic: stop the group head's gradient at the trunk
        if post_process and role == "critic":
            self.output_layer = ValueAndGroupHead(arch.hidden_size, arch.num_groups, params_dtype)
        elif post_process and role == "reward":
            self.output_layer = ScalarHead(arch.hidden_size, params_dtype)

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                packing: Optional[Packing] = None) -> torch.Tensor:
        """``packing`` (models/packing.py): run its packed row [1, T] instead of ``input_ids``. The
        last stage returns the critic's and reward model's outputs unpacked to [b, s, ...] (zeros at
        pad) and the actor's logits still packed, [1, T, V/tp] (models/logprobs.action_logprobs takes them
        with the Packing); other stages return hidden states [T, 1, h]."""
        if packing is not None:
            output = super().forward(input_ids=packing.input_ids, position_ids=packing.position_ids,
                                     attention_mask=None, packed_seq_params=packing.params,
                                     output_processor=self._head)
            return packing.unpack(output) if self.post_process and self.role != "actor" else output
        if position_ids is None:
            # sequences are right-padded and contiguous (prompt then response): positions 0..s-1
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            position_ids = position_ids.expand_as(input_ids)
        return super().forward(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=None,  # causal mask inside attention; right padding needs no other
            output_processor=self._head,
        )

    def _preprocess(self, *args, **kwargs):
        # Packed input on the local spec: megatron's own thd RoPE rotates sequence by sequence (a
        # Python loop with a host sync per sequence, per layer, for queries and keys). Our core
        # attention rotates instead, in one pass over the row with each token's own angles;
        # megatron's attention then gets no angles and skips RoPE.
        # transformer-engine's attention and fused RoPE take thd themselves: untouched.
        out = super()._preprocess(*args, **kwargs)
        params = kwargs.get("packed_seq_params")
        if isinstance(params, PackedSegments) and out[1] is not None and not self.using_te:
            params.rotary = params.per_token_rotary(out[1], self.config.params_dtype)
            out = (out[0], None) + tuple(out[2:])
        return out

    def _head(self, hidden_states, output_layer, output_weight, **_):
        # hidden_states: [s, b, h] after the final RMSNorm
        if self.role == "critic" and self.detach_group_trunk:
            weight = output_layer.score.weight
            value = hidden_states @ weight[:1].t()
            groups = hidden_states.detach() @ weight[1:].t()
            return torch.cat([value, groups], dim=-1).transpose(0, 1).contiguous()
        if self.role != "actor":
            return output_layer(hidden_states).transpose(0, 1).contiguous()  # [b, s(, 1+M)]
        logits, _ = output_layer(hidden_states, weight=output_weight)  # [s, b, V/tp]
        logits = mask_padded_vocab(logits, self.arch.vocab_size)
        return logits.transpose(0, 1).contiguous()  # [b, s, V/tp]


def layer_spec(qk_norm: bool = False):
    """transformer-engine's spec on GPU when importable (its attention takes packed thd input);
    megatron-core's local spec otherwise, with a core attention that also takes packed input.
    ``qk_norm``: the attention's q_layernorm / k_layernorm are RMSNorms over head_dim (Qwen3)."""
    if HAVE_TE and torch.cuda.is_available():
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_norm)
    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_norm)
    spec.submodules.self_attention.submodules.core_attention = PackedDotProductAttention
    return spec


def rope_scaling_kwargs(arch: LlamaArchConfig) -> dict:
    """GPTModel's RoPE arguments for HF's rope_scaling: linear -> position interpolation,
    llama3 -> megatron's Llama-3 band scaling (its factor; the band limits follow below)."""
    scaling = arch.rope_scaling
    if scaling is None:
        return {}
    if scaling["rope_type"] == "linear":
        return {"seq_len_interpolation_factor": scaling["factor"]}
    return {"rope_scaling": True, "rope_scaling_factor": scaling["factor"]}


def _apply_llama3_band_limits(model: GPTModel, arch: LlamaArchConfig) -> None:
    """GPTModel passes only the factor to RotaryEmbedding, whose low/high frequency factors and
    original context default to Llama-3.1's (1, 4, 8192). Recompute the inverse frequencies with
    the checkpoint's own values through the same megatron function."""
    scaling = arch.rope_scaling
    if scaling is None or scaling["rope_type"] != "llama3":
        return
    rope = model.rotary_pos_emb
    dim = arch.head_dim
    base = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32,
                                                    device=rope.inv_freq.device) / dim))
    rope.inv_freq = rope._apply_scaling(
        base, factor=scaling["factor"], low_freq_factor=scaling["low_freq_factor"],
        high_freq_factor=scaling["high_freq_factor"],
        original_max_position_embeddings=scaling["original_max_position_embeddings"],
    )


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set logits of padded vocabulary ids (>= vocab_size) on this TP shard to -inf."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    shard = logits.shape[-1]
    start = tp_rank * shard
    if start + shard <= vocab_size:
        return logits
    # in place rather than concatenating a copy of the whole logits: the projection's backward reads
    # its input and weight, never its output
    logits[..., max(vocab_size - start, 0):] = float("-inf")
    return logits


def split_critic_output(out: torch.Tensor):
    """[b, s, 2 + M] -> values [b, s], task values [b, s], group_logits [b, s, M] (config.CRITIC_ROWS)."""
    return out[..., 0], out[..., 1], out[..., len(CRITIC_ROWS):]


def score_at_last(per_token: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Pick per-token outputs [b, s, ...] at the last real token of each row (lengths [b])."""
    index = (lengths - 1).clamp(min=0)
    return per_token[torch.arange(per_token.shape[0], device=per_token.device), index]
