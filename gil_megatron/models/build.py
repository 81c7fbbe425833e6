"""Build a role's model on this rank from a model directory: ours (any layout) or a Hugging Face one
(converted in memory at the run's layout; models/weights.checkpoint_format tells them apart)."""

import os
from typing import Optional

import torch

from gil_megatron.models.chunks import ModelChunks
from gil_megatron.models.config import LlamaArchConfig
from gil_megatron.models.llama import LlamaModel, transformer_config
from gil_megatron.models.weights import CheckpointError, arch_of, load_model_weights
from gil_megatron.parallel.distributed import ParallelLayout


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def model_from_checkpoint(ckpt_dir: str, role: str, layout: ParallelLayout, dtype: torch.dtype = torch.float32,
                          num_groups: Optional[int] = None, trainable: bool = True,
                          key: Optional[str] = None) -> torch.nn.Module:
    """A ``role`` model whose trunk (and head, when the checkpoint has a matching one) comes from
    ``ckpt_dir``, a model directory of ours or a Hugging Face one (each rank reads only its shard).
    A critic may start from a reward model or an LM, a reward model from an LM: missing heads start
    fresh. ``key``: the config key that named ``ckpt_dir``, for the error message.
    Returns a LlamaModel, or with a virtual pipeline (layout.vp > 1) this rank's ModelChunks."""
    arch, _, _, _ = arch_of(ckpt_dir, key)
    if num_groups is not None:
        arch.num_groups = num_groups
    arch.check_layout(layout.tp, layout.pp)
    if layout.vp == 1:
        model = LlamaModel(arch, role, params_dtype=dtype)
    else:  # one shared TransformerConfig: megatron's schedule reads chunk 0's
        config = transformer_config(arch, dtype)
        model = ModelChunks([LlamaModel(arch, role, params_dtype=dtype, vp_stage=v, config=config)
                             for v in range(layout.vp)])
    if torch.cuda.is_available():
        model.cuda()
    load_model_weights(model, ckpt_dir, layout.tp_rank, layout.tp, layout.pp_rank, layout.pp)
    if not trainable:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def load_tokenizer(path: str, key: Optional[str] = None):
    """The tokenizer of a model directory of either format (ours carries the source's tokenizer
    files) or of a tokenizer directory."""
    from transformers import AutoTokenizer

    if not os.path.isfile(os.path.join(path, "tokenizer.json")) and not os.path.isfile(
            os.path.join(path, "tokenizer_config.json")):
        where = f"{key}={path}" if key else path
        raise CheckpointError(f"no tokenizer in {where} (tokenizer.json); set the tokenizer path in the config")
    return AutoTokenizer.from_pretrained(path)


__all__ = ["LlamaArchConfig", "model_from_checkpoint", "load_tokenizer", "resolve_dtype"]
