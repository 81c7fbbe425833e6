"""Fused vocab-parallel log-prob / entropy / masked-KL kernels (gil_megatron.ops.logprob, csrc/logprob)
against the pure-torch reference, a float64 log_softmax computation and megatron-core's
vocab_parallel_cross_entropy; TP=2 under gloo against TP=1. CUDA tests skip without a GPU.

bf16/fp16 are checked the flash-attention way: the error against the float64 truth may be at most 2x
the error of torch's own bf16/fp16 computation of the same inputs, and a low-precision gradient must
carry only the rounding error of its store (a truncating store doubles it). The CPU kernels run under
1, 2 and 4 threads on row counts that the thread count does not divide; KL masks are bool and float
weights, forward and backward.
"""

import os
import warnings

import pytest
import torch
import torch.distributed as dist

from gil_megatron.algo.kl import kl_per_token
from gil_megatron.ops import extension as L
from gil_megatron.ops import (
    kernel_backend,
    masked_kl,
    reference_masked_kl,
    reference_vocab_parallel_logprobs,
    vocab_parallel_kl,
    vocab_parallel_log_softmax,
    vocab_parallel_logprobs,
)

NEG_INF = float("-inf")
LOW_PRECISION = (torch.bfloat16, torch.float16)
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
needs_kernel = pytest.mark.skipif(not L.HAVE_KERNEL, reason="gil_megatron._C is not built")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def direct_logprobs(logits, targets):
    """The naive computation (log_softmax + gather) in float64, and the entropy."""
    logp = logits.double().log_softmax(dim=-1)
    lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp.masked_fill(logits == NEG_INF, 0.0)).sum(-1)
    return lp, ent


def make_inputs(shape, vocab, dtype=torch.float32, device="cpu", scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=g) * scale).to(dtype).to(device)
    targets = torch.randint(0, vocab, shape, generator=g).to(device)
    return logits, targets


def run_with_grads(fn, logits, targets, w_lp, w_ent, **kw):
    """Log-probs, entropy and d(sum w_lp*logprob + w_ent*entropy)/d logits."""
    x = logits.detach().clone().requires_grad_()
    lp, ent = fn(x, targets, compute_entropy=True, **kw)
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    return lp.detach(), ent.detach(), x.grad


def assert_close(a, b, tol, what=""):
    a, b = a.double().cpu(), b.double().cpu()
    torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def direct_with_grads(logits, targets, w_lp, w_ent, dtype):
    """The naive computation (log_softmax + gather, entropy from the log-probs) run by torch in
    ``dtype``, and its gradient. float64 gives the truth; the logits' own bf16/fp16 gives torch's
    own low-precision error on the same inputs."""
    x = logits.detach().to(dtype).requires_grad_()
    logp = x.log_softmax(dim=-1)
    lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp.masked_fill(x == NEG_INF, 0.0)).sum(-1)
    ((lp * w_lp.to(dtype)).sum() + (ent * w_ent.to(dtype)).sum()).backward()
    return lp.detach(), ent.detach(), x.grad


def assert_lowprec_error_bounded(ours, truth, baseline, what, factor=2.0, atol=1e-6):
    """Flash-attention's test: the kernel's max error against the float64 truth is at most
    ``factor`` times the error of torch's own low-precision computation of the same inputs."""
    ours, truth, baseline = ours.double().cpu(), truth.double().cpu(), baseline.double().cpu()
    err = (ours - truth).abs().max().item()
    err_torch = (baseline - truth).abs().max().item()
    assert err <= factor * err_torch + atol, (
        f"{what}: max error {err:.3g} > {factor} x torch's low-precision error {err_torch:.3g} + {atol:g}"
    )


