// CUDA kernel of ngram_overlap: a block takes kCandidatesPerBlock consecutive candidates and,
// order by order, puts its reference's n-grams in a hash table (one slot per distinct n-gram:
// the position of one occurrence in the reference, the occurrence count, and a used count),
// built once and probed by every consecutive candidate of the block with that reference
// (candidates of a group are usually consecutive). Each candidate n-gram looks its n-gram up,
// O(n) expected per n-gram instead of a comparison with every reference n-gram, and takes one
// occurrence with an atomic increment of the used count: exactly min(count in candidate,
// count in reference) increments of a slot find an occurrence left, so the block's sum is
// the clipped match count.
//
// No size is read back to launch it (validate=False is sync-free and graph-capturable): every
// chunk of candidates whose references fit the shared-memory table (1024 tokens) is done by
// the first launch, which lists the other chunks on the device and keeps there the size of the
// largest table they need. A second launch of up to 4 blocks per SM works through that list
// with tables in a pool of global memory sized on the host (pool_slots below): each block takes
// the largest table as its stride, and the blocks whose table lies past the pool's end stay
// idle. The kernels read only the clipped sequences of checked_overlap_inputs, so no input
// value can send them out of bounds.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cub/block/block_reduce.cuh>
#include <torch/library.h>

#include "kernel_constants.h"
#include "sequence_overlap.h"

