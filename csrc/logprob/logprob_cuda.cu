// CUDA kernels of the gil_megatron op family, registered for the CUDA dispatch key (schemas and the
// math are in logprob_cpu.cpp / logprob.h).
//
// Forward (logprob_partials): one row per block of 256 threads (or one row per warp when the vocab
// shard is small). Each thread streams its strided share of the row with 16-byte loads, four loads in
// flight, and keeps an online (max, sum-exp, entropy partial) in fp32; the per-thread states are merged
// with warp shuffles and, for a block row, through shared memory. No atomics: thread 0 of the row
// writes its four scalars.
// Backward (logprob_backward): same layout; each element's gradient is computed from the saved global
// max and log-sum-exp (and entropy) and written once, 16 bytes at a time, in the logits' dtype.
#include "logprob.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>

namespace gil_megatron {
namespace {

constexpr int kBlock = 256;
constexpr int kUnroll = 4;                  // 16-byte loads in flight per thread
constexpr int64_t kWarpRowMaxVocab = 4096;  // at or below this, one warp per row

struct Stats {
  float m;  // running max
  float s;  // sum exp(z - m)
  float w;  // sum exp(z - m) * (z - m)
};

template <bool kEnt>
__device__ __forceinline__ Stats merge(const Stats& a, const Stats& b) {
  Stats r;
  r.m = fmaxf(a.m, b.m);
  if (r.m == -INFINITY) return Stats{-INFINITY, 0.f, 0.f};
  const float da = a.m - r.m, db = b.m - r.m;  // -inf for an empty side
  const float ea = __expf(da), eb = __expf(db);
  r.s = a.s * ea + b.s * eb;
  r.w = 0.f;
  if (kEnt) {
    r.w = (a.m != -INFINITY ? ea * (a.w + da * a.s) : 0.f) + (b.m != -INFINITY ? eb * (b.w + db * b.s) : 0.f);
  }
  return r;
}

template <bool kEnt, int K>
__device__ __forceinline__ void accumulate(Stats& st, const float (&z)[K]) {
  float vm = z[0];
#pragma unroll
  for (int k = 1; k < K; ++k) vm = fmaxf(vm, z[k]);
  if (vm > st.m) {  // rescale the running sums to the new max
    if (st.m != -INFINITY) {
      const float d = st.m - vm, a = __expf(d);
      if (kEnt) st.w = a * (st.w + d * st.s);
      st.s *= a;
    }
    st.m = vm;
  }
  if (st.m == -INFINITY) return;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const float d = z[k] - st.m;
    const float e = __expf(d);  // 0 for z = -inf
    st.s += e;
    if (kEnt) st.w += z[k] != -INFINITY ? e * d : 0.f;
  }
}

template <bool kEnt>
__device__ __forceinline__ Stats warp_reduce(Stats st) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Stats o;
    o.m = __shfl_xor_sync(0xffffffffu, st.m, off);
    o.s = __shfl_xor_sync(0xffffffffu, st.s, off);
    o.w = __shfl_xor_sync(0xffffffffu, st.w, off);
    st = merge<kEnt>(st, o);
  }
  return st;
}

template <typename T>
struct VecOf {
  static constexpr int N = 16 / sizeof(T);
};

template <typename T, int K>
__device__ __forceinline__ void unpack(const uint4& raw, float* out) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int k = 0; k < K; ++k) out[k] = static_cast<float>(e[k]);
}

template <typename T, int K>
__device__ __forceinline__ uint4 pack(const float* in) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int k = 0; k < K; ++k) e[k] = static_cast<T>(in[k]);
  return raw;
}

// Row layout shared by both kernels: kWarpsPerRow == 8 -> one row per block; == 1 -> 8 rows per block.
template <int kWarpsPerRow>
struct RowLayout {
  static_assert(kWarpsPerRow == 1 || kWarpsPerRow == kBlock / 32, "one warp or one block per row");
  static constexpr int kThreads = 32 * kWarpsPerRow;
  static constexpr int kRowsPerBlock = kBlock / kThreads;
  __device__ __forceinline__ static int tid() { return threadIdx.x % kThreads; }
  __device__ __forceinline__ static int64_t row() {
    return static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreads;
  }
};

