// CPU kernel of lambda_advantages: groups in parallel, O(G) extra memory per group; large
// groups evaluate each pair once (w_ij = w_ji), mid-sized ones whole rows, and dense groups
// of up to 64 members many groups per vector step, in loops the compiler vectorizes per ISA.
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

// Dense groups of at most kLaneMajorMaxGroup members (GRPO-style G = 4 to 64) go lane-major:
// a block of groups is transposed to [member][group] so that each pair (i, j), i < j, is
// evaluated once for kLanes groups per vector step; within one group the vector loops would
// be a few lanes long. Every group of a block, padded to whole lane sets, runs the same
// fixed-width loops, so its result does not depend on where it sits in the batch.
constexpr int64_t kLaneMajorMaxGroup = 64;
constexpr int64_t kLanes = 16;
constexpr int64_t kGroupsPerBlock = 64;

// adv[i][c] = sum over valid j != i of the pair terms of group c (lanes [0, lanes), a
// multiple of kLanes); valid may be null (all valid). At most G - 1 < kPairsPerFloatPartial
// terms per member: one float partial each.
LAMBDAPO_ISA_CLONES
void accumulate_lane_major(const float* __restrict r, const float* __restrict s,
                           const float* __restrict valid, float* __restrict adv, int64_t g,
                           int64_t lanes, float beta) {
  for (int64_t k = 0; k < g * lanes; ++k) adv[k] = 0.0f;
  for (int64_t c0 = 0; c0 < lanes; c0 += kLanes) {
    for (int64_t i = 0; i < g; ++i) {
      const float* ri = r + i * lanes + c0;
      const float* si = s + i * lanes + c0;
      float* ai = adv + i * lanes + c0;
      for (int64_t j = i + 1; j < g; ++j) {
        const float* rj = r + j * lanes + c0;
        const float* sj = s + j * lanes + c0;
        float* aj = adv + j * lanes + c0;
        if (valid == nullptr) {
#pragma omp simd
          for (int64_t l = 0; l < kLanes; ++l) {
            const float term = pair_term(ri[l], si[l], rj[l], sj[l], beta);
            ai[l] += term;
            aj[l] -= term;
          }
        } else {
          const float* vi = valid + i * lanes + c0;
          const float* vj = valid + j * lanes + c0;
#pragma omp simd
          for (int64_t l = 0; l < kLanes; ++l) {
            // A masked member may hold NaN: select the term away, do not multiply it.
            const float term = vi[l] * vj[l] != 0.0f
                                   ? pair_term(ri[l], si[l], rj[l], sj[l], beta)
                                   : 0.0f;
            ai[l] += term;
            aj[l] -= term;
          }
        }
      }
    }
  }
}

struct LaneMajorScratch {
  std::vector<float> r, s, valid, adv;
};

// Groups [g_begin, g_end) of dense [P, g] inputs, lane-major (see kLaneMajorMaxGroup).
void lane_major_groups(const float* rewards, const float* scores, const bool* valid, int64_t g,
                       int64_t g_begin, int64_t g_end, float beta, Normalize norm, double eps,
                       bool validate, bool& rewards_finite, bool& scores_finite, float* result,
                       LaneMajorScratch& scratch) {
  const int64_t count = g_end - g_begin;
  const int64_t lanes = (count + kLanes - 1) / kLanes * kLanes;
  scratch.r.assign(g * lanes, 0.0f);
  scratch.s.assign(g * lanes, 0.0f);
  scratch.adv.resize(g * lanes);
  if (valid != nullptr) scratch.valid.assign(g * lanes, 0.0f);  // padding lanes: invalid
  for (int64_t c = 0; c < count; ++c) {
    const int64_t row = (g_begin + c) * g;
    for (int64_t i = 0; i < g; ++i) {
      const bool member = valid == nullptr || valid[row + i];
      if (validate && member) {
        rewards_finite &= std::isfinite(rewards[row + i]);
        scores_finite &= std::isfinite(scores[row + i]);
      }
      scratch.r[i * lanes + c] = rewards[row + i];
      scratch.s[i * lanes + c] = scores[row + i];
      if (valid != nullptr) scratch.valid[i * lanes + c] = member ? 1.0f : 0.0f;
    }
  }
  accumulate_lane_major(scratch.r.data(), scratch.s.data(),
                        valid != nullptr ? scratch.valid.data() : nullptr, scratch.adv.data(), g,
                        lanes, beta);
  for (int64_t c = 0; c < count; ++c) {
    const int64_t row = (g_begin + c) * g;
    int64_t n = 0;
    double mean = 0.0;
    for (int64_t i = 0; i < g; ++i) {
      if (valid != nullptr && !valid[row + i]) continue;
      ++n;
      mean += rewards[row + i];
    }
    double scale = norm == Normalize::None ? 1.0 : 1.0 / static_cast<double>(n - 1);
    if (norm == Normalize::Std && n >= 2) {
      mean /= static_cast<double>(n);
      double m2 = 0.0;
      for (int64_t i = 0; i < g; ++i) {
        if (valid != nullptr && !valid[row + i]) continue;
        m2 += (rewards[row + i] - mean) * (rewards[row + i] - mean);
      }
      scale /= std::sqrt(m2 / static_cast<double>(n)) + eps;
    }
    for (int64_t i = 0; i < g; ++i) {
      const bool member = valid == nullptr || valid[row + i];
      result[row + i] = member && n >= 2
                            ? static_cast<float>(static_cast<double>(scratch.adv[i * lanes + c]) *
                                                 scale)
                            : 0.0f;
    }
  }
}

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
  if (dense_size > 0 && dense_size <= kLaneMajorMaxGroup && order == nullptr) {
    const int64_t blocks = (seg.num_groups + kGroupsPerBlock - 1) / kGroupsPerBlock;
    at::parallel_for(0, blocks, 1, [&](int64_t b_begin, int64_t b_end) {
      LaneMajorScratch scratch;
      bool r_ok = true, s_ok = true;
      for (int64_t b = b_begin; b < b_end; ++b) {
        lane_major_groups(rewards, scores, valid, dense_size, b * kGroupsPerBlock,
                          std::min(seg.num_groups, (b + 1) * kGroupsPerBlock), beta, norm, eps,
                          validate, r_ok, s_ok, result, scratch);
      }
      if (!r_ok) rewards_finite = false;
      if (!s_ok) scores_finite = false;
    });
    check_valid_members_finite(rewards_finite, scores_finite);
    return;
  }
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
