"""Build a role's model on this rank from a checkpoint directory (any layout) or fresh weights."""

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
                          num_groups: Optional[int] = None, trainable: bool = True) -> torch.nn.Module:
    """A ``role`` model whose trunk (and head, when the checkpoint has a matching one) comes from
    ``ckpt_dir``. A critic may start from a reward model or an LM: missing heads start fresh.
    Returns a LlamaModel, or with a virtual pipeline (layout.vp > 1) this rank's ModelChunks."""
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"checkpoint directory {ckpt_dir} does not exist")
    arch, _, _, _ = arch_of(ckpt_dir)
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


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if not os.path.isfile(os.path.join(path, "tokenizer.json")) and not os.path.isfile(
            os.path.join(path, "tokenizer_config.json")):
        raise CheckpointError(f"no tokenizer in {path} (tokenizer.json); set the tokenizer path in the config")
    return AutoTokenizer.from_pretrained(path)


__all__ = ["LlamaArchConfig", "model_from_checkpoint", "load_tokenizer", "resolve_dtype"]
