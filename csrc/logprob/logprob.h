// Fused vocab-parallel log-prob (+ entropy) and masked KL: shared definitions.
//
// Op family (namespace gil_megatron, schema in logprob_cpu.cpp, CPU kernels there, CUDA kernels in
// logprob_cuda.cu; the dispatcher picks the device):
//
//   logprob_partials(logits [N, V_local], targets [N] int64 (global ids), vocab_start, vocab_size,
//                    compute_entropy) -> (max [N], sumexp [N], target_logit [N], entropy_partial [N or 0])
//     all fp32; targets outside [0, vocab_size) (the global vocab) raise (CPU) / device-assert (CUDA).
//     per row of this rank's vocab shard, in one pass over the logits (online max / sum-exp):
//       max             m   = max_j z_j
//       sumexp          s   = sum_j exp(z_j - m)
//       target_logit    z_t if vocab_start <= t < vocab_start + V_local, else 0
//       entropy_partial w   = sum_j exp(z_j - m) * (z_j - m)        (empty when !compute_entropy)
//     Entries equal to -inf (padded vocab) contribute nothing. The Python side all-reduces these
//     per-token scalars across tensor-parallel ranks (MAX, then rescale and SUM) and finalises
//       logprob = (z_t - M) - log S,   entropy = log S - W / S.
//
//   logprob_backward(logits, targets, vocab_start, max [N], log_sumexp [N], grad_logprobs [N],
//                    entropy [N]?, grad_entropy [N]?) -> grad_logits [N, V_local] (logits' dtype)
//       grad z_j = grad_lp * (1[j == t] - p_j) - grad_H * p_j * (log p_j + H),
//       log p_j = (z_j - M) - log S     (M and log S kept apart: exact for huge logits)
//     one pass, no communication (M and log S are already the global ones).
//
//   masked_kl(logprobs, ref_logprobs, mask, estimator) -> kl * mask             (elementwise)
//   masked_kl_backward(grad, logprobs, ref_logprobs, mask, estimator) -> d(kl * mask)/d logprobs * grad
//     estimators, d = logprobs - ref_logprobs (same formulas as gil_megatron/algo/kl.py):
//       k1 = d,   k2 = d^2 / 2,   k3 = expm1(-d) + d
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <string>

#if defined(__CUDACC__)
#define GIL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define GIL_HOST_DEVICE inline
#endif

#if defined(__CUDA_ARCH__)
#define GIL_EXPM1 expm1
#else
#define GIL_EXPM1 std::expm1
#endif

namespace gil_megatron {

// ---------------------------------------------------------------------------------------------
// KL estimators (per token). Kept in one place for the CPU and CUDA kernels.
enum class KLEstimator : int { K1 = 1, K2 = 2, K3 = 3 };

KLEstimator parse_kl_estimator(const std::string& name);  // raises for unknown names

template <typename T>
GIL_HOST_DEVICE T kl_value(T logprob, T ref_logprob, KLEstimator est) {
  const T d = logprob - ref_logprob;
  switch (est) {
    case KLEstimator::K1:
      return d;
    case KLEstimator::K2:
      return T(0.5) * d * d;
    default:  // k3 = exp(-d) - 1 + d, written as in algo/kl.py: expm1(log_ratio) - log_ratio
      return GIL_EXPM1(-d) + d;
  }
}

// d kl / d logprob  (d kl / d ref_logprob is its negative: every estimator is a function of d).
template <typename T>
GIL_HOST_DEVICE T kl_grad(T logprob, T ref_logprob, KLEstimator est) {
  const T d = logprob - ref_logprob;
  switch (est) {
    case KLEstimator::K1:
      return T(1);
    case KLEstimator::K2:
      return d;
    default:
      return -GIL_EXPM1(-d);
  }
}

// Calls f(T{}) with T = float, c10::BFloat16 or c10::Half, the logits' dtype.
template <typename F>
void dispatch_logits_dtype(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kFloat:
      f(float{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    default:
      TORCH_CHECK(false, "logits must be float32, bfloat16 or float16, got ", dtype);
  }
}

// ---------------------------------------------------------------------------------------------
// Input checks shared by the CPU and CUDA kernels (logprob_cpu.cpp).
void check_partials_inputs(const at::Tensor& logits, const at::Tensor& targets);
void check_backward_inputs(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& max,
                           const at::Tensor& log_sumexp, const at::Tensor& grad_logprobs,
                           const c10::optional<at::Tensor>& entropy,
                           const c10::optional<at::Tensor>& grad_entropy);
void check_kl_inputs(const at::Tensor& logprobs, const at::Tensor& ref_logprobs, const at::Tensor& mask);

}  // namespace gil_megatron
