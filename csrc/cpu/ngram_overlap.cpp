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

namespace lambdapo {
namespace {

// Longest reference: keeps every id and table slot below 2^32 (see pair_key).
constexpr int64_t kMaxReferenceTokens = int64_t{1} << 29;

// Open-addressing set of 64-bit keys (never ~0): linear probing at load <= 1/4 without
// wrap-around (a run of occupied slots is at most max_keys long, so max_keys + 1 slots past
// the last home keep every probe in bounds). A key's slot index is its dense id.
class KeySlots {
 public:
  void reset(int64_t max_keys) {
    int64_t homes = 16;
    int shift = 60;
    while (homes < 4 * max_keys) homes <<= 1, --shift;
    keys_.assign(homes + max_keys + 1, kEmpty);
    shift_ = shift;
  }
  int64_t capacity() const { return static_cast<int64_t>(keys_.size()); }

  int64_t insert(uint64_t key) {
    const int64_t slot = settle(key);
    keys_[slot] = key;
    return slot;
  }
  // The key's slot, or -1.
  int64_t find(uint64_t key) const {
    const int64_t slot = settle(key);
    const int64_t hit = -static_cast<int64_t>(keys_[slot] == key);  // all ones on a hit
    return slot | ~hit;
  }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t{0};

  // Fibonacci hashing: the top bits of key * 2^64/phi depend on every bit of the key.
  int64_t home(uint64_t key) const {
    return static_cast<int64_t>((key * 0x9E3779B97F4A7C15ull) >> shift_);
  }
  // 0 iff the slot holding `stored` holds key or is empty (kEmpty + 1 wraps to 0).
  static uint64_t other_key(uint64_t stored, uint64_t key) {
    return std::min(stored ^ key, stored + 1);
  }
  // The first slot from the key's home that holds the key or is empty. The two slots at home
  // settle almost every key, and their test is arithmetic, not a branch per slot.
  int64_t settle(uint64_t key) const {
    int64_t slot = home(key);
    const uint64_t first = other_key(keys_[slot], key);
    if (C10_LIKELY(std::min(first, other_key(keys_[slot + 1], key)) == 0)) {
      return slot + (first != 0);
    }
    for (slot += 2; other_key(keys_[slot], key) != 0;) ++slot;
    return slot;
  }

  std::vector<uint64_t> keys_;
  int shift_ = 64;
};

// Dense ids 0..u-1 of the u distinct tokens of one reference: a direct-address array for
// token ids below kDirectBound (any real vocabulary), a KeySlots table above it (every
// int64 >= 0 is a valid token id).
class TokenIds {
 public:
  static constexpr int64_t kDirectBound = int64_t{1} << 20;

  // ids[i] = id of ref[i]; returns u. ref must stay valid until the next assign, which
  // clears its entries.
  int64_t assign(const int64_t* ref, int64_t len, int64_t* ids) {
    for (int64_t i = 0; i < ref_len_; ++i) {
      if (ref_[i] < kDirectBound) direct_[ref_[i]] = -1;
    }
    ref_ = ref;
    ref_len_ = len;
    any_large_ = false;
    int64_t next = 0;
    for (int64_t i = 0; i < len; ++i) {
      const int64_t token = ref[i];
      if (C10_UNLIKELY(token >= static_cast<int64_t>(direct_.size()))) {
        if (token >= kDirectBound) {
          ids[i] = assign_large(token, next);
          continue;
        }
        direct_.resize(std::min(kDirectBound, std::max<int64_t>(token + 1, 2 * direct_.size())),
                       -1);
      }
      // A new token takes id `next`, without a branch.
      const int32_t id = direct_[token];
      const int32_t dense = id < 0 ? static_cast<int32_t>(next) : id;
      direct_[token] = dense;
      next += id < 0;
      ids[i] = dense;
    }
    return next;
  }

  // The token's id, or -1 when the reference lacks it.
  int64_t find(int64_t token) const {
    if (C10_LIKELY(token < static_cast<int64_t>(direct_.size()))) return direct_[token];
    if (token < kDirectBound || !any_large_) return -1;
    const int64_t slot = large_.find(static_cast<uint64_t>(token));
    return slot < 0 ? -1 : large_ids_[slot];
  }

 private:
  int64_t assign_large(int64_t token, int64_t& next) {
    if (!any_large_) {
      large_.reset(ref_len_);
      large_ids_.assign(large_.capacity(), -1);
      any_large_ = true;
    }
    int32_t& id = large_ids_[large_.insert(static_cast<uint64_t>(token))];
    if (id < 0) id = static_cast<int32_t>(next++);
    return id;
  }

