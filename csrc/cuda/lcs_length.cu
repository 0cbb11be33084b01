// CUDA kernel of lcs_length: bit-parallel LCS (Hyyro 2004) with one warp per candidate.
// Lane l holds the state words l, l + 32, l + 64, ... of V (64 reference positions each), so
// a step updates 32 words at once; the carries between words come from two warp ballots
// (lane_carries in sequence_overlap.h) and pass from one 32-word chunk to the next.
//
// A step's match words (bit j of word w: ref[64 w + j] is the candidate's token) come from
// comparing the token with the reference directly, two warp ballots per word, so nothing is
// built per reference and no size is read back (validate=False is sync-free and
// graph-capturable). References of up to kRegisterChunks 32-word chunks (8192 tokens) keep V
// in registers; the first launch lists the candidates of longer ones on the device and keeps
// there the largest number of words they need. A second launch of up to a warp per candidate
// works through that list with V in a pool of global memory sized on the host (pool_words
// below): each warp takes the largest V as its stride, and the warps whose V lies past the
// pool's end stay idle. The kernels read only the clipped sequences of checked_overlap_inputs,
// so no input value can send them out of bounds.
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
constexpr int kRegisterChunks = 4;
// Scratch V of the second launch: at most this much memory unless one V for the longest
// reference possible takes more (it cannot: 2^29 tokens are 2^23 words, 64 MiB).
constexpr int64_t kScratchBytes = int64_t{64} << 20;
// Fewest words of a listed candidate's reference (more than kRegisterChunks chunks).
constexpr int64_t kMinListedWords = 32 * kRegisterChunks + 1;

// The clipped sequences (checked_overlap_inputs): every start + length lies within its values,
// every ref_index within the references (the last one empty).
struct LcsArgs {
  const int64_t* cand_values;
  const int64_t* cand_starts;
  const int64_t* cand_lengths;
  const int64_t* ref_values;
  const int64_t* ref_starts;
  const int64_t* ref_lengths;
  const int64_t* ref_index;
  int64_t batch;
  int64_t* out;  // [batch]
};

