// CPU kernel of lcs_length: bit-parallel LCS (Hyyro 2004), 64 reference positions per
// word with the carry passed between words. Candidates are grouped by reference; a task
// gives its reference's distinct tokens dense ids and builds their match masks once, in
// thread-local buffers, then runs each of its candidates against them.
//
// Where the time went before: the masks were built for all references at once with ATen
// sorts and scatters (about two thirds of the time on 1024 x 1024 tokens), and every
// candidate token was found by a binary search over the sorted distinct reference tokens
// (a chain of mispredicted branches per token). Now the masks come from one pass over the
// reference, a candidate token's mask row from one array lookup, and the tokens absent from
// the reference are dropped before the word loop, which then runs without a branch.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <utility>
#include <vector>

#include "sequence_overlap.h"
#include "token_ids.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace lambdapo {
namespace {

// V = (V + (V & M)) | (V & ~M) over words 64-bit words: the step of lcs_step, with the
// carry kept in the flags on x86-64 (add-with-carry) instead of recomputed by comparisons.
inline unsigned char lcs_step_word(unsigned char carry, uint64_t& v, uint64_t match) {
#if defined(__x86_64__) || defined(_M_X64)
  unsigned long long sum;
  carry = _addcarry_u64(carry, v, v & match, &sum);
#else
  const uint64_t partial = v + (v & match), sum = partial + carry;
  carry = (partial < v) | (sum < partial);
#endif
  v = sum | (v & ~match);
  return carry;
}

// All steps of one candidate, rows[s] the offset of step s's mask row. kWords > 0: the
// reference has exactly kWords words, V lives in registers and the word loop is unrolled;
// kWords == 0: any number of words, V in memory.
template <int64_t kWords>
void lcs_steps(uint64_t* __restrict v_out, const uint64_t* __restrict masks,
               const int64_t* __restrict rows, int64_t steps, int64_t words) {
  if constexpr (kWords > 0) {
    uint64_t v[kWords];
    for (int64_t w = 0; w < kWords; ++w) v[w] = ~uint64_t{0};
    for (int64_t s = 0; s < steps; ++s) {
      const uint64_t* match = masks + rows[s];
      unsigned char carry = 0;
#pragma GCC unroll 16
      for (int64_t w = 0; w < kWords; ++w) carry = lcs_step_word(carry, v[w], match[w]);
    }
    for (int64_t w = 0; w < kWords; ++w) v_out[w] = v[w];
  } else {
    for (int64_t w = 0; w < words; ++w) v_out[w] = ~uint64_t{0};
    for (int64_t s = 0; s < steps; ++s) {
      const uint64_t* match = masks + rows[s];
      unsigned char carry = 0;
      for (int64_t w = 0; w < words; ++w) carry = lcs_step_word(carry, v_out[w], match[w]);
    }
  }
}

template <int64_t... kWords>
void lcs_steps_any(std::integer_sequence<int64_t, kWords...>, uint64_t* v, const uint64_t* masks,
                   const int64_t* rows, int64_t steps, int64_t words) {
  const bool unrolled =
      ((words == kWords + 1 ? (lcs_steps<kWords + 1>(v, masks, rows, steps, words), true)
                            : false) || ...);
  if (!unrolled) lcs_steps<0>(v, masks, rows, steps, words);
}

// References up to kUnrolledWords * 64 tokens get a word loop unrolled for their length.
constexpr int64_t kUnrolledWords = 16;

// One reference's match masks: mask row k (words_ words) has bit j set where ref[j] is the
// token with dense id k.
class ReferenceMatchMasks {
 public:
  void build(const int64_t* ref, int64_t len) {
    len_ = len;
    words_ = (len + 63) / 64;
    ids_.resize(len);
    const int64_t distinct = tokens_.assign(ref, len, ids_.data());
    masks_.assign(distinct * words_, 0);
    for (int64_t j = 0; j < len; ++j) {
      masks_[ids_[j] * words_ + (j >> 6)] |= uint64_t{1} << (j & 63);
    }
  }

  int64_t lcs(const int64_t* cand, int64_t len) {
    if (len == 0 || len_ == 0) return 0;
    // Offsets of the mask rows of the candidate's tokens that occur in the reference: a
    // token that does not leaves V unchanged.
    rows_.resize(len);
    int64_t steps = 0;
    for (int64_t i = 0; i < len; ++i) {
      const int64_t id = tokens_.find(cand[i]);
      rows_[steps] = id * words_;
      steps += id >= 0;
    }
    v_.resize(words_);
    lcs_steps_any(std::make_integer_sequence<int64_t, kUnrolledWords>{}, v_.data(),
                  masks_.data(), rows_.data(), steps, words_);
    return lcs_from_state(v_.data(), words_, len_);
  }

 private:
  int64_t len_ = 0, words_ = 0;
  TokenIds tokens_;
  std::vector<int64_t> ids_, rows_;
  std::vector<uint64_t> masks_, v_;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> lcs_length_cpu(
    const at::Tensor& cand_values, const at::Tensor& cand_starts, const at::Tensor& cand_lengths,
    const at::Tensor& ref_values, const at::Tensor& ref_starts, const at::Tensor& ref_lengths,
    const at::Tensor& ref_index, bool validate) {
  const OverlapInputs inputs = checked_overlap_inputs(
      "lcs_length", cand_values, cand_starts, cand_lengths, ref_values, ref_starts, ref_lengths,
      ref_index, validate);
  const Sequences& cand = inputs.cand;
  const Sequences& ref = inputs.ref;
  const at::Tensor& ref_of = inputs.ref_index;
  at::Tensor out = at::zeros({cand.starts.numel()}, cand.values.options());
  const auto plan = candidates_by_reference(ref_of);
  const int64_t* cv = cand.values.data_ptr<int64_t>();
  const int64_t* cs = cand.starts.data_ptr<int64_t>();
  const int64_t* cl = cand.lengths.data_ptr<int64_t>();
  const int64_t* rv = ref.values.data_ptr<int64_t>();
  const int64_t* rs = ref.starts.data_ptr<int64_t>();
  const int64_t* rl = ref.lengths.data_ptr<int64_t>();
  int64_t* result = out.data_ptr<int64_t>();
  const int64_t tokens = cand.values.numel() + ref.values.numel();
  NegativeIdScan negative_ids(validate);
  for_each_task<ReferenceMatchMasks>(plan, tokens, [&](ReferenceMatchMasks& masks,
                                                        const CandidateTask& task) {
    negative_ids.add_ref(rv + rs[task.ref], rl[task.ref]);
    masks.build(rv + rs[task.ref], rl[task.ref]);
    for (int64_t k = task.begin; k < task.end; ++k) {
      const int64_t b = plan.order[k];
      negative_ids.add_cand(cv + cs[b], cl[b]);
      result[b] = masks.lcs(cv + cs[b], cl[b]);
    }
  });
  negative_ids.check("lcs_length", inputs, plan);
  return lcs_length_outputs(inputs, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(lambdapo, CPU, m) {
  m.impl("lcs_length", &lcs_length_cpu);
}

}  // namespace lambdapo
