"""Benchmark: per-token log-probs + masked KL from logits [tokens, vocab], three ways.

    (a) torch      log_softmax(logits.float()) + gather + KL (gil_megatron.algo.kl), the naive way
    (b) megatron   megatron-core's vocab_parallel_cross_entropy (tp=1) + the same KL
    (c) ours       gil_megatron.ops: vocab_parallel_logprobs (csrc/logprob kernel, one pass over the
                   logits) then masked_kl (the kernel's masked-KL op), as the PPO loop calls them

For each shape and dtype it prints the median time of the forward (under no_grad, as when scoring
old/reference log-probs) and of forward+backward (loss = sum(w * logprobs) + kl, backward to the
logits), the peak extra memory of each, and for (c) the effective bandwidth: bytes the kernel must
move (forward: read logits; forward+backward: read them twice and write grad-logits) divided by the
time, also as a percentage of the device's copy bandwidth (a large tensor copy, bytes read + written
/ time). The last line gives the ratios a/c and b/c.

Peak extra memory is measured during one extra call (outside the timed ones), outputs and autograd
buffers included, the inputs excluded:
  - on GPU ("alloc MiB"): torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus
    what was allocated before the call.
  - on CPU, two measurements:
    "alloc MiB": the running sum of every allocation and free of torch's CPU allocator, recorded by
      the torch profiler (profile_memory=True); its maximum is the peak. It sees short-lived
      temporaries but not memory that does not come from torch's allocator (the kernel's per-thread
      stack buffers, OpenMP).
    "RSS MiB": the process's resident-set high-water mark during the call above its resident set
      before it (Linux: the mark is reset by writing 5 to /proc/self/clear_refs, then read from
      VmHWM in /proc/self/status). It sees every byte touched, whoever allocated it. So that freed
      memory is not silently reused from malloc's cache, the script re-runs itself with
      MALLOC_MMAP_THRESHOLD_=65536 and MALLOC_TRIM_THRESHOLD_=0 (glibc gives blocks of 64 KiB and
      more back to the system on free).

Usage (run from the repository root; this is not a timed test):
    python benchmarks/bench_logprob.py                 # shapes 4096x32000, 16384x32000, 4096x128256
    python benchmarks/bench_logprob.py --quick         # small shapes, a smoke run
    python benchmarks/bench_logprob.py --device cuda --dtypes fp32,bf16
    python benchmarks/bench_logprob.py --shapes 4096x32000,4096x128256
Megatron (b) needs megatron-core; without it that row is skipped. On CPU a one-rank gloo group is
created for it.
"""

import argparse
import gc
import os
import statistics
import sys
import time

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler quiet

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gil_megatron.algo.kl import kl_per_token  # noqa: E402
from gil_megatron.ops import kernel_backend, masked_kl, vocab_parallel_logprobs  # noqa: E402

SHAPES = [(4096, 32000), (16384, 32000), (4096, 128256)]
QUICK_SHAPES = [(512, 8000), (256, 32000)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------------
# The three implementations: (logits [N, V], targets [N], ref [N], mask [N]) -> (logprobs, kl)


def masked_mean_kl(logprobs, ref, mask):
    kl = kl_per_token(logprobs, ref, "k1") * mask
    return kl.sum() / mask.sum().clamp_min(1)


def impl_torch(logits, targets, ref, mask):
    logp = torch.log_softmax(logits.float(), dim=-1)  # [N, V] fp32
    logprobs = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logprobs, masked_mean_kl(logprobs, ref, mask)


def make_impl_megatron(device):
    try:
        import torch.distributed as dist
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    except ImportError:
        return None
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=0, world_size=1, init_method="tcp://127.0.0.1:29517")
    group = dist.new_group([0])

    def impl_megatron(logits, targets, ref, mask):
        # note: for fp32 input megatron works in place on the logits (they become the softmax)
        logprobs = -vocab_parallel_cross_entropy(logits, targets, tp_group=group)
        return logprobs, masked_mean_kl(logprobs, ref, mask)

    return impl_megatron


