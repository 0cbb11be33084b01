// CUDA kernel of lambda_advantages. Grid (group, chunk of BLOCK members): each thread owns
// one member i and streams its whole group through shared memory in tiles, so any group
// size and any number of groups work with O(P*G) memory and no [P, G, G] tensor.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cub/block/block_reduce.cuh>
#include <torch/library.h>

#include "lambda_advantages.h"

namespace lambdapo {
namespace {

constexpr int kBlock = 256;
constexpr int kTile = 1024;

struct GroupStats {
  double count, sum, sum_sq_dev;
};

// Valid-member count and (for "std") the population spread of the group's rewards, two
// passes for accuracy; every block of the group computes the same values.
template <typename BlockReduce>
__device__ GroupStats group_stats(const float* r, const bool* valid, int64_t begin, int64_t size,
                                  bool need_spread, typename BlockReduce::TempStorage& tmp,
                                  double* broadcast) {
  double count = 0.0, sum = 0.0;
  for (int64_t k = threadIdx.x; k < size; k += kBlock) {
    if (valid == nullptr || valid[begin + k]) {
      count += 1.0;
      sum += r[begin + k];
    }
  }
  count = BlockReduce(tmp).Sum(count);
  __syncthreads();
  sum = BlockReduce(tmp).Sum(sum);
  if (threadIdx.x == 0) {
    broadcast[0] = count;
    broadcast[1] = sum;
  }
  __syncthreads();
  GroupStats stats{broadcast[0], broadcast[1], 0.0};
  if (need_spread && stats.count > 0) {
    const double mean = stats.sum / stats.count;
    double m2 = 0.0;
    for (int64_t k = threadIdx.x; k < size; k += kBlock) {
      if (valid == nullptr || valid[begin + k]) {
        const double d = r[begin + k] - mean;
        m2 += d * d;
      }
    }
    __syncthreads();
    m2 = BlockReduce(tmp).Sum(m2);
    if (threadIdx.x == 0) broadcast[2] = m2;
    __syncthreads();
    stats.sum_sq_dev = broadcast[2];
  }
  return stats;
}

__global__ void __launch_bounds__(kBlock)
lambda_advantages_kernel(const float* __restrict__ rewards, const float* __restrict__ scores,
                         const bool* __restrict__ valid, const int64_t* __restrict__ offsets,
                         float beta, int normalize, double eps, float* __restrict__ out) {
  using BlockReduce = cub::BlockReduce<double, kBlock>;
  __shared__ typename BlockReduce::TempStorage reduce_tmp;
  __shared__ double broadcast[3];
  __shared__ float tile_r[kTile];
  __shared__ float tile_s[kTile];
  __shared__ float tile_v[kTile];

  const int64_t group = blockIdx.x;
  const int64_t begin = offsets[group];
  const int64_t size = offsets[group + 1] - begin;
  const int64_t chunk_begin = static_cast<int64_t>(blockIdx.y) * kBlock;
  if (chunk_begin >= size) return;  // uniform across the block
  const int64_t i = chunk_begin + threadIdx.x;

  const GroupStats stats = group_stats<BlockReduce>(
      rewards, valid, begin, size, normalize == static_cast<int>(Normalize::Std), reduce_tmp,
      broadcast);

  const bool own = i < size && (valid == nullptr || valid[begin + i]);
  const float ri = own ? rewards[begin + i] : 0.0f;
  const float si = own ? scores[begin + i] : 0.0f;
  float acc = 0.0f;
  for (int64_t t0 = 0; t0 < size; t0 += kTile) {
    const int m = size - t0 < kTile ? static_cast<int>(size - t0) : kTile;
    for (int k = threadIdx.x; k < m; k += kBlock) {
      const bool v = valid == nullptr || valid[begin + t0 + k];
      // Masked-out members may hold non-finite padding: zero them so 0 * term stays 0.
      tile_r[k] = v ? rewards[begin + t0 + k] : 0.0f;
      tile_s[k] = v ? scores[begin + t0 + k] : 0.0f;
      tile_v[k] = v ? 1.0f : 0.0f;
    }
    __syncthreads();
    if (own) {
      for (int k = 0; k < m; ++k) {
        const float dr = ri - tile_r[k];
        const float sign = static_cast<float>(dr > 0.0f) - static_cast<float>(dr < 0.0f);
        // w = 2 / (1 + exp(x)); |x| <= 80 keeps the fast division in its exact range.
        const float x = fminf(fmaxf(beta * sign * (si - tile_s[k]), -80.0f), 80.0f);
        acc += tile_v[k] * dr * __fdividef(2.0f, 1.0f + __expf(x));
      }
    }
    __syncthreads();
  }
  if (i >= size) return;
  float result = 0.0f;
  if (own && stats.count >= 2.0) {
    double scale = normalize == static_cast<int>(Normalize::None) ? 1.0 : 1.0 / (stats.count - 1.0);
    if (normalize == static_cast<int>(Normalize::Std)) {
      scale /= sqrt(stats.sum_sq_dev / stats.count) + eps;
    }
    result = static_cast<float>(acc * scale);
  }
  out[begin + i] = result;
}

void lambda_advantages_segments_cuda(const GroupSegments& seg, float beta, Normalize norm,
                                     double eps, at::Tensor& out) {
  const int64_t chunks = (seg.max_group_size + kBlock - 1) / kBlock;
  TORCH_CHECK(chunks <= 65535, "lambda_advantages: groups of up to ", int64_t{65535} * kBlock,
              " members are supported on CUDA, got ", seg.max_group_size);
  TORCH_CHECK(seg.num_groups <= int64_t{2147483647},
              "lambda_advantages: too many groups for one CUDA launch: ", seg.num_groups);
  const c10::cuda::CUDAGuard device_guard(out.device());
  check_valid_members_finite(seg);
  const dim3 grid(static_cast<unsigned>(seg.num_groups), static_cast<unsigned>(chunks));
  auto stream = c10::cuda::getCurrentCUDAStream();
  lambda_advantages_kernel<<<grid, kBlock, 0, stream>>>(
      seg.rewards.data_ptr<float>(), seg.scores.data_ptr<float>(),
      seg.valid.defined() ? seg.valid.data_ptr<bool>() : nullptr,
      seg.offsets.data_ptr<int64_t>(), beta, static_cast<int>(norm), eps,
      out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor lambda_advantages_cuda(const at::Tensor& rewards, const at::Tensor& scores,
                                  const std::optional<at::Tensor>& mask,
                                  const std::optional<at::Tensor>& group_ids, double beta,
                                  c10::string_view normalize, double eps) {
  return lambda_advantages_impl(rewards, scores, mask, group_ids, beta,
                                std::string_view(normalize.data(), normalize.size()), eps,
                                lambda_advantages_segments_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(lambdapo, CUDA, m) {
  m.impl("lambda_advantages", &lambda_advantages_cuda);
}

}  // namespace lambdapo
