"""megatron DDP + optimizer + LR schedule around a model, one optimizer step over micro-batches, and
the model + optimizer + schedule as one sharded state dict for megatron's dist_checkpointing.

bf16 parameters train with fp32 main weights and fp32 gradients (megatron's mixed-precision
optimizer), on GPU and on CPU alike; ``distributed_optimizer`` shards the fp32 main weights and the
Adam moments over data-parallel ranks (megatron's DistributedOptimizer, on by default with bf16).
On CPU, gil_megatron/parallel/cpu_compat.py lets megatron's CUDA-only type checks accept CPU tensors.
"""


from typing import Dict, List, Sequence, Tuple

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from gil_megatron.config import RECOMPUTE, OptimSettings  # noqa: F401  (re-exported)
from gil_megatron.models.chunks import model_chunks
from gil_megatron.models.pipeline import LossFn, run_microbatches
from gil_megatron.parallel import collectives


def _patch_step_state_on_load() -> None:
    """megatron-core 0.19.2 without apex / TE (torch Adam: CPU, or a GPU without them): loading the
    DistributedOptimizer's fully_reshardable state puts the Adam ``step`` tensor into each
    parameter's state, then copies every state tensor from the checkpoint's per-parameter dict,
    which never holds ``step`` (KeyError 'step' in _set_main_param_and_optimizer_states). The step
    is already restored from the param groups; skip it there. No effect with apex / TE."""
    from megatron.core.optimizer import distrib_optimizer

    cls = distrib_optimizer.DistributedOptimizer
    if getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True) or getattr(cls, "_gil_step_patch", False):
        return
    original = cls._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        return original(self, model_param, {"step": None, **tensors})  # None: "not a tensor, skip"

    cls._set_main_param_and_optimizer_states = set_states
    cls._gil_step_patch = True


def set_recompute(model: torch.nn.Module, mode: str) -> None:
    """Activation recomputation in the backward pass (megatron's ``recompute_granularity``).

    selective: recompute core attention, softmax(QK^T/sqrt(d)) V, whose activations grow with s^2;
    full: keep only each layer's input and recompute the whole layer (uniform, one layer per
    checkpoint). The math is unchanged; memory drops for extra forward compute."""
    if mode not in RECOMPUTE:
        raise ValueError(f"train.recompute={mode!r}; valid: {', '.join(RECOMPUTE)}")
    for chunk in model_chunks(model):
        config = chunk.config
        config.recompute_granularity = None if mode == "none" else mode
        config.recompute_method = "uniform" if mode == "full" else None
        config.recompute_num_layers = 1 if mode == "full" else None
        if mode == "selective":
            config.recompute_modules = ["core_attn"]
        for module in chunk.modules():  # attention decides this at construction; the model already exists
            if hasattr(module, "checkpoint_core_attention"):
                module.checkpoint_core_attention = mode == "selective"


