// CUDA tile kernels of linear_token_logprobs (the driver is csrc/linear_token_logprobs.h).
// Forward: one block per tile row folds the row, read in 16-byte vectors, into an online
// (max, sum exp, sum exp * shifted logit) state, merged with the row's state from earlier
// tiles. Backward: a (row, column chunk) grid overwrites the tile with dlogits. The 16-bit
// hidden/weight gradient accumulation is a cuBLAS matmul with fp32 output and beta = 1.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "kernel_constants.h"
#include "linear_token_logprobs.h"

namespace lambdapo {
namespace {

constexpr int kThreads = 256;
constexpr int kBackwardVecsPerThread = 4;

template <typename acc_t>
struct Softmax {
  acc_t m;  // running max of x = z / T
  acc_t s;  // sum exp(x - m)
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

// Folds one value x = z / T into a thread's state. st.m never turns NaN (NaN > m is false),
// but a NaN x is summed, as NaN - m: s turns NaN and stays NaN through every later fold and
// merge. tests/ops/softmax_kernel_emulation.py mirrors fold, merge and the kernels' traversal:
// change them together.
template <typename acc_t>
__device__ __forceinline__ void fold(Softmax<acc_t>& st, acc_t x) {
  if (x > st.m) {
    if (st.s > acc_t(0)) {
      const acc_t d = st.m - x, c = exp_acc(d);
      st.t = c * (st.t + d * st.s);
      st.s *= c;
    }
    st.m = x;
  }
  if (x != -INFINITY) {  // -inf adds nothing (and would give 0 * inf below); NaN is added
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

// state: [rows, 4] (max, sum exp, sum exp * shift, target logit), row stride 4.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
forward_tile_kernel(const scalar_t* __restrict__ logits, int64_t cols,
                    const int64_t* __restrict__ targets, int64_t col0, int64_t ignore_index,
                    acc_type<scalar_t> inv_t, acc_type<scalar_t>* __restrict__ state,
                    bool first) {
  using acc_t = acc_type<scalar_t>;
  constexpr int N = kVecBytes / sizeof(scalar_t);
  const int64_t r = blockIdx.x;
  acc_t* row_state = state + r * linear::kStateColumns;
  const int64_t target = targets[r];
  if (target == ignore_index) {
    if (first && threadIdx.x == 0) {
      row_state[linear::kMax] = 0, row_state[linear::kSumExp] = 1;
      row_state[linear::kSumExpShift] = 0, row_state[linear::kTargetLogit] = 0;
    }
    return;
  }
  const scalar_t* row = logits + r * cols;
  Softmax<acc_t> st{-INFINITY, acc_t(0), acc_t(0)};
  if (reinterpret_cast<uintptr_t>(row) % kVecBytes == 0 && cols % N == 0) {
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
  if (threadIdx.x == 0) {
    if (!first) {
      st = merge(Softmax<acc_t>{row_state[linear::kMax], row_state[linear::kSumExp],
                                row_state[linear::kSumExpShift]},
                 st);
    }
    row_state[linear::kMax] = st.m;
    row_state[linear::kSumExp] = st.s;
    row_state[linear::kSumExpShift] = st.t;
    // Stays NaN unless a tile holds the target (an unvalidated out-of-range target).
    if (first) row_state[linear::kTargetLogit] = NAN;
    const int64_t y = target - col0;
    if (y >= 0 && y < cols) row_state[linear::kTargetLogit] = static_cast<acc_t>(row[y]) * inv_t;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
backward_tile_kernel(scalar_t* __restrict__ logits, int64_t cols,
                     const int64_t* __restrict__ targets, int64_t col0, int64_t ignore_index,
                     acc_type<scalar_t> inv_t,
                     const acc_type<scalar_t>* __restrict__ grad_logprobs,
                     const acc_type<scalar_t>* __restrict__ grad_entropy,
                     const acc_type<scalar_t>* __restrict__ lse,
                     const acc_type<scalar_t>* __restrict__ entropy) {
  using acc_t = acc_type<scalar_t>;
  constexpr int N = kVecBytes / sizeof(scalar_t);
  constexpr int64_t kChunk = int64_t{kThreads} * N * kBackwardVecsPerThread;
  const int64_t r = blockIdx.x;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * kChunk;
  const int64_t end = begin + kChunk < cols ? begin + kChunk : cols;
  scalar_t* row = logits + r * cols;
  const int64_t y = targets[r] == ignore_index ? -1 : targets[r] - col0;
  const bool ignored = targets[r] == ignore_index;
  const acc_t g_lp = ignored ? acc_t(0) : grad_logprobs[r];
  const acc_t g_h = ignored || grad_entropy == nullptr ? acc_t(0) : grad_entropy[r];
  const acc_t h = ignored || grad_entropy == nullptr ? acc_t(0) : entropy[r];
  const acc_t row_lse = ignored ? acc_t(0) : lse[r];
  const auto grad_at = [&](int64_t j, scalar_t z) -> scalar_t {
    if (ignored) return scalar_t(0);
    const acc_t log_p = static_cast<acc_t>(z) * inv_t - row_lse;
    const acc_t p = exp_acc(log_p);
    // p = 0 (a -inf logit) must not meet log p = -inf; a NaN p (NaN logit or lse) passes.
    acc_t dz = p == acc_t(0) ? acc_t(0) : -inv_t * p * (g_lp + g_h * (log_p + h));
    if (j == y) dz += inv_t * g_lp;
    return static_cast<scalar_t>(dz);
  };
  if (reinterpret_cast<uintptr_t>(row) % kVecBytes == 0 && cols % N == 0) {
    auto* vrow = reinterpret_cast<Vec<scalar_t, N>*>(row);
    for (int64_t i = begin / N + threadIdx.x; i < end / N; i += kThreads) {
      Vec<scalar_t, N> v = vrow[i];
#pragma unroll
      for (int k = 0; k < N; ++k) v.v[k] = grad_at(i * N + k, v.v[k]);
      vrow[i] = v;
    }
  } else {
    for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) row[j] = grad_at(j, row[j]);
  }
}

template <typename scalar_t>
int64_t backward_chunks(int64_t cols) {
  constexpr int64_t kChunk = int64_t{kThreads} * (kVecBytes / sizeof(scalar_t)) *
                             kBackwardVecsPerThread;
  return (cols + kChunk - 1) / kChunk;
}

void check_grid(int64_t rows, int64_t chunks) {
  TORCH_CHECK(rows <= kMaxGridX, linear::kOp, ": at most 2^31-1 rows per chunk on CUDA, got ",
              rows);
  TORCH_CHECK(chunks <= kMaxGridY, linear::kOp,
              ": vocab_chunk_size too large for one CUDA launch");
}

// A 2-D operand as cuBLAS (column-major) sees it: X [r, c] row-major is X^T column-major.
struct BlasOperand {
  char trans;  // 'n': the memory is op^T's column-major layout as is; 't': transposed
  int64_t ld;
};

// For C = A @ B in row-major terms, cuBLAS computes C^T = B^T A^T; an operand with unit
// column stride is its own transpose in column-major, one with unit row stride is not.
BlasOperand blas_operand(const at::Tensor& x) {
  if (x.stride(1) == 1 && x.stride(0) >= std::max<int64_t>(1, x.size(1))) {
    return {'n', x.stride(0)};
  }
  TORCH_CHECK(x.stride(0) == 1 && x.stride(1) >= std::max<int64_t>(1, x.size(0)), linear::kOp,
              ": internal error, a matmul operand is not dense in either order");
  return {'t', x.stride(1)};
}

// c (fp32, row-major rows) = a @ b (+ c when accumulate) for 16-bit a, b, in one cuBLAS
// call with fp32 output and compute (at::cuda::blas::gemm is not exported by libtorch_cuda).
// Row-major C [m, n] = A [m, k] B [k, n] is column-major C^T [n, m] = B^T A^T.
void gemm_fp32_out(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  TORCH_CHECK(c.stride(1) == 1, linear::kOp, ": internal error, fp32 accumulator not row-major");
  const BlasOperand ob = blas_operand(b), oa = blas_operand(a);
  const cudaDataType_t type = a.scalar_type() == at::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F;
  const auto to_op = [](char trans) { return trans == 'n' ? CUBLAS_OP_N : CUBLAS_OP_T; };
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  TORCH_CUDABLAS_CHECK(cublasGemmEx(
      handle, to_op(ob.trans), to_op(oa.trans), static_cast<int>(c.size(1)),
      static_cast<int>(c.size(0)), static_cast<int>(a.size(1)), &alpha, b.data_ptr(), type,
      static_cast<int>(ob.ld), a.data_ptr(), type, static_cast<int>(oa.ld), &beta, c.data_ptr(),
      CUDA_R_32F, static_cast<int>(c.stride(0)), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

struct CudaKernels {
  static void forward_tile(const linear::Tile& tile, at::Tensor& state, bool first) {
    const c10::cuda::CUDAGuard device_guard(tile.logits.device());
    const int64_t rows = tile.logits.size(0), cols = tile.logits.size(1);
    if (rows == 0) return;
    check_grid(rows, 1);
    TORCH_CHECK(state.is_contiguous(), linear::kOp, ": internal error, state not contiguous");
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tile.logits.scalar_type(),
                                    "linear_token_logprobs", [&] {
      using acc_t = acc_type<scalar_t>;
      forward_tile_kernel<scalar_t><<<rows, kThreads, 0, stream>>>(
          tile.logits.data_ptr<scalar_t>(), cols, tile.targets.data_ptr<int64_t>(), tile.col0,
          tile.ignore_index, static_cast<acc_t>(tile.inv_temperature), state.data_ptr<acc_t>(),
          first);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void backward_tile(linear::Tile& tile, const at::Tensor& grad_logprobs,
                            const at::Tensor& grad_entropy, const at::Tensor& lse,
                            const at::Tensor& entropy) {
    const c10::cuda::CUDAGuard device_guard(tile.logits.device());
    const int64_t rows = tile.logits.size(0), cols = tile.logits.size(1);
    if (rows == 0) return;
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tile.logits.scalar_type(),
                                    "linear_token_logprobs_backward", [&] {
      using acc_t = acc_type<scalar_t>;
      const int64_t chunks = backward_chunks<scalar_t>(cols);
      check_grid(rows, chunks);
      const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(chunks));
      backward_tile_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          tile.logits.data_ptr<scalar_t>(), cols, tile.targets.data_ptr<int64_t>(), tile.col0,
          tile.ignore_index, static_cast<acc_t>(tile.inv_temperature),
          grad_logprobs.data_ptr<acc_t>(),
          grad_entropy.defined() ? grad_entropy.data_ptr<acc_t>() : nullptr,
          lse.data_ptr<acc_t>(), entropy.defined() ? entropy.data_ptr<acc_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  // c (fp32) (+)= a @ b for 16-bit a, b: one cuBLAS call, fp32 output, beta = 1 to add.
  static void matmul_fp32_accumulate(at::Tensor& c, const at::Tensor& a, const at::Tensor& b,
                                     bool accumulate) {
    const c10::cuda::CUDAGuard device_guard(c.device());
    if (c.numel() == 0) return;
    if (a.size(1) == 0) {
      if (!accumulate) c.zero_();
      return;
    }
    TORCH_CHECK(linear::is_16_bit(a.scalar_type()) && b.scalar_type() == a.scalar_type() &&
                    c.scalar_type() == at::kFloat,
                linear::kOp, ": internal error, fp32 accumulation of ", a.scalar_type());
    const int64_t int_max = std::numeric_limits<int>::max();
    TORCH_CHECK(c.size(0) <= int_max && c.size(1) <= int_max && a.size(1) <= int_max &&
                    c.stride(0) <= int_max && a.stride(0) <= int_max && a.stride(1) <= int_max &&
                    b.stride(0) <= int_max && b.stride(1) <= int_max,
                linear::kOp, ": a matmul dimension exceeds cuBLAS's 32-bit sizes");
    gemm_fp32_out(c, a, b, accumulate);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_op(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, double temperature, int64_t ignore_index, bool return_entropy,
    int64_t chunk_size, int64_t vocab_chunk_size, bool validate) {
  return linear::forward<CudaKernels>(hidden, weight, bias, targets, temperature, ignore_index,
                                      return_entropy, chunk_size, vocab_chunk_size, validate);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(
    const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& entropy,
    double temperature, int64_t ignore_index, int64_t chunk_size, int64_t vocab_chunk_size,
    std::array<bool, 3> output_mask, bool validate, bool unrounded_grad_hidden) {
  return linear::backward<CudaKernels>(grad_logprobs, grad_entropy, hidden, weight, bias,
                                       targets, lse, entropy, temperature, ignore_index,
                                       chunk_size, vocab_chunk_size, output_mask, validate,
                                       unrounded_grad_hidden);
}

}  // namespace

TORCH_LIBRARY_IMPL(lambdapo, CUDA, m) {
  m.impl("linear_token_logprobs_forward", &forward_op);
  m.impl("linear_token_logprobs_backward", &backward_op);
}

}  // namespace lambdapo
