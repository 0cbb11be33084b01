// CUDA kernels of rms_norm. Forward and the input gradient: one warp per row (lanes stride
// the row, so loads coalesce; the sum is a fixed shuffle tree, so a row's result does not
// depend on the other rows). Weight gradient: a block per (32-column tile, row chunk) writes
// one fp32 partial per column and chunk after a fixed-order shared-memory sum, and the
// partials are summed over chunks by at::sum: no atomics, the same result on every run.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>

#include "kernel_constants.h"
#include "rms_norm.h"
#include "warp_sum.cuh"

namespace lambdapo {
namespace {

constexpr int kRowWarps = 4;  // rows (warps) per block of the row kernels
constexpr int kGradRowThreads = 8;  // threadIdx.y of the weight-gradient kernel
constexpr int64_t kMinGradChunkRows = 256;
constexpr int64_t kMaxRowBlocks = 65536;  // grid-stride beyond

template <typename scalar_t>
__global__ void rms_norm_forward_kernel(const scalar_t* __restrict__ x,
                                        const scalar_t* __restrict__ w,
                                        scalar_t* __restrict__ y,
                                        acc_type<scalar_t>* __restrict__ rstd, int64_t rows,
                                        int64_t dim, acc_type<scalar_t> eps) {
  using acc_t = acc_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kRowWarps;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp; r < rows;
       r += warps) {
    const scalar_t* xr = x + r * dim;
    acc_t squares = 0;
    for (int64_t j = lane; j < dim; j += kWarp) {
      const acc_t v = static_cast<acc_t>(xr[j]);
      squares += v * v;
    }
    squares = warp_sum(squares);
    const acc_t s = acc_t(1) / sqrt(squares / static_cast<acc_t>(dim) + eps);
    if (lane == 0) rstd[r] = s;
    scalar_t* yr = y + r * dim;
    for (int64_t j = lane; j < dim; j += kWarp) {
      yr[j] = static_cast<scalar_t>(static_cast<acc_t>(w[j]) * (static_cast<acc_t>(xr[j]) * s));
    }
  }
}

// dx = s * (g * w - x * s^2 * sum(g * w * x) / dim).
template <typename scalar_t>
__global__ void rms_norm_input_grad_kernel(const scalar_t* __restrict__ g,
                                           const scalar_t* __restrict__ x,
                                           const scalar_t* __restrict__ w,
                                           const acc_type<scalar_t>* __restrict__ rstd,
                                           scalar_t* __restrict__ dx, int64_t rows,
                                           int64_t dim) {
  using acc_t = acc_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kRowWarps;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp; r < rows;
       r += warps) {
    const scalar_t* gr = g + r * dim;
    const scalar_t* xr = x + r * dim;
    acc_t dot = 0;
    for (int64_t j = lane; j < dim; j += kWarp) {
      dot += static_cast<acc_t>(gr[j]) * static_cast<acc_t>(w[j]) * static_cast<acc_t>(xr[j]);
    }
    dot = warp_sum(dot);
    const acc_t s = rstd[r];
    const acc_t c = dot * s * s / static_cast<acc_t>(dim);
    scalar_t* dxr = dx + r * dim;
    for (int64_t j = lane; j < dim; j += kWarp) {
      dxr[j] = static_cast<scalar_t>(
          s * (static_cast<acc_t>(gr[j]) * static_cast<acc_t>(w[j]) -
               static_cast<acc_t>(xr[j]) * c));
    }
  }
}

// partials[chunk, j] = sum over the chunk's rows of g * x * s, for the block's 32 columns.
template <typename scalar_t>
__global__ void rms_norm_weight_grad_kernel(const scalar_t* __restrict__ g,
                                            const scalar_t* __restrict__ x,
                                            const acc_type<scalar_t>* __restrict__ rstd,
                                            acc_type<scalar_t>* __restrict__ partials,
                                            int64_t rows, int64_t dim, int64_t chunk_rows) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t sums[kGradRowThreads][kWarp + 1];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarp + threadIdx.x;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * chunk_rows;
  const int64_t end = std::min(rows, begin + chunk_rows);
  acc_t sum = 0;
  if (j < dim) {
    for (int64_t r = begin + threadIdx.y; r < end; r += kGradRowThreads) {
      sum += static_cast<acc_t>(g[r * dim + j]) * static_cast<acc_t>(x[r * dim + j]) * rstd[r];
    }
  }
  sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && j < dim) {
    acc_t total = 0;
#pragma unroll
    for (int t = 0; t < kGradRowThreads; ++t) total += sums[t][threadIdx.x];
    partials[static_cast<int64_t>(blockIdx.y) * dim + j] = total;
  }
}

