// CUDA kernel of lcs_length: bit-parallel LCS (Hyyro 2004) with one warp per candidate.
// Lane l holds the state words l, l + 32, l + 64, ... of V (64 reference positions each), so
// a step updates 32 words at once; the carries between words come from two warp ballots
// (lane_carries in sequence_overlap.h) and pass from one 32-word chunk to the next. The
// reference's match masks are built once per reference (reference_masks) and shared by all
// its candidates. The lanes find the mask rows of 32 candidate tokens at a time, one token
// each, and the warp then steps through them, skipping tokens absent from the reference.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernel_constants.h"
#include "sequence_overlap.h"

namespace lambdapo {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = 32 * kWarpsPerBlock;
constexpr unsigned kFullWarp = 0xffffffffu;
// References up to kRegisterChunks * 32 * 64 tokens keep V in registers; longer ones in a
// global scratch row per candidate.
constexpr int kRegisterChunks = 4;

// Row of token x among the sorted distinct tokens of a reference, or -1.
__device__ int64_t mask_row(const int64_t* tokens, int64_t num_tokens, int64_t x) {
  int64_t lo = 0, hi = num_tokens;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (tokens[mid] < x) lo = mid + 1; else hi = mid;
  }
  return lo < num_tokens && tokens[lo] == x ? lo : -1;
}

// One step on this lane's word v of one 32-word chunk, the lane's match word `match`.
// chunk_carry: the carry into the chunk's lane 0 in, out of its lane 31 out. Lanes past the
// reference's last word (v starts 0, match 0) never generate a carry and may only gather
// carries from below; carries move up, so they never reach a word of the reference, and
// those lanes' bits are never counted.
__device__ __forceinline__ void lcs_chunk_step(uint64_t& v, uint64_t match, unsigned lane,
                                               uint64_t& chunk_carry) {
  const uint64_t sum = v + (v & match);
  const uint32_t generate = __ballot_sync(kFullWarp, sum < v);
  const uint32_t propagate = __ballot_sync(kFullWarp, sum == ~uint64_t{0});
  const uint64_t carries = lane_carries(generate, propagate, chunk_carry);
  chunk_carry = (carries >> 32) & 1;
  v = (sum + ((carries >> lane) & 1)) | (v & ~match);
}

// kChunks > 0: the references have at most kChunks chunks of 32 words, V in registers.
// kChunks == 0: any length, V in scratch[b * scratch_words ...].
template <int kChunks>
__global__ void __launch_bounds__(kThreads)
lcs_length_kernel(const int64_t* __restrict__ cand_values, const int64_t* __restrict__ cand_starts,
                  const int64_t* __restrict__ cand_lengths, const int64_t* __restrict__ ref_lengths,
                  const int64_t* __restrict__ ref_index, const int64_t* __restrict__ tokens,
                  const int64_t* __restrict__ token_offsets,
                  const int64_t* __restrict__ words_per_ref,
                  const int64_t* __restrict__ mask_offsets, const uint64_t* __restrict__ masks,
                  uint64_t* __restrict__ scratch, int64_t scratch_words, int64_t batch,
                  int64_t* __restrict__ out) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const unsigned lane = threadIdx.x % 32;
  if (b >= batch) return;  // uniform across the warp
  const int64_t r = ref_index[b];
  const int64_t m = ref_lengths[r], n = cand_lengths[b];
  const int64_t words = words_per_ref[r];
  const int64_t chunks = (words + 31) / 32;
  const int64_t* ref_tokens = tokens + token_offsets[r];
  const int64_t num_tokens = token_offsets[r + 1] - token_offsets[r];
  const uint64_t* ref_masks = masks + mask_offsets[r];
  const int64_t* cand = cand_values + cand_starts[b];

  // V starts all ones on the reference's words, 0 on the lanes past them.
  uint64_t v_regs[kChunks > 0 ? kChunks : 1];
  uint64_t* v_mem = scratch + b * scratch_words;
