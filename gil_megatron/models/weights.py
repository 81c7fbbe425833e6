"""Model weights on disk: HF safetensors in, our TP/PP-sharded directory out, and back.

Our directory (written atomically: a temporary sibling directory, then one rename):

    gil_megatron.json                 format version, role, architecture, tp, pp
    mp_rank_{TT}_{PPP}.safetensors    the megatron state dict of tensor rank TT, pipeline rank PPP

A rank whose layout equals the directory's reads its own file. Any other layout is resharded on
load: the stage's TP shards are merged to HF tensors and re-split (exact, just slower).

Virtual pipeline (models/chunks.py): a model chunk is one stage of a plain pipeline of pp * V
stages. A run with virtual_pp = V writes its model directory as exactly that (pp * V stage files,
``pp`` = pp * V in gil_megatron.json), so it loads directly at the same layout and reshards like
any other directory elsewhere.
"""

import json
import os
import shutil
import tempfile
from typing import Dict, Iterator, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gil_megatron.models import hf_mapping
from gil_megatron.models.chunks import model_chunks, stage_of_chunk
from gil_megatron.models.config import ROLES, LlamaArchConfig

META_FILE = "gil_megatron.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not fit the model asked for."""


def shard_file(tp_rank: int, pp_rank: int) -> str:
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}.safetensors"


# ---- Hugging Face directories ----------------------------------------------------------------
class HFReader:
    """Lazily reads tensors from a HF directory (model.safetensors or a sharded index)."""

    def __init__(self, hf_dir: str):
        if not os.path.isdir(hf_dir):
            raise CheckpointError(f"--load-dir {hf_dir}: no such directory")
        self.hf_dir = hf_dir
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                self.file_of = {k: os.path.join(hf_dir, v) for k, v in json.load(f)["weight_map"].items()}
        elif os.path.isfile(single):
            with safe_open(single, "pt") as f:
                self.file_of = {k: single for k in f.keys()}
        else:
            raise CheckpointError(
                f"{hf_dir} has no model.safetensors or model.safetensors.index.json; "
                "save the model with save_pretrained(..., safe_serialization=True)"
            )
        self._handles = {}

    def has(self, name: str) -> bool:
        return name in self.file_of

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.file_of:
            raise CheckpointError(f"{self.hf_dir}: tensor {name!r} not found in the checkpoint")
        path = self.file_of[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, "pt")
        return self._handles[path].get_tensor(name)

    def close(self):
        self._handles.clear()


# ---- our sharded directory -------------------------------------------------------------------
def read_meta(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, META_FILE)
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"checkpoint directory {ckpt_dir} does not exist")
    if not os.path.isfile(path):
        roles = [r for r in ROLES if os.path.isfile(os.path.join(ckpt_dir, r, META_FILE))]
        if roles:  # a training checkpoint (iter_N/) holds one model directory per role
            raise CheckpointError(
                f"{ckpt_dir} is a training checkpoint holding {', '.join(roles)}: pass one model directory, "
                f"e.g. {os.path.join(ckpt_dir, roles[0])}"
            )
        raise CheckpointError(
            f"{ckpt_dir} is not a gil_megatron checkpoint (no {META_FILE}); convert a HF model "
            "with tools/convert_hf_checkpoint.py first"
        )
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {meta.get('format_version')} != {FORMAT_VERSION}")
    return meta


def arch_of(ckpt_dir: str) -> Tuple[LlamaArchConfig, str, int, int]:
    meta = read_meta(ckpt_dir)
    return LlamaArchConfig.from_dict(meta["arch"]), meta["role"], meta["tp"], meta["pp"]


def atomic_directory(final_dir: str):
    """Context manager yielding a temporary directory that replaces ``final_dir`` on success."""
    return _AtomicDir(final_dir)


class _AtomicDir:
    def __init__(self, final_dir: str):
        self.final_dir = os.path.abspath(final_dir)

    def __enter__(self) -> str:
        parent = os.path.dirname(self.final_dir)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(self.final_dir) + "-", dir=parent)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        _fsync_dir(self.tmp)
        if os.path.exists(self.final_dir):
            old = self.final_dir + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(self.final_dir, old)
            os.rename(self.tmp, self.final_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.final_dir)
        return False


def _fsync_dir(path: str) -> None:
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            with open(full, "rb") as f:
                os.fsync(f.fileno())


def write_meta(out_dir: str, arch: LlamaArchConfig, role: str, tp: int, pp: int, **extra) -> None:
    meta = {"format_version": FORMAT_VERSION, "role": role, "arch": arch.to_dict(), "tp": tp, "pp": pp,
            "padded_vocab_size": arch.padded_vocab_size(tp), **extra}
    with open(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)


def save_shard(out_dir: str, tp_rank: int, pp_rank: int, tensors: Dict[str, torch.Tensor]) -> None:
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items() if not k.endswith("_extra_state")}
    save_file(clean, os.path.join(out_dir, shard_file(tp_rank, pp_rank)))


def load_shard(ckpt_dir: str, tp_rank: int, pp_rank: int) -> Dict[str, torch.Tensor]:
    path = os.path.join(ckpt_dir, shard_file(tp_rank, pp_rank))
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def hf_tensors_of_stage(ckpt_dir: str, pp_rank: int) -> Iterator[Tuple[str, torch.Tensor]]:
    """One pipeline stage of a sharded checkpoint as HF-named tensors (its TP shards merged)."""
    arch, role, tp, pp = arch_of(ckpt_dir)
    shards = {t: load_shard(ckpt_dir, t, pp_rank) for t in range(tp)}
    yield from hf_mapping.hf_from_megatron_stage(arch, role, shards, pp_rank, pp)


