// Operator schemas of the gil_megatron op family and their CPU kernels. See logprob.h for the math.
//
// CPU strategy: rows are split across threads with at::parallel_for (torch's OpenMP pool, so
// torch.set_num_threads applies). Each row is streamed in chunks of kChunk elements: the chunk is
// converted to fp32 once (bf16/fp16) into an L1-resident buffer, its max is taken, the running
// (max, sum-exp, entropy partial) of the row is rescaled if the max grew, and the chunk's sum-exp is
// added. So the logits are read from memory once (online softmax at chunk granularity) and the
// inner loops are plain, branch-free loops over floats that the compiler vectorises. The hot loops
// are compiled for AVX-512, AVX2 and baseline x86-64 with target_clones and picked at load time.
// exp is a small Cody-Waite + polynomial routine (about 1 ulp on the range we use, x <= 0) so that
// it inlines into the vector loops; libm's expf would not vectorise without -ffast-math, which we
// avoid because -inf logits (padded vocab) must keep IEEE semantics.
#include "logprob.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define GIL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GIL_CLONES
#endif
#if defined(__GNUC__)
#define GIL_INLINE inline __attribute__((always_inline))  // must inline into every clone to vectorise
#else
#define GIL_INLINE inline
#endif

namespace gil_megatron {

KLEstimator parse_kl_estimator(const std::string& name) {
  if (name == "k1") return KLEstimator::K1;
  if (name == "k2") return KLEstimator::K2;
  if (name == "k3") return KLEstimator::K3;
  TORCH_CHECK_VALUE(false, "unknown KL estimator '", name, "'; valid: ['k1', 'k2', 'k3']");
}

// ------------------------------------------------------------------------------------------------
// Input checks (shared by the CPU and CUDA kernels).
void check_partials_inputs(const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK(logits.dim() == 2, "logprob_partials: logits must be 2-D [tokens, vocab_local], got shape ",
              logits.sizes());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0),
              "logprob_partials: targets must be 1-D [tokens] matching logits ", logits.sizes(), ", got ",
              targets.sizes());
  TORCH_CHECK(logits.size(1) > 0, "logprob_partials: the vocab shard is empty (logits ", logits.sizes(), ")");
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "logprob_partials: logits must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(targets.scalar_type() == at::kLong, "logprob_partials: targets must be int64, got ",
              targets.scalar_type());
  TORCH_CHECK(logits.stride(1) == 1 || logits.size(1) == 1,
              "logprob_partials: the vocab dim of logits must be contiguous, got strides ", logits.strides());
  TORCH_CHECK(targets.device() == logits.device(), "logprob_partials: targets on ", targets.device(),
              " but logits on ", logits.device());
}

void check_backward_inputs(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& max,
                           const at::Tensor& log_sumexp, const at::Tensor& grad_logprobs,
                           const c10::optional<at::Tensor>& entropy,
                           const c10::optional<at::Tensor>& grad_entropy) {
  check_partials_inputs(logits, targets);
  const int64_t n = logits.size(0);
  auto check_row_tensor = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.scalar_type() == at::kFloat && t.is_contiguous(),
                "logprob_backward: ", name, " must be a contiguous float32 [", n, "] tensor, got ",
                t.scalar_type(), " ", t.sizes());
    TORCH_CHECK(t.device() == logits.device(), "logprob_backward: ", name, " on ", t.device(),
                " but logits on ", logits.device());
  };
  check_row_tensor(max, "max");
  check_row_tensor(log_sumexp, "log_sumexp");
  check_row_tensor(grad_logprobs, "grad_logprobs");
  TORCH_CHECK(entropy.has_value() == grad_entropy.has_value(),
              "logprob_backward: pass both entropy and grad_entropy or neither");
  if (entropy.has_value()) {
    check_row_tensor(*entropy, "entropy");
    check_row_tensor(*grad_entropy, "grad_entropy");
  }
}