def assert_rounded_store(grad, truth, what, factor=1.25):
    """A bf16/fp16 gradient computed in fp32 and stored with round-to-nearest has the mean error of
    rounding the truth itself (0.25 ulp); truncating the store doubles it (0.5 ulp)."""
    truth = truth.double().cpu()
    floor = (truth.to(grad.dtype).double() - truth).abs().mean().item()
    err = (grad.double().cpu() - truth).abs().mean().item()
    assert err <= factor * floor + 1e-12, (
        f"{what}: mean error {err:.3g} > {factor} x the {grad.dtype} rounding floor {floor:.3g} "
        "(is the store truncating instead of rounding?)"
    )


def assert_matches_truth(logits, targets, w_lp, w_ent, lp, ent, grad, what, rounded_store=True):
    """Outputs and gradients of the kernel against the float64 truth: fp32 to 1e-5; bf16/fp16
    within 2x torch's own bf16/fp16 error, and (``rounded_store``, the kernels' contract: fp32 math,
    one rounding) the gradient rounded, not truncated, to its dtype."""
    truth = direct_with_grads(logits.cpu(), targets.cpu(), w_lp.cpu(), w_ent.cpu(), torch.float64)
    if logits.dtype not in LOW_PRECISION:
        for name, ours, exact in zip(("logprobs", "entropy", "grad"), (lp, ent, grad), truth):
            assert_close(ours, exact, 1e-5, f"{what} {name}")
        return
    baseline = direct_with_grads(logits.cpu(), targets.cpu(), w_lp.cpu(), w_ent.cpu(), logits.dtype)
    for name, ours, exact, torch_low in zip(("logprobs", "entropy", "grad"), (lp, ent, grad), truth, baseline):
        assert_lowprec_error_bounded(ours, exact, torch_low, f"{what} {name}")
    if rounded_store:
        assert_rounded_store(grad, truth[2], f"{what} grad")


# ------------------------------------------------------------------------------------------------
# Extension / backend selection


def test_extension_loaded_when_required():
    if os.environ.get(L.REQUIRE_KERNEL_ENV) != "1":
        pytest.skip(f"{L.REQUIRE_KERNEL_ENV}=1 is not set")
    assert L.HAVE_KERNEL, L._KERNEL_IMPORT_ERROR
    assert kernel_backend("cpu") == "cpu"
    if HAS_CUDA:
        assert kernel_backend(torch.device("cuda", 0)) == "cuda"


