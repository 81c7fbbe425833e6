"""Model weights on disk: HF safetensors in, our TP/PP-sharded directory out, and back.

A model directory is either format (``checkpoint_format`` decides, in one place): a Hugging Face
directory (config.json + model.safetensors or a sharded index) is loaded at the run's layout in
memory, each rank reading only its own shard's slices; our directory (written atomically: a
temporary sibling directory, then one rename):

    gil_megatron.json                 format version, role, architecture, tp, pp
    mp_rank_{TT}_{PPP}.safetensors    the megatron state dict of tensor rank TT, pipeline rank PPP

A rank whose layout equals the directory's reads its own file. Any other layout is resharded on
load: the stage's TP shards are merged to HF tensors and re-split (exact, just slower).

Virtual pipeline (models/chunks.py): a model chunk is one stage of a plain pipeline of pp * V
stages. A run with virtual_pp = V writes its model directory as exactly that (pp * V stage files,
``pp`` = pp * V in gil_megatron.json), so it loads directly at the same layout and reshards like
any other directory elsewhere.
"""

import functools
import json
import os
import shutil
import tempfile
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gil_megatron.models import hf_mapping
from gil_megatron.models.chunks import model_chunks, stage_of_chunk
from gil_megatron.models.config import CRITIC_ROWS, ROLES, LlamaArchConfig

