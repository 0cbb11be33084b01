// CUDA kernels of lambda_advantages, both with O(P*G) memory and no [P, G, G] tensor.
//
// Small dense groups (G <= 64) and all ragged groups: one thread per member, looping over
// its group (read through L1), so one launch covers any number of groups with no per-group
// setup and no group table. Large dense groups: a block per (group, chunk of kBlock members)
// streams the group through shared memory, and each pair costs one special-function op
// through per-member factors (see pair_term_factored). The kernel a group takes depends only
// on the layout and the group's own size, never on validate or on the other groups.
//
// With validate, each kernel flags non-finite valid members in a device word that is read
// once after the launch; without, nothing is read back.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cub/block/block_reduce.cuh>
#include <torch/library.h>

#include "kernel_constants.h"
#include "lambda_advantages.h"

namespace lambdapo {
namespace {

constexpr int kMemberThreads = 128;
constexpr int64_t kMemberKernelMaxGroup = 64;
constexpr int kBlock = 256;
constexpr int kTile = 1024;
// A pair takes the factored form when its factors sum to at least this; see
// pair_term_factored.
constexpr float kMinFactorSum = 0x1p-24f;

constexpr int kRewardsNonFinite = 1;
constexpr int kScoresNonFinite = 2;

__device__ __forceinline__ void flag_non_finite(int* flag, float r, float s) {
  if (flag == nullptr) return;
  const int bits = (isfinite(r) ? 0 : kRewardsNonFinite) | (isfinite(s) ? 0 : kScoresNonFinite);
  if (bits != 0) atomicOr(flag, bits);
}

// (r_i - r_j) w_ij / 2 straight from the definition: w / 2 = 1 / (1 + exp(beta sign(dr) ds)).
__device__ __forceinline__ float pair_term_direct(float ri, float si, float rj, float sj,
                                                  float beta) {
  const float dr = ri - rj;
  const float sign = static_cast<float>(dr > 0.0f) - static_cast<float>(dr < 0.0f);
  // Keeps the fast division in its accurate range.
  const float x =
      fminf(fmaxf(beta * sign * (si - sj), -kFastDivideExpBound), kFastDivideExpBound);
  return dr * __fdividef(1.0f, 1.0f + expf(x));
}

// The same with factors a = exp(beta (s - s_ref)) in (0, 1], s_ref the valid score with
// the largest beta * s: exp(beta (s_i - s_j)) = a_i / a_j, so w_ij / 2 is a_j / (a_i + a_j)
// when r_i > r_j and a_i / (a_i + a_j) when r_i < r_j (the lower-rewarded member's factor
// on top). No overflow (a <= 1); a_i + a_j >= kMinFactorSum keeps the larger factor's
// exponent above -17.3, so the exponent's rounding (relative 2^-24 of at most 17.3) moves
// w by under 2e-6 relative, and a smaller factor lost to underflow stands for a weight
// below 2^-126 / 2^-25. Callers fall back to pair_term_direct below kMinFactorSum.
__device__ __forceinline__ float pair_term_factored(float ri, float ai, float rj, float aj) {
  const float dr = ri - rj;
  return dr * __fdividef(dr > 0.0f ? aj : ai, ai + aj);
}

struct GroupScale {
  double count, scale;  // valid members; 1/(n-1) (or 1), over the std + eps for "std"
};

__device__ __forceinline__ double advantage_scale(double count, double sum_sq_dev,
                                                  int normalize, double eps) {
  double scale = normalize == static_cast<int>(Normalize::None) ? 1.0 : 1.0 / (count - 1.0);
  if (normalize == static_cast<int>(Normalize::Std)) scale /= sqrt(sum_sq_dev / count) + eps;
  return scale;
}

// One thread per member k (segment slot), looping over its own group: dense groups of
// dense_size members, or ragged ones given by member_begin/member_end.
__global__ void __launch_bounds__(kMemberThreads)
lambda_advantages_member_kernel(const float* __restrict__ rewards,
                                const float* __restrict__ scores,
                                const bool* __restrict__ valid, int64_t n_members,
                                int64_t dense_size, const int64_t* __restrict__ member_begin,
                                const int64_t* __restrict__ member_end,
                                const int64_t* __restrict__ order, float beta, int normalize,
                                double eps, int* __restrict__ flag, float* __restrict__ out) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kMemberThreads + threadIdx.x;
  if (k >= n_members) return;
  const int64_t begin = dense_size > 0 ? k / dense_size * dense_size : member_begin[k];
  const int64_t end = dense_size > 0 ? begin + dense_size : member_end[k];
  float result = 0.0f;
  if (valid == nullptr || valid[k]) {
    const float ri = rewards[k], si = scores[k];
    flag_non_finite(flag, ri, si);
    // The valid members counted in an integer; the reward sum (for "std" only) and the
    // advantage summed in double from float partials of at most kPairsPerFloatPartial terms
    // (lambda_advantages.h): ragged groups met without a group table may be of any size.
    const bool spread = normalize == static_cast<int>(Normalize::Std);  // uniform
    int64_t count = 0;
    double sum = 0.0, acc = 0.0;
    for (int64_t j0 = begin; j0 < end; j0 += kPairsPerFloatPartial) {
      const int64_t j1 = end - j0 < kPairsPerFloatPartial ? end : j0 + kPairsPerFloatPartial;
      float partial = 0.0f, reward_partial = 0.0f;
      for (int64_t j = j0; j < j1; ++j) {
        if (valid != nullptr && !valid[j]) continue;
        const float rj = rewards[j];
        ++count;
        if (spread) reward_partial += rj;
        partial += pair_term_direct(ri, si, rj, scores[j], beta);  // j == k adds 0
      }
      acc += partial;
      if (spread) sum += reward_partial;
    }
    if (count >= 2) {
      double sum_sq_dev = 0.0;
      if (spread) {
        const double mean = sum / static_cast<double>(count);
        for (int64_t j = begin; j < end; ++j) {
          if (valid != nullptr && !valid[j]) continue;
          const double d = rewards[j] - mean;
          sum_sq_dev += d * d;
        }
      }
      result = static_cast<float>(
          2.0 * acc * advantage_scale(static_cast<double>(count), sum_sq_dev, normalize, eps));
    }
  }
  out[order != nullptr ? order[k] : k] = result;
}

// Valid-member count, reward sum and (for "std") squared deviation, and the reference
// score s_ref (valid score with the largest beta * s) of one group; every block of the
// group computes the same values.
struct GroupStats {
  double count, sum, sum_sq_dev;
  float score_ref;
};

struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <typename DoubleReduce, typename FloatReduce>
__device__ GroupStats group_stats(const float* r, const float* s, const bool* valid,
                                  int64_t begin, int64_t size, float beta, bool need_spread,
                                  typename DoubleReduce::TempStorage& tmp_d,
                                  typename FloatReduce::TempStorage& tmp_f, double* broadcast) {
  const float direction = beta >= 0.0f ? 1.0f : -1.0f;
  double count = 0.0, sum = 0.0;
  float top = -INFINITY;  // max of direction * s
  for (int64_t k = threadIdx.x; k < size; k += kBlock) {
    if (valid == nullptr || valid[begin + k]) {
      count += 1.0;
      sum += r[begin + k];
      top = fmaxf(top, direction * s[begin + k]);
    }
  }
  count = DoubleReduce(tmp_d).Sum(count);
  __syncthreads();
  sum = DoubleReduce(tmp_d).Sum(sum);
  top = FloatReduce(tmp_f).Reduce(top, MaxOp());
  if (threadIdx.x == 0) {
    broadcast[0] = count;
    broadcast[1] = sum;
    broadcast[2] = top;
  }
  __syncthreads();
  GroupStats stats{broadcast[0], broadcast[1], 0.0, direction * static_cast<float>(broadcast[2])};
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
    m2 = DoubleReduce(tmp_d).Sum(m2);
    if (threadIdx.x == 0) broadcast[3] = m2;
    __syncthreads();
    stats.sum_sq_dev = broadcast[3];
  }
  return stats;
}