void check_kl_inputs(const at::Tensor& logprobs, const at::Tensor& ref_logprobs, const at::Tensor& mask) {
  TORCH_CHECK(logprobs.sizes() == ref_logprobs.sizes() && logprobs.sizes() == mask.sizes(),
              "masked_kl: logprobs ", logprobs.sizes(), ", ref_logprobs ", ref_logprobs.sizes(), " and mask ",
              mask.sizes(), " must have the same shape");
  const auto dt = logprobs.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "masked_kl: logprobs must be float32 or float64, got ", dt);
  TORCH_CHECK(ref_logprobs.scalar_type() == dt && mask.scalar_type() == dt,
              "masked_kl: logprobs, ref_logprobs and mask must share a dtype, got ", dt, ", ",
              ref_logprobs.scalar_type(), ", ", mask.scalar_type());
  TORCH_CHECK(ref_logprobs.device() == logprobs.device() && mask.device() == logprobs.device(),
              "masked_kl: all inputs must be on one device, got ", logprobs.device(), ", ",
              ref_logprobs.device(), ", ", mask.device());
}

namespace {

constexpr int64_t kChunk = 2048;  // fp32 elements per chunk: 8 KiB, stays in L1
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) for x <= 0 (the only range used here: x = z - max). Cody-Waite reduction x = n ln2 + r,
// |r| <= ln2/2, degree-6 polynomial for exp(r), then scale by 2^n through the exponent bits.
// Returns 0 for x < -87 (incl. -inf; exp(-87) ~ 1.6e-38 is negligible next to the row max's 1).
// NaN propagates. Branch-free so it vectorises.
GIL_INLINE float exp_nonpos(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  // round to nearest integer with the 1.5 * 2^23 trick (needs IEEE round-to-nearest, no fast-math)
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;          // ln2 high part (exact in float)
  r = r - n * -2.12194440e-4f;              // ln2 low part
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : y * scale;
}

GIL_INLINE float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

GIL_INLINE uint16_t float_to_bf16_bits(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
  return f != f ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
}

// --- hot loops (multi-versioned) -------------------------------------------------------------------

GIL_CLONES void bf16_to_float(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_float(src[i]);
}

GIL_CLONES void float_to_bf16(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16_bits(src[i]);
}

GIL_CLONES void half_to_float(const c10::Half* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

GIL_CLONES void float_to_half(const float* __restrict src, c10::Half* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}

GIL_CLONES float chunk_max(const float* __restrict z, int64_t n) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = z[i] > m ? z[i] : m;
  return m;
}

// sum_i exp(z_i - m) and, when with_entropy, sum_i exp(z_i - m) * (z_i - m) (0 for z_i = -inf).
GIL_CLONES void chunk_sumexp(const float* __restrict z, int64_t n, float m, bool with_entropy, float* s_out,
                             float* w_out) {
  float s = 0.0f, w = 0.0f;
  if (with_entropy) {
#pragma omp simd reduction(+ : s, w)
    for (int64_t i = 0; i < n; ++i) {
      const float d = z[i] - m;
      const float e = exp_nonpos(d);
      s += e;
      w += z[i] != kNegInf ? e * d : 0.0f;
    }
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += exp_nonpos(z[i] - m);
  }
  *s_out = s;
  *w_out = w;
}

// out_i = -p_i * (g + gh * (log p_i + H)),  log p_i = (z_i - M) - log S; 0 where z_i = -inf.
GIL_CLONES void chunk_grad(const float* __restrict z, int64_t n, float M, float log_s, float g, float gh,
                           float H, float* __restrict out) {
  for (int64_t i = 0; i < n; ++i) {
    const float lp = (z[i] - M) - log_s;
    const float v = -exp_nonpos(lp) * (g + gh * (lp + H));
    out[i] = z[i] != kNegInf ? v : 0.0f;
  }
}