  std::vector<int32_t> direct_;  // token -> id, -1 when absent
  KeySlots large_;
  std::vector<int32_t> large_ids_;  // slot of large_ -> id, -1 when empty
  const int64_t* ref_ = nullptr;
  int64_t ref_len_ = 0;
  bool any_large_ = false;
};

// The n-gram ids of one reference for n = 1..max_n and their counts, probed by candidates.
class ReferenceGrams {
 public:
  void build(const int64_t* ref, int64_t len, int64_t max_n) {
    levels_ = std::min(max_n, len);
    tables_.resize(max_n - 1);
    ref_counts_.resize(max_n);
    unigram_ids_.resize(len);
    gram_ids_.resize(len);
    const int64_t distinct = tokens_.assign(ref, len, unigram_ids_.data());
    count_ids(unigram_ids_.data(), len, distinct, ref_counts_[0]);
    std::copy(unigram_ids_.begin(), unigram_ids_.end(), gram_ids_.begin());
    for (int64_t n = 2; n <= levels_; ++n) {
      const int64_t count = len - n + 1;
      KeySlots& table = tables_[n - 2];
      table.reset(count);
      for (int64_t i = 0; i < count; ++i) {
        gram_ids_[i] = table.insert(pair_key(gram_ids_[i], unigram_ids_[i + n - 1]));
      }
      count_ids(gram_ids_.data(), count, table.capacity(), ref_counts_[n - 1]);
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

  // One key per (prefix, last): both are below 2^32 (a reference has at most 2^29 tokens, so
  // a table has fewer than 2^31 + 2^29 + 1 slots), and last < 2^29 keeps the key off ~0.
  static uint64_t pair_key(int64_t prefix, int64_t last) {
    return static_cast<uint64_t>(prefix) << 32 | static_cast<uint64_t>(last);
  }

  // counts[kMissSlots + id] = occurrences of id among ids[0:len], id in [0, num_ids).
  static void count_ids(const int64_t* ids, int64_t len, int64_t num_ids,
                        std::vector<int32_t>& counts) {
    counts.assign(kMissSlots + num_ids, 0);
    for (int64_t i = 0; i < len; ++i) ++counts[kMissSlots + ids[i]];
  }

  // How many of ids[0:len] (-1 for a miss) find an occurrence left in a copy of ref_counts.
  // Misses take the zero counters in turn, so that consecutive misses do not wait on each
  // other's store and nothing branches on hit or miss.
  int64_t use_up(const int64_t* ids, int64_t len, const std::vector<int32_t>& ref_counts) {
    remaining_.assign(ref_counts.begin(), ref_counts.end());
    int32_t* remaining = remaining_.data();
    int64_t matches = 0;
    for (int64_t i = 0; i < len; ++i) {
      const int64_t miss = ids[i] >> 63;  // all ones for -1
      const int64_t counter = ((kMissSlots + ids[i]) & ~miss) | (i & (kMissSlots - 1) & miss);
      const int32_t available = remaining[counter] > 0;
      matches += available;
      remaining[counter] -= available;
    }
    return matches;
  }

  int64_t levels_ = 0;  // orders n with at least one n-gram in the reference
  TokenIds tokens_;
  std::vector<KeySlots> tables_;                  // tables_[n-2]: the n-grams, n >= 2
  std::vector<std::vector<int32_t>> ref_counts_;  // ref_counts_[n-1]: see count_ids
  std::vector<int64_t> unigram_ids_, gram_ids_;   // by position in the sequence at hand
  std::vector<uint64_t> lookup_keys_;             // the candidate n-grams looked up,
  std::vector<int64_t> lookup_positions_, lookup_ids_;  // their positions and ids
  std::vector<int32_t> remaining_;                // use_up's copy of ref_counts
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> ngram_overlap_cpu(
    const at::Tensor& cand_values, const at::Tensor& cand_starts, const at::Tensor& cand_lengths,
    const at::Tensor& ref_values, const at::Tensor& ref_starts, const at::Tensor& ref_lengths,
    const at::Tensor& ref_index, int64_t max_n, bool validate) {
  const OverlapInputs inputs = checked_overlap_inputs(
      "ngram_overlap", cand_values, cand_starts, cand_lengths, ref_values, ref_starts, ref_lengths,
      ref_index, validate);
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
  for (const CandidateTask& task : tasks.tasks) {
    TORCH_CHECK_VALUE(rl[task.ref] <= kMaxReferenceTokens, "ngram_overlap: reference ", task.ref,
                      " has ", rl[task.ref], " tokens; at most 2^29 are supported");
  }
  int64_t* out = matches.data_ptr<int64_t>();
  at::parallel_for(0, static_cast<int64_t>(tasks.tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    ReferenceGrams grams;
    for (int64_t t = t0; t < t1; ++t) {
      const CandidateTask& task = tasks.tasks[t];
      grams.build(rv + rs[task.ref], rl[task.ref], max_n);
      for (int64_t k = task.begin; k < task.end; ++k) {
        const int64_t b = tasks.order[k];
        grams.clipped_matches(cv + cs[b], cl[b], out + b * max_n);
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