def hf_tensors_of_checkpoint(ckpt_dir: str) -> Iterator[Tuple[str, torch.Tensor]]:
    """Stream a sharded checkpoint as HF-named tensors, one pipeline stage in memory at a time."""
    for pp_rank in range(arch_of(ckpt_dir)[3]):
        yield from hf_tensors_of_stage(ckpt_dir, pp_rank)


class CheckpointReader:
    """HF-named tensor reader over one of our checkpoints (used to reshard on load)."""

    def __init__(self, ckpt_dir: str):
        self.tensors = dict(hf_tensors_of_checkpoint(ckpt_dir))

    def has(self, name: str) -> bool:
        return name in self.tensors

    def __call__(self, name: str) -> torch.Tensor:
        return self.tensors[name]


# ---- into / out of a live model --------------------------------------------------------------
def state_for_rank(arch: LlamaArchConfig, role: str, read, tp_rank: int, tp: int, pp_rank: int, pp: int,
                   has=None, seed: int = 0) -> Dict[str, torch.Tensor]:
    """One rank's megatron state dict from an HF-named reader; missing score heads start fresh."""
    has = has or (lambda name: True)
    sd = dict(hf_mapping.megatron_shard_from_hf(arch, role, read, tp_rank, tp, pp_rank, pp, has_head=has))
    if role != "actor" and pp_rank == pp - 1 and "output_layer.score.weight" not in sd:
        sd["output_layer.score.weight"] = hf_mapping.fresh_score_head(arch, role, seed)
    return sd


def load_into_model(model: torch.nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Copy a rank's state into the model; every parameter must be covered and match in shape."""
    own = model.state_dict()
    for name, tensor in state.items():
        if name not in own:
            raise CheckpointError(f"checkpoint tensor {name!r} has no parameter in the model ({type(model).__name__})")
        if tuple(own[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"shape of {name!r}: checkpoint {tuple(tensor.shape)} vs model {tuple(own[name].shape)}; "
                "the checkpoint's architecture does not match the configured model"
            )
    missing = [k for k in own if k not in state and not k.endswith("_extra_state")]
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} model tensors, e.g. {missing[:3]}")
    model.load_state_dict(state, strict=False)


def model_state_for_save(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state") and v is not None}


def load_model_weights(model: torch.nn.Module, ckpt_dir: str, tp_rank: int, tp: int, pp_rank: int, pp: int) -> None:
    """Load this rank's weights (every chunk of ``model``) from a checkpoint of any layout,
    resharding when it differs.

    The model's role may differ from the checkpoint's: a critic starts from a reward model (its
    score row seeds the value and task-value rows, group rows start fresh) or from an LM (fresh head); a reward
    model starts from an LM (fresh head)."""
    arch, role, ck_tp, ck_pp = arch_of(ckpt_dir)
    chunks = model_chunks(model)
    stages = [stage_of_chunk(chunk, pp_rank) for chunk in chunks]  # [(stage, stages)]
    target = chunks[0].role
    if (ck_tp, ck_pp) == (tp, stages[0][1]) and role == target:
        for chunk, (stage, _) in zip(chunks, stages):
            load_into_model(chunk, load_shard(ckpt_dir, tp_rank, stage))
        return
    if target == "actor" and role != "actor":
        raise CheckpointError(f"{ckpt_dir} holds a {role} model (no LM head); an actor needs a causal-LM checkpoint")
    reader = CheckpointReader(ckpt_dir)
    read, has = reader, (lambda name: role == target)
    if target == "critic" and role == "reward":
        head = hf_mapping.critic_head_from_reward(chunks[0].arch, reader("score.weight"))
        read, has = (lambda name: head if name == "score.weight" else reader(name)), (lambda name: True)
    for chunk, (stage, n_stages) in zip(chunks, stages):
        load_into_model(chunk, state_for_rank(chunk.arch, target, read, tp_rank, tp, stage, n_stages, has=has))


def save_model_weights(model: torch.nn.Module, out_dir: str, tp_rank: int, pp_rank: int) -> None:
    """Write this rank's shards (one per chunk, named by its stage; ``model_dir_stages``) into
    ``out_dir`` (a directory the caller makes atomic)."""
    for chunk in model_chunks(model):
        save_shard(out_dir, tp_rank, stage_of_chunk(chunk, pp_rank)[0], model_state_for_save(chunk))


def model_dir_stages(model: torch.nn.Module) -> int:
    """The ``pp`` that save_model_weights' directory declares: pipeline size x chunks per rank."""
    chunk = model_chunks(model)[0]
    return stage_of_chunk(chunk, 0)[1]


__all__ = [
    "CheckpointError", "HFReader", "CheckpointReader", "ROLES", "read_meta", "arch_of", "write_meta",
    "save_shard", "load_shard", "hf_tensors_of_stage", "atomic_directory", "state_for_rank", "load_into_model",
    "load_model_weights", "save_model_weights", "model_dir_stages", "hf_tensors_of_checkpoint", "shard_file",
]
