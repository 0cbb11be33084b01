// CUDA kernel of ngram_overlap: one block per candidate. For each candidate n-gram (one per
// thread) the kernel counts its occurrences in the reference and, if any, its rank among
// equal n-grams earlier in the candidate: it is a clipped match iff rank < reference count,
// so the block's sum is sum_g min(count_cand(g), count_ref(g)) exactly. The reference sits in
// shared memory when it fits (global memory otherwise).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cub/block/block_reduce.cuh>
#include <torch/library.h>

#include "sequence_overlap.h"

namespace lambdapo {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kSharedRefTokens = 4096;  // 32 KiB of int64 ids

__global__ void __launch_bounds__(kThreads)
ngram_overlap_kernel(const int64_t* __restrict__ cand_values, const int64_t* __restrict__ cand_starts,
                     const int64_t* __restrict__ cand_lengths, const int64_t* __restrict__ ref_values,
                     const int64_t* __restrict__ ref_starts, const int64_t* __restrict__ ref_lengths,
                     const int64_t* __restrict__ ref_index, int64_t max_n, int64_t shared_capacity,
                     int64_t* __restrict__ matches) {
  using BlockReduce = cub::BlockReduce<long long, kThreads>;
  __shared__ typename BlockReduce::TempStorage reduce_tmp;
  extern __shared__ int64_t shared_ref[];
  const int64_t b = blockIdx.x;
  const int64_t r = ref_index[b];
  const int64_t* cand = cand_values + cand_starts[b];
  const int64_t cand_len = cand_lengths[b];
  const int64_t ref_len = ref_lengths[r];
  const int64_t* ref = ref_values + ref_starts[r];
  if (ref_len <= shared_capacity) {  // uniform across the block
    for (int64_t k = threadIdx.x; k < ref_len; k += kThreads) shared_ref[k] = ref[k];
    __syncthreads();
    ref = shared_ref;
  }
  for (int64_t n = 1; n <= max_n; ++n) {
    long long local = 0;
    for (int64_t i = threadIdx.x; i + n <= cand_len; i += kThreads) {
      const int64_t* gram = cand + i;
      int64_t in_ref = 0;
      for (int64_t j = 0; j + n <= ref_len; ++j) {
        in_ref += ref[j] == gram[0] && same_ngram(ref + j, gram, n);
      }
      int64_t rank = 0;
      for (int64_t j = 0; j < i && rank < in_ref; ++j) {
        rank += cand[j] == gram[0] && same_ngram(cand + j, gram, n);
      }
      local += rank < in_ref;
    }
    const long long total = BlockReduce(reduce_tmp).Sum(local);
    if (threadIdx.x == 0) matches[b * max_n + n - 1] = total;
    __syncthreads();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ngram_overlap_cuda(
    const at::Tensor& cand_values, const at::Tensor& cand_starts, const at::Tensor& cand_lengths,
    const at::Tensor& ref_values, const at::Tensor& ref_starts, const at::Tensor& ref_lengths,
    const at::Tensor& ref_index, int64_t max_n, bool validate) {
  const OverlapInputs inputs = checked_overlap_inputs(
      "ngram_overlap", cand_values, cand_starts, cand_lengths, ref_values, ref_starts, ref_lengths,
      ref_index, validate);
  const auto& [cand, ref, ref_of] = inputs;
  TORCH_CHECK_VALUE(max_n >= 1, "ngram_overlap: max_n must be >= 1, got ", max_n);
  const c10::cuda::CUDAGuard device_guard(cand.values.device());
  const int64_t batch = cand.starts.numel();
  at::Tensor matches = at::zeros({batch, max_n}, cand.values.options());
  if (batch > 0) {
    const int64_t longest_ref = ref.lengths.index_select(0, ref_of).max().item<int64_t>();
    const int64_t capacity = longest_ref <= kSharedRefTokens ? longest_ref : 0;
    TORCH_CHECK(batch <= int64_t{2147483647}, "ngram_overlap: too many candidates for one launch");
    ngram_overlap_kernel<<<static_cast<unsigned>(batch), kThreads, capacity * sizeof(int64_t),
                           c10::cuda::getCurrentCUDAStream()>>>(
        cand.values.data_ptr<int64_t>(), cand.starts.data_ptr<int64_t>(),
        cand.lengths.data_ptr<int64_t>(), ref.values.data_ptr<int64_t>(),
        ref.starts.data_ptr<int64_t>(), ref.lengths.data_ptr<int64_t>(), ref_of.data_ptr<int64_t>(),
        max_n, capacity, matches.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return ngram_overlap_outputs(inputs, matches, max_n);
}

}  // namespace

TORCH_LIBRARY_IMPL(lambdapo, CUDA, m) {
  m.impl("ngram_overlap", &ngram_overlap_cuda);
}

}  // namespace lambdapo
