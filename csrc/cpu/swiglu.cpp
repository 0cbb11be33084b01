// CPU kernels of swiglu: rows in parallel, each row's gate and up halves in one loop the
// compiler vectorizes per ISA (the sigmoid through exp_vectorizable), one rounding per
// output element. The backward writes the gate and up gradients side by side, the layout of
// gate_up, so that the concatenated projection's backward takes them as they are.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "float_conversions.h"
#include "kernel_constants.h"
#include "swiglu.h"
#include "vectorizable_math.h"

namespace lambdapo {
namespace {

// Elements per parallel task: below this, a thread's start-up costs more than the work.
constexpr int64_t kElementsPerTask = 32768;

// 1 / (1 + exp(-x)); 0 where exp(-x) would pass the clamp of exp_vectorizable (below
// x = -88 the sigmoid is under FLT_MIN), so that silu(gate) * up stays 0 there for any up.
inline __attribute__((always_inline)) float sigmoid(float x) {
  const float s = 1.0f / (1.0f + exp_vectorizable(-x));
  return -x > kExpNormalMax ? 0.0f : s;
}
inline __attribute__((always_inline)) double sigmoid(double x) {
  return 1.0 / (1.0 + std::exp(-x));
}

template <typename scalar_t>
inline __attribute__((always_inline)) void forward_rows_impl(
    const scalar_t* __restrict gate_up, scalar_t* __restrict y, int64_t begin, int64_t end,
    int64_t width) {
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* gate = gate_up + r * 2 * width;
    const scalar_t* up = gate + width;
    scalar_t* yr = y + r * width;
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      const auto g = widen(gate[j]);
      yr[j] = rounded<scalar_t>(g * sigmoid(g) * widen(up[j]));
    }
  }
}

// d silu(g) / dg = s * (1 + g * (1 - s)), s = sigmoid(g).
template <typename scalar_t>
inline __attribute__((always_inline)) void backward_rows_impl(
    const scalar_t* __restrict grad_y, const scalar_t* __restrict gate_up,
    scalar_t* __restrict grad_gate_up, int64_t begin, int64_t end, int64_t width) {
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* gate = gate_up + r * 2 * width;
    const scalar_t* up = gate + width;
    const scalar_t* dy = grad_y + r * width;
    scalar_t* dgate = grad_gate_up + r * 2 * width;
    scalar_t* dup = dgate + width;
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      const auto g = widen(gate[j]);
      const auto d = widen(dy[j]);
      const auto s = sigmoid(g);
      const auto silu = g * s;
      dgate[j] = rounded<scalar_t>(d * widen(up[j]) * (s + silu * (1 - s)));
      dup[j] = rounded<scalar_t>(d * silu);
    }
  }
}

// One clone set per dtype (target_clones applies to plain functions, not templates).
#define LAMBDAPO_SWIGLU_ROWS(scalar_t)                                                       \
  LAMBDAPO_ISA_CLONES void forward_rows(const scalar_t* gate_up, scalar_t* y, int64_t begin, \
                                        int64_t end, int64_t width) {                        \
    forward_rows_impl(gate_up, y, begin, end, width);                                        \
  }                                                                                          \
  LAMBDAPO_ISA_CLONES void backward_rows(const scalar_t* grad_y, const scalar_t* gate_up,    \
                                         scalar_t* grad_gate_up, int64_t begin, int64_t end, \
                                         int64_t width) {                                    \
    backward_rows_impl(grad_y, gate_up, grad_gate_up, begin, end, width);                    \
  }
LAMBDAPO_SWIGLU_ROWS(float)
LAMBDAPO_SWIGLU_ROWS(double)
LAMBDAPO_SWIGLU_ROWS(c10::BFloat16)
LAMBDAPO_SWIGLU_ROWS(c10::Half)
#undef LAMBDAPO_SWIGLU_ROWS

int64_t rows_per_task(int64_t width) {
  return std::max<int64_t>(1, kElementsPerTask / width);
}

at::Tensor swiglu_forward_cpu(const at::Tensor& gate_up) {
  check_swiglu_args("swiglu", gate_up);
  const at::Tensor input = gate_up.contiguous();
  at::Tensor y = at::empty(swiglu_output_shape(gate_up), input.options());
  const int64_t width = y.size(-1), rows = y.numel() / width;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "swiglu", [&] {
    const scalar_t* xp = input.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, rows_per_task(width), [&](int64_t begin, int64_t end) {
      forward_rows(xp, yp, begin, end, width);
    });
  });
  return y;
}

at::Tensor swiglu_backward_cpu(const at::Tensor& grad_y, const at::Tensor& gate_up) {
  check_swiglu_backward_args("swiglu_backward", grad_y, gate_up);
  const at::Tensor input = gate_up.contiguous(), dy = grad_y.contiguous();
  at::Tensor grad = at::empty(gate_up.sizes(), input.options());
  const int64_t width = dy.size(-1), rows = dy.numel() / width;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "swiglu_backward", [&] {
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = input.const_data_ptr<scalar_t>();
    scalar_t* gp = grad.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, rows_per_task(width), [&](int64_t begin, int64_t end) {
      backward_rows(dyp, xp, gp, begin, end, width);
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(lambdapo, CPU, m) {
  m.impl("swiglu_forward", &swiglu_forward_cpu);
  m.impl("swiglu_backward", &swiglu_backward_cpu);
}

}  // namespace lambdapo