def test_missing_extension_warns_once_or_raises(monkeypatch):
    monkeypatch.setattr(L, "HAVE_KERNEL", False)
    monkeypatch.setattr(L, "_warned_fallback", False)
    assert kernel_backend("cpu") == "reference"
    logits, targets = make_inputs((2, 3), 11)
    monkeypatch.setenv(L.REQUIRE_KERNEL_ENV, "1")
    with pytest.raises(RuntimeError, match="pip install -e . --no-build-isolation"):
        vocab_parallel_logprobs(logits, targets)
    monkeypatch.setenv(L.REQUIRE_KERNEL_ENV, "0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lp, _ = vocab_parallel_logprobs(logits, targets)
        vocab_parallel_logprobs(logits, targets)
    assert sum("--no-build-isolation" in str(w.message) for w in caught) == 1
    assert_close(lp, direct_logprobs(logits, targets)[0], 1e-5)


# ------------------------------------------------------------------------------------------------
# Forward and backward against the reference and the direct computation


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1, 37, 1001, 5000])
def test_kernel_matches_reference(device, dtype, vocab):
    # 1001: not a multiple of the vector width (scalar CUDA path); 5000: several CPU chunks and
    # the CUDA block-per-row path; 1: a length-1 row (logprob 0, entropy 0, zero grad)
    logits, targets = make_inputs((3, 5), vocab, dtype, device)
    g = torch.Generator().manual_seed(1)
    w_lp, w_ent = torch.randn(3, 5, generator=g).to(device), torch.randn(3, 5, generator=g).to(device)
    assert kernel_backend(device) == device
    lp, ent, grad = run_with_grads(vocab_parallel_logprobs, logits, targets, w_lp, w_ent)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32 and grad.dtype == dtype
    assert_matches_truth(logits, targets, w_lp, w_ent, lp, ent, grad, "kernel")
    lp_r, ent_r, grad_r = run_with_grads(reference_vocab_parallel_logprobs, logits, targets, w_lp, w_ent)
    assert_matches_truth(logits, targets, w_lp, w_ent, lp_r, ent_r, grad_r, "reference", False)
    if vocab == 1:
        assert torch.all(lp == 0) and torch.all(ent == 0) and torch.all(grad == 0)


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_only_gradient(device):
    logits, targets = make_inputs((4, 6), 300, device=device)
    x = logits.clone().requires_grad_()
    lp, ent = vocab_parallel_logprobs(x, targets)
    assert ent is None
    lp.sum().backward()
    expected = torch.nn.functional.one_hot(targets, 300).float() - logits.softmax(-1)
    assert_close(x.grad, expected, 1e-6, "grad = onehot - softmax")


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits(device, dtype):
    logits, targets = make_inputs((4, 8), 512, dtype, device, scale=1e4)  # softmax ~ one-hot
    logits[..., -64:] = NEG_INF  # padded vocab entries
    logits[0, 0, :-65] = NEG_INF  # a row with a single finite entry
    targets = targets % 448
    targets[0, 0] = 512 - 65
    w = torch.ones(4, 8, device=device)
    lp, ent, grad = run_with_grads(vocab_parallel_logprobs, logits, targets, w, w)
    lp_r, ent_r, grad_r = run_with_grads(reference_vocab_parallel_logprobs, logits, targets, w, w)
    for t in (lp, ent, grad):
        assert torch.isfinite(t).all()
    assert lp[0, 0] == 0 and ent[0, 0] == 0
    assert_close(lp, lp_r, 1e-5, "logprobs")
    assert_close(lp, direct_logprobs(logits, targets)[0], 1e-5, "logprobs vs log_softmax")
    assert_matches_truth(logits, targets, w, w, lp, ent, grad, "kernel")
    assert_matches_truth(logits, targets, w, w, lp_r, ent_r, grad_r, "reference", False)
    assert torch.all(grad[..., -64:] == 0)


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_strided_inputs(device):
    logits = torch.zeros(0, 7, 50, device=device, requires_grad=True)
    lp, ent = vocab_parallel_logprobs(logits, torch.zeros(0, 7, dtype=torch.long, device=device), None, True)
    assert lp.shape == (0, 7) and ent.shape == (0, 7)
    (lp.sum() + ent.sum()).backward()
    assert logits.grad.shape == logits.shape
    # a vocab slice of a wider tensor: rows are strided
    wide, targets = make_inputs((3, 4), 130, device=device)
    lp, ent = vocab_parallel_logprobs(wide[..., :128], targets % 128, compute_entropy=True)
    lp_d, ent_d = direct_logprobs(wide[..., :128], targets % 128)
    assert_close(lp, lp_d, 1e-5, "strided logprobs")
    assert_close(ent, ent_d, 1e-5, "strided entropy")
    # vocab dim not contiguous (a transposed tensor)
    x = wide.transpose(0, 2).contiguous().transpose(0, 2).requires_grad_()
    lp, _ = vocab_parallel_logprobs(x, targets)
    lp.sum().backward()
    assert_close(lp, direct_logprobs(wide, targets)[0], 1e-5, "transposed logprobs")
    assert_close(x.grad, torch.nn.functional.one_hot(targets, 130) - wide.softmax(-1), 1e-6, "transposed grad")


def test_reference_gradcheck_float64():
    logits, targets = make_inputs((2, 3), 7, torch.float64)
    logits[0, 0, 3] = NEG_INF  # -inf entries must not break the gradient

    def f(x):
        lp, ent = reference_vocab_parallel_logprobs(x, targets, compute_entropy=True)
        return lp, ent

    assert torch.autograd.gradcheck(f, (logits.requires_grad_(),), eps=1e-6, atol=1e-6)