template <typename T, int kWarpsPerRow, bool kEnt, bool kVec>
__global__ void __launch_bounds__(kBlock)
    partials_kernel(const T* __restrict__ logits, int64_t row_stride, const int64_t* __restrict__ targets,
                    int64_t n_rows, int64_t V, int64_t vocab_start, int64_t vocab_size,
                    float* __restrict__ out_max,
                    float* __restrict__ out_sumexp, float* __restrict__ out_target, float* __restrict__ out_ent) {
  using L = RowLayout<kWarpsPerRow>;
  const int64_t row = L::row();
  if (row >= n_rows) return;  // uniform per row group: a block row exits as a whole
  const int tid = L::tid();
  const T* z = logits + row * row_stride;
  Stats st{-INFINITY, 0.f, 0.f};
  int64_t tail = 0;
  if constexpr (kVec) {
    constexpr int K = VecOf<T>::N;
    const uint4* zv = reinterpret_cast<const uint4*>(z);
    const int64_t nvec = V / K;
    int64_t v = tid;
    for (; v + (kUnroll - 1) * L::kThreads < nvec; v += kUnroll * L::kThreads) {
      uint4 raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) raw[u] = zv[v + u * L::kThreads];
      float x[kUnroll * K];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) unpack<T, K>(raw[u], x + u * K);
      accumulate<kEnt>(st, x);
    }
    for (; v < nvec; v += L::kThreads) {
      float x[K];
      unpack<T, K>(zv[v], x);
      accumulate<kEnt>(st, x);
    }
    tail = nvec * K;
  }
  for (int64_t j = tail + tid; j < V; j += L::kThreads) {
    float x[1] = {static_cast<float>(z[j])};
    accumulate<kEnt>(st, x);
  }

  st = warp_reduce<kEnt>(st);
  if constexpr (kWarpsPerRow > 1) {
    __shared__ Stats partial[kWarpsPerRow];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) partial[warp] = st;
    __syncthreads();
    if (warp != 0) return;
    st = lane < kWarpsPerRow ? partial[lane] : Stats{-INFINITY, 0.f, 0.f};
    st = warp_reduce<kEnt>(st);
  }
  if (tid == 0) {
    CUDA_KERNEL_ASSERT(targets[row] >= 0 && targets[row] < vocab_size);  // token ids in [0, vocab_size)
    const int64_t t = targets[row] - vocab_start;
    out_max[row] = st.m;
    out_sumexp[row] = st.s;
    out_target[row] = (t >= 0 && t < V) ? static_cast<float>(z[t]) : 0.f;
    if (kEnt) out_ent[row] = st.w;
  }
}

template <bool kEnt>
__device__ __forceinline__ float grad_of(float z, float M, float log_s, float g, float gh, float H) {
  const float lp = (z - M) - log_s;
  const float p = __expf(lp);
  const float v = kEnt ? -p * (g + gh * (lp + H)) : -p * g;
  return z != -INFINITY ? v : 0.f;
}

