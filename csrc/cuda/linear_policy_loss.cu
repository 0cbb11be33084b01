// CUDA row kernel of linear_policy_loss (the driver, with its cuBLAS matmuls through ATen,
// is csrc/linear_policy_loss.h). One block per row of a chunk's full-vocabulary logits:
//   pass 1: each thread folds its strided share of the row (16-byte vector loads when the
//           row is aligned) into an online (max, sum exp, sum exp * shift) state; a block
//           reduction merges them; thread 0 turns the row's state into its log-prob,
//           entropy, loss term and the derivatives g_lp, g_H (policy::row_terms, in double);
//   pass 2: every thread overwrites its share of the row with
//           dz_j = (1/T) (g_lp ([j == y] - p_j) - g_H p_j (log p_j + H)).
// A NaN logit makes the row's state, log-prob, loss and gradient NaN.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "kernel_constants.h"
#include "linear_policy_loss.h"

namespace lambdapo {
namespace {

constexpr int kThreads = 512;

template <typename acc_t>
struct Softmax {
  acc_t m;  // running max of x = z / T
  acc_t s;  // sum exp(x - m); NaN once a NaN was seen
  acc_t t;  // sum exp(x - m) (x - m)
};

__device__ __forceinline__ float exp_acc(float x) { return __expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

template <typename acc_t>
__device__ __forceinline__ Softmax<acc_t> merge(Softmax<acc_t> a, Softmax<acc_t> b) {
  if (b.s == acc_t(0)) return a;  // b has seen nothing (or only -inf)
  if (a.s == acc_t(0)) return b;
  const acc_t m = a.m > b.m ? a.m : b.m;
  const acc_t da = a.m - m, db = b.m - m;
  const acc_t ca = exp_acc(da), cb = exp_acc(db);
  return {m, a.s * ca + b.s * cb, ca * (a.t + da * a.s) + cb * (b.t + db * b.s)};
}

template <typename acc_t>
__device__ __forceinline__ void fold(Softmax<acc_t>& st, acc_t x) {
  if (x != x) {  // NaN: the sum (and everything made from it) is NaN from now on
    st.s = x;
    return;
  }
  if (x > st.m) {
    if (st.s > acc_t(0)) {
      const acc_t d = st.m - x, c = exp_acc(d);
      st.t = c * (st.t + d * st.s);
      st.s *= c;
    }
    st.m = x;
  }
  if (x > -INFINITY) {
    const acc_t d = x - st.m, e = exp_acc(d);
    st.s += e;
    st.t += e * d;
  }
}

template <typename acc_t>
__device__ __forceinline__ Softmax<acc_t> warp_merge(Softmax<acc_t> st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    st = merge(st, Softmax<acc_t>{__shfl_down_sync(0xffffffffu, st.m, offset),
                                  __shfl_down_sync(0xffffffffu, st.s, offset),
                                  __shfl_down_sync(0xffffffffu, st.t, offset)});
  }
  return st;  // valid in lane 0
}

template <typename acc_t>
__device__ Softmax<acc_t> block_merge(Softmax<acc_t> st) {
  constexpr int kWarps = kThreads / 32;
  __shared__ acc_t shared[3][kWarps];
  st = warp_merge(st);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    shared[0][warp] = st.m;
    shared[1][warp] = st.s;
    shared[2][warp] = st.t;
  }
  __syncthreads();
  if (warp == 0) {
    st = lane < kWarps ? Softmax<acc_t>{shared[0][lane], shared[1][lane], shared[2][lane]}
                       : Softmax<acc_t>{-INFINITY, acc_t(0), acc_t(0)};
    st = warp_merge(st);
  }
  return st;  // valid in thread 0
}

// Per-row pointers of a chunk (each [rows]; old and ref may be null).
template <typename acc_t>
struct RowArgs {
  const int64_t* targets;
  const acc_t* advantages;
  const acc_t* token_weights;
  const acc_t* old;
  const acc_t* ref;
  acc_t* logprobs;
  acc_t* entropy;
  acc_t* loss;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
policy_rows_kernel(scalar_t* __restrict__ logits, int64_t cols,
                   RowArgs<acc_type<scalar_t>> args, policy::Settings settings,
                   bool write_grad) {
  using acc_t = acc_type<scalar_t>;
  constexpr int N = kVecBytes / sizeof(scalar_t);
  const int64_t r = blockIdx.x;
  scalar_t* row = logits + r * cols;
  const int64_t y = args.targets[r];
  const bool vectorized = reinterpret_cast<uintptr_t>(row) % kVecBytes == 0 && cols % N == 0;
  if (y == settings.ignore_index) {
    if (threadIdx.x == 0) args.logprobs[r] = 0, args.entropy[r] = 0, args.loss[r] = 0;
    if (write_grad) {
      for (int64_t j = threadIdx.x; j < cols; j += kThreads) row[j] = scalar_t(0);
    }
    return;
  }
  const acc_t inv_t = static_cast<acc_t>(settings.inv_temperature);
  Softmax<acc_t> st{-INFINITY, acc_t(0), acc_t(0)};
  if (vectorized) {
    const auto* vrow = reinterpret_cast<const Vec<scalar_t, N>*>(row);
    for (int64_t i = threadIdx.x; i < cols / N; i += kThreads) {
      const Vec<scalar_t, N> v = vrow[i];
#pragma unroll
      for (int k = 0; k < N; ++k) fold(st, static_cast<acc_t>(v.v[k]) * inv_t);
    }
  } else {
    for (int64_t i = threadIdx.x; i < cols; i += kThreads) {
      fold(st, static_cast<acc_t>(row[i]) * inv_t);
    }
  }
  st = block_merge(st);
  __shared__ acc_t row_lse, row_h, g_lp, g_h;
  if (threadIdx.x == 0) {
    const double log_sum = log(static_cast<double>(st.s));
    const double lse = static_cast<double>(st.m) + log_sum;
    const double h = log_sum - static_cast<double>(st.t) / static_cast<double>(st.s);
    // NaN for an unvalidated out-of-range target: its loss and gradient row are NaN.
    double lp = NAN;
    if (y >= 0 && y < cols) {
      const double d = static_cast<double>(static_cast<acc_t>(row[y]) * inv_t) - lse;
      lp = d > 0.0 ? 0.0 : d;  // clamp to <= 0, NaN kept
    }
    const policy::RowTerms terms = policy::row_terms(
        lp, h, args.advantages[r], args.token_weights[r],
        args.old != nullptr ? static_cast<double>(args.old[r]) : lp,
        args.ref != nullptr ? static_cast<double>(args.ref[r]) : 0.0, settings);
    args.logprobs[r] = static_cast<acc_t>(lp);
    args.entropy[r] = static_cast<acc_t>(h);
    args.loss[r] = static_cast<acc_t>(terms.loss);
    row_lse = static_cast<acc_t>(lse);
    row_h = static_cast<acc_t>(h);
    g_lp = static_cast<acc_t>(terms.grad_logprob);
    g_h = static_cast<acc_t>(terms.grad_entropy);
  }
  if (!write_grad) return;  // uniform across the block: no barrier is skipped by some only
  __syncthreads();
  const acc_t lse = row_lse, h = row_h, a = g_lp, b = g_h;
  const auto grad_at = [&](int64_t j, scalar_t z) -> scalar_t {
    const acc_t log_p = static_cast<acc_t>(z) * inv_t - lse;
    const acc_t p = exp_acc(log_p);
    // p == 0 (a -inf logit) gives 0, never 0 * inf; NaN passes.
    acc_t dz = p != acc_t(0) ? -inv_t * p * (a + b * (log_p + h)) : acc_t(0);
    if (j == y) dz += inv_t * a;
    return static_cast<scalar_t>(dz);
  };
  if (vectorized) {
    auto* vrow = reinterpret_cast<Vec<scalar_t, N>*>(row);
    for (int64_t i = threadIdx.x; i < cols / N; i += kThreads) {
      Vec<scalar_t, N> v = vrow[i];
#pragma unroll
      for (int k = 0; k < N; ++k) v.v[k] = grad_at(i * N + k, v.v[k]);
      vrow[i] = v;
    }
  } else {
    for (int64_t j = threadIdx.x; j < cols; j += kThreads) row[j] = grad_at(j, row[j]);
  }
}

struct CudaKernels {
  static void rows(policy::Chunk& c, const policy::Settings& settings) {
    const c10::cuda::CUDAGuard device_guard(c.logits.device());
    const int64_t rows = c.logits.size(0), cols = c.logits.size(1);
    if (rows == 0) return;
    TORCH_CHECK(rows <= kMaxGridX, policy::kOp, ": at most 2^31-1 rows per chunk on CUDA, got ",
                rows);
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.logits.scalar_type(),
                                    "linear_policy_loss", [&] {
      using acc_t = acc_type<scalar_t>;
      const auto ptr = [](const at::Tensor& x) -> const acc_t* {
        return x.defined() ? x.data_ptr<acc_t>() : nullptr;
      };
      const RowArgs<acc_t> args{c.targets.data_ptr<int64_t>(), ptr(c.advantages),
                                ptr(c.token_weights), ptr(c.old), ptr(c.ref),
                                c.logprobs.data_ptr<acc_t>(), c.entropy.data_ptr<acc_t>(),
                                c.loss.data_ptr<acc_t>()};
      policy_rows_kernel<scalar_t><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
          c.logits.data_ptr<scalar_t>(), cols, args, settings, c.write_grad);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_op(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& advantages, const at::Tensor& token_weights,
    const std::optional<at::Tensor>& old_logprobs, const std::optional<at::Tensor>& ref_logprobs,
    double kl_coef, double entropy_coef, double clip_low, double clip_high, double temperature,
    int64_t ignore_index, int64_t chunk_size, std::array<bool, 3> output_mask, bool validate) {
  const c10::cuda::CUDAGuard device_guard(hidden.device());
  return policy::forward<CudaKernels>(hidden, weight, bias, targets, advantages, token_weights,
                                      old_logprobs, ref_logprobs, kl_coef, entropy_coef, clip_low,
                                      clip_high, temperature, ignore_index, chunk_size,
                                      output_mask, validate);
}

}  // namespace

TORCH_LIBRARY_IMPL(lambdapo, CUDA, m) {
  m.impl("linear_policy_loss_forward", &forward_op);
}

}  // namespace lambdapo