META_FILE = "gil_megatron.json"
FORMAT_VERSION = 1
OURS, HF = "gil_megatron", "hf"
HF_CONFIG, HF_SINGLE, HF_INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not fit the model asked for."""


def shard_file(tp_rank: int, pp_rank: int) -> str:
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}.safetensors"


# ---- which format -----------------------------------------------------------------------------
def checkpoint_format(path: str, key: Optional[str] = None) -> str:
    """OURS or HF for a model directory, or a one-line CheckpointError saying what ``path`` (the
    value of config key ``key``, when given) holds instead."""
    what = f"{key}={path}" if key else path
    if not os.path.isdir(path):
        raise CheckpointError(f"{what}: model directory does not exist")
    if os.path.isfile(os.path.join(path, META_FILE)):
        return OURS
    if os.path.isfile(os.path.join(path, HF_CONFIG)) and (
            os.path.isfile(os.path.join(path, HF_SINGLE)) or os.path.isfile(os.path.join(path, HF_INDEX))):
        return HF
    roles = [r for r in ROLES if os.path.isfile(os.path.join(path, r, META_FILE))]
    if roles:  # a training checkpoint (iter_N/) holds one model directory per role
        raise CheckpointError(
            f"{what} is a training checkpoint holding {', '.join(roles)}: pass one model directory, "
            f"e.g. {os.path.join(path, roles[0])}"
        )
    names = sorted(os.listdir(path))
    found = "it is empty" if not names else "it holds " + ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
    raise CheckpointError(
        f"{what} is neither a gil_megatron model directory ({META_FILE}) nor a Hugging Face one "
        f"({HF_CONFIG} with {HF_SINGLE} or {HF_INDEX}): {found}"
    )


# ---- Hugging Face directories ----------------------------------------------------------------
class HFReader:
    """Lazily reads tensors, or slices of them, from a HF directory (model.safetensors or a sharded
    index): ``reader(name, index)`` reads only ``tensor[index]`` from the file (safetensors'
    get_slice), so a TP rank never holds the whole matrix."""

    def __init__(self, hf_dir: str):
        if not os.path.isdir(hf_dir):
            raise CheckpointError(f"--load-dir {hf_dir}: no such directory")
        self.hf_dir = hf_dir
        index = os.path.join(hf_dir, HF_INDEX)
        single = os.path.join(hf_dir, HF_SINGLE)
        if os.path.isfile(index):
            with open(index) as f:
                self.file_of = {k: os.path.join(hf_dir, v) for k, v in json.load(f)["weight_map"].items()}
        elif os.path.isfile(single):
            with safe_open(single, "pt") as f:
                self.file_of = {k: single for k in f.keys()}
        else:
            raise CheckpointError(
                f"{hf_dir} has no {HF_SINGLE} or {HF_INDEX}; save the model with "
                "save_pretrained(..., safe_serialization=True)"
            )
        self._handles = {}

    def has(self, name: str) -> bool:
        return name in self.file_of

    def _slice(self, name: str):
        if name not in self.file_of:
            raise CheckpointError(f"{self.hf_dir}: tensor {name!r} not found in the checkpoint")
        path = self.file_of[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, "pt")
        return self._handles[path].get_slice(name)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def __call__(self, name: str, index: hf_mapping.Index = None) -> torch.Tensor:
        part = self._slice(name)
        return part[:] if index is None else part[index]

    def close(self):
        self._handles.clear()


def hf_role(reader: HFReader) -> str:
    """The role a HF checkpoint holds: a score head of 1 row is a reward model, of more a critic
    (value, task value, M groups: config.CRITIC_ROWS); without one, a causal LM."""
    if not reader.has("score.weight"):
        return "actor"
    return "reward" if reader.shape("score.weight")[0] == 1 else "critic"


def hf_arch(hf_dir: str) -> Tuple[LlamaArchConfig, str]:
    """(architecture, role) of a HF directory; a critic's num_groups is its score head's."""
    arch = LlamaArchConfig.from_hf_dir(hf_dir)
    reader = HFReader(hf_dir)
    role = hf_role(reader)
    if role == "critic":
        arch.num_groups = reader.shape("score.weight")[0] - len(CRITIC_ROWS)
    reader.close()
    return arch, role


# ---- our sharded directory -------------------------------------------------------------------
def read_meta(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, META_FILE)
    if checkpoint_format(ckpt_dir) != OURS:
        raise CheckpointError(f"{ckpt_dir} is a Hugging Face directory, not a gil_megatron one (no {META_FILE})")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {meta.get('format_version')} != {FORMAT_VERSION}")
    return meta


def arch_of(ckpt_dir: str, key: Optional[str] = None) -> Tuple[LlamaArchConfig, str, int, int]:
    """(architecture, role, tp, pp) of a model directory of either format (a HF one is unsharded:
    tp = pp = 1). ``key``: the config key that named the directory, for the error message."""
    if checkpoint_format(ckpt_dir, key) == HF:
        return (*hf_arch(ckpt_dir), 1, 1)
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
    """HF-named tensor reader over one of our checkpoints (used to reshard on load); the whole
    checkpoint is read on first use."""

    def __init__(self, ckpt_dir: str):
        self.ckpt_dir = ckpt_dir

    @functools.cached_property
    def tensors(self) -> Dict[str, torch.Tensor]:
        return dict(hf_tensors_of_checkpoint(self.ckpt_dir))

    def has(self, name: str) -> bool:
        return name in self.tensors

    def __call__(self, name: str, index: hf_mapping.Index = None) -> torch.Tensor:
        return hf_mapping.dict_reader(self.tensors)(name, index)

    def close(self):
        self.__dict__.pop("tensors", None)


# ---- into / out of a live model --------------------------------------------------------------
def role_reader(arch: LlamaArchConfig, target: str, source: str, read: hf_mapping.Reader,
                has: Callable[[str], bool], where: str, seed: int = 0) -> Tuple[hf_mapping.Reader, bool, str]:
    """How a ``target``-role model takes its weights from a checkpoint holding a ``source`` role
    (``read`` / ``has`` over its HF-named tensors): (reader, whether its score head is loaded, a
    one-line note). A critic starts from a reward model (its score row seeds the value and
    task-value rows, the group rows start fresh) or from an LM (fresh head); a reward model from
    an LM (fresh head)."""
    if target == "actor":
        if source != "actor":
            raise CheckpointError(f"{where} holds a {source} model (no LM head); an actor needs a causal-LM checkpoint")
        if not arch.tie_word_embeddings and not has("lm_head.weight"):
            raise CheckpointError(f"{where} has no lm_head.weight and tie_word_embeddings is false: it is not a "
                                  "causal LM; load it as a reward model or critic")
        return read, True, "actor: trunk and " + ("tied embedding / LM head" if arch.tie_word_embeddings
                                                  else "lm_head") + " loaded"
    if source == "actor":
        return read, False, f"{target}: trunk loaded from a causal LM; the score head is freshly initialised"
    rows = read("score.weight").shape[0]
    want = arch.score_rows(target)
    if rows == want:
        return read, True, f"{target}: trunk and score head loaded"
    if target == "critic" and rows == 1:
        head = hf_mapping.critic_head_from_reward(arch, read("score.weight"), seed)

        def with_value_rows(name, index=None):
            return head if name == "score.weight" else read(name, index)
        return with_value_rows, True, ("critic: trunk, value and task-value rows loaded from a reward model; the "
                                       "group head is freshly initialised")
    groups = f" with num_groups={arch.num_groups}" if target == "critic" else ""
    raise CheckpointError(f"{where}: shape of 'output_layer.score.weight': the checkpoint's score.weight has "
                          f"{rows} rows but a {target}{groups} needs {want}")


def state_for_rank(arch: LlamaArchConfig, role: str, read: hf_mapping.Reader, tp_rank: int, tp: int, pp_rank: int,
                   pp: int, load_head: bool = True, seed: int = 0) -> Dict[str, torch.Tensor]:
    """One rank's megatron state dict from an HF-named reader; a score head not loaded starts fresh."""
    sd = dict(hf_mapping.megatron_shard_from_hf(arch, role, read, tp_rank, tp, pp_rank, pp, load_head=load_head))
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
    """Load this rank's weights (every chunk of ``model``) from a model directory of either format:
    ours at the same layout shard by shard, ours at another layout by resharding, a Hugging Face
    one by reading this rank's slices of its tensors. The model's role may differ from the
    checkpoint's (``role_reader``)."""
    chunks = model_chunks(model)
    stages = [stage_of_chunk(chunk, pp_rank) for chunk in chunks]  # [(stage, stages)]
    target = chunks[0].role
    if checkpoint_format(ckpt_dir) == HF:
        reader = HFReader(ckpt_dir)
        source = hf_role(reader)
    else:
        _, source, ck_tp, ck_pp = arch_of(ckpt_dir)
        if (ck_tp, ck_pp) == (tp, stages[0][1]) and source == target:
            for chunk, (stage, _) in zip(chunks, stages):
                load_into_model(chunk, load_shard(ckpt_dir, tp_rank, stage))
            return
        reader = CheckpointReader(ckpt_dir)
    read, load_head, _ = role_reader(chunks[0].arch, target, source, reader, reader.has, ckpt_dir)
    for chunk, (stage, n_stages) in zip(chunks, stages):
        load_into_model(chunk, state_for_rank(chunk.arch, target, read, tp_rank, tp, stage, n_stages,
                                              load_head=load_head))
    reader.close()


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
    "CheckpointError", "HFReader", "CheckpointReader", "ROLES", "read_meta", "arch_of", "write_meta", "OURS", "HF",
    "checkpoint_format", "hf_role", "hf_arch", "role_reader",
    "save_shard", "load_shard", "hf_tensors_of_stage", "atomic_directory", "state_for_rank", "load_into_model",
    "load_model_weights", "save_model_weights", "model_dir_stages", "hf_tensors_of_checkpoint", "shard_file",
]