// --- per-dtype row access ------------------------------------------------------------------------
// Returns a pointer to n fp32 values of row chunk [j, j+n): the input itself for fp32, else `buf`.
template <typename T>
const float* load_chunk(const T* row, int64_t j, int64_t n, float* buf);

template <>
const float* load_chunk<float>(const float* row, int64_t j, int64_t, float*) {
  return row + j;
}
template <>
const float* load_chunk<c10::BFloat16>(const c10::BFloat16* row, int64_t j, int64_t n, float* buf) {
  bf16_to_float(reinterpret_cast<const uint16_t*>(row + j), buf, n);
  return buf;
}
template <>
const float* load_chunk<c10::Half>(const c10::Half* row, int64_t j, int64_t n, float* buf) {
  half_to_float(row + j, buf, n);
  return buf;
}

template <typename T>
void store_chunk(const float* src, T* dst, int64_t n);
template <>
void store_chunk<float>(const float* src, float* dst, int64_t n) {
  if (src != dst) std::memcpy(dst, src, n * sizeof(float));
}
template <>
void store_chunk<c10::BFloat16>(const float* src, c10::BFloat16* dst, int64_t n) {
  float_to_bf16(src, reinterpret_cast<uint16_t*>(dst), n);
}
template <>
void store_chunk<c10::Half>(const float* src, c10::Half* dst, int64_t n) {
  float_to_half(src, dst, n);
}

template <typename T>
inline float load_one(const T* p) {
  return static_cast<float>(*p);
}

int64_t rows_grain(int64_t vocab) { return std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(vocab, 1)); }

