"""Fused ops backed by the csrc/ kernels (gil_megatron._C), each with a pure-torch reference beside it."""

from gil_megatron.ops.logprob import (
    HAVE_KERNEL,
    KL_REDUCTIONS,
    kernel_backend,
    masked_kl,
    reference_masked_kl,
    reference_vocab_parallel_logprobs,
    vocab_parallel_kl,
    vocab_parallel_log_softmax,
    vocab_parallel_logprobs,
)

__all__ = [
    "HAVE_KERNEL",
    "KL_REDUCTIONS",
    "kernel_backend",
    "masked_kl",
    "reference_masked_kl",
    "reference_vocab_parallel_logprobs",
    "vocab_parallel_kl",
    "vocab_parallel_log_softmax",
    "vocab_parallel_logprobs",
]