template <typename T, int kWarpsPerRow, bool kEnt, bool kVec>
__global__ void __launch_bounds__(kBlock)
    backward_kernel(const T* __restrict__ logits, int64_t row_stride, const int64_t* __restrict__ targets,
                    int64_t n_rows, int64_t V, int64_t vocab_start, const float* __restrict__ gmax,
                    const float* __restrict__ log_s,
                    const float* __restrict__ grad_lp, const float* __restrict__ entropy,
                    const float* __restrict__ grad_ent, T* __restrict__ grad) {
  using L = RowLayout<kWarpsPerRow>;
  const int64_t row = L::row();
  if (row >= n_rows) return;
  const int tid = L::tid();
  const T* z = logits + row * row_stride;
  T* out = grad + row * V;
  const float M = gmax[row], LS = log_s[row], g = grad_lp[row];
  const float gh = kEnt ? grad_ent[row] : 0.f, H = kEnt ? entropy[row] : 0.f;
  const int64_t t = targets[row] - vocab_start;  // the one-hot term lands only on the owning shard
  int64_t tail = 0;
  if constexpr (kVec) {
    constexpr int K = VecOf<T>::N;
    const uint4* zv = reinterpret_cast<const uint4*>(z);
    uint4* ov = reinterpret_cast<uint4*>(out);
    const int64_t nvec = V / K;
    int64_t v = tid;
    for (; v + (kUnroll - 1) * L::kThreads < nvec; v += kUnroll * L::kThreads) {
      uint4 raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) raw[u] = zv[v + u * L::kThreads];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float x[K];
        unpack<T, K>(raw[u], x);
        const int64_t j0 = (v + u * L::kThreads) * K;
#pragma unroll
        for (int k = 0; k < K; ++k) x[k] = grad_of<kEnt>(x[k], M, LS, g, gh, H) + (j0 + k == t ? g : 0.f);
        ov[v + u * L::kThreads] = pack<T, K>(x);
      }
    }
    for (; v < nvec; v += L::kThreads) {
      float x[K];
      unpack<T, K>(zv[v], x);
      const int64_t j0 = v * K;
#pragma unroll
      for (int k = 0; k < K; ++k) x[k] = grad_of<kEnt>(x[k], M, LS, g, gh, H) + (j0 + k == t ? g : 0.f);
      ov[v] = pack<T, K>(x);
    }
    tail = nvec * K;
  }
  for (int64_t j = tail + tid; j < V; j += L::kThreads) {
    const float x = grad_of<kEnt>(static_cast<float>(z[j]), M, LS, g, gh, H) + (j == t ? g : 0.f);
    out[j] = static_cast<T>(x);
  }
}

bool is_aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Calls f(kWarpsPerRow, kEnt, kVec) as compile-time constants.
template <typename F>
void dispatch_layout(int64_t V, bool ent, bool vec, const F& f) {
  auto with_vec = [&](auto warps, auto e) {
    if (vec)
      f(warps, e, std::true_type{});
    else
      f(warps, e, std::false_type{});
  };
  auto with_ent = [&](auto warps) {
    if (ent)
      with_vec(warps, std::true_type{});
    else
      with_vec(warps, std::false_type{});
  };
  if (V <= kWarpRowMaxVocab)
    with_ent(std::integral_constant<int, 1>{});
  else
    with_ent(std::integral_constant<int, kBlock / 32>{});
}

