// CPU kernel of ngram_overlap: candidates grouped by reference; each task gives every
// distinct n-gram of its reference a dense id, level by level, once, and probes the ids with
// each of its candidates, clipping counts as it goes.
//
// The ids are exact by construction, with no hash of token runs to confirm: a unigram's id
// comes from its token id, an n-gram's (n >= 2) from the pair (id of its (n-1)-gram prefix,
// id of its last token), one 64-bit key per distinct n-gram in a small table. A candidate
// n-gram whose prefix or last token is absent from the reference is a miss without a lookup.
// Whether a lookup hits is data-dependent, so the hot loops avoid branching on it: a
// mispredicted branch costs more than the lookup.
#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "sequence_overlap.h"
#include "token_ids.h"

namespace lambdapo {
namespace {

// The n-gram ids of one reference for n = 1..max_n and their counts, probed by candidates.
class ReferenceGrams {
 public:
  void build(const int64_t* ref, int64_t len, int64_t max_n) {
    levels_ = std::min(max_n, len);
    tables_.resize(max_n - 1);
    ref_slots_.resize(max_n - 1);
    ref_counts_.resize(max_n);
    unigram_ids_.resize(len);
    const int64_t distinct = tokens_.assign(ref, len, unigram_ids_.data());
    ref_counts_[0].assign(2 * (kMissSlots + distinct), 0);
    count_ids(unigram_ids_.data(), len, ref_counts_[0]);
    const int64_t* prefix_ids = unigram_ids_.data();
    for (int64_t n = 2; n <= levels_; ++n) {
      // The last reference built at this order left its n-grams in `slots`: they are cleared
      // slot by slot, so that a table sized for 4x the n-grams costs O(n-grams) per
      // reference, not O(table). (Orders past levels_ keep theirs until they are built.)
      const int64_t count = len - n + 1;
      KeySlots& table = tables_[n - 2];
      std::vector<int64_t>& slots = ref_slots_[n - 2];
      std::vector<int32_t>& counts = ref_counts_[n - 1];
      if (table.reset(count, slots.data(), static_cast<int64_t>(slots.size()))) {
        counts.assign(2 * (kMissSlots + table.capacity()), 0);
      } else {
        for (const int64_t slot : slots) counts[2 * (kMissSlots + slot)] = 0;
      }
      slots.resize(count);
      for (int64_t i = 0; i < count; ++i) {
        slots[i] = table.insert(pair_key(prefix_ids[i], unigram_ids_[i + n - 1]));
      }
      count_ids(slots.data(), count, counts);
      prefix_ids = slots.data();
    }
  }

  // matches[n-1] = sum over n-grams g of cand[0 : len] of min(count in cand, count in ref):
  // each occurrence of g in cand uses up one of g's occurrences in ref. Orders n with no
  // n-gram in cand or ref are left as they are (0).
  void clipped_matches(const int64_t* cand, int64_t len, int64_t* matches) {
    unigram_ids_.resize(len);
    gram_ids_.resize(len);
    lookup_keys_.resize(len);
    lookup_positions_.resize(len);
    lookup_ids_.resize(len);
    for (int64_t i = 0; i < len; ++i) unigram_ids_[i] = tokens_.find(cand[i]);
    matches[0] = use_up(unigram_ids_.data(), len, ref_counts_[0]);
    std::copy(unigram_ids_.begin(), unigram_ids_.end(), gram_ids_.begin());
    for (int64_t n = 2; n <= std::min(levels_, len); ++n) {
      const int64_t count = len - n + 1;
      // Gather the n-grams whose prefix and last token are both in the reference: only
      // those are looked up.
      int64_t num_keys = 0;
      for (int64_t i = 0; i < count; ++i) {
        const int64_t prefix = gram_ids_[i], last = unigram_ids_[i + n - 1];
        lookup_keys_[num_keys] = pair_key(prefix, last);
        lookup_positions_[num_keys] = i;
        num_keys += (prefix | last) >= 0;
        gram_ids_[i] = -1;
      }
      const KeySlots& table = tables_[n - 2];
      for (int64_t k = 0; k < num_keys; ++k) {
        lookup_ids_[k] = table.find(lookup_keys_[k]);
        gram_ids_[lookup_positions_[k]] = lookup_ids_[k];
      }
      matches[n - 1] = use_up(lookup_ids_.data(), num_keys, ref_counts_[n - 1]);
    }
  }

 private:
  // Counters 0..kMissSlots-1 of a count array stay 0: use_up sends misses there.
  static constexpr int64_t kMissSlots = 8;