def test_input_checks():
    logits, targets = make_inputs((2, 3), 10)
    with pytest.raises(ValueError, match=r"logits \(2, 3, 10\) and targets \(3, 2\)"):
        vocab_parallel_logprobs(logits, targets.t())
    with pytest.raises(TypeError, match="integer token ids"):
        vocab_parallel_logprobs(logits, targets.float())
    with pytest.raises(TypeError, match="torch.float64"):
        vocab_parallel_logprobs(logits.double(), targets)
    with pytest.raises(ValueError, match="empty vocab"):
        vocab_parallel_logprobs(logits[..., :0], targets)
    with pytest.raises(RuntimeError, match=r"\[0, 10\)"):
        vocab_parallel_logprobs(logits, targets + 10)
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="same shape"):
        masked_kl(lp, torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k4'; valid: \['k1', 'k2', 'k3'\]"):
        masked_kl(lp, lp, lp, estimator="k4")
    with pytest.raises(ValueError, match="unknown reduction 'avg'; valid: .*seq_mean_token_mean"):
        masked_kl(lp, lp, lp, reduction="avg")


# ------------------------------------------------------------------------------------------------
# Masked KL


def direct_masked_kl(lp, ref, mask, estimator, reduction):
    """Slow, obvious version: loops over sequences and tokens."""
    kl = kl_per_token(lp.double(), ref.double(), estimator)
    m = mask.double()
    per_token = torch.where(m != 0, kl * m, torch.zeros_like(kl))
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        return per_token.sum() / m.sum() if m.sum() > 0 else per_token.sum() * 0
    seq_means = []
    for row_kl, row_m in zip(per_token.reshape(-1, lp.shape[-1]), m.reshape(-1, lp.shape[-1])):
        if row_m.sum() > 0:
            seq_means.append(sum(row_kl[t] for t in range(len(row_kl))) / row_m.sum())
    return torch.stack(seq_means).mean() if seq_means else torch.zeros((), dtype=torch.float64)


def make_mask(kind, shape, generator, device):
    """bool, or float weights in [0, 2) with about 40 % exact zeros (the API accepts both)."""
    u = torch.rand(*shape, generator=generator)
    if kind == "bool":
        return (u > 0.4).to(device)
    weights = torch.rand(*shape, generator=generator) * 2
    return torch.where(u > 0.4, weights, torch.zeros_like(weights)).to(device)


def masked_kl_with_grads(fn, lp, ref, mask, estimator, reduction, upstream):
    """fn's output and its gradients w.r.t. logprobs and ref_logprobs for loss = sum(upstream * out)."""
    x, r = lp.clone().requires_grad_(), ref.clone().requires_grad_()
    out = fn(x, r, mask, estimator, reduction)
    (out * upstream.to(out.dtype)).sum().backward()
    return out.detach(), x.grad, r.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "seq_mean_token_mean"])
