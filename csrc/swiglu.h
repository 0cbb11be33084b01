// Fused SwiGLU activation of gated MLPs (Llama, Qwen, Mistral): y = silu(gate) * up, with
// gate and up the two halves of the last dimension of one [..., 2I] tensor (the output of
// the concatenated gate and up projections). Argument checks shared by the CPU and CUDA
// kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <vector>

#include "argument_checks.h"

namespace lambdapo {

inline void check_swiglu_args(const char* op, const at::Tensor& gate_up) {
  check_float_dtype(op, "gate_up", gate_up);
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) > 0 && gate_up.size(-1) % 2 == 0, op,
              ": gate_up must have an even, non-zero last dimension (gate then up), got shape ",
              gate_up.sizes());
}

// y's shape: gate_up's with half its last dimension.
inline std::vector<int64_t> swiglu_output_shape(const at::Tensor& gate_up) {
  std::vector<int64_t> shape(gate_up.sizes().begin(), gate_up.sizes().end());
  shape.back() /= 2;
  return shape;
}

inline void check_swiglu_backward_args(const char* op, const at::Tensor& grad_y,
                                       const at::Tensor& gate_up) {
  check_swiglu_args(op, gate_up);
  const std::vector<int64_t> expected = swiglu_output_shape(gate_up);
  TORCH_CHECK(grad_y.sizes() == at::IntArrayRef(expected), op,
              ": grad_y must have shape ", at::IntArrayRef(expected),
              " (gate_up's with half its last dimension), got ", grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == gate_up.scalar_type(), op, ": grad_y has dtype ",
              grad_y.scalar_type(), " but gate_up has ", gate_up.scalar_type());
  TORCH_CHECK(grad_y.device() == gate_up.device(), op, ": grad_y is on ", grad_y.device(),
              " but gate_up is on ", gate_up.device());
}

}  // namespace lambdapo