class Trainable:
    """A model wrapped for training: megatron DDP, optimizer, LR scheduler (and the model's
    activation recomputation, ``recompute``: none | selective | full).

    A model of several chunks (a virtual pipeline, models/chunks.py) gets one DDP per chunk, as
    Megatron-LM does (bucketing only on the first), and one optimizer over all of them."""

    def __init__(self, model: torch.nn.Module, settings: OptimSettings, recompute: str = "none"):
        set_recompute(model, recompute)
        bf16 = next(model.parameters()).dtype == torch.bfloat16
        sharded = bf16 if settings.distributed_optimizer is None else settings.distributed_optimizer
        if sharded:
            _patch_step_state_on_load()
        self.distributed_optimizer = sharded
        config = model.config
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=sharded,
            check_for_nan_in_grad=False,  # our own guard counts and skips instead of raising
        )
        self.chunks = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                               disable_bucketing=index > 0)
                       for index, chunk in enumerate(model_chunks(model))]
        # what run_microbatches takes: the one DDP module, or the list of them
        self.model = self.chunks[0] if len(self.chunks) == 1 else torch.nn.ModuleList(self.chunks)
        self._module = model
        config.finalize_model_grads_func = finalize_model_grads
        no_sync = [chunk.no_sync for chunk in self.chunks]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        opt_config = OptimizerConfig(
            optimizer="adam", lr=settings.lr, min_lr=settings.min_lr, weight_decay=settings.weight_decay,
            adam_beta1=settings.adam_beta1, adam_beta2=settings.adam_beta2, adam_eps=settings.adam_eps,
            clip_grad=settings.clip_grad, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=sharded,
        )
        self.optimizer = get_megatron_optimizer(opt_config, self.chunks)
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
        """The unwrapped model: a LlamaModel, or its ModelChunks."""
        return self._module

    def forward_backward(self, microbatches: Sequence[Dict[str, torch.Tensor]], loss_fn: LossFn) -> List[Dict]:
        """Accumulate gradients of the mini-batch objective over its micro-batches."""
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        return run_microbatches(self.model, microbatches, loss_fn)

    def grads_finite(self) -> bool:
        """All ranks agree whether every accumulated gradient is finite (one all-reduce)."""
        finite = all(bool(torch.isfinite(p.main_grad).all()) for p in self._module.parameters()
                     if getattr(p, "main_grad", None) is not None)
        flag = torch.tensor(1.0 if finite else 0.0, device=_device())
        if torch.distributed.is_initialized():
            collectives.all_reduce(flag, torch.distributed.group.WORLD, op=torch.distributed.ReduceOp.MIN)
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

    # ---- checkpointing (gil_megatron/training/checkpoint.py) ---------------------------------------------
    def sharded_state_dict(self, prefix: str, is_loading: bool = False) -> dict:
        """Weights, optimizer and LR schedule for megatron dist_checkpointing. Every tensor carries
        its global shape and this rank's offsets, so any TP / PP / DP layout can load it; the
        distributed optimizer uses megatron's ``fully_reshardable`` form for the same reason."""
        self._ensure_optimizer_state()
        model_sd = _without_objects(_chunks_sharded_state_dict(self._module, prefix + "model."))
        optim_sd = self.optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"})
        return {"model": model_sd, "optimizer": optim_sd, "scheduler": self.scheduler.state_dict()}

    def _ensure_optimizer_state(self) -> None:
        """Give a never-stepped optimizer its (zero) Adam state, as torch would on the first step.
        megatron's sharded state dict needs the state tensors to exist (to load into them, or to
        save a checkpoint before the first step), and without apex/TE its DistributedOptimizer
        reads the step count from them."""
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = opt.optimizer
            if any(len(inner.state[p]) for g in inner.param_groups for p in g["params"]):
                continue
            opt.init_state_fn(inner, opt.config)
            for group in inner.param_groups:
                for p in group["params"]:
                    inner.state[p].setdefault("step", torch.tensor(0.0))

    def load_sharded(self, loaded: dict, prefix: str) -> None:
        """Inverse of ``sharded_state_dict`` on the tensors dist_checkpointing.load returned."""
        from gil_megatron.models.weights import load_into_model

        model_prefix = prefix + "model."
        chunks = model_chunks(self._module)
        per_chunk = [loaded["model"]] if len(chunks) == 1 else [loaded["model"][_chunk_key(v)] for v in range(len(chunks))]
        for chunk, tensors in zip(chunks, per_chunk):
            load_into_model(chunk, {k[len(model_prefix):]: v for k, v in tensors.items()})
        self.reload_model_params()
        self.optimizer.load_state_dict(loaded["optimizer"])
        self.scheduler.load_state_dict(loaded["scheduler"])
        # megatron (without apex / TE) gives every parameter's Adam state ONE shared ``step``
        # tensor; torch Adam increments each parameter's step in place, so a shared one would
        # advance once per parameter per step (wrong bias correction after a resume)
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            for state in opt.optimizer.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()

    def reload_model_params(self) -> None:
        """After weights are copied into the model, refresh the optimizer's fp32 main copy from them
        (mixed precision: otherwise the next step would continue from the old main weights)."""
        self.optimizer.reload_model_params()


def _chunk_key(vp_stage: int) -> str:
    return f"chunk{vp_stage}"


def _chunks_sharded_state_dict(model: torch.nn.Module, prefix: str) -> dict:
    """A model's sharded state dict; with several chunks one sub-dict per chunk (their local names
    repeat). The tensors' checkpoint keys are the same either way: megatron names every layer by
    its global index (TransformerBlock.sharded_state_dict uses get_transformer_layer_offset), so a
    checkpoint loads at any pipeline / virtual-pipeline layout."""
    chunks = model_chunks(model)
    if len(chunks) == 1:
        return _model_sharded_state_dict(chunks[0], prefix)
    return {_chunk_key(v): _model_sharded_state_dict(chunk, prefix) for v, chunk in enumerate(chunks)}


def _model_sharded_state_dict(model: torch.nn.Module, prefix: str) -> dict:
    """megatron's sharded state dict of a LlamaModel. The critic's and reward model's heads replace
    GPTModel's ``output_layer``, whose vocab-padded ``output_layer.weight`` megatron's LanguageModule
    special-cases on the last stage; for those roles that step is skipped (the head is a plain
    module, saved replicated across TP like any other). Belongs in LlamaModel.sharded_state_dict."""
    if getattr(model, "role", "actor") == "actor" or not model.post_process:
        return model.sharded_state_dict(prefix=prefix)
    model.post_process = False
    try:
        return model.sharded_state_dict(prefix=prefix)
    finally:
        model.post_process = True


def _without_objects(sharded: dict) -> dict:
    """Drop ShardedObject entries (megatron layers' ``_extra_state``, empty without fp8): they would be
    stored as pickles, which loading then refuses (gil_megatron/training/checkpoint.py)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    out = {}
    for key, value in sharded.items():
        if isinstance(value, dict):
            out[key] = _without_objects(value)
        elif isinstance(value, ShardedObject):
            if "_extra_state" not in key:
                raise ValueError(f"unexpected non-tensor checkpoint entry {key!r}")
        else:
            out[key] = value
    return out


def main_grads(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Name -> accumulated gradient (megatron's main_grad) of every parameter of a DDP module (of
    a list of DDP chunks: names prefixed by the chunk index, ``0.decoder...``)."""
    if isinstance(model, torch.nn.ModuleList):
        return {f"{v}.{name}": g for v, chunk in enumerate(model) for name, g in main_grads(chunk).items()}
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    return {name: p.main_grad.detach().clone() for name, p in inner.named_parameters()
            if getattr(p, "main_grad", None) is not None}


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