int row_blocks(int64_t rows) {
  return static_cast<int>(std::min(kMaxRowBlocks, (rows + kRowWarps - 1) / kRowWarps));
}

std::tuple<at::Tensor, at::Tensor> rms_norm_forward_cuda(const at::Tensor& x,
                                                         const at::Tensor& weight, double eps) {
  check_rms_norm_args("rms_norm", x, weight, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor y = at::empty(x.sizes(), xc.options());
  at::Tensor rstd = at::empty(rms_norm_rows_shape(x),
                              xc.options().dtype(rms_norm_stat_dtype(x.scalar_type())));
  const int64_t dim = x.size(-1), rows = rstd.numel();
  if (rows == 0) return {y, rstd};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    using acc_t = acc_type<scalar_t>;
    rms_norm_forward_kernel<scalar_t><<<row_blocks(rows), kRowWarps * kWarp, 0, stream>>>(
        xc.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(),
        y.mutable_data_ptr<scalar_t>(), rstd.mutable_data_ptr<acc_t>(), rows, dim,
        static_cast<acc_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& grad_y,
                                                          const at::Tensor& x,
                                                          const at::Tensor& weight,
                                                          const at::Tensor& rstd,
                                                          std::array<bool, 2> output_mask) {
  check_rms_norm_backward_args("rms_norm_backward", grad_y, x, weight, rstd);
  const c10::cuda::CUDAGuard guard(x.device());
  const bool need_x = output_mask[0], need_weight = output_mask[1];
  const at::Tensor gc = grad_y.contiguous(), xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor sc = rstd.contiguous();
  const int64_t dim = x.size(-1), rows = sc.numel();
  at::Tensor dx = need_x ? at::empty(x.sizes(), xc.options()) : at::empty({0}, xc.options());
  at::Tensor dw = at::empty({0}, wc.options());
  if (rows == 0) {
    return {dx, need_weight ? at::zeros({dim}, wc.options()) : dw};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // Enough chunks to fill the GPU, few enough for gridDim.y.
  const int64_t chunk_rows = std::max(kMinGradChunkRows, (rows + kMaxGridY - 1) / kMaxGridY);
  const int64_t chunks = (rows + chunk_rows - 1) / chunk_rows;
  at::Tensor partials = need_weight ? at::empty({chunks, dim}, sc.options())
                                    : at::empty({0}, sc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "rms_norm_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    if (need_x) {
      rms_norm_input_grad_kernel<scalar_t><<<row_blocks(rows), kRowWarps * kWarp, 0, stream>>>(
          gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
          wc.const_data_ptr<scalar_t>(), sc.const_data_ptr<acc_t>(),
          dx.mutable_data_ptr<scalar_t>(), rows, dim);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (need_weight) {
      const dim3 grid(static_cast<unsigned>((dim + kWarp - 1) / kWarp),
                      static_cast<unsigned>(chunks));
      rms_norm_weight_grad_kernel<scalar_t><<<grid, dim3(kWarp, kGradRowThreads), 0, stream>>>(
          gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
          sc.const_data_ptr<acc_t>(), partials.mutable_data_ptr<acc_t>(), rows, dim,
          chunk_rows);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (need_weight) dw = at::sum(partials, 0).to(weight.scalar_type());
  return {dx, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(lambdapo, CUDA, m) {
  m.impl("rms_norm_forward", &rms_norm_forward_cuda);
  m.impl("rms_norm_backward", &rms_norm_backward_cuda);
}

}  // namespace lambdapo
