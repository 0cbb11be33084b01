// CPU kernels of rms_norm: rows in parallel, one pass for the sum of squares and one for
// the output, in loops the compiler vectorizes per ISA; the weight gradient from partials
// of fixed row blocks (kRmsNormGradRows), added in block order.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "float_conversions.h"
#include "kernel_constants.h"
#include "rms_norm.h"
#include "vectorizable_math.h"

namespace lambdapo {
namespace {

// Elements per parallel task: below this, a thread's start-up costs more than the work.
constexpr int64_t kElementsPerTask = 32768;

template <typename scalar_t>
inline __attribute__((always_inline)) void forward_rows_impl(
    const scalar_t* __restrict x, const scalar_t* __restrict w, scalar_t* __restrict y,
    acc_type<scalar_t>* __restrict rstd, int64_t begin, int64_t end, int64_t dim,
    acc_type<scalar_t> eps) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* xr = x + r * dim;
    scalar_t* yr = y + r * dim;
    acc_t squares = 0;
#pragma omp simd reduction(+ : squares)
    for (int64_t j = 0; j < dim; ++j) {
      const acc_t v = widen(xr[j]);
      squares += v * v;
    }
    const acc_t s = acc_t(1) / std::sqrt(squares / static_cast<acc_t>(dim) + eps);
    rstd[r] = s;
#pragma omp simd
    for (int64_t j = 0; j < dim; ++j) {
      yr[j] = rounded<scalar_t>(widen(w[j]) * (widen(xr[j]) * s));
    }
  }
}

// dx = s * (g * w - x * s^2 * sum(g * w * x) / dim); dw_partial += g * x * s. Either output
// may be null (not asked for).
template <typename scalar_t>
inline __attribute__((always_inline)) void backward_rows_impl(
    const scalar_t* __restrict g, const scalar_t* __restrict x, const scalar_t* __restrict w,
    const acc_type<scalar_t>* __restrict rstd, scalar_t* __restrict dx,
    acc_type<scalar_t>* __restrict dw_partial, int64_t begin, int64_t end, int64_t dim) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* gr = g + r * dim;
    const scalar_t* xr = x + r * dim;
    const acc_t s = rstd[r];
    if (dx != nullptr) {
      acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < dim; ++j) {
        dot += widen(gr[j]) * widen(w[j]) * widen(xr[j]);
      }
      const acc_t c = dot * s * s / static_cast<acc_t>(dim);
      scalar_t* dxr = dx + r * dim;
#pragma omp simd
      for (int64_t j = 0; j < dim; ++j) {
        const acc_t xj = widen(xr[j]);
        dxr[j] = rounded<scalar_t>(
            s * (widen(gr[j]) * widen(w[j]) - xj * c));
      }
    }
    if (dw_partial != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < dim; ++j) {
        dw_partial[j] += widen(gr[j]) * widen(xr[j]) * s;
      }
    }
  }
}

// One clone set per dtype (target_clones applies to plain functions, not templates).
#define LAMBDAPO_RMS_NORM_ROWS(scalar_t)                                                       \
  LAMBDAPO_ISA_CLONES void forward_rows(const scalar_t* x, const scalar_t* w, scalar_t* y,     \
                                        acc_type<scalar_t>* rstd, int64_t begin, int64_t end,  \
                                        int64_t dim, acc_type<scalar_t> eps) {                 \
    forward_rows_impl(x, w, y, rstd, begin, end, dim, eps);                                    \
  }                                                                                            \
  LAMBDAPO_ISA_CLONES void backward_rows(const scalar_t* g, const scalar_t* x,                 \
                                         const scalar_t* w, const acc_type<scalar_t>* rstd,    \
                                         scalar_t* dx, acc_type<scalar_t>* dw_partial,         \
                                         int64_t begin, int64_t end, int64_t dim) {            \
    backward_rows_impl(g, x, w, rstd, dx, dw_partial, begin, end, dim);                        \
  }
