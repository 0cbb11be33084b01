// CUDA kernel of decode_attention: a block per (row, key-value head, query head); each warp
// runs an online softmax over a strided share of the columns (a lane holds head_dim / 32 of
// the running output), and the block merges its warps' (max, sum, output) in shared memory in
// a fixed order. Keys and values are read once per query head; the scores never leave
// registers.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "decode_attention.h"
#include "kernel_constants.h"
#include "warp_sum.cuh"

namespace lambdapo {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxPerLane = 8;   // head_dim <= kWarp * kMaxPerLane
constexpr int64_t kMaxHeadDim = kWarp * kMaxPerLane;

__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }

template <typename scalar_t>
__global__ void decode_attention_kernel(const scalar_t* __restrict__ q,
                                        const scalar_t* __restrict__ keys,
                                        const scalar_t* __restrict__ values,
                                        const scalar_t* __restrict__ mask,
                                        scalar_t* __restrict__ out, int64_t heads,
                                        int64_t groups, int64_t width, int64_t mask_width,
                                        int64_t seen, int64_t dim, acc_type<scalar_t> scale) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t warp_max[kWarps], warp_total[kWarps];
  __shared__ acc_t warp_out[kWarps][kMaxHeadDim];
  const int64_t bh = blockIdx.x;   // row * heads + key-value head
  const int64_t g = blockIdx.y;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const scalar_t* query = q + (bh * groups + g) * dim;
  const scalar_t* key_base = keys + bh * width * dim;
  const scalar_t* value_base = values + bh * width * dim;
  const scalar_t* mask_row = mask == nullptr ? nullptr : mask + (bh / heads) * mask_width;
  acc_t qv[kMaxPerLane], acc[kMaxPerLane];
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int64_t d = lane + i * kWarp;
    qv[i] = d < dim ? static_cast<acc_t>(query[d]) * scale : acc_t(0);
    acc[i] = 0;
  }
  acc_t top = -INFINITY, total = 0;
  for (int64_t j = warp; j < seen; j += kWarps) {
    const scalar_t* key = key_base + j * dim;
    acc_t dot = 0;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      const int64_t d = lane + i * kWarp;
      if (d < dim) dot += qv[i] * static_cast<acc_t>(key[d]);
    }
    const acc_t s = warp_sum(dot) + (mask_row == nullptr ? acc_t(0)
                                                           : static_cast<acc_t>(mask_row[j]));
    if (s == -INFINITY) continue;   // a masked column weighs 0 (and cannot make NaN below)
    const acc_t new_top = s > top ? s : top;
    const acc_t rescale = exp_of(top - new_top), p = exp_of(s - new_top);
    top = new_top;
    total = total * rescale + p;
    const scalar_t* value = value_base + j * dim;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      const int64_t d = lane + i * kWarp;
      if (d < dim) acc[i] = acc[i] * rescale + p * static_cast<acc_t>(value[d]);
    }
  }
  if (lane == 0) {
    warp_max[warp] = top;
    warp_total[warp] = total;
  }
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int64_t d = lane + i * kWarp;
    if (d < dim) warp_out[warp][d] = acc[i];
  }
  __syncthreads();
  acc_t block_top = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) block_top = warp_max[w] > block_top ? warp_max[w] : block_top;
  // Every column masked: 0 / 0, NaN, as torch's softmax gives.
  acc_t block_total = 0;
  acc_t weights[kWarps];
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    weights[w] = warp_max[w] == -INFINITY ? acc_t(0) : exp_of(warp_max[w] - block_top);
    block_total += warp_total[w] * weights[w];
  }
  scalar_t* o = out + (bh * groups + g) * dim;
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    acc_t sum = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += warp_out[w][d] * weights[w];
    o[d] = static_cast<scalar_t>(sum / block_total);
  }
}

at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& keys,
                                 const at::Tensor& values, const std::optional<at::Tensor>& mask,
                                 int64_t seen, double scale) {
  const at::Tensor mask_or_none = mask.has_value() ? *mask : at::Tensor();
  check_decode_attention_args("decode_attention", q, keys, values, mask_or_none, seen, scale);
  TORCH_CHECK(q.size(3) <= kMaxHeadDim, "decode_attention: q's head_dim must be at most ",
              kMaxHeadDim, " on CUDA, got ", q.size(3));
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = q.contiguous(), kc = keys.contiguous(), vc = values.contiguous();
  const at::Tensor mc = mask_or_none.defined() ? mask_or_none.contiguous() : at::Tensor();
  at::Tensor out = at::empty(q.sizes(), qc.options());
  const int64_t batch = q.size(0), heads = q.size(1), groups = q.size(2), dim = q.size(3);
  if (batch * heads == 0) return out;
  TORCH_CHECK(batch * heads <= kMaxGridX && groups <= kMaxGridY, "decode_attention: ",
              batch * heads, " rows x kv_heads and ", groups,
              " query heads per kv head exceed the CUDA grid");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(batch * heads), static_cast<unsigned>(groups));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "decode_attention",
                                  [&] {
    using acc_t = acc_type<scalar_t>;
    decode_attention_kernel<scalar_t><<<grid, kWarps * kWarp, 0, stream>>>(
        qc.const_data_ptr<scalar_t>(), kc.const_data_ptr<scalar_t>(),
        vc.const_data_ptr<scalar_t>(), mc.defined() ? mc.const_data_ptr<scalar_t>() : nullptr,
        out.mutable_data_ptr<scalar_t>(), heads, groups, keys.size(2),
        mc.defined() ? mc.size(1) : 0, seen, dim, static_cast<acc_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lambdapo, CUDA, m) {
  m.impl("decode_attention", &decode_attention_cuda);
}

}  // namespace lambdapo
