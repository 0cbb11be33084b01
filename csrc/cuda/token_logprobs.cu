// CUDA kernels of token_logprobs. Forward: one block per row; each thread folds 16-byte
// vectors of the row into an online (max, sum exp, sum exp * shifted logit) state, and
// the block merges the states. Backward: a (row, vocabulary chunk) grid that recomputes p
// from the saved log-sum-exp. Both read logits once; backward writes dlogits once. The
// entropy terms are compiled in only when entropy is asked for. Offsets are 64-bit; no
// host sync.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "kernel_constants.h"
#include "token_logprobs.h"

namespace lambdapo {
namespace {

constexpr int kThreads = 256;
constexpr int kForwardLoads = 4;
constexpr int kBackwardVecsPerThread = 4;

// The kernels work in base 2: x = z * log2(e) / T, so each element costs one ex2 on the
// special-function unit (MUFU.EX2) and an FFMA, instead of expf's range reduction.
// s = sum 2^(x - m), t = sum 2^(x - m) (x - m); then lse = (m + log2 s) ln 2 and
// H = (log2 s - t / s) ln 2.
template <typename acc_t>
struct OnlineState {
  acc_t m;  // running max of x
  acc_t s;  // sum 2^(x - m)
  acc_t t;  // sum 2^(x - m) (x - m), with entropy only
};

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));  // 2^-inf = 0; NaN stays NaN
  return y;
}
__device__ __forceinline__ double fast_exp2(double x) { return exp2(x); }

template <typename acc_t>
constexpr acc_t kLog2e = acc_t(1.4426950408889634074);
template <typename acc_t>
constexpr acc_t kLn2 = acc_t(0.6931471805599453094);

template <bool kEntropy, typename acc_t>
__device__ __forceinline__ OnlineState<acc_t> merge(OnlineState<acc_t> a, OnlineState<acc_t> b) {
  if (b.s == acc_t(0)) return a;  // b has seen nothing but -inf (or nothing)
  if (a.s == acc_t(0)) return b;
  const acc_t m = a.m > b.m ? a.m : b.m;
  const acc_t da = a.m - m, db = b.m - m;
  const acc_t ca = fast_exp2(da), cb = fast_exp2(db);
  OnlineState<acc_t> out{m, a.s * ca + b.s * cb, acc_t(0)};
  if (kEntropy) out.t = ca * (a.t + da * a.s) + cb * (b.t + db * b.s);
  return out;
}

// Folds values x[0..n) (already in base-2 units) into a thread's state: one max for the
// whole batch, then one ex2 per value. st.m never turns NaN (NaN > m is false); a NaN in x
// reaches s through the sum (NaN - m), or through the branch below while st.m is -inf, and
// a NaN s stays NaN through every later fold and merge. tests/ops/softmax_kernel_emulation.py
// mirrors fold, merge and the kernels' traversal: change them together.
template <bool kEntropy, typename acc_t, int N>
__device__ __forceinline__ void fold(OnlineState<acc_t>& st, const acc_t (&x)[N]) {
  acc_t local_max = x[0];
#pragma unroll
  for (int k = 1; k < N; ++k) local_max = x[k] > local_max ? x[k] : local_max;
  if (local_max > st.m) {
    if (st.s > acc_t(0)) {
      const acc_t d = st.m - local_max, c = fast_exp2(d);
      if (kEntropy) st.t = c * (st.t + d * st.s);
      st.s *= c;
    }
    st.m = local_max;
  }
  if (!(st.m > -INFINITY)) {
    // Nothing but -inf and NaN so far: the batch adds nothing to the sums, except that a NaN
    // in it must reach the result.
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (x[k] != x[k]) st.s = x[k];
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const acc_t d = x[k] - st.m;
    const acc_t e = fast_exp2(d);
    st.s += e;
    if (kEntropy) st.t += e > acc_t(0) ? e * d : acc_t(0);  // no 0 * -inf
  }
}

template <bool kEntropy, typename acc_t>
__device__ __forceinline__ OnlineState<acc_t> warp_merge(OnlineState<acc_t> st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    OnlineState<acc_t> other{__shfl_down_sync(0xffffffffu, st.m, offset),
                             __shfl_down_sync(0xffffffffu, st.s, offset),
                             kEntropy ? __shfl_down_sync(0xffffffffu, st.t, offset) : acc_t(0)};
    st = merge<kEntropy>(st, other);
  }
  return st;  // valid in lane 0
}