template <typename T>
void partials_cpu_impl(const at::Tensor& logits, const at::Tensor& targets, int64_t vocab_start,
                       int64_t vocab_size, bool compute_entropy, float* out_max, float* out_sumexp,
                       float* out_target, float* out_ent) {
  const int64_t n_rows = logits.size(0), V = logits.size(1), row_stride = logits.stride(0);
  const T* base = logits.const_data_ptr<T>();
  const int64_t* tgt = targets.const_data_ptr<int64_t>();
  std::atomic<int64_t> bad_row{-1};
  at::parallel_for(0, n_rows, rows_grain(V), [&](int64_t begin, int64_t end) {
    alignas(64) float buf[kChunk];
    for (int64_t r = begin; r < end; ++r) {
      const T* row = base + r * row_stride;
      float m = kNegInf, s = 0.0f, w = 0.0f;
      for (int64_t j = 0; j < V; j += kChunk) {
        const int64_t n = std::min(kChunk, V - j);
        const float* z = load_chunk<T>(row, j, n, buf);
        const float cm = chunk_max(z, n);
        if (cm > m) {  // rescale the running sums to the new max
          if (s != 0.0f) {
            const float a = std::exp(m - cm);
            w = a * (w + (m - cm) * s);
            s *= a;
          }
          m = cm;
        }
        if (m == kNegInf) continue;  // everything so far is -inf
        float cs, cw;
        chunk_sumexp(z, n, m, compute_entropy, &cs, &cw);
        s += cs;
        w += cw;
      }
      if (tgt[r] < 0 || tgt[r] >= vocab_size) bad_row.store(r, std::memory_order_relaxed);
      const int64_t t = tgt[r] - vocab_start;
      out_max[r] = m;
      out_sumexp[r] = s;
      out_target[r] = (t >= 0 && t < V) ? load_one(row + t) : 0.0f;
      if (compute_entropy) out_ent[r] = w;
    }
  });
  const int64_t bad = bad_row.load();
  if (bad >= 0) {
    TORCH_CHECK(false, "targets must be token ids in [0, ", vocab_size, ") (the global vocab size), got ", tgt[bad],
                " at token ", bad);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprob_partials_cpu(const at::Tensor& logits,
                                                                               const at::Tensor& targets,
                                                                               int64_t vocab_start,
                                                                               int64_t vocab_size,
                                                                               bool compute_entropy) {
  check_partials_inputs(logits, targets);
  TORCH_CHECK(vocab_start >= 0 && vocab_start + logits.size(1) <= vocab_size, "logprob_partials: shard [",
              vocab_start, ", ", vocab_start + logits.size(1), ") is not inside the vocab [0, ", vocab_size, ")");
  const int64_t n = logits.size(0);
  const auto opts = logits.options().dtype(at::kFloat);
  at::Tensor mx = at::empty({n}, opts), se = at::empty({n}, opts), tl = at::empty({n}, opts);
  at::Tensor ent = at::empty({compute_entropy ? n : 0}, opts);
  const at::Tensor tg = targets.contiguous();
  float* ent_ptr = compute_entropy ? ent.mutable_data_ptr<float>() : nullptr;
  dispatch_logits_dtype(logits.scalar_type(), [&](auto tag) {
    partials_cpu_impl<decltype(tag)>(logits, tg, vocab_start, vocab_size, compute_entropy,
                                     mx.mutable_data_ptr<float>(), se.mutable_data_ptr<float>(),
                                     tl.mutable_data_ptr<float>(), ent_ptr);
  });
  return {mx, se, tl, ent};
}

template <typename T>
void backward_cpu_impl(const at::Tensor& logits, const at::Tensor& targets, int64_t vocab_start,
                       const float* gmax, const float* log_s, const float* grad_lp, const float* entropy,
                       const float* grad_ent,
                       at::Tensor& grad_logits) {
  const int64_t n_rows = logits.size(0), V = logits.size(1), row_stride = logits.stride(0);
  const T* base = logits.const_data_ptr<T>();
  T* gbase = grad_logits.mutable_data_ptr<T>();
  const int64_t* tgt = targets.const_data_ptr<int64_t>();
  at::parallel_for(0, n_rows, rows_grain(V), [&](int64_t begin, int64_t end) {
    alignas(64) float zbuf[kChunk];
    alignas(64) float gbuf[kChunk];
    for (int64_t r = begin; r < end; ++r) {
      const T* row = base + r * row_stride;
      T* grow = gbase + r * V;
      const float M = gmax[r], LS = log_s[r], g = grad_lp[r];
      const float gh = grad_ent ? grad_ent[r] : 0.0f, H = entropy ? entropy[r] : 0.0f;
      const int64_t t = tgt[r] - vocab_start;
      for (int64_t j = 0; j < V; j += kChunk) {
        const int64_t n = std::min(kChunk, V - j);
        const float* z = load_chunk<T>(row, j, n, zbuf);
        float* out = std::is_same<T, float>::value ? reinterpret_cast<float*>(grow + j) : gbuf;
        chunk_grad(z, n, M, LS, g, gh, H, out);
        if (t >= j && t < j + n) out[t - j] += g;  // one-hot(target) term, only on the owning shard
        store_chunk<T>(out, grow + j, n);
      }
    }
  });
}

at::Tensor logprob_backward_cpu(const at::Tensor& logits, const at::Tensor& targets, int64_t vocab_start,
                                const at::Tensor& max, const at::Tensor& log_sumexp,
                                const at::Tensor& grad_logprobs,
                                const c10::optional<at::Tensor>& entropy,
                                const c10::optional<at::Tensor>& grad_entropy) {
  check_backward_inputs(logits, targets, max, log_sumexp, grad_logprobs, entropy, grad_entropy);
  at::Tensor grad = at::empty({logits.size(0), logits.size(1)}, logits.options());
  const at::Tensor tg = targets.contiguous();
  const float* ent = entropy.has_value() ? entropy->const_data_ptr<float>() : nullptr;
  const float* gent = grad_entropy.has_value() ? grad_entropy->const_data_ptr<float>() : nullptr;
  const float* mx = max.const_data_ptr<float>();
  const float* l = log_sumexp.const_data_ptr<float>();
  const float* g = grad_logprobs.const_data_ptr<float>();
  dispatch_logits_dtype(logits.scalar_type(), [&](auto tag) {
    backward_cpu_impl<decltype(tag)>(logits, tg, vocab_start, mx, l, g, ent, gent, grad);
  });
  return grad;
}

at::Tensor masked_kl_cpu(const at::Tensor& logprobs, const at::Tensor& ref_logprobs, const at::Tensor& mask,
                         c10::string_view estimator) {
  check_kl_inputs(logprobs, ref_logprobs, mask);
  const KLEstimator est = parse_kl_estimator(std::string(estimator));
  const at::Tensor lp = logprobs.contiguous(), ref = ref_logprobs.contiguous(), mk = mask.contiguous();
  at::Tensor out = at::empty(lp.sizes(), lp.options());
  AT_DISPATCH_FLOATING_TYPES(lp.scalar_type(), "masked_kl_cpu", [&] {
    const scalar_t* a = lp.const_data_ptr<scalar_t>();
    const scalar_t* b = ref.const_data_ptr<scalar_t>();
    const scalar_t* m = mk.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, lp.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) o[i] = m[i] != scalar_t(0) ? kl_value(a[i], b[i], est) * m[i] : scalar_t(0);
    });
  });
  return out;
}

