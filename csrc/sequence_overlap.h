// Token-sequence overlap ops (n-gram matches, LCS) for the semantic-density reward
// (DESIGN.md sections 2 and 4): argument checks, the candidate -> reference task plan and
// the per-reference match masks of the bit-parallel LCS, shared by CPU and CUDA.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <tuple>
#include <vector>

namespace lambdapo {

// A batch of token sequences: sequence i is values[starts[i] : starts[i] + lengths[i]].
struct Sequences {
  at::Tensor values;   // [T] int64, non-negative ids
  at::Tensor starts;   // [B] int64
  at::Tensor lengths;  // [B] int64
};

// Whether any of the (contiguous int64) values is negative. On the CPU a plain scan, not a
// torch reduction: after a parallel reduction the OpenMP workers spin for a while, and the
// kernel that follows ran at half speed at 2 threads on the 2-vCPU dev machine (full speed
// with GOMP_SPINCOUNT=0 or with this scan).
inline bool holds_negative(const at::Tensor& values) {
  const int64_t n = values.numel();
  if (n == 0) return false;
  if (!values.is_cpu()) return values.min().item<int64_t>() < 0;
  const int64_t* v = values.data_ptr<int64_t>();
  int64_t any_sign = 0;
  for (int64_t i = 0; i < n; ++i) any_sign |= v[i];
  return any_sign < 0;
}

// validate=False skips the checks that read values (host syncs on CUDA).
inline void check_sequences(const char* op, const char* name, const Sequences& seq,
                            const at::Device& device, bool validate) {
  for (const auto& [part, t] : {std::pair<const char*, const at::Tensor&>{"values", seq.values},
                                {"starts", seq.starts},
                                {"lengths", seq.lengths}}) {
    TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, "_", part,
                " must be an int64 tensor, got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 1, op, ": ", name, "_", part, " must be 1-D, got shape ", t.sizes());
    TORCH_CHECK(t.device() == device, op, ": ", name, "_", part, " is on ", t.device(),
                " but cand_values is on ", device);
  }
  TORCH_CHECK(seq.starts.numel() == seq.lengths.numel(), op, ": ", name, "_starts and ", name,
              "_lengths must have the same length, got ", seq.starts.numel(), " and ",
              seq.lengths.numel());
  if (!validate) return;
  if (seq.starts.numel() > 0) {
    TORCH_CHECK_VALUE(seq.starts.min().item<int64_t>() >= 0, op, ": ", name,
                      "_starts must be >= 0");
    TORCH_CHECK_VALUE(seq.lengths.min().item<int64_t>() >= 0, op, ": ", name,
                      "_lengths must be >= 0");
    TORCH_CHECK_VALUE(seq.starts.add(seq.lengths).max().item<int64_t>() <= seq.values.numel(),
                      op, ": ", name, " sequences run past the end of ", name, "_values (",
                      seq.values.numel(), " ids)");
  }
  // Negative ids are rejected inside the sequences; padding outside them may be anything.
  if (holds_negative(seq.values)) {
    const at::Tensor seg = at::repeat_interleave(at::arange(seq.starts.numel(), seq.starts.options()),
                                                 seq.lengths);
    const at::Tensor first = at::cumsum(seq.lengths, 0).sub_(seq.lengths);
    const at::Tensor position = seq.starts.index_select(0, seg)
                                    .add_(at::arange(seg.numel(), seg.options()))
                                    .sub_(first.index_select(0, seg));
    TORCH_CHECK_VALUE(seg.numel() == 0 || seq.values.index_select(0, position).min()
                                                  .item<int64_t>() >= 0,
                      op, ": ", name, "_values holds negative token ids inside the sequences "
                      "(padding such as -100 must be left out by the lengths/offsets)");
  }
}

inline void check_overlap_args(const char* op, const Sequences& cand, const Sequences& ref,
                               const at::Tensor& ref_index, bool validate) {
  const at::Device device = cand.values.device();
  check_sequences(op, "cand", cand, device, validate);
  check_sequences(op, "ref", ref, device, validate);
  TORCH_CHECK(ref_index.scalar_type() == at::kLong && ref_index.dim() == 1, op,
              ": ref_index must be a 1-D int64 tensor");
  TORCH_CHECK(ref_index.device() == device, op, ": ref_index is on ", ref_index.device(),
              " but cand_values is on ", device);
  TORCH_CHECK(ref_index.numel() == cand.starts.numel(), op, ": ref_index must have one entry "
              "per candidate (", cand.starts.numel(), "), got ", ref_index.numel());
  if (validate && ref_index.numel() > 0) {
    TORCH_CHECK_VALUE(ref_index.min().item<int64_t>() >= 0 &&
                          ref_index.max().item<int64_t>() < ref.starts.numel(),
                      op, ": ref_index must lie in [0, ", ref.starts.numel(),
                      ") (the number of references)");
  }
}

// The arguments every overlap op takes, made contiguous and checked.
struct OverlapInputs {
  Sequences cand, ref;
  at::Tensor ref_index;  // [B] int64 in [0, R)
};

inline OverlapInputs checked_overlap_inputs(
    const char* op, const at::Tensor& cand_values, const at::Tensor& cand_starts,
    const at::Tensor& cand_lengths, const at::Tensor& ref_values, const at::Tensor& ref_starts,
    const at::Tensor& ref_lengths, const at::Tensor& ref_index, bool validate) {
  OverlapInputs in{{cand_values.contiguous(), cand_starts.contiguous(), cand_lengths.contiguous()},
                   {ref_values.contiguous(), ref_starts.contiguous(), ref_lengths.contiguous()},
                   ref_index.contiguous()};
  // The overlap kernels index memory with these values (an unchecked negative id, offset or
  // ref_index could read out of bounds) and still read sizes back to the host on CUDA, so
  // their value checks always run: validate=False does not skip them (yet).
  static_cast<void>(validate);
  check_overlap_args(op, in.cand, in.ref, in.ref_index, /*validate=*/true);
  return in;
}

// counts[b][n-1] = number of n-grams in a sequence of lengths[b] tokens, n = 1..max_n.
inline at::Tensor ngram_counts(const at::Tensor& lengths, int64_t max_n) {
  const at::Tensor n = at::arange(1, max_n + 1, lengths.options());
  return lengths.unsqueeze(1).sub(n.unsqueeze(0)).add_(1).clamp_min_(0);
}

// ngram_overlap's outputs around a backend's clipped matches [B, max_n]: the n-gram counts
// follow from the lengths alone.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> ngram_overlap_outputs(
    const OverlapInputs& in, const at::Tensor& matches, int64_t max_n) {
  return {matches, ngram_counts(in.cand.lengths, max_n),
          ngram_counts(in.ref.lengths.index_select(0, in.ref_index), max_n)};
}

