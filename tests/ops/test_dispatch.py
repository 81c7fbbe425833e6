"""The log-prob ops' dispatch and process-group plumbing, which the numerical tests in
test_logprob.py do not reach: the pure-torch fallback runs without touching the kernel, target
ids are checked however few there are, and the TP all-reduces stay inside the TP group when
data parallelism shares the world (TP2 x DP2 on 4 gloo ranks)."""

import pytest
import torch

from gil_megatron.ops import extension, logprob
from gil_megatron.ops import kl as kl_op

from dist_utils import spawn


def _naive(logits, targets):
    return torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None]).squeeze(-1)


def test_the_reference_backend_runs_without_the_kernel(monkeypatch):
    """With no kernel for the device, log-probs and masked KL come from the pure-torch reference
    (same numbers, gradients included) and the kernel's autograd functions are never called."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=gen).requires_grad_(True)
    targets = torch.randint(0, 11, (3, 5), generator=gen)
    ref = torch.randn(3, 5, generator=gen)
    mask = (torch.rand(3, 5, generator=gen) > 0.3).float()

    def no_kernel(*args, **kwargs):
        raise AssertionError("the kernel was called on the reference backend")

    monkeypatch.setattr(extension, "kernel_backend", lambda device: "reference")
    monkeypatch.setattr(extension, "_warned_fallback", True)
    monkeypatch.delenv(extension.REQUIRE_KERNEL_ENV, raising=False)
    monkeypatch.setattr(logprob._FusedLogprobs, "apply", no_kernel)
    monkeypatch.setattr(kl_op._MaskedKL, "apply", no_kernel)
    lp, _ = logprob.vocab_parallel_logprobs(logits, targets)
    torch.testing.assert_close(lp, _naive(logits, targets))
    kl = kl_op.masked_kl(lp, ref, mask, "k1", "none")
    torch.testing.assert_close(kl, (lp - ref) * mask)
    kl.sum().backward()
    expected = torch.autograd.grad(((_naive(logits, targets) - ref) * mask).sum(), logits)[0]
    torch.testing.assert_close(logits.grad, expected)


@pytest.mark.parametrize("shape", [(1,), (2, 3)])
def test_out_of_range_targets_are_refused_however_few(shape):
    logits = torch.randn(*shape, 7)
    targets = torch.zeros(shape, dtype=torch.long)
    targets.view(-1)[-1] = 7
    with pytest.raises(RuntimeError, match="targets must be token ids in"):
        logprob.vocab_parallel_logprobs(logits, targets)
    empty, _ = logprob.vocab_parallel_logprobs(torch.randn(0, 7), torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0,)


def _tp2_dp2_worker():
    from megatron.core import parallel_state

    from gil_megatron.parallel import distributed

    layout = distributed.initialize(tp=2)
    assert layout.dp == 2
    gen = torch.Generator().manual_seed(10 + layout.dp_rank)  # each replica its own batch...
    full = torch.randn(4, 16, generator=gen) + 300.0 * layout.dp_rank  # ...on a very different scale
    targets = torch.randint(0, 16, (4,), generator=gen)
    shard = full[:, layout.tp_rank * 8:(layout.tp_rank + 1) * 8].contiguous()
    lp, ent = logprob.vocab_parallel_logprobs(shard, targets, parallel_state.get_tensor_model_parallel_group(),
                                              compute_entropy=True)
    return lp, ent, _naive(full, targets), -(torch.softmax(full, -1) * torch.log_softmax(full, -1)).sum(-1)


def test_tp_reductions_stay_inside_the_tp_group():
    """A reduction over the whole world would mix the other replica's logits (300 higher): the
    shared max would underflow this replica's sum of exponentials to 0."""
    for lp, ent, expected_lp, expected_ent in spawn(_tp2_dp2_worker, 4):
        torch.testing.assert_close(lp, expected_lp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent, expected_ent, rtol=1e-5, atol=1e-5)
