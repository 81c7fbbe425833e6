"""The one place that silences known-harmless third-party output (applied when gil_megatron is imported).

Every entry (this list is all of it) is a message that says nothing the user can or should act
on in this engine: optional accelerators that are not installed (the CPU path and the local
megatron-core spec are the supported fallback), deprecation notes about megatron-core internals
that we do not call, and CUDA hints on a machine without CUDA. Anything not listed here is shown.

    GIL_MEGATRON_VERBOSE=1 (or --verbose on the launcher)   shows everything again

Python warnings are filtered with `warnings.filterwarnings` (message regex + category); messages
logged through `logging` get a filter on the emitting logger.
"""

import logging
import os
import re
import warnings

# (message regex, category) of warnings.warn calls; matched at the start of the message
WARNINGS = (
    (r"Transformer Engine and Apex are not installed", UserWarning),
    (r"Apex is not installed", UserWarning),
    (r"absl\.logging is not installed", UserWarning),
    (r"MimoModelConfig is experimental", UserWarning),
    (r"full scope is deprecated", UserWarning),  # megatron's cuda-graph default, unused on our path
    (r"When using async grad allreduce it is recommended to set the environment variable "
     r"CUDA_DEVICE_MAX_CONNECTIONS", UserWarning),
    (r"`torch\.distributed\.all_gather_into_tensor` is deprecated", FutureWarning),  # called inside megatron
    (r"`torch\.distributed\._all_gather_base` is a private function", FutureWarning),
    (r"`torch\.distributed\._reduce_scatter_base` is a private function", FutureWarning),
)

# logger name -> message regexes of `logging` records to drop
LOG_RECORDS = {
    "megatron.core.models.gpt.gpt_model": (r"GPTModel IS DEPRECATED",),
    "torch.utils.cpp_extension": (r"No CUDA runtime is found",),
    # logged by every torch_dist save, though ours are synchronous (the note is about async saves)
    "megatron.core.dist_checkpointing.strategies.torch": (r"MCore's async save is deprecated",),
}

_applied = False


def verbose() -> bool:
    return os.environ.get("GIL_MEGATRON_VERBOSE", "").strip().lower() not in ("", "0", "false", "no")


class _DropMessages(logging.Filter):
    def __init__(self, patterns):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(p.match(msg) for p in self.patterns)


def apply() -> None:
    """Install the filters once per process (idempotent); does nothing under GIL_MEGATRON_VERBOSE=1."""
    global _applied
    if _applied or verbose():
        return
    _applied = True
    for pattern, category in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    for name, patterns in LOG_RECORDS.items():
        logging.getLogger(name).addFilter(_DropMessages(patterns))
    # datasets' per-call progress bars ("Map: 100%", "Generating train split") and info lines
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
