// CPU kernel of lambda_advantages: groups in parallel, O(G) extra memory per group; large
// groups evaluate each pair once (w_ij = w_ji), small ones whole rows, in loops the
// compiler vectorizes per ISA.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

#include "lambda_advantages.h"
#include "vectorizable_math.h"

namespace lambdapo {
namespace {

// (r_i - r_j) w_ij with w = 2 sigmoid(-beta sign(dr) ds) = 2 / (1 + exp(beta sign(dr) ds)).
// Ties give dr = 0 and so contribute nothing whatever their weight.
inline __attribute__((always_inline)) float pair_term(float ri, float si, float rj, float sj,
                                                      float beta) {
  const float dr = ri - rj;
  const float sign = static_cast<float>(dr > 0.0f) - static_cast<float>(dr < 0.0f);
  return dr * 2.0f / (1.0f + exp_vectorizable(beta * sign * (si - sj)));
}

// Pairs (i, j) for j > i: adds sum_j (r_i - r_j) w_ij to adv[i] and subtracts each term
// from adv[j]. Float partials of at most kPairsPerFloatPartial terms (lambda_advantages.h):
// a row's in chunks of columns, and column j's in `partial` over a block of that many rows,
// flushed into the double adv after each block.
LAMBDAPO_ISA_CLONES
void accumulate_pairs(const float* __restrict r, const float* __restrict s,
                      double* __restrict adv, float* __restrict partial, int64_t n, float beta) {
  for (int64_t i0 = 0; i0 + 1 < n; i0 += kPairsPerFloatPartial) {
    const int64_t i1 = std::min(n - 1, i0 + kPairsPerFloatPartial);
    for (int64_t j = i0 + 1; j < n; ++j) partial[j] = 0.0f;
    for (int64_t i = i0; i < i1; ++i) {
      const float ri = r[i], si = s[i];
      double row = 0.0;
      for (int64_t j0 = i + 1; j0 < n; j0 += kPairsPerFloatPartial) {
        const int64_t j1 = std::min(n, j0 + kPairsPerFloatPartial);
        float row_part = 0.0f;
#pragma omp simd reduction(+ : row_part)
        for (int64_t j = j0; j < j1; ++j) {
          const float term = pair_term(ri, si, r[j], s[j], beta);
          row_part += term;
          partial[j] -= term;
        }
        row += row_part;
      }
      adv[i] += row;
    }
    for (int64_t j = i0 + 1; j < n; ++j) adv[j] += partial[j];
  }
}

// Whole rows, no symmetry: twice the exps but one reduction per row and full-length
// vector loops; faster for small groups, where the symmetric loop's trip counts are short.
LAMBDAPO_ISA_CLONES
void accumulate_rows(const float* __restrict r, const float* __restrict s,
                     double* __restrict adv, int64_t n, float beta) {
  for (int64_t i = 0; i < n; ++i) {
    const float ri = r[i], si = s[i];
    double row = 0.0;
    for (int64_t j0 = 0; j0 < n; j0 += kPairsPerFloatPartial) {
      const int64_t j1 = std::min(n, j0 + kPairsPerFloatPartial);
      float row_part = 0.0f;
#pragma omp simd reduction(+ : row_part)
      for (int64_t j = j0; j < j1; ++j) row_part += pair_term(ri, si, r[j], s[j], beta);
      row += row_part;
    }
    adv[i] = row;
  }
}

// Measured crossover between the two loops (2-core Xeon, AVX-512): rows win up to ~200.
constexpr int64_t kWholeRowsMaxGroup = 192;

struct GroupScratch {
  std::vector<float> r, s, partial;
  std::vector<double> adv;
  std::vector<int64_t> slot;
};

void lambda_advantages_segments_cpu(const GroupSegments& seg, float beta, Normalize norm,
                                    double eps, bool validate, at::Tensor& out) {
  const float* rewards = seg.rewards.data_ptr<float>();
  const float* scores = seg.scores.data_ptr<float>();
  const bool* valid = seg.valid.defined() ? seg.valid.data_ptr<bool>() : nullptr;
  const int64_t dense_size = seg.dense_group_size;
  const int64_t* offsets = dense_size > 0 ? nullptr : seg.offsets.data_ptr<int64_t>();
  const int64_t* order = seg.order.defined() ? seg.order.data_ptr<int64_t>() : nullptr;
  float* result = out.data_ptr<float>();

  std::atomic<bool> rewards_finite{true}, scores_finite{true};
  // Grain: about 2^16 pair evaluations per task, so small groups are batched per thread.
  const int64_t pairs = std::max<int64_t>(1, seg.max_group_size * seg.max_group_size);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / pairs);
  at::parallel_for(0, seg.num_groups, grain, [&](int64_t g_begin, int64_t g_end) {
    GroupScratch scratch;
    for (int64_t g = g_begin; g < g_end; ++g) {
      const int64_t begin = offsets ? offsets[g] : g * dense_size;
      const int64_t size = offsets ? offsets[g + 1] - begin : dense_size;
      for (int64_t k = begin; k < begin + size; ++k) result[order ? order[k] : k] = 0.0f;
      // Valid members, compacted so the pair loop has no masking.
      scratch.r.clear();
      scratch.s.clear();
      scratch.slot.clear();
      for (int64_t k = begin; k < begin + size; ++k) {
        if (valid != nullptr && !valid[k]) continue;
        if (validate && !std::isfinite(rewards[k])) rewards_finite = false;
        if (validate && !std::isfinite(scores[k])) scores_finite = false;
        scratch.r.push_back(rewards[k]);
        scratch.s.push_back(scores[k]);
        scratch.slot.push_back(order ? order[k] : k);
      }
      const int64_t n = static_cast<int64_t>(scratch.slot.size());
      if (n < 2) continue;
      scratch.adv.assign(n, 0.0);
      if (n <= kWholeRowsMaxGroup) {
        accumulate_rows(scratch.r.data(), scratch.s.data(), scratch.adv.data(), n, beta);
      } else {
        scratch.partial.resize(n);
        accumulate_pairs(scratch.r.data(), scratch.s.data(), scratch.adv.data(),
                         scratch.partial.data(), n, beta);
      }

      double scale = norm == Normalize::None ? 1.0 : 1.0 / static_cast<double>(n - 1);
      if (norm == Normalize::Std) {
        double mean = 0.0, m2 = 0.0;
        for (float v : scratch.r) mean += v;
        mean /= static_cast<double>(n);
        for (float v : scratch.r) m2 += (v - mean) * (v - mean);
        scale /= std::sqrt(m2 / static_cast<double>(n)) + eps;
      }
      for (int64_t k = 0; k < n; ++k) {
        result[scratch.slot[k]] = static_cast<float>(scratch.adv[k] * scale);
      }
    }
  });
  check_valid_members_finite(rewards_finite, scores_finite);
}

at::Tensor lambda_advantages_cpu(const at::Tensor& rewards, const at::Tensor& scores,
                                 const std::optional<at::Tensor>& mask,
                                 const std::optional<at::Tensor>& group_ids, double beta,
                                 c10::string_view normalize, double eps, bool validate) {
  return lambda_advantages_impl(rewards, scores, mask, group_ids, beta,
                                std::string_view(normalize.data(), normalize.size()), eps,
                                validate, RaggedLayout{}, lambda_advantages_segments_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(lambdapo, CPU, m) {
  m.impl("lambda_advantages", &lambda_advantages_cpu);
}

}  // namespace lambdapo