def test_masked_kl(device, mask_kind, estimator, reduction):
    g = torch.Generator().manual_seed(2)
    lp = (-torch.rand(4, 6, generator=g) * 5).to(device)
    ref = (-torch.rand(4, 6, generator=g) * 5).to(device)
    mask = make_mask(mask_kind, (4, 6), g, device)
    mask[1] = 0  # a fully masked sequence
    ref[1, 2] = NEG_INF  # garbage under the mask must not leak (k3 would be inf)
    upstream = (torch.randn(4, 6, generator=g) if reduction == "none" else torch.randn((), generator=g)).to(device)
    expected, grad_lp_d, grad_ref_d = masked_kl_with_grads(
        direct_masked_kl, lp.double(), ref.double(), mask, estimator, reduction, upstream
    )
    grad_lp_d, grad_ref_d = torch.nan_to_num(grad_lp_d, nan=0.0), torch.nan_to_num(grad_ref_d, nan=0.0)
    for fn in (masked_kl, reference_masked_kl):
        what = f"{fn.__name__} {mask_kind} {estimator} {reduction}"
        out, grad_lp, grad_ref = masked_kl_with_grads(fn, lp, ref, mask, estimator, reduction, upstream)
        assert out.shape == expected.shape
        assert_close(out, expected, 1e-5, what)
        for name, grad, grad_d in (("grad logprobs", grad_lp, grad_lp_d), ("grad ref", grad_ref, grad_ref_d)):
            assert torch.isfinite(grad).all() and torch.all(grad[1] == 0), f"{what} {name}"
            assert_close(grad, grad_d, 1e-5, f"{what} {name}")
    empty = torch.zeros_like(mask)
    if reduction != "none":
        assert masked_kl(lp, ref, empty, estimator, reduction).item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_logprobs_then_masked_kl(device, mask_kind):
    """The loop's in-loss KL: kernel log-probs (with entropy) into the masked-KL op; the gradient of
    KL + entropy reaches the logits through both ops, the mask's weights included."""
    logits, targets = make_inputs((3, 7), 257, device=device)
    g = torch.Generator().manual_seed(4)
    ref = (-torch.rand(3, 7, generator=g) * 6).to(device)
    mask = make_mask(mask_kind, (3, 7), g, device)
    x = logits.clone().requires_grad_()
    lp, ent = vocab_parallel_logprobs(x, targets, compute_entropy=True)
    kl = masked_kl(lp, ref, mask, "k3", "seq_mean_token_mean")
    (kl + ent.sum()).backward()
    x_r = logits.double().requires_grad_()  # float64 reference: the mask's weights reach the logits' grad
    lp_r, ent_r = reference_vocab_parallel_logprobs(x_r, targets, compute_entropy=True)
    kl_r = direct_masked_kl(lp_r, ref, mask, "k3", "seq_mean_token_mean")
    (kl_r + ent_r.sum()).backward()
    assert_close(lp, lp_r, 1e-5, "logprobs")
    assert_close(kl, kl_r, 1e-5, "kl")
    assert_close(x.grad, x_r.grad, 1e-5, "grad")


# ------------------------------------------------------------------------------------------------
# Whole distributions (evaluation's exact KL)


def naive_log_softmax_and_kl(logits, ref_logits):
    """float64 log_softmax over the full vocabulary, and KL(p || p_ref) with 0 log 0 = 0."""
    logp, logr = logits.double().log_softmax(-1), ref_logits.double().log_softmax(-1)
    p = logp.exp()
    return logp, torch.where(p > 0, p * (logp - logr), torch.zeros_like(p)).sum(-1)


def test_vocab_parallel_log_softmax_and_exact_kl_tp1():
    logits, _ = make_inputs((3, 5), 40, scale=4.0, seed=1)
    ref_logits, _ = make_inputs((3, 5), 40, scale=4.0, seed=2)
    logits[..., 33:] = ref_logits[..., 33:] = NEG_INF  # padded vocabulary
    logp_d, kl_d = naive_log_softmax_and_kl(logits, ref_logits)
    logp = vocab_parallel_log_softmax(logits)
    assert logp.dtype == torch.float32 and torch.all(logp[..., 33:] == NEG_INF)
    assert_close(logp[..., :33], logp_d[..., :33], 1e-5, "log_softmax")
    assert_close(vocab_parallel_kl(logits, ref_logits), kl_d, 1e-5, "exact kl")
    assert torch.equal(vocab_parallel_kl(logits, logits), torch.zeros(3, 5))
    low = logits.to(torch.bfloat16)  # bf16 logits: computed in fp32 from the bf16 values
    assert_close(vocab_parallel_log_softmax(low)[..., :33], naive_log_softmax_and_kl(low, low)[0][..., :33], 1e-5,
                 "bf16 log_softmax")
    with pytest.raises(ValueError, match="same shape"):
        vocab_parallel_kl(logits, ref_logits[..., :20])


