"""Training checkpoints through megatron-core's dist_checkpointing: written atomically, found again
by ``resume=auto``, rotated by keep-last-N, and loadable at another TP / PP / DP layout.

    RUN_DIR/checkpoints/iter_0000040/
        dist/                         megatron dist_checkpointing, torch_dist format: per trained model
                                      its weights, optimizer (Adam moments; with mixed precision the
                                      fp32 main weights; the distributed optimizer's sharded state in
                                      megatron's fully_reshardable form) and LR scheduler
        actor/ critic/ model/         model directories (our safetensors format + tokenizer files):
                                      what tools, evaluation, --to-hf and new runs load (with a
                                      virtual pipeline: one stage file per chunk, pp * V stages)
        rng/tp00_pp000_dp000.json     RNG states (and per-rank trainer state) of that rank, as JSON
        trainer_state.json            iteration, layout, data cursor, controllers (rank 0)
        COMPLETE                      written last; a directory without it is never picked

All ranks write into ``.tmp-iter_N``; after a barrier rank 0 writes the state and the marker,
fsyncs and renames. A crash at any point leaves the previous checkpoint as the latest complete one.

Resuming at another layout: megatron reshards the weights and the optimizer state (each tensor is
saved with its global shape and this rank's offsets; layers under their global index, so a virtual
pipeline's chunks save the same keys as a plain pipeline's stages). The RNG states belong to one rank of one
layout, so they are restored only when the layout is unchanged; otherwise every rank keeps the
seeded state of a fresh start (bit-identical continuation is then not possible, the math is the same).

Nothing in a checkpoint is unpickled as arbitrary Python: the JSON files are JSON, the torch_dist
metadata is read with an allow-list unpickler first, and megatron's common state (the one byte
entry, which torch's load planner unpickles with ``weights_only=False``) is checked with
``weights_only=True`` before megatron loads it; no other byte entry is written or accepted.
"""

import io
import json
import os
import pickle
import queue
import random
import re
import shutil
from typing import Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from gil_megatron.models.convert import copy_tokenizer_files
from gil_megatron.models.weights import CheckpointError, model_dir_stages, save_model_weights, write_meta
from gil_megatron.parallel import collectives
from gil_megatron.parallel.distributed import ParallelLayout
from gil_megatron.training import faults

CKPT_DIR = "checkpoints"
COMPLETE = "COMPLETE"
DIST_DIR = "dist"
FORMAT = "torch_dist"
_ITER = re.compile(r"^iter_(\d{7})$")


def _barrier():
    if dist.is_initialized():
        collectives.barrier(collectives.world_group())


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, CKPT_DIR)


def complete_checkpoints(run_dir: str):
    """Complete checkpoint directories, oldest first."""
    root = checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _ITER.match(name)
        if m and os.path.isfile(os.path.join(root, name, COMPLETE)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str) -> Optional[str]:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_resume(run_dir: str, resume: str) -> Optional[str]:
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    if not os.path.isfile(os.path.join(resume, COMPLETE)):
        raise CheckpointError(f"checkpoint.resume={resume}: not a complete checkpoint (no {COMPLETE} marker)")
    return resume


