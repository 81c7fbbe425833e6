"""The compiled extension gil_megatron._C (csrc/): loading it registers torch.ops.gil_megatron.*, and
``kernel_backend(device)`` says which implementation of the ops runs for tensors on a device:

    "cpu"        C++ kernels (OpenMP over rows, vectorised online softmax), csrc/logprob/logprob_cpu.cpp
    "cuda"       CUDA kernels, csrc/logprob/logprob_cuda.cu
    "reference"  the readable pure-torch code beside each op (ops/logprob.py, ops/kl.py); used
                 when gil_megatron._C is not built, with one warning. GIL_MEGATRON_REQUIRE_KERNEL=1
                 turns that fallback into an error (CI sets it).

The dispatcher picks the CPU or CUDA kernel from the tensors' device: the ops have no device branches.
"""

import os
import warnings
from typing import Dict, Optional, Tuple

import torch

try:  # loading the library registers torch.ops.gil_megatron.*
    from gil_megatron import _C  # noqa: F401

    HAVE_KERNEL = True
    _KERNEL_IMPORT_ERROR: Optional[BaseException] = None
except ImportError as _err:  # not built
    HAVE_KERNEL = False
    _KERNEL_IMPORT_ERROR = _err

REQUIRE_KERNEL_ENV = "GIL_MEGATRON_REQUIRE_KERNEL"
BUILD_COMMAND = "pip install -e . --no-build-isolation"
_warned_fallback = False

__all__ = ["BUILD_COMMAND", "HAVE_KERNEL", "REQUIRE_KERNEL_ENV", "backend_for", "kernel_backend"]


_BACKEND_CACHE: Dict[Tuple[bool, str], str] = {}


def kernel_backend(device) -> str:
    """Which implementation runs for tensors on ``device``: "cuda", "cpu" or "reference"."""
    device_type = torch.device(device).type
    key = (HAVE_KERNEL, device_type)
    if key not in _BACKEND_CACHE:  # asked on every call: keep the dispatcher lookup out of the hot path
        has = HAVE_KERNEL and device_type in ("cpu", "cuda") and torch._C._dispatch_has_kernel_for_dispatch_key(
            "gil_megatron::logprob_partials", "CUDA" if device_type == "cuda" else "CPU"
        )
        _BACKEND_CACHE[key] = device_type if has else "reference"
    return _BACKEND_CACHE[key]


def _why_no_kernel(device: torch.device) -> str:
    if not HAVE_KERNEL:
        return f"the compiled extension gil_megatron._C could not be imported ({_KERNEL_IMPORT_ERROR})"
    return f"gil_megatron._C was built without kernels for {device.type} tensors"


def backend_for(device: torch.device) -> str:
    """kernel_backend(), plus the one-time warning (or the error under GIL_MEGATRON_REQUIRE_KERNEL=1)."""
    global _warned_fallback
    backend = kernel_backend(device)
    if backend != "reference":
        return backend
    why = _why_no_kernel(device)
    if os.environ.get(REQUIRE_KERNEL_ENV, "0") == "1":
        raise RuntimeError(
            f"{REQUIRE_KERNEL_ENV}=1 but {why}. Build it from the repository root with `{BUILD_COMMAND}`"
            " (with nvcc on PATH / CUDA_HOME set for the CUDA kernels)."
        )
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"gil_megatron: {why}; falling back to the pure-torch reference for log-probs and KL "
            f"(slower, materialises [tokens, vocab] fp32). Build the kernels with `{BUILD_COMMAND}`.",
            RuntimeWarning,
            stacklevel=3,
        )
    return backend