# ------------------------------------------------------------------------------------------------
# Threads: the CPU kernels split rows (elements for the KL) across torch's OpenMP threads


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, vocab", [(67, 3001), (3543, 37)])
def test_kernel_threads_match_truth(threads, dtype, rows, vocab):
    # at::parallel_for hands a thread at least 32768 // vocab rows (10 and 885 here), so these row
    # counts keep 2 and 4 threads busy on unequal shares (67 and 3543 are odd, neither divides by
    # 4) and 3001 > the kernel's 2048-element chunk. A row-indexing or shared-buffer bug that only
    # shows with several threads fails here.
    torch.set_num_threads(threads)  # the autouse fixture puts it back
    assert torch.get_num_threads() == threads
    logits, targets = make_inputs((rows,), vocab, dtype, scale=4.0, seed=threads)
    g = torch.Generator().manual_seed(5)
    w_lp, w_ent = torch.randn(rows, generator=g), torch.randn(rows, generator=g)
    lp, ent, grad = run_with_grads(vocab_parallel_logprobs, logits, targets, w_lp, w_ent)
    assert_matches_truth(logits, targets, w_lp, w_ent, lp, ent, grad, f"{threads} threads")
    x = logits.clone().requires_grad_()
    lp_only, _ = vocab_parallel_logprobs(x, targets)  # the backward without the entropy term
    (lp_only * w_lp).sum().backward()
    _, _, grad_lp_only = direct_with_grads(logits, targets, w_lp, torch.zeros(rows), torch.float64)
    assert_close(lp_only, lp, 0, f"{threads} threads logprobs without entropy")
    assert_close(x.grad, grad_lp_only, 1e-5 if dtype == torch.float32 else 2**-8, f"{threads} threads grad")


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_masked_kl_threads(threads, estimator):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(6)
    shape = (5, 10007)  # 50035 elements: 4 shares of at::parallel_for's 16384-element grain, unequal
    lp, ref = -torch.rand(*shape, generator=g) * 5, -torch.rand(*shape, generator=g) * 5
    mask, upstream = make_mask("float", shape, g, "cpu"), torch.randn(*shape, generator=g)
    out, grad_lp, grad_ref = masked_kl_with_grads(masked_kl, lp, ref, mask, estimator, "none", upstream)
    exp, grad_lp_d, grad_ref_d = masked_kl_with_grads(
        direct_masked_kl, lp.double(), ref.double(), mask, estimator, "none", upstream
    )
    assert_close(out, exp, 1e-5, f"{threads} threads kl")
    assert_close(grad_lp, grad_lp_d, 1e-5, f"{threads} threads grad logprobs")
    assert_close(grad_ref, grad_ref_d, 1e-5, f"{threads} threads grad ref")


# ------------------------------------------------------------------------------------------------
# Tensor parallelism: TP=2 under gloo vs TP=1, and megatron-core's vocab_parallel_cross_entropy


def _tp_worker(full_logits, targets, w_lp, w_ent, ref, mask, full_ref_logits):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from gil_megatron.parallel import distributed

    distributed.initialize(tp=2)
    group = dist.group.WORLD
    rank, world = dist.get_rank(), dist.get_world_size()
    v_local = full_logits.shape[-1] // world
    shard = full_logits[..., rank * v_local : (rank + 1) * v_local]
    out = {}
    for name, fn in (("kernel", vocab_parallel_logprobs), ("reference", reference_vocab_parallel_logprobs)):
        out[name] = run_with_grads(fn, shard, targets, w_lp, w_ent, tp_group=group)
    lp, _ = vocab_parallel_logprobs(shard, targets, tp_group=group)
    out["kl"] = masked_kl(lp, ref, mask, "k2", "mean")
    ref_shard = full_ref_logits[..., rank * v_local : (rank + 1) * v_local]
    out["log_softmax"] = vocab_parallel_log_softmax(shard, group)
    out["exact_kl"] = vocab_parallel_kl(shard, ref_shard, group)

    def megatron(logits, tp_group):  # returns -logprob; it edits its input in place, so give it a copy
        x = logits.clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(x, targets, tp_group=tp_group)
        (-(loss * w_lp).sum()).backward()
        return -loss.detach(), x.grad

    single_rank_groups = [dist.new_group([r]) for r in range(world)]
    out["megatron_tp2"] = megatron(shard, group)
    out["megatron_tp1"] = megatron(full_logits, single_rank_groups[rank])
    return out