template <bool kEntropy, typename acc_t>
__device__ OnlineState<acc_t> block_merge(OnlineState<acc_t> st) {
  __shared__ acc_t shared[3][kThreads / 32];
  st = warp_merge<kEntropy>(st);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    shared[0][warp] = st.m;
    shared[1][warp] = st.s;
    shared[2][warp] = st.t;
  }
  __syncthreads();
  if (warp == 0) {
    constexpr int kWarps = kThreads / 32;
    st = lane < kWarps ? OnlineState<acc_t>{shared[0][lane], shared[1][lane], shared[2][lane]}
                       : OnlineState<acc_t>{-INFINITY, acc_t(0), acc_t(0)};
    st = warp_merge<kEntropy>(st);
  }
  return st;  // valid in thread 0
}

template <typename scalar_t, bool kEntropy>
__global__ void __launch_bounds__(kThreads)
token_logprobs_forward_kernel(const scalar_t* __restrict__ logits,
                              const int64_t* __restrict__ offsets,
                              const int64_t* __restrict__ targets, int64_t vocab,
                              int64_t ignore_index, acc_type<scalar_t> inv_t,
                              acc_type<scalar_t>* __restrict__ logprobs,
                              acc_type<scalar_t>* __restrict__ entropy,
                              acc_type<scalar_t>* __restrict__ lse) {
  using acc_t = acc_type<scalar_t>;
  constexpr int N = kVecBytes / sizeof(scalar_t);
  const int64_t r = blockIdx.x;
  const int64_t target = targets[r];
  if (target == ignore_index) {
    if (threadIdx.x == 0) {
      logprobs[r] = 0;
      lse[r] = 0;
      if (kEntropy) entropy[r] = 0;
    }
    return;
  }
  const scalar_t* row = logits + offsets[r];
  const acc_t scale = inv_t * kLog2e<acc_t>;
  OnlineState<acc_t> st{-INFINITY, acc_t(0), acc_t(0)};
  const bool vectorized = reinterpret_cast<uintptr_t>(row) % kVecBytes == 0 && vocab % N == 0;
  if (vectorized) {
    const auto* vrow = reinterpret_cast<const Vec<scalar_t, N>*>(row);
    const int64_t vecs = vocab / N;
    int64_t i = threadIdx.x;
    // kForwardLoads independent 16-byte loads in flight per thread before any is used: one
    // at a time left the forward at ~63% of HBM bandwidth on an H100.
    for (; i + (kForwardLoads - 1) * kThreads < vecs; i += kForwardLoads * kThreads) {
      Vec<scalar_t, N> v[kForwardLoads];
#pragma unroll
      for (int u = 0; u < kForwardLoads; ++u) v[u] = vrow[i + u * kThreads];
      acc_t x[kForwardLoads * N];
#pragma unroll
      for (int u = 0; u < kForwardLoads; ++u) {
#pragma unroll
        for (int k = 0; k < N; ++k) x[u * N + k] = static_cast<acc_t>(v[u].v[k]) * scale;
      }
      fold<kEntropy>(st, x);
    }
    for (; i < vecs; i += kThreads) {
      const Vec<scalar_t, N> v = vrow[i];
      acc_t x[N];
#pragma unroll
      for (int k = 0; k < N; ++k) x[k] = static_cast<acc_t>(v.v[k]) * scale;
      fold<kEntropy>(st, x);
    }
  } else {
    for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
      const acc_t x[1] = {static_cast<acc_t>(row[i]) * scale};
      fold<kEntropy>(st, x);
    }
  }
  st = block_merge<kEntropy>(st);
  if (threadIdx.x == 0) {
    const acc_t log2_s = log2(st.s);
    const acc_t row_lse = (st.m + log2_s) * kLn2<acc_t>;
    // An unchecked target out of range (validate=False) gives NaN, never a stray read.
    const acc_t lp = target >= 0 && target < vocab
                         ? static_cast<acc_t>(row[target]) * inv_t - row_lse
                         : acc_t(NAN);
    logprobs[r] = lp > acc_t(0) ? acc_t(0) : lp;  // NaN passes
    lse[r] = row_lse;
    if (kEntropy) entropy[r] = (log2_s - st.t / st.s) * kLn2<acc_t>;
  }
}