def all_finite(models: Dict[str, torch.nn.Module]) -> bool:
    ok = torch.tensor(1.0, device=next(iter(models.values())).parameters().__next__().device)
    for model in models.values():
        for p in model.parameters():
            if not torch.isfinite(p.detach()).all():
                ok.zero_()
                break
    if dist.is_initialized():
        collectives.all_reduce(ok, dist.group.WORLD, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def _rank_file(layout: ParallelLayout) -> str:
    return f"tp{layout.tp_rank:02d}_pp{layout.pp_rank:03d}_dp{layout.dp_rank:03d}.json"


def _sharded_state(trainables: Dict[str, object], is_loading: bool) -> dict:
    return {name: t.sharded_state_dict(prefix=f"{name}.", is_loading=is_loading) for name, t in trainables.items()}


def save_checkpoint(run_dir: str, iteration: int, layout: ParallelLayout, models: Dict[str, torch.nn.Module],
                    trainables: Dict[str, object], trainer_state: dict, keep_last: int,
                    tokenizer_dir: Optional[str] = None, rank_state: Optional[dict] = None) -> str:
    """Write one checkpoint collectively (every rank calls this). Returns its directory.

    ``models``: name -> model written as a model directory (with ``tokenizer_dir``'s files);
    ``trainables``: name -> optim.Trainable whose weights, optimizer and scheduler go to dist/;
    ``trainer_state``: JSON-able, rank 0's; ``rank_state``: JSON-able, this rank's (restored only at
    the same layout, like the RNG)."""
    from megatron.core import dist_checkpointing

    if not all_finite(models):
        raise FloatingPointError(f"refusing to checkpoint iteration {iteration}: the weights hold NaN/Inf")
    root = checkpoint_root(run_dir)
    final = os.path.join(root, f"iter_{iteration:07d}")
    tmp = os.path.join(root, f".tmp-iter_{iteration:07d}")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        for sub in list(models) + [DIST_DIR, "rng"]:
            os.makedirs(os.path.join(tmp, sub), exist_ok=True)
    _barrier()
    if layout.dp_rank == 0:
        for name, model in models.items():
            save_model_weights(model, os.path.join(tmp, name), layout.tp_rank, layout.pp_rank)
            if layout.tp_rank == 0 and layout.pp_rank == 0:  # a virtual pipeline's chunks are stages here
                write_meta(os.path.join(tmp, name), model.arch, model.role, layout.tp, model_dir_stages(model),
                           source=f"training checkpoint, iteration {iteration}")
                if tokenizer_dir:
                    copy_tokenizer_files(tokenizer_dir, os.path.join(tmp, name))
    _write_results_in_process()
    dist_checkpointing.save(_sharded_state(trainables, is_loading=False), os.path.join(tmp, DIST_DIR),
                            async_sharded_save=False)
    with open(os.path.join(tmp, "rng", _rank_file(layout)), "w") as f:
        json.dump({"rng": rng_state(), "rank_state": rank_state or {}}, f)
    faults.maybe_fail("during_save", iteration)
    _barrier()
    if _rank() == 0:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"iteration": iteration, "format": FORMAT,
                       "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "vp": layout.vp},
                       **trainer_state}, f, indent=2)
        for dirpath, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(dirpath, name), "rb") as fh:
                    os.fsync(fh.fileno())
        with open(os.path.join(tmp, COMPLETE), "w") as f:
            f.write(f"{iteration}\n")
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _write_results_in_process() -> None:
    """Our saves are synchronous: megatron's writer threads report to a results queue read in this
    same process. Megatron nonetheless creates that queue through a ``multiprocessing.Manager``, a
    server process that outlives a SIGKILLed rank and keeps the launcher's stdout/stderr open (so
    torchrun's caller never sees EOF). A plain in-process queue does the same job without the orphan."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def load_checkpoint(path: str, layout: ParallelLayout, trainables: Dict[str, object]) -> dict:
    """Restore every rank's weights, optimizer and scheduler (at any layout) and, at the saved
    layout, the RNG. Returns the trainer state, with ``rank_state`` (this rank's, or None when the
    layout changed) and ``same_layout``."""
    from megatron.core import dist_checkpointing

    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is in an older checkpoint format (before {FORMAT}); start a new run from "
                              f"its model directories (e.g. models.actor={os.path.join(path, 'actor')})")
    dist_dir = os.path.join(path, DIST_DIR)
    check_loadable_without_code(dist_dir)
    loaded = dist_checkpointing.load(_sharded_state(trainables, is_loading=True), dist_dir)
    for name, trainable in trainables.items():
        trainable.load_sharded(loaded[name], prefix=f"{name}.")
    saved = state["layout"]
    state["same_layout"] = ((saved["tp"], saved["pp"], saved["dp"], saved.get("vp", 1))
                            == (layout.tp, layout.pp, layout.dp, layout.vp))
    state["rank_state"] = None
    if state["same_layout"]:
        rng_path = os.path.join(path, "rng", _rank_file(layout))
        try:
            with open(rng_path) as f:
                rank = json.load(f)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{rng_path}: {exc}; the checkpoint is incomplete") from None
        set_rng_state(rank["rng"])
        state["rank_state"] = rank["rank_state"]
    return state


# ---- loading without running code -----------------------------------------------------------------
_DCP = "torch.distributed.checkpoint"
_ALLOWED_GLOBALS = {
    (f"{_DCP}.metadata", n) for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                      "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                      "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {(f"{_DCP}.planner", n) for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")} | {
    (f"{_DCP}.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Rebuilds torch.distributed.checkpoint metadata and nothing else."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                    torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it references {module}.{name}, which is not checkpoint metadata")


def check_loadable_without_code(dist_dir: str) -> None:
    """Refuse (one line) a torch_dist directory whose loading would unpickle anything but data."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    meta_path = os.path.join(dist_dir, ".metadata")
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{meta_path} is missing: the checkpoint is incomplete")
    try:
        with open(meta_path, "rb") as f:
            meta = _MetadataUnpickler(f).load()
    except Exception as exc:  # any failure to parse is a refusal, never a traceback
        raise CheckpointError(f"{meta_path} is not plain checkpoint metadata ({_first_line(exc)}); refusing to load "
                              f"it") from None
    # torch's load planner torch.loads byte entries with weights_only=False: megatron's one byte entry,
    # its common state, is checked here with weights_only=True first; we write no other
    for key, value in getattr(meta, "state_dict_metadata", {}).items():
        if not isinstance(value, BytesStorageMetadata):
            continue
        if not key.startswith("common_state"):
            raise CheckpointError(f"{meta_path} declares a pickled object {key!r}, which gil_megatron never writes; "
                                  f"refusing to load it")
        for index, info in meta.storage_data.items():
            if index.fqn != key:
                continue
            data_path = os.path.join(dist_dir, os.path.basename(info.relative_path))
            if getattr(info, "transform_descriptors", None):
                raise CheckpointError(f"{data_path}: entry {key!r} is transformed ({info.transform_descriptors}), "
                                      f"which gil_megatron never writes; refusing to load it")
            with open(data_path, "rb") as f:
                f.seek(info.offset)
                raw = f.read(info.length)
            safe_torch_load(io.BytesIO(raw), f"{data_path} (entry {key!r})")
    common = os.path.join(dist_dir, "common.pt")  # megatron's older layout of the same state
    if os.path.isfile(common):
        safe_torch_load(common)


def safe_torch_load(source, name: Optional[str] = None):
    """torch.load that only rebuilds tensors and plain containers (never runs pickled code): data
    referencing anything else is refused with one line."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{name or source} is not plain checkpoint data ({_first_line(exc)}); refusing to "
                              f"load it") from None


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = next((line for line in lines if "GLOBAL" in line or "references" in line), lines[0] if lines else "")
    return f"{type(exc).__name__}: {detail[:200]}"


# ---- RNG as JSON ------------------------------------------------------------------------------
def _bytes_of(t: torch.Tensor) -> list:
    return t.to(torch.uint8).tolist()


def rng_state() -> dict:
    """python / numpy / torch / megatron-tracker (/ CUDA) generator states as JSON-able lists."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, np_gauss = np.random.get_state()
    state = {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, np_gauss],
             "torch": _bytes_of(torch.get_rng_state()),
             "tracker": {k: _bytes_of(v) for k, v in get_cuda_rng_tracker().get_states().items()}}
    if torch.cuda.is_available():
        state["cuda"] = _bytes_of(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, np_gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, np_gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    get_cuda_rng_tracker().set_states({k: torch.tensor(v, dtype=torch.uint8) for k, v in state["tracker"].items()})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))
