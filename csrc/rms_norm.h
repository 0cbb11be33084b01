// Fused RMSNorm (y = weight * x * rstd, rstd = 1 / sqrt(mean(x^2) + eps) over the last
// dimension): argument checks and layout shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <vector>

#include "argument_checks.h"

namespace lambdapo {

// Rows per partial sum of the weight gradient: partials of fixed row blocks, added in
// block order, so that the weight gradient does not depend on the thread count.
constexpr int64_t kRmsNormGradRows = 64;

// rstd (and the accumulation) is float32, or float64 for float64 inputs (gradcheck).
inline at::ScalarType rms_norm_stat_dtype(at::ScalarType x_dtype) {
  return x_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline std::vector<int64_t> rms_norm_rows_shape(const at::Tensor& x) {
  const auto sizes = x.sizes();
  return std::vector<int64_t>(sizes.begin(), sizes.end() - 1);
}

inline void check_rms_norm_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                double eps) {
  check_float_dtype(op, "x", x);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op,
              ": x must have a non-empty last (normalized) dimension, got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), op,
              ": weight must have shape [", x.size(-1), "] (the last dimension of x), got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight has dtype ",
              weight.scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), op, ": weight is on ", weight.device(),
              " but x is on ", x.device());
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ",
                    eps);
}

inline void check_rms_norm_backward_args(const char* op, const at::Tensor& grad_y,
                                         const at::Tensor& x, const at::Tensor& weight,
                                         const at::Tensor& rstd) {
  check_rms_norm_args(op, x, weight, 0.0);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y must have the shape of x ", x.sizes(),
              ", got ", grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), op, ": grad_y has dtype ",
              grad_y.scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK(rstd.sizes() == x.sizes().slice(0, x.dim() - 1), op,
              ": rstd must have the leading shape of x ", x.sizes().slice(0, x.dim() - 1),
              ", got ", rstd.sizes());
  TORCH_CHECK(rstd.scalar_type() == rms_norm_stat_dtype(x.scalar_type()), op,
              ": rstd must be ", rms_norm_stat_dtype(x.scalar_type()), ", got ",
              rstd.scalar_type());
  TORCH_CHECK(grad_y.device() == x.device() && rstd.device() == x.device(), op,
              ": grad_y and rstd must be on the device of x (", x.device(), ")");
}

}  // namespace lambdapo
