"""Frozen-model offload: the reference model and the reward model live in host memory between uses.

    offload = FrozenOffload({"reference": reference, "reward_model": reward_model}, cfg.offload, device)
    with offload.resident("reference"):
        ref_logprobs = score_logprobs(reference, ...)

They only score, once per iteration, so outside that their weights need not take accelerator
memory: every parameter and buffer of an offloaded model gets a host copy once (pinned on a GPU, so
the copy onto the device is asynchronous and fast), and the module's tensors point at it. Inside
``resident`` the tensors are copied onto the device; on leaving, the module points at the host copy
again and the device copy is freed. The weights never change, so nothing is copied back.

On the CPU the device is the host: the moves are no-ops (``Tensor.to`` returns the same tensor),
and the code path still runs, which is what the CPU test checks. Peak device memory then holds the
trained models plus the largest offloaded model, not all of them (memory.estimate's ``offloaded``).
"""

from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from gil_megatron.config import OffloadConfig

OFFLOADABLE = ("reference", "reward_model")  # frozen models only: trained ones have gradients and optimizer state


def _tensors(model: torch.nn.Module) -> List[torch.Tensor]:
    """Every parameter and buffer once (a tied weight is one Parameter shared by two modules)."""
    return list(model.parameters()) + list(model.buffers())


class FrozenOffload:
    """Moves the configured frozen models between host and ``device`` (see the module docstring)."""

    def __init__(self, models: Dict[str, Optional[torch.nn.Module]], cfg: OffloadConfig, device: torch.device):
        self.device = torch.device(device)
        unknown = set(models) - set(OFFLOADABLE)
        if unknown:
            raise ValueError(f"cannot offload {sorted(unknown)}; offloadable: {list(OFFLOADABLE)}")
        self.models = {name: model for name, model in models.items()
                       if model is not None and getattr(cfg, name)}
        pin = self.device.type == "cuda"
        self._host: Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]] = {}
        self.bytes_moved = 0  # host -> device copies so far (the test's evidence on the CPU)
        for name, model in self.models.items():
            pairs = []
            for t in _tensors(model):
                host = t.detach().to("cpu")
                if pin:
                    host = host.pin_memory()
                t.data = host  # the device copy is freed when nothing else holds it
                pairs.append((t, host))
            self._host[name] = pairs
        if pin and self.models:
            torch.cuda.empty_cache()

    def offloaded(self, name: str) -> bool:
        return name in self.models

    @contextmanager
    def resident(self, name: str) -> Iterator[None]:
        """The model ``name`` on the device for the block (a no-op when it is not offloaded)."""
        if name not in self.models:
            yield
            return
        pairs = self._host[name]
        for t, host in pairs:
            t.data = host.to(self.device, non_blocking=True)
            self.bytes_moved += host.numel() * host.element_size()
        try:
            yield
        finally:
            for t, host in pairs:
                t.data = host


def device_offloaded(cfg: OffloadConfig, present: Iterable[str]) -> Tuple[str, ...]:
    """Which of the ``present`` models leave the accelerator between uses (for the memory
    estimate): the configured ones; none without a GPU, where the host is the device."""
    if not torch.cuda.is_available():
        return ()
    return tuple(name for name in OFFLOADABLE if name in present and getattr(cfg, name))
