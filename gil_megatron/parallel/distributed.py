"""One entry point for torch.distributed + megatron parallel_state, and a clean teardown.

Launch under torchrun (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in the
environment). nccl with CUDA, gloo without; on CPU the megatron CUDA workarounds of
``gil_megatron.parallel.cpu_compat`` are applied first. Data parallelism is whatever the world size leaves
after tensor x pipeline: dp = world / (tp * pp).
"""

import datetime
import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from gil_megatron.parallel import cpu_compat


@dataclass(frozen=True)
class ParallelLayout:
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    vp: int = 1  # model chunks per pipeline rank (parallel.virtual_pp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def free_port() -> int:
    """A free TCP port on this host: MASTER_PORT for a run started without torchrun (a tool, a
    benchmark, a test's spawned ranks), so that it never collides with another job."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_layout(world_size: int, tp: int, pp: int) -> None:
    if tp < 1 or pp < 1:
        raise ValueError(f"parallel.tp={tp} and parallel.pp={pp} must be >= 1")
    if world_size % (tp * pp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by parallel.tp * parallel.pp = {tp}*{pp}; "
            f"launch a multiple of {tp * pp} ranks (NPROC / --nproc-per-node) or change the layout"
        )


def initialize(tp: int = 1, pp: int = 1, seed: int = 1234, timeout_minutes: int = 30,
               virtual_pp: int = 1) -> ParallelLayout:
    """Initialise the process group and megatron's model-parallel groups; seed every rank.
    ``virtual_pp`` > 1: every pipeline rank holds that many model chunks (interleaved schedule)."""
    from megatron.core import parallel_state, tensor_parallel

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    check_layout(world_size, tp, pp)
    if virtual_pp < 1 or (virtual_pp > 1 and pp < 2):
        raise ValueError(f"parallel.virtual_pp={virtual_pp} needs parallel.pp >= 2 (or set parallel.virtual_pp=1)")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        cpu_compat.apply()
        backend = "gloo"
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        timeout = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout,
                                store=_store_for_this_attempt(rank, world_size, timeout))
    if parallel_state.model_parallel_is_initialized():  # switching layouts in one process (tests)
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=virtual_pp if virtual_pp > 1 else None,
    )
    seed_everything(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return current_layout()


def _store_for_this_attempt(rank: int, world_size: int, timeout):
    """After a torchrun restart (--max-restarts) the rendezvous store still holds the keys of the
    dead attempt's process groups, and megatron's new groups reuse their names: gloo then connects
    to the dead workers' addresses. Every group of attempt N lives under its own key prefix."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0:
        return None  # plain env:// rendezvous
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=rank == 0 and not agent_store, timeout=timeout)
    return dist.PrefixStore(f"gil_megatron/attempt_{attempt}", store)


def current_layout() -> ParallelLayout:
    from megatron.core import parallel_state as ps

    return ParallelLayout(
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        vp=ps.get_virtual_pipeline_model_parallel_world_size() or 1,
    )


def seed_everything(seed: int) -> None:
    """Same seed on every rank: weights are built identically and sharded afterwards; sampling
    agrees across TP ranks. Data-parallel ranks differ through their data, not their seed."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