// dz_j = (1/T) (g_lp [j == y] - p_j (g_lp + g_H (log p_j + H))), p_j = 2^(x_j - lse / ln 2).
// Each thread loads all its vectors of the chunk before computing any (bytes in flight),
// and writes each dlogits element once, after reading it. dlogits may be logits itself (the
// in-place backward), so neither of the two is __restrict__.
template <typename scalar_t, bool kEntropy>
__global__ void __launch_bounds__(kThreads)
token_logprobs_backward_kernel(const scalar_t* logits,
                               const int64_t* __restrict__ in_offsets,
                               scalar_t* dlogits,
                               const int64_t* __restrict__ out_offsets,
                               const int64_t* __restrict__ targets, int64_t vocab,
                               int64_t ignore_index, acc_type<scalar_t> inv_t,
                               const acc_type<scalar_t>* __restrict__ grad_logprobs,
                               const acc_type<scalar_t>* __restrict__ grad_entropy,
                               const acc_type<scalar_t>* __restrict__ lse,
                               const acc_type<scalar_t>* __restrict__ entropy) {
  using acc_t = acc_type<scalar_t>;
  constexpr int N = kVecBytes / sizeof(scalar_t);
  constexpr int64_t kChunk = int64_t{kThreads} * N * kBackwardVecsPerThread;
  const int64_t r = blockIdx.x;
  const int64_t chunk_begin = static_cast<int64_t>(blockIdx.y) * kChunk;
  const int64_t chunk_end = chunk_begin + kChunk < vocab ? chunk_begin + kChunk : vocab;
  const scalar_t* in_row = logits + in_offsets[r];
  scalar_t* out_row = dlogits + out_offsets[r];
  const int64_t target = targets[r];
  const bool ignored = target == ignore_index;
  const acc_t scale = inv_t * kLog2e<acc_t>;
  const acc_t g_lp = ignored ? acc_t(0) : grad_logprobs[r];
  const acc_t g_h = ignored || !kEntropy ? acc_t(0) : grad_entropy[r];
  const acc_t h = ignored || !kEntropy ? acc_t(0) : entropy[r];
  const acc_t lse2 = ignored ? acc_t(0) : lse[r] * kLog2e<acc_t>;
  const acc_t neg_inv_t = -inv_t;
  const acc_t target_grad = inv_t * g_lp;
  const auto grad_at = [&](int64_t j, scalar_t z) -> scalar_t {
    if (ignored) return scalar_t(0);
    const acc_t log2_p = static_cast<acc_t>(z) * scale - lse2;
    const acc_t p = fast_exp2(log2_p);
    acc_t dz;
    if (kEntropy) {
      // p = 0 (a -inf logit) must not meet log p = -inf; a NaN p (NaN logit or lse) passes.
      dz = p == acc_t(0) ? acc_t(0) : neg_inv_t * p * (g_lp + g_h * (log2_p * kLn2<acc_t> + h));
    } else {
      dz = neg_inv_t * g_lp * p;
    }
    if (j == target) dz += target_grad;
    return static_cast<scalar_t>(dz);
  };
  const bool vectorized = reinterpret_cast<uintptr_t>(in_row) % kVecBytes == 0 &&
                          reinterpret_cast<uintptr_t>(out_row) % kVecBytes == 0 && vocab % N == 0;
  if (vectorized) {
    const auto* vin = reinterpret_cast<const Vec<scalar_t, N>*>(in_row);
    auto* vout = reinterpret_cast<Vec<scalar_t, N>*>(out_row);
    const int64_t first = chunk_begin / N + threadIdx.x, last = chunk_end / N;
    Vec<scalar_t, N> z[kBackwardVecsPerThread];
#pragma unroll
    for (int u = 0; u < kBackwardVecsPerThread; ++u) {
      const int64_t i = first + u * kThreads;
      if (i < last) z[u] = vin[i];
    }
#pragma unroll
    for (int u = 0; u < kBackwardVecsPerThread; ++u) {
      const int64_t i = first + u * kThreads;
      if (i < last) {
        Vec<scalar_t, N> dz;
#pragma unroll
        for (int k = 0; k < N; ++k) dz.v[k] = grad_at(i * N + k, z[u].v[k]);
        vout[i] = dz;
      }
    }
  } else {
    for (int64_t j = chunk_begin + threadIdx.x; j < chunk_end; j += kThreads) {
      out_row[j] = grad_at(j, in_row[j]);
    }
  }
}

