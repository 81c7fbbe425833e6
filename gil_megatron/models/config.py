"""The Llama architecture as a small typed config, read from / written to HF config.json."""

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

ROLES = ("actor", "critic", "reward")


class LayoutError(ValueError):
    """A tensor/pipeline layout that this model cannot be split into."""


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
        if self.rope_scaling is not None:
            raise ValueError(
                f"rope_scaling={self.rope_scaling} is not supported yet; only plain RoPE "
                "(rope_scaling null) converts exactly"
            )

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_kv_heads

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
        model_type = hf.get("model_type", "llama")
        if model_type != "llama" or hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ValueError(
                f"config.json model_type={model_type!r} (attention_bias={hf.get('attention_bias')}, "
                f"mlp_bias={hf.get('mlp_bias')}): only bias-free Llama checkpoints convert"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json hidden_act={act!r}: only silu (SwiGLU) Llama is supported")
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=float(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            num_groups=hf.get("gil_num_groups", 2),
            rope_scaling=_plain_rope_or_none(hf),
        )

    def to_hf_dict(self, role: str = "actor") -> Dict[str, Any]:
        hf = {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM" if role == "actor" else "LlamaForSequenceClassification"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
        }
        if role != "actor":
            hf["num_labels"] = 1 if role == "reward" else 1 + self.num_groups
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


def _plain_rope_or_none(hf: Dict[str, Any]):
    scaling = hf.get("rope_scaling")
    if scaling is None:
        params = hf.get("rope_parameters")
        if isinstance(params, dict) and params.get("rope_type", "default") != "default":
            return params
        return None
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return None
    return scaling
