"""The few places where megatron-core assumes CUDA, made to run on CPU (gloo) instead.

Applied once by ``gil_megatron.parallel.distributed.initialize`` and ONLY when ``torch.cuda.is_available()``
is False, so the GPU path never sees any of this. Each patch says why it exists. Measured against
megatron-core 0.19.2: with these, GPTModel (local spec), TP, 1F1B pipelining, megatron DDP, the fp32,
bf16 mixed-precision and distributed optimizers and dist_checkpointing run on CPU, and TP/PP layouts
agree with the single-rank result.
"""

import contextlib
import types

import torch

_APPLIED = False
_CUDA_LITERAL_MODULES = (
    # literal device="cuda" tensors (token counters, grad-norm buffers, causal mask)
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.transformer.utils",  # the default causal mask
    "megatron.core.utils",  # the apex-free multi-tensor l2 norm used by grad clipping
    "megatron.core.optimizer.distrib_optimizer",  # the distributed optimizer's gather buffers
)


class _CpuRNGStatesTracker:
    """Mixin body for megatron's CudaRNGStatesTracker that keeps CPU generator states.

    Why: the tracker stores torch.cuda RNG states, which do not exist without a GPU; attention
    forks it on every forward (dropout), so it must work even with dropout 0.
    """

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def _cpu_device(device):
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _TorchWithCpuDevice(types.ModuleType):
    """Stands in for ``torch`` inside modules that build tensors with a literal device="cuda"."""

    _FACTORIES = ("zeros", "ones", "empty", "tensor", "full", "arange")

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in self._FACTORIES:
            def factory(*args, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _cpu_device(kwargs["device"])
                return attr(*args, **kwargs)
            return factory
        return attr


class _NullStream:
    """torch.cuda.current_stream() stand-in: the grad buffer and p2p code only wait on it."""

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return None


def apply() -> None:
    """Install the CPU patches (idempotent). Never call this on a machine with CUDA."""
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return
    import importlib

    from megatron.core.tensor_parallel import random as mp_random

    # torch.cuda.current_device() names the device of new buffers in RoPE, mappings, attention and
    # p2p; on CPU that device is "cpu".
    torch.cuda.current_device = lambda: "cpu"
    # p2p and parallel_state synchronise CUDA streams; there is nothing to wait for on CPU.
    torch.cuda.synchronize = lambda *a, **k: None
    # the DDP grad buffer records/waits on the current stream (megatron-core 0.19).
    torch.cuda.current_stream = lambda *a, **k: _NullStream()
    # the tied output embedding of the last pipeline stage is moved with .cuda() before its
    # initial all-reduce; on CPU the tensor stays where it is.
    torch.Tensor.cuda = lambda self, *a, **k: self

    # the model-parallel RNG tracker must hold CPU generator states.
    cpu_tracker_cls = type(
        "CpuRNGStatesTracker", (_CpuRNGStatesTracker, mp_random.CudaRNGStatesTracker), {}
    )
    mp_random._CUDA_RNG_STATE_TRACKER = cpu_tracker_cls()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # activation recomputation (tensor_parallel.checkpoint) saves and restores the CUDA generator
    # beside the CPU one and the tracker's; without CUDA there is none to save.
    mp_random._get_cuda_rng_state = lambda *a, **k: None
    mp_random._set_cuda_rng_state = lambda *a, **k: None

    # literal device="cuda" tensors in schedules, grad clipping and grad finalisation.
    proxy = _TorchWithCpuDevice()
    for name in _CUDA_LITERAL_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = proxy

    # clip_grad_by_total_norm_fp32 / the fp32 optimizer assert tensors are torch.cuda.FloatTensor.
    _relax_cuda_type_asserts()
    # the mixed-precision and distributed optimizers sort parameters by their CUDA type name.
    _cuda_type_names_in_optimizer_constructors()
    _APPLIED = True


def _cuda_type_names_in_optimizer_constructors() -> None:
    """Float16OptimizerWithFloat16Params and DistributedOptimizer pick fp32 main copies by
    ``param.type() in ['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor']`` and raise TypeError for
    anything else. While (only while) they are constructed, CPU tensors answer with the CUDA name
    of their dtype, so bf16 training on CPU gets fp32 main weights exactly as on a GPU."""
    import functools

    from megatron.core.optimizer import distrib_optimizer, optimizer

    plain_type = torch.Tensor.type

    def cuda_named_type(self, *args, **kwargs):
        name = plain_type(self, *args, **kwargs)
        if not args and not kwargs and name.startswith("torch.") and not name.startswith("torch.cuda."):
            return "torch.cuda." + name[len("torch."):]
        return name

    def with_cuda_names(init):
        @functools.wraps(init)
        def wrapped(*args, **kwargs):
            torch.Tensor.type = cuda_named_type
            try:
                return init(*args, **kwargs)
            finally:
                torch.Tensor.type = plain_type
        return wrapped

    for cls in (optimizer.Float16OptimizerWithFloat16Params, distrib_optimizer.DistributedOptimizer):
        cls.__init__ = with_cuda_names(cls.__init__)


def _relax_cuda_type_asserts() -> None:
    """multi_tensor_applier paths check ``param.type() == 'torch.cuda.FloatTensor'``: on CPU we
    route them through the plain-torch fallbacks megatron ships for when apex is absent."""
    from megatron.core.optimizer import clip_grads

    def clip_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        grads = []
        for param in parameters:
            grad = param.decoupled_grad if use_decoupled_grad else param.grad
            if grad is not None:
                grads.append(grad.detach())
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            for g in grads:
                g.mul_(clip_coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_by_total_norm
    try:
        from megatron.core.optimizer import optimizer as mopt

        if getattr(mopt, "clip_grad_by_total_norm_fp32", None) is not None:
            mopt.clip_grad_by_total_norm_fp32 = clip_by_total_norm
    except ImportError:
        pass
