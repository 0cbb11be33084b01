// CUDA kernel of lcs_length: one thread per candidate runs the bit-parallel LCS (Hyyro
// 2004) over its reference's match masks, built once per reference (reference_masks) and
// shared by all its candidates; the state V lives in a per-candidate global scratch row.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "sequence_overlap.h"

namespace lambdapo {
namespace {

constexpr int kThreads = 128;

__global__ void __launch_bounds__(kThreads)
lcs_length_kernel(const int64_t* __restrict__ cand_values, const int64_t* __restrict__ cand_starts,
                  const int64_t* __restrict__ cand_lengths, const int64_t* __restrict__ ref_lengths,
                  const int64_t* __restrict__ ref_index, const int64_t* __restrict__ tokens,
                  const int64_t* __restrict__ token_offsets,
                  const int64_t* __restrict__ words_per_ref,
                  const int64_t* __restrict__ mask_offsets, const uint64_t* __restrict__ masks,
                  uint64_t* __restrict__ scratch, int64_t scratch_words, int64_t batch,
                  int64_t* __restrict__ out) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (b >= batch) return;
  const int64_t r = ref_index[b];
  const int64_t m = ref_lengths[r], n = cand_lengths[b];
  if (n == 0 || m == 0) {
    out[b] = 0;
    return;
  }
  const int64_t words = words_per_ref[r];
  const int64_t* ref_tokens = tokens + token_offsets[r];
  const int64_t num_tokens = token_offsets[r + 1] - token_offsets[r];
  const uint64_t* ref_masks = masks + mask_offsets[r];
  const int64_t* cand = cand_values + cand_starts[b];
  uint64_t* v = scratch + b * scratch_words;
  for (int64_t w = 0; w < words; ++w) v[w] = ~0ull;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t x = cand[i];
    int64_t lo = 0, hi = num_tokens;  // lower bound of x among the sorted distinct tokens
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (ref_tokens[mid] < x) lo = mid + 1; else hi = mid;
    }
    if (lo == num_tokens || ref_tokens[lo] != x) continue;
    lcs_step(v, ref_masks + lo * words, words);
  }
  out[b] = lcs_from_state(v, words, m);
}

at::Tensor lcs_length_cuda(const at::Tensor& cand_values, const at::Tensor& cand_starts,
                           const at::Tensor& cand_lengths, const at::Tensor& ref_values,
                           const at::Tensor& ref_starts, const at::Tensor& ref_lengths,
                           const at::Tensor& ref_index, bool validate) {
  const auto [cand, ref, ref_of] = checked_overlap_inputs(
      "lcs_length", cand_values, cand_starts, cand_lengths, ref_values, ref_starts, ref_lengths,
      ref_index, validate);
  const c10::cuda::CUDAGuard device_guard(cand.values.device());
  const int64_t batch = cand.starts.numel();
  at::Tensor out = at::zeros({batch}, cand.values.options());
  if (batch == 0) return out;
  const ReferenceMasks rm = reference_masks(ref);
  const int64_t scratch_words =
      std::max<int64_t>(1, rm.words_per_ref.index_select(0, ref_of).max().item<int64_t>());
  at::Tensor scratch = at::empty({batch, scratch_words}, cand.values.options());
  const int64_t blocks = (batch + kThreads - 1) / kThreads;
  lcs_length_kernel<<<static_cast<unsigned>(blocks), kThreads, 0,
                      c10::cuda::getCurrentCUDAStream()>>>(
      cand.values.data_ptr<int64_t>(), cand.starts.data_ptr<int64_t>(),
      cand.lengths.data_ptr<int64_t>(), ref.lengths.data_ptr<int64_t>(),
      ref_of.data_ptr<int64_t>(), rm.tokens.data_ptr<int64_t>(),
      rm.token_offsets.data_ptr<int64_t>(), rm.words_per_ref.data_ptr<int64_t>(),
      rm.mask_offsets.data_ptr<int64_t>(),
      reinterpret_cast<const uint64_t*>(rm.masks.data_ptr<int64_t>()),
      reinterpret_cast<uint64_t*>(scratch.data_ptr<int64_t>()), scratch_words, batch,
      out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lambdapo, CUDA, m) {
  m.impl("lcs_length", &lcs_length_cuda);
}

}  // namespace lambdapo
