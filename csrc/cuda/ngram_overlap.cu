// CUDA kernel of ngram_overlap: a block takes kCandidatesPerBlock consecutive candidates and,
// order by order, puts its reference's n-grams in a hash table (one slot per distinct n-gram:
// the position of one occurrence in the reference, the occurrence count, and a used count),
// built once and probed by every consecutive candidate of the block with that reference
// (candidates of a group are usually consecutive). Each candidate n-gram looks its n-gram up,
// O(n) expected per n-gram instead of a comparison with every reference n-gram, and takes one
// occurrence with an atomic increment of the used count: exactly min(count in candidate,
// count in reference) increments of a slot find an occurrence left, so the block's sum is
// the clipped match count. The table sits in shared memory when the longest reference fits
// (2048 tokens), in a global scratch table per block otherwise.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cub/block/block_reduce.cuh>
#include <torch/library.h>

#include "sequence_overlap.h"

namespace lambdapo {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kCandidatesPerBlock = 4;
constexpr int64_t kSharedSlots = 4096;  // 3 int32 per slot: 48 KiB of shared memory
// Longest reference: keeps positions and slot indices in int32.
constexpr int64_t kMaxReferenceTokens = int64_t{1} << 29;

// Slots of a reference's table: a power of two >= 2 x its tokens (load <= 1/2), >= 32.
C10_HOST_DEVICE inline int slot_bits(int64_t ref_len) {
  int bits = 5;
  while ((int64_t{1} << bits) < 2 * ref_len) ++bits;
  return bits;
}

__device__ __forceinline__ int64_t home_slot(const int64_t* gram, int64_t n, int bits) {
  uint64_t h = 0;
  for (int64_t k = 0; k < n; ++k) h = (h ^ static_cast<uint64_t>(gram[k])) * 0x9E3779B97F4A7C15ull;
  return static_cast<int64_t>(h >> (64 - bits));
}

// The table's slots are read through volatile loads: in the global-memory table, entries
// written by other threads' atomics must not be served from a stale L1 line.
__device__ __forceinline__ int32_t load(const int32_t* p) {
  return *reinterpret_cast<const volatile int32_t*>(p);
}

// Puts the n-gram at ref[j] in the table (position, count): the first thread to claim an
// empty slot stores its position, every occurrence adds one to the slot of its n-gram.
__device__ void insert_ngram(int32_t* position, int32_t* count, const int64_t* ref, int64_t j,
                             int64_t n, int bits) {
  const int64_t mask = (int64_t{1} << bits) - 1;
  for (int64_t s = home_slot(ref + j, n, bits);; s = (s + 1) & mask) {
    int32_t held = load(position + s);
    if (held < 0) {
      held = atomicCAS(position + s, -1, static_cast<int32_t>(j));
      if (held < 0) {
        atomicAdd(count + s, 1);
        return;
      }
    }
    if (same_ngram(ref + held, ref + j, n)) {
      atomicAdd(count + s, 1);
      return;
    }
  }
}

// The slot of the n-gram `gram` in the table, or -1 (the table is at most half full).
__device__ int64_t find_ngram(const int32_t* position, const int64_t* ref, const int64_t* gram,
                              int64_t n, int bits) {
  const int64_t mask = (int64_t{1} << bits) - 1;
  for (int64_t s = home_slot(gram, n, bits);; s = (s + 1) & mask) {
    const int32_t held = load(position + s);
    if (held < 0) return -1;
    if (same_ngram(ref + held, gram, n)) return s;
  }
}

__global__ void __launch_bounds__(kThreads)
ngram_overlap_kernel(const int64_t* __restrict__ cand_values, const int64_t* __restrict__ cand_starts,
                     const int64_t* __restrict__ cand_lengths, const int64_t* __restrict__ ref_values,
                     const int64_t* __restrict__ ref_starts, const int64_t* __restrict__ ref_lengths,
                     const int64_t* __restrict__ ref_index, int64_t batch, int64_t max_n,
                     int32_t* __restrict__ global_tables, int64_t global_slots,
                     int64_t* __restrict__ matches) {
  using BlockReduce = cub::BlockReduce<long long, kThreads>;
  __shared__ typename BlockReduce::TempStorage reduce_tmp;
  extern __shared__ int32_t shared_table[];
  int32_t* table = global_tables != nullptr ? global_tables + static_cast<int64_t>(blockIdx.x) * 3 * global_slots
                                            : shared_table;
  const int64_t num_chunks = (batch + kCandidatesPerBlock - 1) / kCandidatesPerBlock;
  for (int64_t chunk = blockIdx.x; chunk < num_chunks; chunk += gridDim.x) {
    const int64_t first = chunk * kCandidatesPerBlock;
    const int64_t last = first + kCandidatesPerBlock < batch ? first + kCandidatesPerBlock : batch;
    // Orders past the shortest of each pair's lengths have no match (outputs stay 0).
    int64_t top_n = 0;
    for (int64_t b = first; b < last; ++b) {
      const int64_t cand_len = cand_lengths[b], ref_len = ref_lengths[ref_index[b]];
      const int64_t shorter = cand_len < ref_len ? cand_len : ref_len;
      const int64_t orders = shorter < max_n ? shorter : max_n;
      top_n = orders > top_n ? orders : top_n;
    }
    for (int64_t n = 1; n <= top_n; ++n) {
      int64_t built = -1;  // reference whose n-grams the table holds
      for (int64_t b = first; b < last; ++b) {
        const int64_t r = ref_index[b];
        const int64_t* ref = ref_values + ref_starts[r];
        const int64_t ref_len = ref_lengths[r];
        const int bits = slot_bits(ref_len);
        const int64_t slots = int64_t{1} << bits;
        int32_t* position = table;
        int32_t* count = table + slots;
        int32_t* used = table + 2 * slots;
        if (r != built) {  // uniform across the block
          for (int64_t s = threadIdx.x; s < slots; s += kThreads) {
            position[s] = -1;
            count[s] = 0;
            used[s] = 0;
          }
          __syncthreads();
          for (int64_t j = threadIdx.x; j + n <= ref_len; j += kThreads) {
            insert_ngram(position, count, ref, j, n, bits);
          }
          __syncthreads();
          built = r;
        }
        const int64_t* cand = cand_values + cand_starts[b];
        long long found = 0;
        for (int64_t i = threadIdx.x; i + n <= cand_lengths[b]; i += kThreads) {
          const int64_t s = find_ngram(position, ref, cand + i, n, bits);
          if (s >= 0) found += atomicAdd(used + s, 1) < load(count + s);
        }
        const long long total = BlockReduce(reduce_tmp).Sum(found);
        if (threadIdx.x == 0) matches[b * max_n + n - 1] = total;
        __syncthreads();
        // The next candidate starts with every occurrence unused.
        for (int64_t s = threadIdx.x; s < slots; s += kThreads) used[s] = 0;
        __syncthreads();
      }
    }
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
    TORCH_CHECK_VALUE(longest_ref <= kMaxReferenceTokens, "ngram_overlap: a reference has ",
                      longest_ref, " tokens; at most 2^29 are supported");
    const int64_t slots = int64_t{1} << slot_bits(longest_ref);
    const int64_t num_chunks = (batch + kCandidatesPerBlock - 1) / kCandidatesPerBlock;
    const bool in_shared = slots <= kSharedSlots;
    // Global tables cost memory per block: as many blocks as fill the GPU, looping over chunks.
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const int64_t blocks = std::min<int64_t>(num_chunks, in_shared ? int64_t{1} << 20 : 4 * sms);
    at::Tensor global_tables;
    if (!in_shared) {
      global_tables = at::empty({blocks * 3 * slots}, cand.values.options().dtype(at::kInt));
    }
    const size_t shared_bytes = in_shared ? 3 * slots * sizeof(int32_t) : 0;
    ngram_overlap_kernel<<<static_cast<unsigned>(blocks), kThreads, shared_bytes,
                           c10::cuda::getCurrentCUDAStream()>>>(
        cand.values.data_ptr<int64_t>(), cand.starts.data_ptr<int64_t>(),
        cand.lengths.data_ptr<int64_t>(), ref.values.data_ptr<int64_t>(),
        ref.starts.data_ptr<int64_t>(), ref.lengths.data_ptr<int64_t>(), ref_of.data_ptr<int64_t>(),
        batch, max_n, in_shared ? nullptr : global_tables.data_ptr<int32_t>(), slots,
        matches.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return ngram_overlap_outputs(inputs, matches, max_n);
}

}  // namespace

TORCH_LIBRARY_IMPL(lambdapo, CUDA, m) {
  m.impl("ngram_overlap", &ngram_overlap_cuda);
}

}  // namespace lambdapo
