// Row-block helpers of the CPU softmax kernels (token_logprobs, linear_token_logprobs):
// loads scaled by 1/T into the accumulation type, block max, the exponential sums of the
// online softmax state, and the logits gradient. Vectorized per ISA.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "kernel_constants.h"
#include "vectorizable_math.h"

namespace lambdapo {
namespace {  // internal linkage: each kernel file gets its own (ISA-cloned) copies

constexpr int64_t kBlock = 2048;

// Block loads: dst = src / T in the accumulation type.
LAMBDAPO_ISA_CLONES
void load_scaled(const float* __restrict src, float* __restrict dst, int64_t n, float inv_t) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i] * inv_t;
}
LAMBDAPO_ISA_CLONES
void load_scaled(const c10::BFloat16* __restrict src, float* __restrict dst, int64_t n,
                 float inv_t) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]) * inv_t;
}
LAMBDAPO_ISA_CLONES
void load_scaled(const c10::Half* __restrict src, float* __restrict dst, int64_t n, float inv_t) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]) * inv_t;
}
void load_scaled(const double* __restrict src, double* __restrict dst, int64_t n, double inv_t) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i] * inv_t;
}

LAMBDAPO_ISA_CLONES
float block_max(const float* __restrict x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}
double block_max(const double* __restrict x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// Whether a block holds a NaN: a block whose other values are all -inf (the max ignores NaN)
// adds nothing to the sums, but its NaN must still reach the row's result. Only such blocks
// are scanned, so this need not vectorize.
template <typename acc_t>
bool block_has_nan(const acc_t* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) return true;
  }
  return false;
}

// sum exp(x - m) and sum exp(x - m) (x - m). exp of a shift below kExpNormalMin (under
// float's normal range, e.g. a -inf logit) is 0, and the clamped shift avoids 0 * inf; NaN passes.
LAMBDAPO_ISA_CLONES
void block_exp_sums(const float* __restrict x, int64_t n, float m, float* sum_exp,
                    float* sum_exp_shift) {
  float s = 0.0f, t = 0.0f;
#pragma omp simd reduction(+ : s, t)
  for (int64_t i = 0; i < n; ++i) {
    const float d = x[i] - m;
    const float clamped = d < kExpNormalMin ? kExpNormalMin : d;
    const float e = d < kExpNormalMin ? 0.0f : exp_vectorizable(clamped);
    s += e;
    t += e * clamped;
  }
  *sum_exp = s;
  *sum_exp_shift = t;
}
void block_exp_sums(const double* __restrict x, int64_t n, double m, double* sum_exp,
                    double* sum_exp_shift) {
  double s = 0.0, t = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = x[i] - m;
    const double e = std::exp(d);
    s += e;
    t += d > -std::numeric_limits<double>::infinity() ? e * d : 0.0;
  }
  *sum_exp = s;
  *sum_exp_shift = t;
}

// dz = -(1/T) p (g_lp + g_H (log p + H)), with log p = x - lse; the target's
// (1/T) g_lp is added by the caller.
LAMBDAPO_ISA_CLONES
void block_grad(const float* __restrict x, float* __restrict dz, int64_t n, float lse,
                float g_lp, float g_h, float entropy, float inv_t) {
  for (int64_t i = 0; i < n; ++i) {
    const float log_p = x[i] - lse;
    const float clamped = log_p < kExpNormalMin ? kExpNormalMin : log_p;
    const float p = log_p < kExpNormalMin ? 0.0f : exp_vectorizable(clamped);
    dz[i] = -inv_t * p * (g_lp + g_h * (clamped + entropy));
  }
}
void block_grad(const double* __restrict x, double* __restrict dz, int64_t n, double lse,
                double g_lp, double g_h, double entropy, double inv_t) {
  for (int64_t i = 0; i < n; ++i) {
    const double log_p = x[i] - lse;
    const double p = std::exp(log_p);
    dz[i] = p == 0.0 ? 0.0 : -inv_t * p * (g_lp + g_h * (log_p + entropy));
  }
}

}  // namespace
}  // namespace lambdapo