namespace lambdapo {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kCandidatesPerBlock = 4;
// 3 int32 per slot: 24 KiB of shared memory, references of up to 1024 tokens (load <= 1/2).
constexpr int64_t kSharedSlots = 2048;
// Global tables of the second launch: at most this much memory unless one table for the
// longest reference possible takes more (see pool_slots).
constexpr int64_t kGlobalTableBytes = int64_t{128} << 20;
constexpr int64_t kBytesPerSlot = 3 * sizeof(int32_t);

using BlockReduce = cub::BlockReduce<long long, kThreads>;

// Slots of a reference's table: a power of two >= 2 x its tokens (load <= 1/2), >= 32. A
// reference holds at most kMaxReferenceTokens = 2^29 tokens (checked or clipped by
// checked_overlap_inputs): at most 2^30 slots, positions and slot indices in int32.
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

// The clipped sequences (checked_overlap_inputs): every start + length lies within its values,
// every ref_index within the references (the last one empty).
struct OverlapArgs {
  const int64_t* cand_values;
  const int64_t* cand_starts;
  const int64_t* cand_lengths;
  const int64_t* ref_values;
  const int64_t* ref_starts;
  const int64_t* ref_lengths;
  const int64_t* ref_index;
  int64_t batch, max_n;
  int64_t* matches;  // [batch, max_n], zero
};

// Bits of the largest table the references of chunk `chunk` need (the same in every thread).
__device__ int chunk_slot_bits(const OverlapArgs& a, int64_t chunk) {
  const int64_t first = chunk * kCandidatesPerBlock;
  const int64_t last = first + kCandidatesPerBlock < a.batch ? first + kCandidatesPerBlock : a.batch;
  int bits = 0;
  for (int64_t b = first; b < last; ++b) {
    const int b_bits = slot_bits(a.ref_lengths[a.ref_index[b]]);
    bits = b_bits > bits ? b_bits : bits;
  }
  return bits;
}

// The clipped matches of the candidates of chunk `chunk`, with `table` (3 int32 arrays of at
// least 2^chunk_slot_bits slots). Called by every thread of the block; ends synchronized.
__device__ void chunk_matches(const OverlapArgs& a, int64_t chunk, int32_t* table,
                              BlockReduce::TempStorage& reduce_tmp) {
  const int64_t first = chunk * kCandidatesPerBlock;
  const int64_t last = first + kCandidatesPerBlock < a.batch ? first + kCandidatesPerBlock : a.batch;
  // Orders past the shortest of each pair's lengths have no match (outputs stay 0).
  int64_t top_n = 0;
  for (int64_t b = first; b < last; ++b) {
    const int64_t cand_len = a.cand_lengths[b];
    const int64_t ref_len = a.ref_lengths[a.ref_index[b]];
    const int64_t shorter = cand_len < ref_len ? cand_len : ref_len;
    const int64_t orders = shorter < a.max_n ? shorter : a.max_n;
    top_n = orders > top_n ? orders : top_n;
  }
  for (int64_t n = 1; n <= top_n; ++n) {
    int64_t built = -1;  // reference whose n-grams the table holds
    for (int64_t b = first; b < last; ++b) {
      const int64_t r = a.ref_index[b];
      const int64_t* ref = a.ref_values + a.ref_starts[r];
      const int64_t ref_len = a.ref_lengths[r];
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
      const int64_t* cand = a.cand_values + a.cand_starts[b];
      long long found = 0;
      if (n <= ref_len) {
        for (int64_t i = threadIdx.x; i + n <= a.cand_lengths[b]; i += kThreads) {
          const int64_t s = find_ngram(position, ref, cand + i, n, bits);
          if (s < 0) continue;
          // Only while occurrences are left: used then exceeds count by less than the
          // block's threads (each checked before its one add), never wraps around however
          // often the candidate repeats the n-gram, and exactly min(candidate count, count)
          // of the adds find used < count.
          const int32_t occurrences = load(count + s);
          if (load(used + s) < occurrences) found += atomicAdd(used + s, 1) < occurrences;
        }
      }
      const long long total = BlockReduce(reduce_tmp).Sum(found);
      if (threadIdx.x == 0) a.matches[b * a.max_n + n - 1] = total;
      __syncthreads();
      // The next candidate starts with every occurrence unused.
      for (int64_t s = threadIdx.x; s < slots; s += kThreads) used[s] = 0;
      __syncthreads();
    }
  }
}

// The list of the first launch, on the device: pending[0 : num_pending] and the slot bits of
// the largest table its chunks need (0 while empty).
struct PendingList {
  unsigned long long num_pending, max_bits;
};

// First launch: the chunks whose references fit the shared table; the others are listed for
// the second launch.
__global__ void __launch_bounds__(kThreads)
ngram_overlap_shared_kernel(OverlapArgs a, int64_t* __restrict__ pending,
                            PendingList* __restrict__ list) {
  __shared__ BlockReduce::TempStorage reduce_tmp;
  extern __shared__ int32_t shared_table[];
  const int64_t num_chunks = (a.batch + kCandidatesPerBlock - 1) / kCandidatesPerBlock;
  for (int64_t chunk = blockIdx.x; chunk < num_chunks; chunk += gridDim.x) {
    const int bits = chunk_slot_bits(a, chunk);
    if ((int64_t{1} << bits) <= kSharedSlots) {  // uniform
      chunk_matches(a, chunk, shared_table, reduce_tmp);
    } else if (threadIdx.x == 0) {
      pending[atomicAdd(&list->num_pending, 1ull)] = chunk;
      atomicMax(&list->max_bits, static_cast<unsigned long long>(bits));
    }
  }
}

// Second launch: the listed chunks. Every block's table is the largest any listed chunk needs
// (2^max_bits slots, 3 int32 each), block i's at slot i * 2^max_bits of the pool; the blocks
// whose table ends within the pool work through the list, the others return.
__global__ void __launch_bounds__(kThreads)
ngram_overlap_global_kernel(OverlapArgs a, const int64_t* __restrict__ pending,
                            const PendingList* __restrict__ list, int32_t* __restrict__ pool,
                            int64_t pool_slots) {
  __shared__ BlockReduce::TempStorage reduce_tmp;
  const int64_t count = static_cast<int64_t>(list->num_pending);
  if (count == 0) return;
  const int64_t table_slots = int64_t{1} << list->max_bits;
  const int64_t fitting = pool_slots / table_slots;  // >= 1: see pool_slots
  const int64_t workers = min(fitting, static_cast<int64_t>(gridDim.x));
  if (blockIdx.x >= workers) return;  // uniform across the block
  int32_t* table = pool + static_cast<int64_t>(blockIdx.x) * 3 * table_slots;
  for (int64_t k = blockIdx.x; k < count; k += workers) {
    chunk_matches(a, pending[k], table, reduce_tmp);
  }
}

// Slots of the second launch's pool for `blocks` blocks, given the longest reference the
// kernels may meet (`longest`: read back when validating, else the shape's bound). The largest
// table (2^slot_bits(longest) slots) bounds every listed chunk's, so a pool of at least one
// always gives block 0 its table; beyond that the pool holds up to kGlobalTableBytes of
// tables, and never more than `blocks` of the largest.
int64_t pool_slots(int64_t longest, int64_t blocks) {
  const int64_t largest = int64_t{1} << slot_bits(longest);
  const int64_t budget = std::max(kGlobalTableBytes / kBytesPerSlot, largest);
  return std::min(budget, blocks * largest);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ngram_overlap_cuda(
    const at::Tensor& cand_values, const at::Tensor& cand_starts, const at::Tensor& cand_lengths,
    const at::Tensor& ref_values, const at::Tensor& ref_starts, const at::Tensor& ref_lengths,
    const at::Tensor& ref_index, int64_t max_n, bool validate) {
  const OverlapInputs inputs = checked_overlap_inputs(
      "ngram_overlap", cand_values, cand_starts, cand_lengths, ref_values, ref_starts, ref_lengths,
      ref_index, validate);
  const Sequences& cand = inputs.cand;
  const Sequences& ref = inputs.ref;
  TORCH_CHECK_VALUE(max_n >= 1, "ngram_overlap: max_n must be >= 1, got ", max_n);
  const c10::cuda::CUDAGuard device_guard(cand.values.device());
  const int64_t batch = cand.starts.numel();
  at::Tensor matches = at::zeros({batch, max_n}, cand.values.options());
  if (batch == 0) return ngram_overlap_outputs(inputs, matches, max_n);
  // The longest reference the kernels may meet: read back when validating anyway (a host
  // sync), else bounded by the number of reference ids and kMaxReferenceTokens.
  const int64_t longest = validate ? reference_lengths(inputs).max().item<int64_t>()
                                   : std::min(ref.values.numel(), kMaxReferenceTokens);
  const OverlapArgs args{cand.values.data_ptr<int64_t>(), cand.starts.data_ptr<int64_t>(),
                         cand.lengths.data_ptr<int64_t>(), ref.values.data_ptr<int64_t>(),
                         ref.starts.data_ptr<int64_t>(), ref.lengths.data_ptr<int64_t>(),
                         inputs.ref_index.data_ptr<int64_t>(), batch, max_n,
                         matches.data_ptr<int64_t>()};
  const int64_t num_chunks = (batch + kCandidatesPerBlock - 1) / kCandidatesPerBlock;
  const auto options = cand.values.options();
  at::Tensor pending = at::empty({num_chunks}, options);
  static_assert(sizeof(PendingList) == 2 * sizeof(int64_t), "PendingList is two int64 words");
  at::Tensor list = at::zeros({2}, options);
  auto* list_ptr = reinterpret_cast<PendingList*>(list.data_ptr<int64_t>());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = std::min(num_chunks, kMaxGridX);
  ngram_overlap_shared_kernel<<<static_cast<unsigned>(blocks), kThreads,
                                3 * kSharedSlots * sizeof(int32_t), stream>>>(
      args, pending.data_ptr<int64_t>(), list_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if ((int64_t{1} << slot_bits(longest)) > kSharedSlots) {  // else nothing can be listed
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const int64_t global_blocks = std::min<int64_t>(num_chunks, 4 * sms);
    const int64_t slots = pool_slots(longest, global_blocks);
    at::Tensor pool = at::empty({3 * slots}, options.dtype(at::kInt));
    ngram_overlap_global_kernel<<<static_cast<unsigned>(global_blocks), kThreads, 0, stream>>>(
        args, pending.data_ptr<int64_t>(), list_ptr, pool.data_ptr<int32_t>(), slots);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return ngram_overlap_outputs(inputs, matches, max_n);
}

}  // namespace

TORCH_LIBRARY_IMPL(lambdapo, CUDA, m) {
  m.impl("ngram_overlap", &ngram_overlap_cuda);
}

}  // namespace lambdapo