@needs_kernel
def test_tp2_matches_tp1_and_megatron():
    pytest.importorskip("megatron.core")
    from dist_utils import spawn

    v_local = 96
    logits, targets = make_inputs((3, 8), 2 * v_local, scale=4.0)
    logits[..., -5:] = NEG_INF  # padded vocab at the end of the last shard
    targets = targets % (2 * v_local - 5)
    targets[0, :4] = torch.tensor([0, v_local - 1, v_local, 2 * v_local - 6])  # every shard, at its edges
    g = torch.Generator().manual_seed(3)
    w_lp, w_ent = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    ref, mask = -torch.rand(3, 8, generator=g) * 5, torch.rand(3, 8, generator=g) > 0.3

    lp1, ent1, grad1 = run_with_grads(vocab_parallel_logprobs, logits, targets, w_lp, w_ent)
    kl1 = masked_kl(vocab_parallel_logprobs(logits, targets)[0], ref, mask, "k2", "mean")
    ref_logits = make_inputs((3, 8), 2 * v_local, scale=4.0, seed=9)[0]
    ref_logits[..., -5:] = NEG_INF
    log_softmax_1, exact_kl_1 = naive_log_softmax_and_kl(logits, ref_logits)
    results = spawn(_tp_worker, 2, logits, targets, w_lp, w_ent, ref, mask, ref_logits)

    for rank, res in enumerate(results):
        cols = slice(rank * v_local, (rank + 1) * v_local)
        for name in ("kernel", "reference"):
            lp, ent, grad = res[name]
            assert_close(lp, lp1, 1e-5, f"rank {rank} {name} logprobs")
            assert_close(ent, ent1, 1e-5, f"rank {rank} {name} entropy")
            assert_close(grad, grad1[..., cols], 1e-5, f"rank {rank} {name} grad")
        assert_close(res["kl"], kl1, 1e-5, f"rank {rank} kl")
        assert_close(res["log_softmax"], log_softmax_1[..., cols], 1e-5, f"rank {rank} log_softmax")
        assert_close(res["exact_kl"], exact_kl_1, 1e-5, f"rank {rank} exact kl")
        # megatron's gradient is that of the log-prob term only
        _, _, grad_lp_only = run_with_grads(vocab_parallel_logprobs, logits, targets, w_lp, torch.zeros_like(w_ent))
        for name, full in (("megatron_tp2", False), ("megatron_tp1", True)):
            lp_m, grad_m = res[name]
            assert_close(lp1, lp_m, 1e-5, f"rank {rank} {name} logprobs")
            assert_close(grad_m, grad_lp_only if full else grad_lp_only[..., cols], 1e-5, f"{name} grad")


# ------------------------------------------------------------------------------------------------
# CUDA against the CPU


@needs_cuda
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [64, 4096, 4104, 32000])
def test_cuda_matches_cpu_kernel(dtype, vocab):
    logits, targets = make_inputs((16, 8), vocab, dtype)
    logits[..., -3:] = NEG_INF
    targets = targets % (vocab - 3)
    w_lp, w_ent = torch.randn(16, 8), torch.randn(16, 8)
    lp_c, ent_c, grad_c = run_with_grads(vocab_parallel_logprobs, logits, targets, w_lp, w_ent)
    lp_g, ent_g, grad_g = run_with_grads(
        vocab_parallel_logprobs, logits.cuda(), targets.cuda(), w_lp.cuda(), w_ent.cuda()
    )
    assert_matches_truth(logits, targets, w_lp, w_ent, lp_c, ent_c, grad_c, "cpu kernel")
    assert_matches_truth(logits, targets, w_lp, w_ent, lp_g, ent_g, grad_g, "cuda kernel")