def impl_ours(logits, targets, ref, mask):
    logprobs, _ = vocab_parallel_logprobs(logits, targets)
    return logprobs, masked_kl(logprobs, ref, mask, "k1", "mean")


def kernel_only(logits, targets, with_backward):
    """The raw kernel launches of (c), without the Python-side finalise / KL / checks around them."""
    m, s, t, _ = torch.ops.gil_megatron.logprob_partials(logits, targets, 0, logits.shape[-1], False)
    if not with_backward:
        return m
    log_s = s.log()
    return torch.ops.gil_megatron.logprob_backward(logits, targets, 0, m, log_s, t, None, None)


# ------------------------------------------------------------------------------------------------
# Measurement


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def forward(impl, logits, targets, ref, mask):
    with torch.no_grad():
        return impl(logits, targets, ref, mask)


def forward_backward(impl, logits, targets, ref, mask, w):
    logits.grad = None
    logprobs, kl = impl(logits, targets, ref, mask)
    ((logprobs * w).sum() + kl).backward()
    grad = logits.grad
    logits.grad = None
    return grad


def median_ms(fn, device, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_bytes(fn, device):
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        if e.device_type() == torch.autograd.DeviceType.CPU:
            running += e.nbytes()
            peak = max(peak, running)
    return peak


MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_peak_extra_bytes(fn):
    """Resident-set high-water mark during fn() above the resident set before it; None where the
    mark cannot be reset (not Linux)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current VmRSS
    except OSError:
        return None
    base = _status_kib("VmRSS")
    out = fn()
    peak = _status_kib("VmHWM")
    del out
    return (peak - base) * 1024


def mib(nbytes):
    if nbytes is None:
        return "n/a"
    return f"{nbytes / 2**20:.1f}" if nbytes >= 2**20 else f"{nbytes / 2**20:.3f}"


def ratio(a, c):
    """a / c, or a bound when c is below one 4 KiB page (the measurement's resolution)."""
    if a is None or c is None:
        return "n/a"
    if c >= 4096:
        return f"{a / c:.1f}x"
    return "both<4KiB" if a < 4096 else f">{a / 4096:.0f}x"


def copy_bandwidth(device, nbytes):
    """Bytes read + written per second by a large tensor copy."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, repeats=10 if device.type == "cuda" else 3)
    return 2 * nbytes / (ms * 1e-3)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtypes", default=None, help="comma list of fp32,bf16,fp16 (default: fp32 on CPU, fp32,bf16 on GPU)"
    )
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median)")
    p.add_argument("--shapes", default=None, help="comma list of TOKENSxVOCAB (default: the three above)")
    p.add_argument("--no-megatron", action="store_true")
    args = p.parse_args()

    device = torch.device(args.device)
    if device.type == "cpu" and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **MALLOC_ENV})
    dtypes = args.dtypes or ("fp32,bf16" if device.type == "cuda" else "fp32")
    dtypes = [DTYPES[d] for d in dtypes.split(",")]
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.shapes.split(",")]
    with_rss = device.type == "cpu"
    impls = {"a:torch": impl_torch}
    megatron = None if args.no_megatron else make_impl_megatron(device)
    if megatron is not None:
        impls["b:megatron"] = megatron
    impls["c:ours"] = impl_ours

    copy_bw = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (1 << 28))
    threads = torch.get_num_threads()
    print(
        f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{threads} threads'})"
        f" backend(ours)={kernel_backend(device)} torch={torch.__version__}"
        f" copy_bw={copy_bw / 1e9:.1f} GB/s (read+write) repeats={repeats}"
    )
    header = (
        f"{'tokens x vocab':>16} {'dtype':>9} {'impl':>11} {'fwd ms':>9} {'fwd+bwd ms':>11}"
        f" {'alloc MiB fwd/f+b':>19}" + (f" {'RSS MiB fwd/f+b':>17}" if with_rss else "")
        + f" {'eff GB/s fwd/f+b':>17} {'% copy':>12}"
    )
    print(header)
    print("-" * len(header))
    ratio_parts = []
    for n, v in shapes:
        for dtype in dtypes:
            g = torch.Generator(device=device).manual_seed(0)
            logits = (torch.randn(n, v, generator=g, device=device) * 2).to(dtype)
            targets = torch.randint(0, v, (n,), generator=g, device=device)
            ref = -torch.rand(n, generator=g, device=device) * 5
            mask = (torch.rand(n, generator=g, device=device) > 0.2).float()
            w = torch.randn(n, generator=g, device=device)
            results = {}
            for name, impl in impls.items():  # megatron last-but-one; it may edit the logits in place
                x = logits.detach().requires_grad_()
                fwd = lambda: forward(impl, logits, targets, ref, mask)  # noqa: E731
                fb = lambda: forward_backward(impl, x, targets, ref, mask, w)  # noqa: E731
                res = dict(
                    fwd=median_ms(fwd, device, repeats),
                    fb=median_ms(fb, device, repeats),
                    mem_fwd=peak_extra_bytes(fwd, device),
                    mem_fb=peak_extra_bytes(fb, device),
                )
                if with_rss:
                    res.update(rss_fwd=rss_peak_extra_bytes(fwd), rss_fb=rss_peak_extra_bytes(fb))
                results[name] = res
                bw = ""
                if name == "c:ours":
                    nbytes = n * v * logits.element_size()
                    bw_f, bw_fb = nbytes / (res["fwd"] * 1e-3), 3 * nbytes / (res["fb"] * 1e-3)
                    bw = (
                        f"{bw_f / 1e9:>8.1f}/{bw_fb / 1e9:<8.1f}"
                        f" {100 * bw_f / copy_bw:>5.0f}/{100 * bw_fb / copy_bw:<5.0f}"
                    )
                rss = ""
                if with_rss:
                    rss = " " + f"{mib(res['rss_fwd'])}/{mib(res['rss_fb'])}".rjust(17)
                print(
                    f"{f'{n} x {v}':>16} {str(dtype).replace('torch.', ''):>9} {name:>11} {res['fwd']:>9.2f}"
                    f" {res['fb']:>11.2f} {f'{mib(res['mem_fwd'])}/{mib(res['mem_fb'])}':>19}{rss} {bw}",
                    flush=True,
                )
            if kernel_backend(device) != "reference":  # bandwidth of the kernels alone
                kf = median_ms(lambda: kernel_only(logits, targets, False), device, repeats)
                kfb = median_ms(lambda: kernel_only(logits, targets, True), device, repeats)
                nbytes = n * v * logits.element_size()
                bw_f, bw_fb = nbytes / (kf * 1e-3), 3 * nbytes / (kfb * 1e-3)
                print(
                    f"{f'{n} x {v}':>16} {str(dtype).replace('torch.', ''):>9} {'c:kernels':>11} {kf:>9.2f}"
                    f" {kfb:>11.2f} {'':>19}{' ' * 18 if with_rss else ''} {bw_f / 1e9:>8.1f}/{bw_fb / 1e9:<8.1f}"
                    f" {100 * bw_f / copy_bw:>5.0f}/{100 * bw_fb / copy_bw:<5.0f}",
                    flush=True,
                )
            c = results["c:ours"]
            for name in [k for k in results if k != "c:ours"]:
                r = results[name]
                part = (
                    f"{n}x{v}/{str(dtype).replace('torch.', '')} {name[0]}/c: fwd {r['fwd'] / c['fwd']:.1f}x"
                    f" f+b {r['fb'] / c['fb']:.1f}x alloc {ratio(r['mem_fwd'], c['mem_fwd'])}"
                    f"/{ratio(r['mem_fb'], c['mem_fb'])}"
                )
                if with_rss:
                    part += f" RSS {ratio(r['rss_fwd'], c['rss_fwd'])}/{ratio(r['rss_fb'], c['rss_fb'])}"
                ratio_parts.append(part)
            del logits, targets, ref, mask, w, x
    print("ratios (time a/c, b/c; peak extra memory fwd/f+b): " + "; ".join(ratio_parts))


if __name__ == "__main__":
    main()
