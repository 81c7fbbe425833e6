"""The Llama architecture as a small typed config, read from / written to HF config.json.

Four HF families share it: Llama (incl. Llama-3.x rope_scaling), Mistral (full attention),
Qwen2/Qwen2.5 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm). Everything else in a config.json that
would change the model is refused.
"""

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

ROLES = ("actor", "critic", "reward")
# The critic's head, row by row: its value (returns of the per-token rewards, KL penalty included),
# its task value (returns of the task reward alone: GIL's performance, docs/design.md 4.1), then the
# group logits. A critic started from a reward model seeds both value rows with the reward row.
CRITIC_ROWS = ("value", "task_value")


class LayoutError(ValueError):
    """A tensor/pipeline layout that this model cannot be split into."""


@dataclass(frozen=True)
class Family:
    """A Hugging Face model family that maps onto our Llama trunk."""

    causal_lm: str
    """HF class of the actor (config.json ``architectures``)."""
    sequence_classifier: str
    """HF class of the reward model / critic (a ``score`` head on the trunk)."""
    qkv_bias: bool
    """q/k/v projections carry a bias (megatron's add_qkv_bias); o_proj and the MLP never do."""
    qk_norm: bool = False
    """Queries and keys are RMS-normalised per head over head_dim, before RoPE (megatron's
    qk_layernorm; HF's self_attn.q_norm / k_norm, one [head_dim] weight shared by all heads)."""
    windowed: bool = False
    """config.json may declare sliding-window layers (use_sliding_window / layer_types)."""


FAMILIES = {
    "llama": Family("LlamaForCausalLM", "LlamaForSequenceClassification", qkv_bias=False),
    "mistral": Family("MistralForCausalLM", "MistralForSequenceClassification", qkv_bias=False),
    "qwen2": Family("Qwen2ForCausalLM", "Qwen2ForSequenceClassification", qkv_bias=True, windowed=True),
    "qwen3": Family("Qwen3ForCausalLM", "Qwen3ForSequenceClassification", qkv_bias=False, qk_norm=True,
                    windowed=True),
}

