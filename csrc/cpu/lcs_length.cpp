// CPU kernel of lcs_length: bit-parallel LCS (Hyyro 2004), 64 reference positions per
// word with the carry passed between words; the reference's match masks are built once
// (reference_masks) and shared by every candidate mapped to it.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "sequence_overlap.h"

namespace lambdapo {
namespace {

// LCS length of cand[0:n] against a reference of m tokens given its distinct tokens
// (sorted) and their masks of `words` words each.
int64_t lcs_bit_parallel(const int64_t* cand, int64_t n, int64_t m, const int64_t* tokens,
                         int64_t num_tokens, const uint64_t* masks, int64_t words,
                         std::vector<uint64_t>& v) {
  if (n == 0 || m == 0) return 0;
  v.assign(words, ~uint64_t{0});
  for (int64_t i = 0; i < n; ++i) {
    const int64_t* hit = std::lower_bound(tokens, tokens + num_tokens, cand[i]);
    if (hit == tokens + num_tokens || *hit != cand[i]) continue;  // no match: V unchanged
    lcs_step(v.data(), masks + (hit - tokens) * words, words);
  }
  return lcs_from_state(v.data(), words, m);
}

at::Tensor lcs_length_cpu(const at::Tensor& cand_values, const at::Tensor& cand_starts,
                          const at::Tensor& cand_lengths, const at::Tensor& ref_values,
                          const at::Tensor& ref_starts, const at::Tensor& ref_lengths,
                          const at::Tensor& ref_index, bool validate) {
  const auto [cand, ref, ref_of] = checked_overlap_inputs(
      "lcs_length", cand_values, cand_starts, cand_lengths, ref_values, ref_starts, ref_lengths,
      ref_index, validate);
  const ReferenceMasks rm = reference_masks(ref);
  at::Tensor out = at::zeros({cand.starts.numel()}, cand.values.options());
  const auto plan = candidates_by_reference(ref_of);
  const int64_t* cv = cand.values.data_ptr<int64_t>();
  const int64_t* cs = cand.starts.data_ptr<int64_t>();
  const int64_t* cl = cand.lengths.data_ptr<int64_t>();
  const int64_t* rl = ref.lengths.data_ptr<int64_t>();
  const int64_t* tokens = rm.tokens.data_ptr<int64_t>();
  const int64_t* token_offsets = rm.token_offsets.data_ptr<int64_t>();
  const int64_t* words = rm.words_per_ref.data_ptr<int64_t>();
  const int64_t* mask_offsets = rm.mask_offsets.data_ptr<int64_t>();
  const auto* masks = reinterpret_cast<const uint64_t*>(rm.masks.data_ptr<int64_t>());
  int64_t* result = out.data_ptr<int64_t>();
  at::parallel_for(0, static_cast<int64_t>(plan.tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint64_t> v;
    for (int64_t t = t0; t < t1; ++t) {
      const CandidateTask& task = plan.tasks[t];
      const int64_t r = task.ref;
      for (int64_t k = task.begin; k < task.end; ++k) {
        const int64_t b = plan.order[k];
        result[b] = lcs_bit_parallel(cv + cs[b], cl[b], rl[r], tokens + token_offsets[r],
                                     token_offsets[r + 1] - token_offsets[r],
                                     masks + mask_offsets[r], words[r], v);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lambdapo, CPU, m) {
  m.impl("lcs_length", &lcs_length_cpu);
}

}  // namespace lambdapo