// Dense groups of dense_size members; grid (group, chunk of kBlock members): thread i owns
// member chunk * kBlock + i and streams its group through shared memory as (r, a, s, valid)
// tiles.
__global__ void __launch_bounds__(kBlock)
lambda_advantages_tiled_kernel(const float* __restrict__ rewards,
                               const float* __restrict__ scores,
                               const bool* __restrict__ valid, int64_t dense_size, float beta,
                               int normalize, double eps, int* __restrict__ flag,
                               float* __restrict__ out) {
  using DoubleReduce = cub::BlockReduce<double, kBlock>;
  using FloatReduce = cub::BlockReduce<float, kBlock>;
  __shared__ typename DoubleReduce::TempStorage reduce_d;
  __shared__ typename FloatReduce::TempStorage reduce_f;
  __shared__ double broadcast[4];
  __shared__ float4 tile[kTile];

  const int64_t group = blockIdx.x;
  const int64_t begin = group * dense_size, size = dense_size;
  const int64_t i = static_cast<int64_t>(blockIdx.y) * kBlock + threadIdx.x;

  const GroupStats stats = group_stats<DoubleReduce, FloatReduce>(
      rewards, scores, valid, begin, size, beta, normalize == static_cast<int>(Normalize::Std),
      reduce_d, reduce_f, broadcast);

  const bool own = i < size && (valid == nullptr || valid[begin + i]);
  const float ri = own ? rewards[begin + i] : 0.0f;
  const float si = own ? scores[begin + i] : 0.0f;
  if (own) flag_non_finite(flag, ri, si);
  const float ai = expf(beta * (si - stats.score_ref));
  double acc = 0.0;  // of float partials (lambda_advantages.h)
  for (int64_t t0 = 0; t0 < size; t0 += kTile) {
    const int m = size - t0 < kTile ? static_cast<int>(size - t0) : kTile;
    for (int k = threadIdx.x; k < m; k += kBlock) {
      const int64_t j = begin + t0 + k;
      // Masked-out members may hold non-finite padding: zero them (weight 0 below).
      if (valid == nullptr || valid[j]) {
        const float sj = scores[j];
        tile[k] = make_float4(rewards[j], expf(beta * (sj - stats.score_ref)), sj, 1.0f);
      } else {
        tile[k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }
    }
    __syncthreads();
    if (own) {
      const bool factored = ai >= kMinFactorSum;  // then every a_i + a_j is too
      for (int k0 = 0; k0 < m; k0 += static_cast<int>(kPairsPerFloatPartial)) {
        const int k1 = min(m, k0 + static_cast<int>(kPairsPerFloatPartial));
        float partial = 0.0f;
        if (factored) {
#pragma unroll 4
          for (int k = k0; k < k1; ++k) {
            const float4 t = tile[k];
            partial += t.w * pair_term_factored(ri, ai, t.x, t.y);
          }
        } else {
          for (int k = k0; k < k1; ++k) {
            const float4 t = tile[k];
            partial += t.w * (ai + t.y >= kMinFactorSum
                                  ? pair_term_factored(ri, ai, t.x, t.y)
                                  : pair_term_direct(ri, si, t.x, t.z, beta));
          }
        }
        acc += partial;
      }
    }
    __syncthreads();
  }
  if (i >= size) return;
  float result = 0.0f;
  if (own && stats.count >= 2.0) {
    result = static_cast<float>(
        2.0 * acc * advantage_scale(stats.count, stats.sum_sq_dev, normalize, eps));
  }
  out[begin + i] = result;
}

void lambda_advantages_segments_cuda(const GroupSegments& seg, float beta, Normalize norm,
                                     double eps, bool validate, at::Tensor& out) {
  const c10::cuda::CUDAGuard device_guard(out.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n_members = seg.rewards.numel();
  at::Tensor flag = validate ? at::zeros({1}, out.options().dtype(at::kInt)) : at::Tensor();
  const float* rewards = seg.rewards.data_ptr<float>();
  const float* scores = seg.scores.data_ptr<float>();
  const bool* valid = seg.valid.defined() ? seg.valid.data_ptr<bool>() : nullptr;
  const int64_t* order = seg.order.defined() ? seg.order.data_ptr<int64_t>() : nullptr;
  int* flag_ptr = validate ? flag.data_ptr<int>() : nullptr;
  // Ragged groups take the member kernel whatever their size: the tiled kernel would need
  // the group table (a host sync, so only with validate) and would then compute the large
  // groups with the factored pair terms, different numbers from validate=False's.
  const bool member_path =
      seg.dense_group_size == 0 || seg.dense_group_size <= kMemberKernelMaxGroup;
  if (member_path) {
    const int64_t blocks = (n_members + kMemberThreads - 1) / kMemberThreads;
    TORCH_CHECK(blocks <= kMaxGridX,
                "lambda_advantages: too many members for one CUDA launch: ", n_members);
    lambda_advantages_member_kernel<<<static_cast<unsigned>(blocks), kMemberThreads, 0, stream>>>(
        rewards, scores, valid, n_members, seg.dense_group_size,
        seg.member_begin.defined() ? seg.member_begin.data_ptr<int64_t>() : nullptr,
        seg.member_end.defined() ? seg.member_end.data_ptr<int64_t>() : nullptr, order, beta,
        static_cast<int>(norm), eps, flag_ptr, out.data_ptr<float>());
  } else {
    const int64_t chunks = (seg.dense_group_size + kBlock - 1) / kBlock;
    TORCH_CHECK(chunks <= kMaxGridY, "lambda_advantages: groups of up to ", kMaxGridY * kBlock,
                " members are supported on CUDA, got ", seg.dense_group_size);
    TORCH_CHECK(seg.num_groups <= kMaxGridX,
                "lambda_advantages: too many groups for one CUDA launch: ", seg.num_groups);
    const dim3 grid(static_cast<unsigned>(seg.num_groups), static_cast<unsigned>(chunks));
    lambda_advantages_tiled_kernel<<<grid, kBlock, 0, stream>>>(
        rewards, scores, valid, seg.dense_group_size, beta, static_cast<int>(norm), eps,
        flag_ptr, out.data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (validate) {
    const int bits = flag.item<int>();
    check_valid_members_finite((bits & kRewardsNonFinite) == 0, (bits & kScoresNonFinite) == 0);
  }
}

at::Tensor lambda_advantages_cuda(const at::Tensor& rewards, const at::Tensor& scores,
                                  const std::optional<at::Tensor>& mask,
                                  const std::optional<at::Tensor>& group_ids, double beta,
                                  c10::string_view normalize, double eps, bool validate) {
  // Ragged groups: per-member bounds (sync-free), never the group table.
  return lambda_advantages_impl(rewards, scores, mask, group_ids, beta,
                                std::string_view(normalize.data(), normalize.size()), eps,
                                validate, RaggedLayout{false, true},
                                lambda_advantages_segments_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(lambdapo, CUDA, m) {
  m.impl("lambda_advantages", &lambda_advantages_cuda);
}

}  // namespace lambdapo