// CPU work plan: candidates sorted by their reference (order), in tasks of consecutive
// candidates sharing one reference, split so that every thread gets work even when all
// candidates share one reference. A task builds its reference's tables once.
struct CandidateTask {
  int64_t ref, begin, end;  // candidates order[begin:end] all map to reference `ref`
};
struct CandidatePlan {
  std::vector<int64_t> order;
  std::vector<CandidateTask> tasks;
};

inline CandidatePlan candidates_by_reference(const at::Tensor& ref_index_cpu) {
  CandidatePlan plan;
  const int64_t batch = ref_index_cpu.numel();
  const int64_t* ref_of = ref_index_cpu.data_ptr<int64_t>();
  plan.order.resize(batch);
  for (int64_t b = 0; b < batch; ++b) plan.order[b] = b;
  std::stable_sort(plan.order.begin(), plan.order.end(),
                   [&](int64_t a, int64_t b) { return ref_of[a] < ref_of[b]; });
  const int64_t max_task = std::max<int64_t>(1, batch / (4 * at::get_num_threads()));
  for (int64_t begin = 0; begin < batch;) {
    const int64_t ref = ref_of[plan.order[begin]];
    int64_t end = begin;
    while (end < batch && end - begin < max_task && ref_of[plan.order[end]] == ref) ++end;
    plan.tasks.push_back({ref, begin, end});
    begin = end;
  }
  return plan;
}

