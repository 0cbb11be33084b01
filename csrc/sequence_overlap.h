// Token-sequence overlap ops (n-gram matches, LCS) for the semantic-density reward
// (DESIGN.md sections 2 and 4): argument checks, the clipping of unchecked inputs, the
// candidate -> reference task plan and the bit-parallel LCS steps, shared by CPU and CUDA.
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

// Longest reference of the overlap ops: keeps n-gram positions and table slots in int32 (CUDA)
// and every n-gram id below 2^32 (CPU), and bounds the CUDA scratch of a reference (see
// docs/ops.md). With validate=True a longer one is an error, with validate=False it is cut to
// its first kMaxReferenceTokens tokens (clipped_sequences). 2^29 ids take 4 GiB.
constexpr int64_t kMaxReferenceTokens = int64_t{1} << 29;
constexpr int64_t kNoLengthLimit = INT64_MAX;

constexpr const char* kNegativeIdsMessage =
    "_values holds negative token ids inside the sequences (padding such as -100 must be left "
    "out by the lengths/offsets)";

// validate=False skips the checks that read values (host syncs on CUDA). max_length: the
// longest sequence accepted (kMaxReferenceTokens for references). Negative ids are looked for
// here off the CPU only: the CPU kernels scan the sequences as their tasks read them
// (NegativeIdScan).
inline void check_sequences(const char* op, const char* name, const Sequences& seq,
                            const at::Device& device, bool validate, int64_t max_length) {
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
    // One read-back for the five bounds. Each is taken in turn, so a later one is only judged
    // once the earlier ones hold (and so cannot have overflowed): starts >= 0, lengths >= 0,
    // starts <= T, lengths <= T - starts (start + length could wrap around), lengths <=
    // max_length.
    const int64_t total = seq.values.numel();
    const at::Tensor room = seq.starts.neg().add_(total);  // T - start
    const at::Tensor bounds = at::stack({seq.starts.min(), seq.lengths.min(), room.min(),
                                         room.sub(seq.lengths).min(), seq.lengths.max()}).cpu();
    const int64_t* b = bounds.data_ptr<int64_t>();
    TORCH_CHECK_VALUE(b[0] >= 0, op, ": ", name, "_starts must be >= 0");
    TORCH_CHECK_VALUE(b[1] >= 0, op, ": ", name, "_lengths must be >= 0");
    TORCH_CHECK_VALUE(b[2] >= 0 && b[3] >= 0, op, ": ", name, " sequences run past the end of ",
                      name, "_values (", total, " ids)");
    TORCH_CHECK_VALUE(b[4] <= max_length, op, ": ", name, "_lengths holds a sequence of ", b[4],
                      " tokens; at most ", max_length, " are supported");
  }
  // Negative ids are rejected inside the sequences; padding outside them may be anything.
  if (!seq.values.is_cpu() && seq.values.numel() > 0 &&
      seq.values.min().item<int64_t>() < 0) {
    const at::Tensor seg = at::repeat_interleave(at::arange(seq.starts.numel(), seq.starts.options()),
                                                 seq.lengths);
    const at::Tensor first = at::cumsum(seq.lengths, 0).sub_(seq.lengths);
    const at::Tensor position = seq.starts.index_select(0, seg)
                                    .add_(at::arange(seg.numel(), seg.options()))
                                    .sub_(first.index_select(0, seg));
    TORCH_CHECK_VALUE(seg.numel() == 0 || seq.values.index_select(0, position).min()
                                                  .item<int64_t>() >= 0,
                      op, ": ", name, kNegativeIdsMessage);
  }
}