  // One key per (prefix, last): both are below 2^32 (a reference has at most
  // kMaxReferenceTokens = 2^29 tokens, checked or clipped in sequence_overlap.h, so a table has
  // fewer than 2^31 + 2^29 + 1 slots), and last < 2^29 keeps the key off ~0.
  static uint64_t pair_key(int64_t prefix, int64_t last) {
    return static_cast<uint64_t>(prefix) << 32 | static_cast<uint64_t>(last);
  }

  // Adds the occurrences of ids[0:len] to counts[2 * (kMissSlots + id)]; the entry after
  // each count is use_up's count of it used (0 between candidates), in the same cache line.
  static void count_ids(const int64_t* ids, int64_t len, std::vector<int32_t>& counts) {
    for (int64_t i = 0; i < len; ++i) ++counts[2 * (kMissSlots + ids[i])];
  }

  // Counter of ids[i] (-1 for a miss): misses take the zero counters in turn, so that
  // consecutive misses do not wait on each other's store and nothing branches on hit or miss.
  static int64_t counter_of(const int64_t* ids, int64_t i) {
    const int64_t miss = ids[i] >> 63;  // all ones for -1
    return 2 * (((kMissSlots + ids[i]) & ~miss) | (i & (kMissSlots - 1) & miss));
  }

  // How many of ids[0:len] find an occurrence in the reference not used by an earlier one.
  // The used counts go back to 0 afterwards, touching only this candidate's counters (a
  // copy of the whole count array per candidate cost more than the lookups).
  static int64_t use_up(const int64_t* ids, int64_t len, std::vector<int32_t>& ref_counts) {
    int32_t* counts = ref_counts.data();
    int64_t matches = 0;
    for (int64_t i = 0; i < len; ++i) {
      int32_t* counter = counts + counter_of(ids, i);
      const int32_t available = counter[1] < counter[0];
      matches += available;
      counter[1] += available;
    }
    for (int64_t i = 0; i < len; ++i) counts[counter_of(ids, i) + 1] = 0;
    return matches;
  }

  int64_t levels_ = 0;  // orders n with at least one n-gram in the reference
  TokenIds tokens_;
  std::vector<KeySlots> tables_;                  // tables_[n-2]: the n-grams, n >= 2
  std::vector<std::vector<int64_t>> ref_slots_;   // ref_slots_[n-2]: slots of ref n-grams
  std::vector<std::vector<int32_t>> ref_counts_;  // ref_counts_[n-1]: see count_ids
  std::vector<int64_t> unigram_ids_, gram_ids_;   // by position in the sequence at hand
  std::vector<uint64_t> lookup_keys_;             // the candidate n-grams looked up,
  std::vector<int64_t> lookup_positions_, lookup_ids_;  // their positions and ids
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> ngram_overlap_cpu(
    const at::Tensor& cand_values, const at::Tensor& cand_starts, const at::Tensor& cand_lengths,
    const at::Tensor& ref_values, const at::Tensor& ref_starts, const at::Tensor& ref_lengths,
    const at::Tensor& ref_index, int64_t max_n, bool validate) {
  const OverlapInputs inputs = checked_overlap_inputs(
      "ngram_overlap", cand_values, cand_starts, cand_lengths, ref_values, ref_starts, ref_lengths,
      ref_index, validate);
  const Sequences& cand = inputs.cand;
  const Sequences& ref = inputs.ref;
  const at::Tensor& ref_of = inputs.ref_index;
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
  const int64_t tokens = cand.values.numel() + ref.values.numel();
  NegativeIdScan negative_ids(validate);
  for_each_task<ReferenceGrams>(tasks, tokens, [&](ReferenceGrams& grams,
                                                   const CandidateTask& task) {
    negative_ids.add_ref(rv + rs[task.ref], rl[task.ref]);
    grams.build(rv + rs[task.ref], rl[task.ref], max_n);
    for (int64_t k = task.begin; k < task.end; ++k) {
      const int64_t b = tasks.order[k];
      negative_ids.add_cand(cv + cs[b], cl[b]);
      grams.clipped_matches(cv + cs[b], cl[b], out + b * max_n);
    }
  });
  negative_ids.check("ngram_overlap", inputs, tasks);
  return ngram_overlap_outputs(inputs, matches, max_n);
}

}  // namespace

TORCH_LIBRARY_IMPL(lambdapo, CPU, m) {
  m.impl("ngram_overlap", &ngram_overlap_cpu);
}

}  // namespace lambdapo