// Tokens of work per thread below which for_each_task uses fewer threads: starting and
// joining OpenMP workers costs more than the work itself for small batches (64 pairs of 256
// tokens took 16 ms at 2 threads on the busy 2-vCPU machine, 0.4 ms at 1).
constexpr int64_t kTokensPerThread = int64_t{1} << 17;

// Runs run_task(state, task) for every task of the plan, a State per thread, on up to one
// thread per kTokensPerThread of `tokens` (the candidate and reference tokens). Each thread
// claims the next task when done with its last, rather than a fixed share: on a machine
// shared with other work, a thread that is descheduled for a while no longer holds up the
// whole op with the tasks it was handed up front.
template <typename State, typename RunTask>
void for_each_task(const CandidatePlan& plan, int64_t tokens, const RunTask& run_task) {
  const int64_t num_tasks = static_cast<int64_t>(plan.tasks.size());
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(
      1, std::min<int64_t>({at::get_num_threads(), num_tasks, tokens / kTokensPerThread}));
  const auto work = [&](int64_t, int64_t) {
    State state;
    for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < num_tasks;
         t = next.fetch_add(1, std::memory_order_relaxed)) {
      run_task(state, plan.tasks[t]);
    }
  };
  if (workers == 1) {
    work(0, 1);
  } else {
    at::parallel_for(0, workers, 1, work);
  }
}

C10_HOST_DEVICE inline bool same_ngram(const int64_t* a, const int64_t* b, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    if (a[k] != b[k]) return false;
  }
  return true;
}

// One step of Hyyro's bit-parallel LCS (2004) over `words` 64-bit words of state v, for a
// candidate token whose match mask in the reference is `match`:
// V = (V + U) | (V - U) with U = V & M; U is a subset of V, so V - U = V & ~U, and only the
// addition carries between words.
C10_HOST_DEVICE inline void lcs_step(uint64_t* v, const uint64_t* match, int64_t words) {
  uint64_t carry = 0;
  for (int64_t w = 0; w < words; ++w) {
    const uint64_t vw = v[w], u = vw & match[w];
    const uint64_t sum = vw + u;
    const uint64_t with_carry = sum + carry;
    carry = (sum < vw) | (with_carry < sum);
    v[w] = with_carry | (vw & ~u);
  }
}

// Word-parallel carries of lcs_step across the 32 lanes of a CUDA warp, each lane adding one
// word: lane i generates a carry (bit i of `generate`: its word's sum overflowed) or passes
// one on (bit i of `propagate`: its sum is all ones), never both. Returns the carry into lane
// i at bit i, and the carry out of lane 31 at bit 32, given `carry_in` into lane 0: the
// carries of the 32-bit addition (generate | propagate) + generate + carry_in, whose bit i
// generates exactly where `generate` does and propagates exactly where `propagate` does.
C10_HOST_DEVICE inline uint64_t lane_carries(uint32_t generate, uint32_t propagate,
                                             uint64_t carry_in) {
  const uint64_t a = generate | propagate, b = generate;
  return (a + b + carry_in) ^ a ^ b;
}

// The LCS length from the final state: the zero bits among the m reference positions.
C10_HOST_DEVICE inline int64_t lcs_from_state(const uint64_t* v, int64_t words, int64_t m) {
  int64_t ones = 0;
  for (int64_t w = 0; w < words; ++w) {
    const int64_t valid = m - 64 * w < 64 ? m - 64 * w : 64;
    const uint64_t keep = valid == 64 ? ~uint64_t{0} : ((uint64_t{1} << valid) - 1);
#ifdef __CUDA_ARCH__
    ones += __popcll(v[w] & keep);
#else
    ones += __builtin_popcountll(v[w] & keep);
#endif
  }
  return m - ones;
}

