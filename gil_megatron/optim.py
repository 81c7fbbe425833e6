"""megatron DDP + optimizer + LR schedule around a model, and one optimizer step over micro-batches.

GPU: bf16 params with fp32 main weights and megatron's distributed optimizer.
CPU: fp32 and the plain megatron optimizer (the mixed-precision optimizers assert CUDA tensors).
"""

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from gil_megatron.models.pipeline import LossFn, run_microbatches


@dataclass
class OptimSettings:
    SECTION = "optim"  # messages name fields as optim.x; config.validate_tree puts the real path
    lr: float = 1e-5
    """Peak learning rate."""
    min_lr: float = 0.0
    """Floor of the decay schedule."""
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip (across TP/PP/DP); 0 disables."""
    warmup_steps: int = 0
    """Linear warmup over this many optimizer steps."""
    decay_steps: int = 0
    """Optimizer steps over which LR decays to min_lr (0 = constant after warmup)."""
    decay_style: str = "cosine"
    """constant | linear | cosine"""

    def validate(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr} must be > 0")
        if self.decay_style not in ("constant", "linear", "cosine"):
            raise ValueError(f"optim.decay_style={self.decay_style!r}; valid: constant, linear, cosine")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ValueError("optim.warmup_steps and optim.decay_steps must be >= 0")


class Trainable:
    """A model wrapped for training: megatron DDP, optimizer, LR scheduler."""

    def __init__(self, model: torch.nn.Module, settings: OptimSettings):
        on_gpu = torch.cuda.is_available()
        bf16 = next(model.parameters()).dtype == torch.bfloat16
        config = model.config
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=on_gpu and bf16,
            check_for_nan_in_grad=False,  # our own guard counts and skips instead of raising
        )
        self.model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = self.model.no_sync
        opt_config = OptimizerConfig(
            optimizer="adam", lr=settings.lr, min_lr=settings.min_lr, weight_decay=settings.weight_decay,
            adam_beta1=settings.adam_beta1, adam_beta2=settings.adam_beta2, adam_eps=settings.adam_eps,
            clip_grad=settings.clip_grad, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=on_gpu and bf16,
        )
        self.optimizer = get_megatron_optimizer(opt_config, [self.model])
        steps = max(settings.warmup_steps + settings.decay_steps, 1)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if settings.warmup_steps else settings.lr, max_lr=settings.lr,
            min_lr=settings.min_lr, lr_warmup_steps=settings.warmup_steps,
            lr_decay_steps=steps if settings.decay_steps else steps + 10**12,
            lr_decay_style=settings.decay_style if settings.decay_steps else "constant",
            start_wd=settings.weight_decay, end_wd=settings.weight_decay, wd_incr_steps=steps,
            wd_incr_style="constant",
        )

    @property
    def module(self) -> torch.nn.Module:
        return self.model.module

    def forward_backward(self, microbatches: Sequence[Dict[str, torch.Tensor]], loss_fn: LossFn) -> List[Dict]:
        """Accumulate gradients of the mini-batch objective over its micro-batches."""
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        return run_microbatches(self.model, microbatches, loss_fn)

    def grads_finite(self) -> bool:
        """All ranks agree whether every accumulated gradient is finite (one all-reduce)."""
        finite = all(bool(torch.isfinite(p.main_grad).all()) for p in self.model.module.parameters()
                     if getattr(p, "main_grad", None) is not None)
        flag = torch.tensor(1.0 if finite else 0.0, device=_device())
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def step(self) -> Tuple[bool, float]:
        """Clip, step, advance the LR schedule. Returns (updated, grad_norm). A non-finite gradient
        anywhere skips the update on every rank (the caller counts skips)."""
        if not self.grads_finite():
            self.optimizer.zero_grad()
            return False, float("nan")
        updated, grad_norm, _ = self.optimizer.step()
        if updated:
            self.scheduler.step(increment=1)
        return bool(updated), float(grad_norm) if grad_norm is not None else 0.0

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def main_grads(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Name -> accumulated gradient (megatron's main_grad) of every parameter of a DDP module."""
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    return {name: p.main_grad.detach().clone() for name, p in inner.named_parameters()
            if getattr(p, "main_grad", None) is not None}


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