inline void check_overlap_args(const char* op, const Sequences& cand, const Sequences& ref,
                               const at::Tensor& ref_index, bool validate) {
  const at::Device device = cand.values.device();
  check_sequences(op, "cand", cand, device, validate, kNoLengthLimit);
  check_sequences(op, "ref", ref, device, validate, kMaxReferenceTokens);
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

// The arguments every overlap op takes, made contiguous, checked, and clipped to memory:
// the kernels read exactly the sequences these describe, so no value of the inputs (checked or
// not) can send them out of bounds.
struct OverlapInputs {
  Sequences cand, ref;   // ref has one more sequence than given: R, empty
  at::Tensor ref_index;  // [B] int64 in [0, R]
  int64_t num_refs = 0;  // R, the number of references given
};

// The unchecked-input rule (validate=False; with validate=True the checks leave nothing for
// it to change): each sequence is clipped to its values, its start clamped into [0, T] and
// its length into [0, T - start] (T = the number of values), a reference's length also to at
// most kMaxReferenceTokens (max_length), and a candidate whose ref_index lies outside [0, R)
// is compared with an empty reference. Negative ids are compared like any other id.
// Elementwise ops on the inputs' device: no host sync.
inline Sequences clipped_sequences(const Sequences& seq, int64_t max_length) {
  const int64_t total = seq.values.numel();
  const at::Tensor starts = seq.starts.clamp(0, total);
  at::Tensor lengths = at::minimum(seq.lengths.clamp_min(0), starts.neg().add_(total));
  if (total > max_length) lengths.clamp_max_(max_length);  // else lengths <= T already
  return {seq.values, starts, lengths};
}

inline OverlapInputs checked_overlap_inputs(
    const char* op, const at::Tensor& cand_values, const at::Tensor& cand_starts,
    const at::Tensor& cand_lengths, const at::Tensor& ref_values, const at::Tensor& ref_starts,
    const at::Tensor& ref_lengths, const at::Tensor& ref_index, bool validate) {
  const Sequences cand{cand_values.contiguous(), cand_starts.contiguous(),
                       cand_lengths.contiguous()};
  const Sequences ref{ref_values.contiguous(), ref_starts.contiguous(), ref_lengths.contiguous()};
  const at::Tensor index = ref_index.contiguous();
  check_overlap_args(op, cand, ref, index, validate);
  OverlapInputs in;
  in.num_refs = ref.starts.numel();
  in.cand = clipped_sequences(cand, kNoLengthLimit);
  const Sequences clipped_ref = clipped_sequences(ref, kMaxReferenceTokens);
  const at::Tensor empty = at::zeros({1}, clipped_ref.starts.options());
  in.ref = {ref.values, at::cat({clipped_ref.starts, empty}), at::cat({clipped_ref.lengths, empty})};
  in.ref_index = at::where(index.ge(0).logical_and_(index.lt(in.num_refs)), index, in.num_refs);
  return in;
}

// counts[b][n-1] = number of n-grams in a sequence of lengths[b] tokens, n = 1..max_n.
inline at::Tensor ngram_counts(const at::Tensor& lengths, int64_t max_n) {
  const at::Tensor n = at::arange(1, max_n + 1, lengths.options());
  return lengths.unsqueeze(1).sub(n.unsqueeze(0)).add_(1).clamp_min_(0);
}

// The length of each candidate's reference, as the kernels read it.
inline at::Tensor reference_lengths(const OverlapInputs& in) {
  return in.ref.lengths.index_select(0, in.ref_index);
}

// ngram_overlap's outputs around a backend's clipped matches [B, max_n]: the n-gram counts
// follow from the lengths alone.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> ngram_overlap_outputs(
    const OverlapInputs& in, const at::Tensor& matches, int64_t max_n) {
  return {matches, ngram_counts(in.cand.lengths, max_n),
          ngram_counts(reference_lengths(in), max_n)};
}

// lcs_length's outputs: the LCS and the two lengths it was taken over.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> lcs_length_outputs(
    const OverlapInputs& in, const at::Tensor& lcs) {
  return {lcs, in.cand.lengths, reference_lengths(in)};
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

// The check for negative ids of validate=True on the CPU, made by the tasks on the
// sequences they read (in cache for the kernel, and on every thread) instead of a separate
// pass over all values beforehand: the kernels compare negative ids like any other, so the
// check can wait until they are done. References no candidate reads are scanned at the end.
class NegativeIdScan {
 public:
  explicit NegativeIdScan(bool enabled) : enabled_(enabled) {}

  void add_cand(const int64_t* v, int64_t n) {
    if (enabled_) cand_.fetch_or(sign_bits(v, n), std::memory_order_relaxed);
  }
  void add_ref(const int64_t* v, int64_t n) {
    if (enabled_) ref_.fetch_or(sign_bits(v, n), std::memory_order_relaxed);
  }

  // Raises as check_sequences does, candidates first.
  void check(const char* op, const OverlapInputs& in, const CandidatePlan& plan) {
    if (!enabled_) return;
    std::vector<bool> read(in.num_refs + 1, false);
    for (const CandidateTask& task : plan.tasks) read[task.ref] = true;
    const int64_t* rv = in.ref.values.data_ptr<int64_t>();
    const int64_t* rs = in.ref.starts.data_ptr<int64_t>();
    const int64_t* rl = in.ref.lengths.data_ptr<int64_t>();
    for (int64_t r = 0; r < in.num_refs; ++r) {
      if (!read[r]) add_ref(rv + rs[r], rl[r]);
    }
    TORCH_CHECK_VALUE(cand_.load() >= 0, op, ": cand", kNegativeIdsMessage);
    TORCH_CHECK_VALUE(ref_.load() >= 0, op, ": ref", kNegativeIdsMessage);
  }

 private:
  static int64_t sign_bits(const int64_t* v, int64_t n) {
    int64_t bits = 0;
    for (int64_t i = 0; i < n; ++i) bits |= v[i];
    return bits;
  }

  bool enabled_;
  std::atomic<int64_t> cand_{0}, ref_{0};
};

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

}  // namespace lambdapo
