"""Training checkpoints: every rank's weights, optimizer, scheduler and RNG, plus the trainer state;
written atomically, found again by ``resume=auto``, rotated by keep-last-N.

    RUN_DIR/checkpoints/iter_0000040/
        actor/  critic/ ...           model directories in the usual sharded format (loadable as models)
        optim/<name>_tp00_pp000_dp000.pt   optimizer + LR scheduler of that rank (DP rank 0 only
                                      unless the optimizer is sharded across DP)
        rng/rank_00000.pt             python / numpy / torch RNG states of every rank
        trainer_state.json            iteration, data cursor, controllers (rank 0)
        COMPLETE                      written last; a directory without it is never picked

All ranks write into ``.tmp-iter_N``; after a barrier rank 0 writes the state and the marker,
fsyncs and renames. A crash at any point leaves the previous checkpoint as the latest complete one.
"""

import json
import os
import random
import re
import shutil
from typing import Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from gil_megatron import faults
from gil_megatron.distributed import ParallelLayout
from gil_megatron.models.weights import CheckpointError, model_state_for_save, save_shard, write_meta

CKPT_DIR = "checkpoints"
COMPLETE = "COMPLETE"
_ITER = re.compile(r"^iter_(\d{7})$")


def _barrier():
    if dist.is_initialized():
        dist.barrier()


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
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def save_checkpoint(run_dir: str, iteration: int, layout: ParallelLayout, models: Dict[str, torch.nn.Module],
                    trainables: Dict[str, object], trainer_state: dict, keep_last: int,
                    shard_optimizer_across_dp: bool = False) -> str:
    """Write one checkpoint collectively (every rank calls this). Returns its directory."""
    if not all_finite(models):
        raise FloatingPointError(f"refusing to checkpoint iteration {iteration}: the weights hold NaN/Inf")
    root = checkpoint_root(run_dir)
    final = os.path.join(root, f"iter_{iteration:07d}")
    tmp = os.path.join(root, f".tmp-iter_{iteration:07d}")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        for sub in list(models) + ["optim", "rng"]:
            os.makedirs(os.path.join(tmp, sub), exist_ok=True)
    _barrier()
    if layout.dp_rank == 0:
        for name, model in models.items():
            save_shard(os.path.join(tmp, name), layout.tp_rank, layout.pp_rank, model_state_for_save(model))
            if layout.tp_rank == 0 and layout.pp_rank == 0:
                write_meta(os.path.join(tmp, name), model.arch, model.role, layout.tp, layout.pp,
                           source=f"training checkpoint, iteration {iteration}")
    if layout.dp_rank == 0 or shard_optimizer_across_dp:
        for name, trainable in trainables.items():
            path = os.path.join(tmp, "optim", f"{name}_tp{layout.tp_rank:02d}_pp{layout.pp_rank:03d}_dp{layout.dp_rank:03d}.pt")
            torch.save(trainable.state_dict(), path)
    torch.save(rng_state(), os.path.join(tmp, "rng", f"rank_{_rank():05d}.pt"))
    faults.maybe_fail("during_save", iteration)
    _barrier()
    if _rank() == 0:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"iteration": iteration, "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp},
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


def load_checkpoint(path: str, layout: ParallelLayout, models: Dict[str, torch.nn.Module],
                    trainables: Dict[str, object], shard_optimizer_across_dp: bool = False) -> dict:
    """Restore every rank's weights, optimizer, scheduler and RNG; returns the trainer state."""
    from gil_megatron.models.weights import load_model_weights

    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    saved = state["layout"]
    if (saved["tp"], saved["pp"], saved["dp"]) != (layout.tp, layout.pp, layout.dp):
        raise CheckpointError(
            f"{path} was written with tp={saved['tp']} pp={saved['pp']} dp={saved['dp']} but this run has "
            f"tp={layout.tp} pp={layout.pp} dp={layout.dp}; resume with the same layout (or start a new run "
            f"from its model directories, which any layout can load)"
        )
    for name, model in models.items():
        load_model_weights(model, os.path.join(path, name), layout.tp_rank, layout.tp, layout.pp_rank, layout.pp)
    dp_rank = layout.dp_rank if shard_optimizer_across_dp else 0
    for name, trainable in trainables.items():
        optim_path = os.path.join(path, "optim", f"{name}_tp{layout.tp_rank:02d}_pp{layout.pp_rank:03d}_dp{dp_rank:03d}.pt")
        trainable.load_state_dict(safe_torch_load(optim_path))
    rng_path = os.path.join(path, "rng", f"rank_{_rank():05d}.pt")
    set_rng_state(safe_torch_load(rng_path))
    return state


def safe_torch_load(path: str):
    """torch.load that only rebuilds tensors and plain containers (never runs pickled code): a
    checkpoint file referencing anything else is refused with one line."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first else "")
        raise CheckpointError(f"{path} is not plain checkpoint data (it would run code when unpickled: "
                              f"{detail.strip()[:200]}); refusing to load it") from None


def rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # plain containers and tensors only, so that loading needs no unpickling of arbitrary objects
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "torch": torch.get_rng_state(),
             "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
