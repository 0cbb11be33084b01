// CPU kernel of ngram_overlap: candidates grouped by reference; each task builds the
// reference's n-gram table (open addressing on 64-bit hashes, ids confirmed on a hash hit)
// once per n and probes it with each of its candidates, clipping counts as it goes.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "sequence_overlap.h"

namespace lambdapo {
namespace {

class NgramTable {
 public:
  // Counts the n-grams of ref[0 : len].
  void build(const int64_t* ref, int64_t len, int64_t n) {
    ref_ = ref;
    n_ = n;
    const int64_t count = std::max<int64_t>(0, len - n + 1);
    int64_t capacity = 16;
    while (capacity < 2 * count) capacity <<= 1;
    if (static_cast<int64_t>(slots_.size()) < capacity) {
      slots_.assign(capacity, Slot{});
      generation_ = 0;
    }
    mask_ = capacity - 1;
    if (++generation_ == 0) {  // stamps wrapped: clear them once
      for (Slot& slot : slots_) slot.generation = 0;
      generation_ = 1;
    }
    for (int64_t i = 0; i < count; ++i) {
      Slot& slot = find_or_insert(ref + i, ngram_hash(ref + i, n), i);
      ++slot.ref_count;
    }
  }

  // Clipped matches of the n-grams of cand[0 : len]: sum over n-grams of min(count in
  // cand, count in ref). Table state is copied to locals so the hot loop keeps it in
  // registers (stores through Slot* could otherwise alias it).
  int64_t clipped_matches(const int64_t* cand, int64_t len) {
    const int64_t n = n_, mask = mask_;
    const uint32_t generation = generation_;
    const int64_t* ref = ref_;
    Slot* slots = slots_.data();
    if (static_cast<int64_t>(touched_.size()) < len) touched_.resize(len);
    Slot** touched = touched_.data();
    int64_t num_touched = 0, matches = 0;
    for (int64_t i = 0; i + n <= len; ++i) {
      const int64_t* gram = cand + i;
      const uint64_t h = ngram_hash(gram, n);
      for (int64_t k = static_cast<int64_t>(h) & mask;; k = (k + 1) & mask) {
        Slot& slot = slots[k];
        if (slot.generation != generation) break;  // not in the reference
        if (slot.hash != h || !same_ngram(ref + slot.first, gram, n)) continue;
        if (slot.cand_count == 0) touched[num_touched++] = &slot;
        matches += slot.cand_count++ < slot.ref_count;
        break;
      }
    }
    for (int64_t t = 0; t < num_touched; ++t) touched[t]->cand_count = 0;
    return matches;
  }

 private:
  // One cache line holds a slot and its neighbours; a slot is in use when its generation
  // is the current build's, so a new build needs no clearing.
  struct Slot {
    uint64_t hash = 0;
    int64_t first = 0;  // position of the n-gram's first occurrence in ref
    int32_t ref_count = 0, cand_count = 0;
    uint32_t generation = 0;
  };

  Slot& find_or_insert(const int64_t* gram, uint64_t h, int64_t position) {
    for (int64_t i = static_cast<int64_t>(h) & mask_;; i = (i + 1) & mask_) {
      Slot& slot = slots_[i];
      if (slot.generation != generation_) {
        slot = Slot{h, position, 0, 0, generation_};
        return slot;
      }
      if (slot.hash == h && same_ngram(ref_ + slot.first, gram, n_)) return slot;
    }
  }

  const int64_t* ref_ = nullptr;
  int64_t n_ = 1, mask_ = 0;
  uint32_t generation_ = 0;
  std::vector<Slot> slots_;
  std::vector<Slot*> touched_;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> ngram_overlap_cpu(
    const at::Tensor& cand_values, const at::Tensor& cand_starts, const at::Tensor& cand_lengths,
    const at::Tensor& ref_values, const at::Tensor& ref_starts, const at::Tensor& ref_lengths,
    const at::Tensor& ref_index, int64_t max_n) {
  const OverlapInputs inputs = checked_overlap_inputs(
      "ngram_overlap", cand_values, cand_starts, cand_lengths, ref_values, ref_starts, ref_lengths,
      ref_index);
  const auto& [cand, ref, ref_of] = inputs;
  TORCH_CHECK_VALUE(max_n >= 1, "ngram_overlap: max_n must be >= 1, got ", max_n);
  const int64_t batch = cand.starts.numel();
  at::Tensor matches = at::zeros({batch, max_n}, cand.values.options());
  const CandidatePlan tasks = candidates_by_reference(ref_of);
  const int64_t* cv = cand.values.data_ptr<int64_t>();
  const int64_t* cs = cand.starts.data_ptr<int64_t>();
  const int64_t* cl = cand.lengths.data_ptr<int64_t>();
  const int64_t* rv = ref.values.data_ptr<int64_t>();
  const int64_t* rs = ref.starts.data_ptr<int64_t>();
  const int64_t* rl = ref.lengths.data_ptr<int64_t>();
  int64_t* out = matches.data_ptr<int64_t>();
  at::parallel_for(0, static_cast<int64_t>(tasks.tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    NgramTable table;
    for (int64_t t = t0; t < t1; ++t) {
      const CandidateTask& task = tasks.tasks[t];
      for (int64_t n = 1; n <= max_n; ++n) {
        table.build(rv + rs[task.ref], rl[task.ref], n);
        for (int64_t k = task.begin; k < task.end; ++k) {
          const int64_t b = tasks.order[k];
          out[b * max_n + n - 1] = table.clipped_matches(cv + cs[b], cl[b]);
        }
      }
    }
  });
  return ngram_overlap_outputs(inputs, matches, max_n);
}

}  // namespace

TORCH_LIBRARY_IMPL(lambdapo, CPU, m) {
  m.impl("ngram_overlap", &ngram_overlap_cpu);
}

}  // namespace lambdapo