template <typename scalar_t>
int64_t backward_chunks(int64_t vocab) {
  constexpr int64_t kChunk = int64_t{kThreads} * (kVecBytes / sizeof(scalar_t)) *
                             kBackwardVecsPerThread;
  return (vocab + kChunk - 1) / kChunk;
}

void check_grid(int64_t rows, int64_t chunks) {
  TORCH_CHECK(rows <= kMaxGridX, "token_logprobs: at most 2^31-1 rows per call on CUDA, got ",
              rows);
  TORCH_CHECK(chunks <= kMaxGridY, "token_logprobs: vocabulary too large for one CUDA launch");
}

void forward_kernel(const TokenLogprobsRows& rows, at::Tensor& logprobs,
                    const at::Tensor& entropy, at::Tensor& lse) {
  const c10::cuda::CUDAGuard device_guard(rows.logits.device());
  const int64_t n_rows = rows.offsets.numel(), vocab = rows.logits.size(-1);
  check_grid(n_rows, 1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.logits.scalar_type(),
                                  "token_logprobs", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto launch = [&](auto kernel) {
      kernel<<<n_rows, kThreads, 0, stream>>>(
          rows.logits.data_ptr<scalar_t>(), rows.offsets.data_ptr<int64_t>(),
          rows.targets.data_ptr<int64_t>(), vocab, rows.ignore_index,
          static_cast<acc_t>(1.0 / rows.temperature), logprobs.data_ptr<acc_t>(),
          entropy.defined() ? entropy.data_ptr<acc_t>() : nullptr, lse.data_ptr<acc_t>());
    };
    if (entropy.defined()) {
      launch(token_logprobs_forward_kernel<scalar_t, true>);
    } else {
      launch(token_logprobs_forward_kernel<scalar_t, false>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void backward_kernel(const TokenLogprobsRows& rows, const at::Tensor& grad_logprobs,
                     const at::Tensor& grad_entropy, const at::Tensor& lse,
                     const at::Tensor& entropy, at::Tensor& dlogits,
                     const at::Tensor& out_offsets) {
  const c10::cuda::CUDAGuard device_guard(rows.logits.device());
  const int64_t n_rows = rows.offsets.numel(), vocab = rows.logits.size(-1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.logits.scalar_type(),
                                  "token_logprobs_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const int64_t chunks = backward_chunks<scalar_t>(vocab);
    check_grid(n_rows, chunks);
    const dim3 grid(static_cast<unsigned>(n_rows), static_cast<unsigned>(chunks));
    const auto launch = [&](auto kernel) {
      kernel<<<grid, kThreads, 0, stream>>>(
          rows.logits.data_ptr<scalar_t>(), rows.offsets.data_ptr<int64_t>(),
          dlogits.data_ptr<scalar_t>(), out_offsets.data_ptr<int64_t>(),
          rows.targets.data_ptr<int64_t>(), vocab, rows.ignore_index,
          static_cast<acc_t>(1.0 / rows.temperature), grad_logprobs.data_ptr<acc_t>(),
          grad_entropy.defined() ? grad_entropy.data_ptr<acc_t>() : nullptr,
          lse.data_ptr<acc_t>(), entropy.defined() ? entropy.data_ptr<acc_t>() : nullptr);
    };
    if (grad_entropy.defined()) {
      launch(token_logprobs_backward_kernel<scalar_t, true>);
    } else {
      launch(token_logprobs_backward_kernel<scalar_t, false>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lambdapo, CUDA, m) {
  m.impl("token_logprobs_forward", &token_logprobs_forward_op<forward_kernel>);
  m.impl("token_logprobs_backward", &token_logprobs_backward_op<backward_kernel>);
  m.impl("token_logprobs_backward_inplace", &token_logprobs_backward_inplace_op<backward_kernel>);
}

}  // namespace lambdapo