template <typename T>
void launch_partials(const at::Tensor& logits, const at::Tensor& targets, int64_t vocab_start,
                     int64_t vocab_size, bool ent,
                     at::Tensor& mx, at::Tensor& se, at::Tensor& tl, at::Tensor& en) {
  const int64_t n = logits.size(0), V = logits.size(1), stride = logits.stride(0);
  const T* ptr = logits.const_data_ptr<T>();
  const bool vec = is_aligned16(ptr) && stride % VecOf<T>::N == 0;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_layout(V, ent, vec, [&](auto warps, auto e, auto v) {
    constexpr int kW = decltype(warps)::value;
    constexpr int rows_per_block = kBlock / (32 * kW);
    const int64_t blocks = ceil_div(n, rows_per_block);
    partials_kernel<T, kW, decltype(e)::value, decltype(v)::value><<<blocks, kBlock, 0, stream>>>(
        ptr, stride, targets.const_data_ptr<int64_t>(), n, V, vocab_start, vocab_size,
        mx.mutable_data_ptr<float>(), se.mutable_data_ptr<float>(), tl.mutable_data_ptr<float>(),
        ent ? en.mutable_data_ptr<float>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename T>
void launch_backward(const at::Tensor& logits, const at::Tensor& targets, int64_t vocab_start,
                     const at::Tensor& gmax, const at::Tensor& log_s, const at::Tensor& grad_lp,
                     const c10::optional<at::Tensor>& entropy,
                     const c10::optional<at::Tensor>& grad_entropy, at::Tensor& grad) {
  const int64_t n = logits.size(0), V = logits.size(1), stride = logits.stride(0);
  const T* ptr = logits.const_data_ptr<T>();
  T* gptr = grad.mutable_data_ptr<T>();
  constexpr int K = VecOf<T>::N;
  const bool vec = is_aligned16(ptr) && is_aligned16(gptr) && stride % K == 0 && V % K == 0;
  const bool ent = entropy.has_value();
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_layout(V, ent, vec, [&](auto warps, auto e, auto v) {
    constexpr int kW = decltype(warps)::value;
    constexpr int rows_per_block = kBlock / (32 * kW);
    const int64_t blocks = ceil_div(n, rows_per_block);
    backward_kernel<T, kW, decltype(e)::value, decltype(v)::value><<<blocks, kBlock, 0, stream>>>(
        ptr, stride, targets.const_data_ptr<int64_t>(), n, V, vocab_start, gmax.const_data_ptr<float>(),
        log_s.const_data_ptr<float>(),
        grad_lp.const_data_ptr<float>(), ent ? entropy->const_data_ptr<float>() : nullptr,
        ent ? grad_entropy->const_data_ptr<float>() : nullptr, gptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprob_partials_cuda(const at::Tensor& logits,
                                                                                const at::Tensor& targets,
                                                                                int64_t vocab_start,
                                                                                int64_t vocab_size,
                                                                                bool compute_entropy) {
  check_partials_inputs(logits, targets);
  TORCH_CHECK(vocab_start >= 0 && vocab_start + logits.size(1) <= vocab_size, "logprob_partials: shard [",
              vocab_start, ", ", vocab_start + logits.size(1), ") is not inside the vocab [0, ", vocab_size, ")");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.size(0);
  const auto opts = logits.options().dtype(at::kFloat);
  at::Tensor mx = at::empty({n}, opts), se = at::empty({n}, opts), tl = at::empty({n}, opts);
  at::Tensor en = at::empty({compute_entropy ? n : 0}, opts);
  if (n == 0) return {mx, se, tl, en};
  const at::Tensor tg = targets.contiguous();
  dispatch_logits_dtype(logits.scalar_type(), [&](auto tag) {
    launch_partials<decltype(tag)>(logits, tg, vocab_start, vocab_size, compute_entropy, mx, se, tl, en);
  });
  return {mx, se, tl, en};
}

at::Tensor logprob_backward_cuda(const at::Tensor& logits, const at::Tensor& targets, int64_t vocab_start,
                                 const at::Tensor& max, const at::Tensor& log_sumexp,
                                 const at::Tensor& grad_logprobs,
                                 const c10::optional<at::Tensor>& entropy,
                                 const c10::optional<at::Tensor>& grad_entropy) {
  check_backward_inputs(logits, targets, max, log_sumexp, grad_logprobs, entropy, grad_entropy);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad = at::empty({logits.size(0), logits.size(1)}, logits.options());
  if (logits.size(0) == 0) return grad;
  const at::Tensor tg = targets.contiguous();
  dispatch_logits_dtype(logits.scalar_type(), [&](auto tag) {
    launch_backward<decltype(tag)>(logits, tg, vocab_start, max, log_sumexp, grad_logprobs, entropy, grad_entropy,
                                   grad);
  });
  return grad;
}

// ------------------------------------------------------------------------------------------------
// Masked KL, elementwise over per-token scalars.
template <typename S>
__global__ void masked_kl_kernel(const S* __restrict__ lp, const S* __restrict__ ref, const S* __restrict__ mask,
                                 S* __restrict__ out, int64_t n, KLEstimator est) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = mask[i] != S(0) ? kl_value(lp[i], ref[i], est) * mask[i] : S(0);
  }
}

template <typename S>
__global__ void masked_kl_backward_kernel(const S* __restrict__ grad, const S* __restrict__ lp,
                                          const S* __restrict__ ref, const S* __restrict__ mask,
                                          S* __restrict__ out, int64_t n, KLEstimator est) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = mask[i] != S(0) ? grad[i] * mask[i] * kl_grad(lp[i], ref[i], est) : S(0);
  }
}

int elementwise_blocks(int64_t n) { return static_cast<int>(std::min<int64_t>(ceil_div(n, kBlock), 65535)); }

at::Tensor masked_kl_cuda(const at::Tensor& logprobs, const at::Tensor& ref_logprobs, const at::Tensor& mask,
                          c10::string_view estimator) {
  check_kl_inputs(logprobs, ref_logprobs, mask);
  const KLEstimator est = parse_kl_estimator(std::string(estimator));
  const c10::cuda::CUDAGuard guard(logprobs.device());
  const at::Tensor lp = logprobs.contiguous(), ref = ref_logprobs.contiguous(), mk = mask.contiguous();
  at::Tensor out = at::empty(lp.sizes(), lp.options());
  const int64_t n = lp.numel();
  if (n == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (lp.scalar_type() == at::kFloat) {
    masked_kl_kernel<float><<<elementwise_blocks(n), kBlock, 0, stream>>>(
        lp.const_data_ptr<float>(), ref.const_data_ptr<float>(), mk.const_data_ptr<float>(),
        out.mutable_data_ptr<float>(), n, est);
  } else {
    masked_kl_kernel<double><<<elementwise_blocks(n), kBlock, 0, stream>>>(
        lp.const_data_ptr<double>(), ref.const_data_ptr<double>(), mk.const_data_ptr<double>(),
        out.mutable_data_ptr<double>(), n, est);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor masked_kl_backward_cuda(const at::Tensor& grad, const at::Tensor& logprobs,
                                   const at::Tensor& ref_logprobs, const at::Tensor& mask,
                                   c10::string_view estimator) {
  check_kl_inputs(logprobs, ref_logprobs, mask);
  TORCH_CHECK(grad.sizes() == logprobs.sizes() && grad.scalar_type() == logprobs.scalar_type(),
              "masked_kl_backward: grad ", grad.scalar_type(), grad.sizes(), " must match logprobs ",
              logprobs.scalar_type(), logprobs.sizes());
  const KLEstimator est = parse_kl_estimator(std::string(estimator));
  const c10::cuda::CUDAGuard guard(logprobs.device());
  const at::Tensor lp = logprobs.contiguous(), ref = ref_logprobs.contiguous(), mk = mask.contiguous();
  const at::Tensor gr = grad.contiguous();
  at::Tensor out = at::empty(lp.sizes(), lp.options());
  const int64_t n = lp.numel();
  if (n == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (lp.scalar_type() == at::kFloat) {
    masked_kl_backward_kernel<float><<<elementwise_blocks(n), kBlock, 0, stream>>>(
        gr.const_data_ptr<float>(), lp.const_data_ptr<float>(), ref.const_data_ptr<float>(),
        mk.const_data_ptr<float>(), out.mutable_data_ptr<float>(), n, est);
  } else {
    masked_kl_backward_kernel<double><<<elementwise_blocks(n), kBlock, 0, stream>>>(
        gr.const_data_ptr<double>(), lp.const_data_ptr<double>(), ref.const_data_ptr<double>(),
        mk.const_data_ptr<double>(), out.mutable_data_ptr<double>(), n, est);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gil_megatron, CUDA, m) {
  m.impl("logprob_partials", &logprob_partials_cuda);
  m.impl("logprob_backward", &logprob_backward_cuda);
  m.impl("masked_kl", &masked_kl_cuda);
  m.impl("masked_kl_backward", &masked_kl_backward_cuda);
}

}  // namespace gil_megatron