# rope_type -> the keys it needs (besides rope_type); megatron-core 0.19's RotaryEmbedding has
# exactly these: plain, linear position interpolation (seq_len_interpolation_factor) and Llama-3's
# frequency-band scaling. "dynamic" (NTK) has no megatron counterpart; "yarn" has one whose
# attention scaling differs from transformers', so neither is accepted.
ROPE_TYPES = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass
class LlamaArchConfig:
    vocab_size: int
    """Real vocabulary size (the tokenizer's); padded internally, see padded_vocab_size()."""
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    """Key/value heads (GQA); == num_attention_heads for plain multi-head attention."""
    head_dim: int = 0
    """0 means hidden_size // num_attention_heads (HF's default)."""
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    make_vocab_size_divisible_by: int = 128
    """Padded vocab = multiple of this times tp (megatron's convention); padded logits are -inf."""
    num_groups: int = 2
    """Critic only: outputs of the GIL group-classifier head."""
    rope_scaling: Optional[Dict[str, Any]] = field(default=None)
    """None for plain RoPE, else {"rope_type": "linear" | "llama3", and that type's keys, see
    ROPE_TYPES}; the same keys as HF's config.json ``rope_scaling``."""
    model_type: str = "llama"
    """HF family (a key of FAMILIES): decides the q/k/v bias and the class names on export."""
    bos_token_id: Optional[int] = None
    """Special token ids of the source config.json, written back on export (the tokenizer's own
    ids win when the exported directory carries a tokenizer)."""
    eos_token_id: Optional[Any] = None
    """An id or a list of ids (Llama-3 instruct models stop on several)."""
    pad_token_id: Optional[int] = None

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_attention_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be > 0")
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.model_type not in FAMILIES:
            raise ValueError(f"model_type={self.model_type!r} is not one of {sorted(FAMILIES)}")
        if self.rope_scaling is not None:
            self.rope_scaling = _check_rope_scaling(self.rope_scaling)

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def qkv_bias(self) -> bool:
        return self.family.qkv_bias

    @property
    def qk_norm(self) -> bool:
        return self.family.qk_norm

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_kv_heads

    def score_rows(self, role: str) -> int:
        """Rows of a scalar-head model's ``score`` projection (HF num_labels): a reward model's score;
        a critic's value, task value and ``num_groups`` group logits (CRITIC_ROWS)."""
        return 1 if role == "reward" else len(CRITIC_ROWS) + self.num_groups

    def padded_vocab_size(self, tp: int) -> int:
        multiple = self.make_vocab_size_divisible_by * tp
        return ((self.vocab_size + multiple - 1) // multiple) * multiple

    def check_layout(self, tp: int, pp: int) -> None:
        """Raise LayoutError naming the field and the fix when (tp, pp) cannot split this model."""
        problems = []
        if self.num_attention_heads % tp:
            problems.append(f"num_attention_heads={self.num_attention_heads}")
        if self.num_kv_heads % tp:
            problems.append(f"num_kv_heads={self.num_kv_heads}")
        if self.intermediate_size % tp:
            problems.append(f"intermediate_size={self.intermediate_size}")
        if problems:
            raise LayoutError(
                f"tensor parallel size {tp} does not divide {', '.join(problems)}; "
                f"choose a tensor parallel size that divides them"
            )
        if self.num_layers % pp:
            raise LayoutError(
                f"pipeline parallel size {pp} does not divide num_layers={self.num_layers}; "
                f"choose a pipeline parallel size that divides it"
            )

    def layers_of_stage(self, pp_rank: int, pp: int) -> range:
        per_stage = self.num_layers // pp
        return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)

    # ---- HF interchange -------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: Dict[str, Any]) -> "LlamaArchConfig":
        """Our config from a HF config.json; anything we cannot reproduce exactly is refused with
        one line naming the field (silently dropping it would give a different model)."""
        model_type = hf.get("model_type", "llama")
        if model_type not in FAMILIES:
            raise ValueError(
                f"config.json model_type={model_type!r} does not convert; supported: {sorted(FAMILIES)}"
            )
        if model_type == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
            raise ValueError(
                f"config.json attention_bias={hf.get('attention_bias')} mlp_bias={hf.get('mlp_bias')}: "
                "only bias-free Llama checkpoints convert"
            )
        if model_type == "qwen3" and hf.get("attention_bias"):
            raise ValueError(
                f"config.json attention_bias={hf.get('attention_bias')}: only bias-free Qwen3 checkpoints "
                "convert (its attention bias includes o_proj, which megatron's add_qkv_bias does not have)"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json hidden_act={act!r}: only silu (SwiGLU) models are supported")
        heads = hf["num_attention_heads"]
        max_positions = hf.get("max_position_embeddings", 2048)
        _refuse_sliding_window(hf, model_type, max_positions)
        theta, scaling = _rope_of(hf)
        partial = hf.get("partial_rotary_factor", 1.0)
        if partial not in (None, 1.0):
            raise ValueError(f"config.json partial_rotary_factor={partial}: only full-width RoPE (1.0) is supported")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=theta,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            num_groups=hf.get("gil_num_groups", 2),
            rope_scaling=scaling,
            model_type=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )

    def to_hf_dict(self, role: str = "actor") -> Dict[str, Any]:
        """config.json of this model in its own family (legacy ``rope_theta`` / ``rope_scaling``
        keys, which transformers 4.x reads and 5.x converts)."""
        family = self.family
        hf = {
            "model_type": self.model_type,
            "architectures": [family.causal_lm if role == "actor" else family.sequence_classifier],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }
        if self.model_type == "llama":
            hf.update(attention_bias=False, mlp_bias=False)
        else:  # full attention in every layer (sliding windows are refused on the way in)
            hf["sliding_window"] = None
        if self.family.windowed:
            hf.update(use_sliding_window=False, max_window_layers=self.num_layers)
        if self.model_type == "qwen3":
            hf["attention_bias"] = False
        if role != "actor":
            hf["num_labels"] = self.score_rows(role)
            if hf["pad_token_id"] is None:  # sequence classifiers need one to find the last token
                hf["pad_token_id"] = 0
        if role == "critic":
            hf["gil_num_groups"] = self.num_groups
        return hf

    @classmethod
    def from_hf_dir(cls, path: str) -> "LlamaArchConfig":
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{cfg_path} not found: a Hugging Face model directory needs config.json")
        with open(cfg_path) as f:
            return cls.from_hf_dict(json.load(f))

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "LlamaArchConfig":
        return cls(**d)