// This lane's match word in chunk c (word 32 c + lane): bit j set where ref[64 w + j] == x.
// Word k of the chunk is gathered by the whole warp, lane i comparing positions i and i + 32.
__device__ __forceinline__ uint64_t match_word(const int64_t* __restrict__ ref, int64_t m,
                                               int64_t words, int64_t c, unsigned lane,
                                               int64_t x) {
  const int64_t first = 32 * c;
  const int64_t count = words - first < 32 ? words - first : 32;  // uniform
  uint64_t mine = 0;
  for (int64_t k = 0; k < count; ++k) {
    const int64_t p = 64 * (first + k) + lane;
    const uint32_t low = __ballot_sync(kFullWarp, p < m && ref[p] == x);
    const uint32_t high = __ballot_sync(kFullWarp, p + 32 < m && ref[p + 32] == x);
    if (lane == k) mine = static_cast<uint64_t>(high) << 32 | low;
  }
  return mine;
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

// Words of candidate b's reference.
__device__ __forceinline__ int64_t reference_words(const LcsArgs& a, int64_t b) {
  return (a.ref_lengths[a.ref_index[b]] + 63) / 64;
}

// The LCS of candidate b and its reference, in lane 0; called by the whole warp.
// kChunks > 0: the reference has at most kChunks chunks, V in registers.
// kChunks == 0: any length, V in v_mem (one word per reference word).
template <int kChunks>
__device__ int64_t candidate_lcs(const LcsArgs& a, int64_t b, unsigned lane, uint64_t* v_mem) {
  const int64_t r = a.ref_index[b];
  const int64_t m = a.ref_lengths[r], n = a.cand_lengths[b];
  const int64_t words = (m + 63) / 64;
  const int64_t chunks = (words + 31) / 32;
  const int64_t* ref = a.ref_values + a.ref_starts[r];
  const int64_t* cand = a.cand_values + a.cand_starts[b];

  // V starts all ones on the reference's words, 0 on the lanes past them.
  uint64_t v_regs[kChunks > 0 ? kChunks : 1];
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

  // The lanes load 32 candidate tokens at a time; the warp then steps through them.
  for (int64_t base = 0; base < n && m > 0; base += 32) {
    const int64_t mine = base + lane < n ? cand[base + lane] : 0;
    const int64_t batch_steps = n - base < 32 ? n - base : 32;
    for (int j = 0; j < batch_steps; ++j) {
      const int64_t x = __shfl_sync(kFullWarp, mine, j);
      uint64_t chunk_carry = 0;
      if constexpr (kChunks > 0) {
#pragma unroll
        for (int k = 0; k < kChunks; ++k) {
          if (k < chunks) {
            lcs_chunk_step(v_regs[k], match_word(ref, m, words, k, lane, x), lane, chunk_carry);
          }
        }
      } else {
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t w = 32 * c + lane;
          uint64_t v = w < words ? v_mem[w] : 0;
          lcs_chunk_step(v, match_word(ref, m, words, c, lane, x), lane, chunk_carry);
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
  return m - ones;
}

// The list of the first launch, on the device: pending[0 : num_pending] and the largest
// number of words of their references (0 while empty).
struct PendingList {
  unsigned long long num_pending, max_words;
};

// First launch: a warp per candidate with V in registers; candidates of longer references are
// listed for the second launch.
__global__ void __launch_bounds__(kThreads)
lcs_length_register_kernel(LcsArgs a, int64_t* __restrict__ pending,
                           PendingList* __restrict__ list) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const unsigned lane = threadIdx.x % 32;
  if (b >= a.batch) return;  // uniform across the warp
  const int64_t words = reference_words(a, b);
  if ((words + 31) / 32 > kRegisterChunks) {
    if (lane == 0) {
      pending[atomicAdd(&list->num_pending, 1ull)] = b;
      atomicMax(&list->max_words, static_cast<unsigned long long>(words));
    }
    return;
  }
  const int64_t lcs = candidate_lcs<kRegisterChunks>(a, b, lane, nullptr);
  if (lane == 0) a.out[b] = lcs;
}

// Second launch: the listed candidates. Every warp's V is the largest any listed candidate
// needs (max_words words), warp i's at word i * max_words of the pool; the warps whose V ends
// within the pool work through the list, the others return.
__global__ void __launch_bounds__(kThreads)
lcs_length_scratch_kernel(LcsArgs a, const int64_t* __restrict__ pending,
                          const PendingList* __restrict__ list, uint64_t* __restrict__ pool,
                          int64_t pool_words) {
  const int64_t count = static_cast<int64_t>(list->num_pending);
  if (count == 0) return;
  const int64_t stride = static_cast<int64_t>(list->max_words);  // >= kMinListedWords
  const int64_t fitting = pool_words / stride;                   // >= 1: see pool_words
  const int64_t workers = min(fitting, static_cast<int64_t>(gridDim.x) * kWarpsPerBlock);
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const unsigned lane = threadIdx.x % 32;
  if (warp >= workers) return;  // uniform across the warp
  uint64_t* v_mem = pool + warp * stride;
  for (int64_t k = warp; k < count; k += workers) {  // uniform across the warp
    const int64_t b = pending[k];
    const int64_t lcs = candidate_lcs<0>(a, b, lane, v_mem);
    if (lane == 0) a.out[b] = lcs;
  }
}

// Words of the second launch's pool for up to `warps` warps, given the longest reference the
// kernels may meet (`longest`: read back when validating, else the shape's bound). The largest
// V (its words) bounds every listed candidate's, so a pool of at least one always gives warp 0
// its V; beyond that the pool holds up to kScratchBytes, and never more than `warps` of the
// largest.
int64_t pool_words(int64_t longest, int64_t warps) {
  const int64_t largest = (longest + 63) / 64;
  const int64_t budget = std::max<int64_t>(kScratchBytes / sizeof(uint64_t), largest);
  return std::min(budget, warps * largest);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lcs_length_cuda(
    const at::Tensor& cand_values, const at::Tensor& cand_starts, const at::Tensor& cand_lengths,
    const at::Tensor& ref_values, const at::Tensor& ref_starts, const at::Tensor& ref_lengths,
    const at::Tensor& ref_index, bool validate) {
  const OverlapInputs inputs = checked_overlap_inputs(
      "lcs_length", cand_values, cand_starts, cand_lengths, ref_values, ref_starts, ref_lengths,
      ref_index, validate);
  const Sequences& cand = inputs.cand;
  const Sequences& ref = inputs.ref;
  const c10::cuda::CUDAGuard device_guard(cand.values.device());
  const int64_t batch = cand.starts.numel();
  at::Tensor out = at::zeros({batch}, cand.values.options());
  if (batch == 0) return lcs_length_outputs(inputs, out);
  const int64_t blocks = (batch + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks <= kMaxGridX, "lcs_length: too many candidates for one launch");
  // The longest reference the kernels may meet: read back when validating anyway (a host
  // sync), else bounded by the number of reference ids and kMaxReferenceTokens.
  const int64_t longest = validate ? reference_lengths(inputs).max().item<int64_t>()
                                   : std::min(ref.values.numel(), kMaxReferenceTokens);
  const LcsArgs args{cand.values.data_ptr<int64_t>(), cand.starts.data_ptr<int64_t>(),
                     cand.lengths.data_ptr<int64_t>(), ref.values.data_ptr<int64_t>(),
                     ref.starts.data_ptr<int64_t>(), ref.lengths.data_ptr<int64_t>(),
                     inputs.ref_index.data_ptr<int64_t>(), batch, out.data_ptr<int64_t>()};
  const auto options = cand.values.options();
  at::Tensor pending = at::empty({batch}, options);
  static_assert(sizeof(PendingList) == 2 * sizeof(int64_t), "PendingList is two int64 words");
  at::Tensor list = at::zeros({2}, options);
  auto* list_ptr = reinterpret_cast<PendingList*>(list.data_ptr<int64_t>());
  auto stream = c10::cuda::getCurrentCUDAStream();
  lcs_length_register_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      args, pending.data_ptr<int64_t>(), list_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if ((longest + 63) / 64 >= kMinListedWords) {  // else nothing can be listed
    const int64_t words = pool_words(longest, batch);
    // A warp per candidate, but no more than could ever find their V in the pool.
    const int64_t warps = std::min(batch, words / kMinListedWords);
    const int64_t scratch_blocks = (warps + kWarpsPerBlock - 1) / kWarpsPerBlock;
    at::Tensor pool = at::empty({words}, options);
    lcs_length_scratch_kernel<<<static_cast<unsigned>(scratch_blocks), kThreads, 0, stream>>>(
        args, pending.data_ptr<int64_t>(), list_ptr,
        reinterpret_cast<uint64_t*>(pool.data_ptr<int64_t>()), words);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return lcs_length_outputs(inputs, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(lambdapo, CUDA, m) {
  m.impl("lcs_length", &lcs_length_cuda);
}

}  // namespace lambdapo