// Match masks of the bit-parallel LCS, built once per reference: for reference r with
// distinct tokens tokens[token_offsets[r] : token_offsets[r+1]] (sorted), the mask of its
// k-th distinct token is words_per_ref[r] 64-bit words at
// masks[mask_offsets[r] + k * words_per_ref[r]], bit j set where ref[j] is that token.
struct ReferenceMasks {
  at::Tensor tokens;          // [D] int64
  at::Tensor token_offsets;   // [R+1] int64
  at::Tensor words_per_ref;   // [R] int64
  at::Tensor mask_offsets;    // [R] int64
  at::Tensor masks;           // [sum_r D_r * W_r] int64 (bit patterns)
};

// Device-generic (ATen): sort the positions by (reference, token), and set one bit per
// reference position. Each (word, bit) is set by exactly one position, so the bits are
// summed into the words: a sum of distinct powers of two is their OR, and it never
// overflows int64 (bit 63 is INT64_MIN, added to at most 2^63 - 1).
inline ReferenceMasks reference_masks(const Sequences& ref) {
  const auto opts = ref.values.options().dtype(at::kLong);
  const int64_t num_refs = ref.starts.numel();
  ReferenceMasks out;
  const at::Tensor ref_of_pos = at::repeat_interleave(at::arange(num_refs, opts), ref.lengths);
  const at::Tensor seg_begin = at::cumsum(ref.lengths, 0).sub_(ref.lengths);
  const at::Tensor index_in_ref = at::arange(ref_of_pos.numel(), opts).sub_(
      seg_begin.index_select(0, ref_of_pos));
  const at::Tensor tokens = ref.values.index_select(0, ref.starts.index_select(0, ref_of_pos)
                                                           .add(index_in_ref));
  // Sort positions by (reference, token); distinct (reference, token) pairs are the masks.
  const at::Tensor by_token = std::get<1>(at::sort(tokens, /*stable=*/true, 0, false));
  const at::Tensor order = by_token.index_select(
      0, std::get<1>(at::sort(ref_of_pos.index_select(0, by_token), /*stable=*/true, 0, false)));
  const at::Tensor sorted_ref = ref_of_pos.index_select(0, order);
  const at::Tensor sorted_tok = tokens.index_select(0, order);
  // A sorted position starts a new distinct (reference, token) pair where either changes.
  at::Tensor is_new = at::ones_like(sorted_ref, sorted_ref.options().dtype(at::kBool));
  if (sorted_ref.numel() > 1) {
    is_new.narrow(0, 1, sorted_ref.numel() - 1)
        .copy_(sorted_ref.narrow(0, 1, sorted_ref.numel() - 1)
                   .ne(sorted_ref.narrow(0, 0, sorted_ref.numel() - 1))
                   .logical_or_(sorted_tok.narrow(0, 1, sorted_tok.numel() - 1)
                                    .ne(sorted_tok.narrow(0, 0, sorted_tok.numel() - 1))));
  }
  const at::Tensor inverse = is_new.cumsum(0).sub_(1);
  const at::Tensor first = at::nonzero(is_new).view({-1});
  out.tokens = sorted_tok.index_select(0, first);
  const at::Tensor distinct_ref = sorted_ref.index_select(0, first);
  const at::Tensor per_ref = at::bincount(distinct_ref, {}, num_refs);
  out.token_offsets = at::cat({at::zeros({1}, opts), per_ref.cumsum(0)});
  out.words_per_ref = ref.lengths.add(63).div_(64, "floor");
  const at::Tensor words = per_ref.mul(out.words_per_ref);
  out.mask_offsets = words.cumsum(0).sub_(words);
  const int64_t total_words = num_refs ? words.sum().item<int64_t>() : 0;
  out.masks = at::zeros({total_words}, opts);
  // Word and bit of each sorted position p = (reference r, index j, distinct token k).
  const at::Tensor k_in_ref = inverse.sub(out.token_offsets.index_select(0, sorted_ref));
  const at::Tensor j = index_in_ref.index_select(0, order);
  const at::Tensor word = out.mask_offsets.index_select(0, sorted_ref)
                              .add_(k_in_ref.mul(out.words_per_ref.index_select(0, sorted_ref)))
                              .add_(j.div(64, "floor"));
  const at::Tensor bit = at::bitwise_left_shift(at::ones_like(j), j.remainder(64));
  out.masks.index_add_(0, word, bit);
  return out;
}

}  // namespace lambdapo