LAMBDAPO_RMS_NORM_ROWS(float)
LAMBDAPO_RMS_NORM_ROWS(double)
LAMBDAPO_RMS_NORM_ROWS(c10::BFloat16)
LAMBDAPO_RMS_NORM_ROWS(c10::Half)
#undef LAMBDAPO_RMS_NORM_ROWS

template <typename acc_t>
void sum_partials(const acc_t* __restrict partials, acc_t* __restrict total, int64_t blocks,
                  int64_t dim) {
  for (int64_t b = 0; b < blocks; ++b) {
#pragma omp simd
    for (int64_t j = 0; j < dim; ++j) total[j] += partials[b * dim + j];
  }
}

std::tuple<at::Tensor, at::Tensor> rms_norm_forward_cpu(const at::Tensor& x,
                                                        const at::Tensor& weight, double eps) {
  check_rms_norm_args("rms_norm", x, weight, eps);
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor y = at::empty(x.sizes(), xc.options());
  at::Tensor rstd = at::empty(rms_norm_rows_shape(x),
                              xc.options().dtype(rms_norm_stat_dtype(x.scalar_type())));
  const int64_t dim = x.size(-1), rows = rstd.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* wp = wc.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    acc_t* sp = rstd.mutable_data_ptr<acc_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kElementsPerTask / dim),
                     [&](int64_t begin, int64_t end) {
      forward_rows(xp, wp, yp, sp, begin, end, dim, static_cast<acc_t>(eps));
    });
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad_y,
                                                         const at::Tensor& x,
                                                         const at::Tensor& weight,
                                                         const at::Tensor& rstd,
                                                         std::array<bool, 2> output_mask) {
  check_rms_norm_backward_args("rms_norm_backward", grad_y, x, weight, rstd);
  const bool need_x = output_mask[0], need_weight = output_mask[1];
  if (!need_x && !need_weight) {
    return {at::empty({0}, x.options()), at::empty({0}, weight.options())};
  }
  const at::Tensor gc = grad_y.contiguous(), xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor sc = rstd.contiguous();
  const int64_t dim = x.size(-1), rows = sc.numel();
  const int64_t blocks = (rows + kRmsNormGradRows - 1) / kRmsNormGradRows;
  at::Tensor dx = need_x ? at::empty(x.sizes(), xc.options()) : at::empty({0}, xc.options());
  at::Tensor partials = need_weight ? at::zeros({blocks, dim}, sc.options())
                                    : at::empty({0}, sc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "rms_norm_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* wp = wc.const_data_ptr<scalar_t>();
    const acc_t* sp = sc.const_data_ptr<acc_t>();
    scalar_t* dxp = need_x ? dx.mutable_data_ptr<scalar_t>() : nullptr;
    acc_t* pp = need_weight ? partials.mutable_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, blocks,
                     std::max<int64_t>(1, kElementsPerTask / (kRmsNormGradRows * dim)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        backward_rows(gp, xp, wp, sp, dxp, pp == nullptr ? nullptr : pp + b * dim,
                      b * kRmsNormGradRows, std::min(rows, (b + 1) * kRmsNormGradRows), dim);
      }
    });
  });
  at::Tensor dw = at::empty({0}, wc.options());
  if (need_weight) {
    // Block order, whatever the thread count: the same weight gradient on every run.
    at::Tensor total = at::zeros({dim}, sc.options());
    AT_DISPATCH_FLOATING_TYPES(sc.scalar_type(), "rms_norm_weight_grad", [&] {
      sum_partials(partials.const_data_ptr<scalar_t>(), total.mutable_data_ptr<scalar_t>(),
                   blocks, dim);
    });
    dw = total.to(weight.scalar_type());
  }
  return {dx, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(lambdapo, CPU, m) {
  m.impl("rms_norm_forward", &rms_norm_forward_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
}

}  // namespace lambdapo
