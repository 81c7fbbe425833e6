"""HF Llama / Mistral / Qwen2 / Qwen3 directory <-> our TP/PP-sharded directory, streaming one tensor at a time.

Peak memory stays near one output shard plus one input tensor: each (tp, pp) shard is built from
tensors read lazily out of the safetensors files, written, and dropped before the next.
"""

import json
import os
from typing import Callable, Optional

from safetensors.torch import save_file

from gil_megatron.models import hf_mapping
from gil_megatron.models.config import ROLES, LlamaArchConfig
from gil_megatron.models.weights import (
    CheckpointError,
    HFReader,
    arch_of,
    atomic_directory,
    hf_role,
    hf_tensors_of_stage,
    role_reader,
    save_shard,
    state_for_rank,
    write_meta,
)

Progress = Callable[[str], None]


def hf_to_megatron(hf_dir: str, out_dir: str, tp: int, pp: int, role: str = "actor",
                   num_groups: int = 2, seed: int = 0, progress: Optional[Progress] = None) -> str:
    """Convert; returns a one-line note on the heads (loaded or freshly initialised)."""
    if role not in ROLES:
        raise CheckpointError(f"--model-type {role!r} is not one of {list(ROLES)}")
    arch = LlamaArchConfig.from_hf_dir(hf_dir)
    arch.num_groups = num_groups
    arch.check_layout(tp, pp)
    reader = HFReader(hf_dir)
    read, load_head, note = role_reader(arch, role, hf_role(reader), reader, reader.has, hf_dir, seed)
    total = tp * pp
    with atomic_directory(out_dir) as tmp:
        for pp_rank in range(pp):
            for tp_rank in range(tp):
                state = state_for_rank(arch, role, read, tp_rank, tp, pp_rank, pp, load_head=load_head, seed=seed)
                save_shard(tmp, tp_rank, pp_rank, state)
                del state
                if progress:
                    progress(f"wrote shard tp={tp_rank} pp={pp_rank} ({pp_rank * tp + tp_rank + 1}/{total})")
        write_meta(tmp, arch, role, tp, pp, source=os.path.abspath(hf_dir))
        copy_tokenizer_files(hf_dir, tmp)
    reader.close()
    return note


def megatron_to_hf(ckpt_dir: str, out_dir: str, progress: Optional[Progress] = None,
                   tokenizer_dir: Optional[str] = None) -> str:
    """Write a HF directory that AutoModelForCausalLM (or ...ForSequenceClassification) and
    AutoTokenizer load: one safetensors file per pipeline stage (memory: one stage), config.json
    and generation_config.json with the bos/eos/pad ids, and the tokenizer files and chat template
    of the checkpoint (or of ``tokenizer_dir`` when the checkpoint carries none). Returns a
    one-line note on where the tokenizer came from."""
    arch, role, tp, pp = arch_of(ckpt_dir)
    source = tokenizer_source(ckpt_dir, tokenizer_dir)
    ids = special_token_ids(arch, source)
    dtype = None
    with atomic_directory(out_dir) as tmp:
        weight_map = {}
        for pp_rank in range(pp):
            fname = "model.safetensors" if pp == 1 else f"model-{pp_rank + 1:05d}-of-{pp:05d}.safetensors"
            tensors = {name: t.contiguous() for name, t in hf_tensors_of_stage(ckpt_dir, pp_rank)}
            save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in tensors})
            dtype = dtype or next(iter(tensors.values())).dtype
            if progress:
                progress(f"wrote {len(tensors)} tensors of stage {pp_rank + 1}/{pp} to {fname}")
            del tensors
        if pp > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
        hf_config = arch.to_hf_dict(role)
        hf_config.update({k: v for k, v in ids.items() if v is not None})
        hf_config["torch_dtype"] = str(dtype).replace("torch.", "")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        if source is not None:
            copy_tokenizer_files(source, tmp)
        _write_generation_config(tmp, ids)
    if source is None:
        return ("note: no tokenizer files in the checkpoint and no --tokenizer-dir: the directory holds "
                "weights and config only (AutoTokenizer cannot load it)")
    return f"tokenizer and chat template from {source}"


def tokenizer_source(ckpt_dir: str, tokenizer_dir: Optional[str]) -> Optional[str]:
    """The checkpoint when it carries a tokenizer, else ``tokenizer_dir`` (which must have one)."""
    if has_tokenizer(ckpt_dir):
        return ckpt_dir
    if tokenizer_dir is None:
        return None
    if not has_tokenizer(tokenizer_dir):
        raise CheckpointError(f"--tokenizer-dir {tokenizer_dir} has no tokenizer.json, tokenizer.model or "
                              "tokenizer_config.json")
    return tokenizer_dir


def has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "tokenizer.model",
                                                                "tokenizer_config.json"))


def special_token_ids(arch: LlamaArchConfig, tokenizer_dir: Optional[str]) -> dict:
    """bos/eos/pad ids: the model's own (from the source config.json), the tokenizer's where the
    model has none. A tokenizer with more tokens than the model's vocabulary does not belong to it."""
    ids = {"bos_token_id": arch.bos_token_id, "eos_token_id": arch.eos_token_id, "pad_token_id": arch.pad_token_id}
    if tokenizer_dir is None:
        return ids
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if len(tokenizer) > arch.vocab_size:
        raise CheckpointError(
            f"the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{arch.vocab_size}: it is not this model's tokenizer"
        )
    for name in ids:
        if ids[name] is None:
            ids[name] = getattr(tokenizer, name, None)
    return ids


def _write_generation_config(out_dir: str, ids: dict) -> None:
    """Keep a copied generation_config.json (sampling defaults, extra stop ids), filling in the
    ids it lacks; write a minimal one otherwise."""
    path = os.path.join(out_dir, "generation_config.json")
    config = {}
    if os.path.isfile(path):
        with open(path) as f:
            config = json.load(f)
    for name, value in ids.items():
        if config.get(name) is None and value is not None:
            config[name] = value
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


# What AutoTokenizer reads (fast and slow tokenizers; recent transformers keep the chat template in
# chat_template.jinja, older ones inside tokenizer_config.json) plus the generation defaults.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                    "generation_config.json")


def copy_tokenizer_files(src: str, dst: str) -> None:
    import shutil

    for name in _TOKENIZER_FILES:
        path = os.path.join(src, name)
        if os.path.isfile(path):
            shutil.copy(path, os.path.join(dst, name))


def save_fresh_model(arch: LlamaArchConfig, role: str, out_dir: str, tp: int, pp: int, seed: int) -> None:
    """Write a randomly initialised model (same numbers for every layout) in our format."""
    arch.check_layout(tp, pp)
    full = hf_mapping.init_hf_state_dict(arch, role, seed)
    with atomic_directory(out_dir) as tmp:
        for pp_rank in range(pp):
            for tp_rank in range(tp):
                save_shard(tmp, tp_rank, pp_rank, state_for_rank(arch, role, hf_mapping.dict_reader(full), tp_rank, tp,
                                                                  pp_rank, pp))
        write_meta(tmp, arch, role, tp, pp, source=f"random init, seed {seed}")