#pragma unroll
  for (int c = 0; c < (kChunks > 0 ? kChunks : 1); ++c) v_regs[c] = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t w = 32 * c + lane;
    const uint64_t start = w < words ? ~uint64_t{0} : 0;
    if constexpr (kChunks > 0) {
#pragma unroll
      for (int k = 0; k < kChunks; ++k) {
        if (k == c) v_regs[k] = start;
      }
    } else if (w < words) {
      v_mem[w] = start;
    }
  }

  for (int64_t base = 0; base < n && m > 0; base += 32) {
    const int64_t i = base + lane;
    const int64_t my_row = i < n ? mask_row(ref_tokens, num_tokens, cand[i]) : -1;
    const int64_t batch_steps = n - base < 32 ? n - base : 32;
    for (int j = 0; j < batch_steps; ++j) {
      const int64_t row = __shfl_sync(kFullWarp, my_row, j);
      if (row < 0) continue;  // uniform: the token is not in the reference
      const uint64_t* match = ref_masks + row * words;
      uint64_t chunk_carry = 0;
      if constexpr (kChunks > 0) {
#pragma unroll
        for (int k = 0; k < kChunks; ++k) {
          if (k < chunks) {
            const int64_t w = 32 * k + lane;
            lcs_chunk_step(v_regs[k], w < words ? match[w] : 0, lane, chunk_carry);
          }
        }
      } else {
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t w = 32 * c + lane;
          uint64_t v = w < words ? v_mem[w] : 0;
          lcs_chunk_step(v, w < words ? match[w] : 0, lane, chunk_carry);
          if (w < words) v_mem[w] = v;
        }
      }
    }
  }

  // LCS = m minus the ones left among the m reference positions.
  int64_t ones = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t w = 32 * c + lane;
    if (w >= words) continue;
    uint64_t v = 0;
    if constexpr (kChunks > 0) {
#pragma unroll
      for (int k = 0; k < kChunks; ++k) {
        if (k == c) v = v_regs[k];
      }
    } else {
      v = v_mem[w];
    }
    const int64_t valid = m - 64 * w < 64 ? m - 64 * w : 64;
    const uint64_t keep = valid == 64 ? ~uint64_t{0} : ((uint64_t{1} << valid) - 1);
    ones += __popcll(v & keep);
  }
  for (int offset = 16; offset > 0; offset /= 2) ones += __shfl_xor_sync(kFullWarp, ones, offset);
  if (lane == 0) out[b] = m - ones;
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
  const int64_t max_words = rm.words_per_ref.index_select(0, ref_of).max().item<int64_t>();
  const int64_t max_chunks = (max_words + 31) / 32;
  const int64_t blocks = (batch + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks <= kMaxGridX, "lcs_length: too many candidates for one launch");
  // Only the longest references need a scratch row per candidate.
  const int64_t scratch_words = max_chunks > kRegisterChunks ? max_words : 0;
  at::Tensor scratch = at::empty({batch * scratch_words}, cand.values.options());
  const auto launch = [&](auto kernel) {
    kernel<<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        cand.values.data_ptr<int64_t>(), cand.starts.data_ptr<int64_t>(),
        cand.lengths.data_ptr<int64_t>(), ref.lengths.data_ptr<int64_t>(),
        ref_of.data_ptr<int64_t>(), rm.tokens.data_ptr<int64_t>(),
        rm.token_offsets.data_ptr<int64_t>(), rm.words_per_ref.data_ptr<int64_t>(),
        rm.mask_offsets.data_ptr<int64_t>(),
        reinterpret_cast<const uint64_t*>(rm.masks.data_ptr<int64_t>()),
        reinterpret_cast<uint64_t*>(scratch.data_ptr<int64_t>()), scratch_words, batch,
        out.data_ptr<int64_t>());
  };
  if (max_chunks <= 1) {
    launch(lcs_length_kernel<1>);
  } else if (max_chunks <= kRegisterChunks) {
    launch(lcs_length_kernel<kRegisterChunks>);
  } else {
    launch(lcs_length_kernel<0>);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lambdapo, CUDA, m) {
  m.impl("lcs_length", &lcs_length_cuda);
}

}  // namespace lambdapo
