// CUDA kernels of swiglu: elementwise, grid-stride over packs of consecutive elements of a
// row (16-byte loads and stores when every row's halves are 16-byte aligned, single
// elements otherwise), float arithmetic (double for double), one rounding per output.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "kernel_constants.h"
#include "swiglu.h"

namespace lambdapo {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride beyond

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

// y[r, c : c + N] = silu(gate) * up, pack p covering row r = p / (width / N).
template <typename scalar_t, int N>
__global__ void swiglu_forward_kernel(const scalar_t* __restrict__ gate_up,
                                      scalar_t* __restrict__ y, int64_t packs,
                                      int64_t width) {
  using acc_t = acc_type<scalar_t>;
  using Pack = Vec<scalar_t, N>;
  const int64_t row_packs = width / N;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = p / row_packs, c = (p - r * row_packs) * N;
    const scalar_t* gate = gate_up + r * 2 * width + c;
    const Pack g = *reinterpret_cast<const Pack*>(gate);
    const Pack u = *reinterpret_cast<const Pack*>(gate + width);
    Pack out;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const acc_t gi = static_cast<acc_t>(g.v[i]);
      out.v[i] = static_cast<scalar_t>(gi * sigmoid(gi) * static_cast<acc_t>(u.v[i]));
    }
    *reinterpret_cast<Pack*>(y + r * width + c) = out;
  }
}

// d gate = dy * up * s * (1 + gate * (1 - s)), d up = dy * silu(gate), s = sigmoid(gate).
template <typename scalar_t, int N>
__global__ void swiglu_backward_kernel(const scalar_t* __restrict__ grad_y,
                                       const scalar_t* __restrict__ gate_up,
                                       scalar_t* __restrict__ grad_gate_up, int64_t packs,
                                       int64_t width) {
  using acc_t = acc_type<scalar_t>;
  using Pack = Vec<scalar_t, N>;
  const int64_t row_packs = width / N;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = p / row_packs, c = (p - r * row_packs) * N;
    const int64_t offset = r * 2 * width + c;
    const Pack g = *reinterpret_cast<const Pack*>(gate_up + offset);
    const Pack u = *reinterpret_cast<const Pack*>(gate_up + offset + width);
    const Pack d = *reinterpret_cast<const Pack*>(grad_y + r * width + c);
    Pack dg, du;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const acc_t gi = static_cast<acc_t>(g.v[i]), di = static_cast<acc_t>(d.v[i]);
      const acc_t s = sigmoid(gi), silu = gi * s;
      dg.v[i] = static_cast<scalar_t>(di * static_cast<acc_t>(u.v[i]) * (s + silu * (1 - s)));
      du.v[i] = static_cast<scalar_t>(di * silu);
    }
    *reinterpret_cast<Pack*>(grad_gate_up + offset) = dg;
    *reinterpret_cast<Pack*>(grad_gate_up + offset + width) = du;
  }
}

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0; }

// Calls launch(pack) with pack = kVecBytes / sizeof(scalar_t) when rows of `width`
// elements split into aligned packs for every pointer, else with pack = 1.
template <typename scalar_t, typename Launch>
void with_pack(int64_t width, std::initializer_list<const void*> pointers, const Launch& launch) {
  constexpr int kPack = kVecBytes / sizeof(scalar_t);
  const bool vector = width % kPack == 0 &&
                      std::all_of(pointers.begin(), pointers.end(), aligned);
  if (vector) {
    launch(std::integral_constant<int, kPack>());
  } else {
    launch(std::integral_constant<int, 1>());
  }
}

unsigned blocks_for(int64_t packs) {
  return static_cast<unsigned>(std::min(kMaxBlocks, (packs + kThreads - 1) / kThreads));
}

at::Tensor swiglu_forward_cuda(const at::Tensor& gate_up) {
  check_swiglu_args("swiglu", gate_up);
  const c10::cuda::CUDAGuard guard(gate_up.device());
  const at::Tensor input = gate_up.contiguous();
  at::Tensor y = at::empty(swiglu_output_shape(gate_up), input.options());
  const int64_t width = y.size(-1), elements = y.numel();
  if (elements == 0) return y;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "swiglu", [&] {
    const scalar_t* xp = input.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    with_pack<scalar_t>(width, {xp, yp}, [&](auto pack) {
      constexpr int N = decltype(pack)::value;
      const int64_t packs = elements / N;
      swiglu_forward_kernel<scalar_t, N><<<blocks_for(packs), kThreads, 0, stream>>>(
          xp, yp, packs, width);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return y;
}

at::Tensor swiglu_backward_cuda(const at::Tensor& grad_y, const at::Tensor& gate_up) {
  check_swiglu_backward_args("swiglu_backward", grad_y, gate_up);
  const c10::cuda::CUDAGuard guard(gate_up.device());
  const at::Tensor input = gate_up.contiguous(), dy = grad_y.contiguous();
  at::Tensor grad = at::empty(gate_up.sizes(), input.options());
  const int64_t width = dy.size(-1), elements = dy.numel();
  if (elements == 0) return grad;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "swiglu_backward", [&] {
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = input.const_data_ptr<scalar_t>();
    scalar_t* gp = grad.mutable_data_ptr<scalar_t>();
    with_pack<scalar_t>(width, {dyp, xp, gp}, [&](auto pack) {
      constexpr int N = decltype(pack)::value;
      const int64_t packs = elements / N;
      swiglu_backward_kernel<scalar_t, N><<<blocks_for(packs), kThreads, 0, stream>>>(
          dyp, xp, gp, packs, width);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(lambdapo, CUDA, m) {
  m.impl("swiglu_forward", &swiglu_forward_cuda);
  m.impl("swiglu_backward", &swiglu_backward_cuda);
}

}  // namespace lambdapo