def _rope_of(hf: Dict[str, Any]):
    """(rope_theta, normalised rope_scaling or None) from either spelling of config.json:
    transformers 4.x ``rope_theta`` + ``rope_scaling``, or 5.x ``rope_parameters``."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    if not isinstance(params, dict):
        params = {}
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    if scaling is None and params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if not scaling or scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return float(theta), None
    return float(theta), scaling


def _check_rope_scaling(scaling: Dict[str, Any]) -> Dict[str, Any]:
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type not in ROPE_TYPES:
        supported = ", ".join(["default"] + sorted(ROPE_TYPES))
        raise ValueError(
            f"config.json rope_scaling rope_type={rope_type!r} is not supported by megatron-core's "
            f"RotaryEmbedding; supported: {supported}"
        )
    missing = [k for k in ROPE_TYPES[rope_type] if scaling.get(k) is None]
    if missing:
        raise ValueError(f"config.json rope_scaling ({rope_type}) lacks {', '.join(missing)}")
    out = {"rope_type": rope_type}
    out.update({k: float(scaling[k]) for k in ROPE_TYPES[rope_type]})
    if "original_max_position_embeddings" in out:
        out["original_max_position_embeddings"] = int(out["original_max_position_embeddings"])
    return out


def _refuse_sliding_window(hf: Dict[str, Any], model_type: str, max_positions: int) -> None:
    """Sliding-window attention is refused: our attention is full-causal. A window at least
    max_position_embeddings long never binds, so full attention is then exact.

    Which layers slide is decided as transformers decides it: Mistral, every layer (when
    sliding_window is set); Qwen2 / Qwen3, the ``layer_types`` entries "sliding_attention", or, without
    layer_types, layers >= max_window_layers when use_sliding_window is true and sliding_window set."""
    window = hf.get("sliding_window")
    if model_type == "mistral":
        sliding, key, off = window is not None, "", "sliding_window to null"
    elif FAMILIES[model_type].windowed:
        layer_types = hf.get("layer_types")
        if layer_types:
            slides = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
            key = f"layer_types[{slides[0]}]='sliding_attention'" if slides else ""
            off = "every layer_types entry to 'full_attention'"
        else:
            first = hf.get("max_window_layers", 0)
            binds = hf.get("use_sliding_window") and window is not None
            slides = list(range(first, hf["num_hidden_layers"])) if binds else []
            key = f"use_sliding_window=True (layers {first}..{hf['num_hidden_layers'] - 1})"
            off = "use_sliding_window to false"
        sliding = bool(slides)
        if sliding and window is None:  # transformers itself cannot build such a model
            raise ValueError(f"config.json {key} but sliding_window=None: sliding-window attention is not "
                             "supported (full attention only)")
    else:
        return
    if sliding and window < max_positions:
        raise ValueError(
            f"config.json {key + ' with ' if key else ''}sliding_window={window} < max_position_embeddings="
            f"{max_positions}: "
            "sliding-window attention is not supported (full attention only). If your sequences "
            f"never exceed {window} tokens the two are identical: set max_position_embeddings to "
            f"{window} (or {off}) in config.json and convert again"
        )