at::Tensor masked_kl_backward_cpu(const at::Tensor& grad, const at::Tensor& logprobs,
                                  const at::Tensor& ref_logprobs, const at::Tensor& mask,
                                  c10::string_view estimator) {
  check_kl_inputs(logprobs, ref_logprobs, mask);
  TORCH_CHECK(grad.sizes() == logprobs.sizes() && grad.scalar_type() == logprobs.scalar_type(),
              "masked_kl_backward: grad ", grad.scalar_type(), grad.sizes(), " must match logprobs ",
              logprobs.scalar_type(), logprobs.sizes());
  const KLEstimator est = parse_kl_estimator(std::string(estimator));
  const at::Tensor lp = logprobs.contiguous(), ref = ref_logprobs.contiguous(), mk = mask.contiguous();
  const at::Tensor gr = grad.contiguous();
  at::Tensor out = at::empty(lp.sizes(), lp.options());
  AT_DISPATCH_FLOATING_TYPES(lp.scalar_type(), "masked_kl_backward_cpu", [&] {
    const scalar_t* a = lp.const_data_ptr<scalar_t>();
    const scalar_t* b = ref.const_data_ptr<scalar_t>();
    const scalar_t* m = mk.const_data_ptr<scalar_t>();
    const scalar_t* g = gr.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, lp.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        o[i] = m[i] != scalar_t(0) ? g[i] * m[i] * kl_grad(a[i], b[i], est) : scalar_t(0);
    });
  });
  return out;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
TORCH_LIBRARY(gil_megatron, m) {
  m.def(
      "logprob_partials(Tensor logits, Tensor targets, int vocab_start, int vocab_size, bool compute_entropy)"
      " -> (Tensor max, Tensor sumexp, Tensor target_logit, Tensor entropy_partial)");
  m.def(
      "logprob_backward(Tensor logits, Tensor targets, int vocab_start, Tensor max, Tensor log_sumexp,"
      " Tensor grad_logprobs,"
      " Tensor? entropy, Tensor? grad_entropy) -> Tensor");
  m.def("masked_kl(Tensor logprobs, Tensor ref_logprobs, Tensor mask, str estimator) -> Tensor");
  m.def(
      "masked_kl_backward(Tensor grad, Tensor logprobs, Tensor ref_logprobs, Tensor mask, str estimator)"
      " -> Tensor");
}

TORCH_LIBRARY_IMPL(gil_megatron, CPU, m) {
  m.impl("logprob_partials", &logprob_partials_cpu);
  m.impl("logprob_backward", &logprob_backward_cpu);
  m.impl("masked_kl", &masked_kl_cpu);
  m.impl("masked_kl_backward", &masked_kl_backward_cpu);
}

}  // namespace gil_megatron
