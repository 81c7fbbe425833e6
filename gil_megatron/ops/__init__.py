"""Fused ops backed by the csrc/ kernels (gil_megatron._C), each with a pure-torch reference beside it.

    extension.py   loading the compiled library; which backend runs (cpu / cuda / reference)
    logprob.py     per-token log-probs and entropy from vocab-parallel logits; exact KL of two
                   distributions for evaluation
    kl.py          the masked per-token KL (k1 / k2 / k3) and its reductions
"""

from gil_megatron.ops.extension import HAVE_KERNEL, kernel_backend
from gil_megatron.ops.kl import KL_REDUCTIONS, masked_kl, reference_masked_kl
from gil_megatron.ops.logprob import (
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
