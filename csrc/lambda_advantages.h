// Pairwise lambda advantages (DESIGN.md section 2): argument checks and the device-generic
// layout of groups as contiguous segments, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>

namespace lambdapo {

enum class Normalize : int { Mean = 0, None = 1, Std = 2 };

// The normalize strings the kernels accept, the C++ owner of the list (Python's owner is
// lambdapo_ext.advantages.NORMALIZE_MODES; tests check that the two agree).
constexpr std::pair<std::string_view, Normalize> kNormalizeModes[] = {
    {"mean", Normalize::Mean}, {"none", Normalize::None}, {"std", Normalize::Std}};

inline Normalize parse_normalize(std::string_view normalize) {
  std::string known;
  for (const auto& [name, mode] : kNormalizeModes) {
    if (normalize == name) return mode;
    known += (known.empty() ? "\"" : ", \"") + std::string(name) + "\"";
  }
  TORCH_CHECK_VALUE(false, "lambda_advantages: normalize must be one of ", known, ", got \"",
                    std::string(normalize), "\"");
}

// Each advantage is summed in double from float partial sums of at most this many pair
// terms, on CPU and CUDA alike, so both keep one error bound whatever the group size: a
// partial's error stays below 128 * 2^-24 (8e-6) of its terms' magnitudes. They share the
// bound, not bit-identical results (they order the terms and evaluate exp differently). The
// inner loops keep float adds (a double add per pair made the CPU kernel 15-20% slower on the
// 2-core Xeon, and FP64 runs at 1/64 of the FP32 rate on consumer GPUs).
constexpr int64_t kPairsPerFloatPartial = 128;

// Groups as segments of flat float32 buffers in segment order: dense [P, G] groups are
// the rows; ragged groups (group ids in any order) are sorted into contiguous segments.
struct GroupSegments {
  at::Tensor rewards;  // [N] float32
  at::Tensor scores;   // [N] float32
  at::Tensor valid;    // [N] bool, or undefined when every member is valid
  int64_t dense_group_size = 0;  // > 0: group g is slots [g * G, (g + 1) * G), no tables
  // Ragged groups only:
  at::Tensor order;         // [N] int64 input position of each segment slot
  at::Tensor offsets;       // [num_groups + 1] int64 (group table; needs a host sync)
  at::Tensor member_begin;  // [N] int64 first slot of each slot's group (no host sync)
  at::Tensor member_end;    // [N] int64 one past its group's last slot
  int64_t num_groups = -1;      // -1: unknown (ragged without a group table)
  int64_t max_group_size = -1;  // -1: unknown
};

// What a backend needs of ragged groups: the group table (offsets, num_groups,
// max_group_size: read back from the device) and/or per-slot group bounds (sync-free).
struct RaggedLayout {
  bool group_table = true;
  bool member_bounds = false;
};

inline void check_lambda_advantages_args(const at::Tensor& rewards, const at::Tensor& scores,
                                         const std::optional<at::Tensor>& mask,
                                         const std::optional<at::Tensor>& group_ids,
                                         double beta, double eps, bool validate) {
  TORCH_CHECK(rewards.is_floating_point(),
              "lambda_advantages: rewards must be a floating-point tensor, got ",
              rewards.scalar_type());
  TORCH_CHECK(scores.is_floating_point(),
              "lambda_advantages: scores must be a floating-point tensor, got ",
              scores.scalar_type());
  TORCH_CHECK(scores.device() == rewards.device(), "lambda_advantages: scores is on ",
              scores.device(), " but rewards is on ", rewards.device());
  TORCH_CHECK(scores.sizes() == rewards.sizes(), "lambda_advantages: scores has shape ",
              scores.sizes(), " but rewards has shape ", rewards.sizes());
  if (group_ids.has_value()) {
    const at::Tensor& ids = *group_ids;
    TORCH_CHECK(rewards.dim() == 1,
                "lambda_advantages: with group_ids, rewards must be 1-D [N], got shape ",
                rewards.sizes());
    TORCH_CHECK(!ids.is_floating_point() && !ids.is_complex() && ids.scalar_type() != at::kBool,
                "lambda_advantages: group_ids must be an integer tensor, got ",
                ids.scalar_type());
    TORCH_CHECK(ids.device() == rewards.device(), "lambda_advantages: group_ids is on ",
                ids.device(), " but rewards is on ", rewards.device());
    TORCH_CHECK(ids.sizes() == rewards.sizes(), "lambda_advantages: group_ids has shape ",
                ids.sizes(), " but rewards has shape ", rewards.sizes());
    TORCH_CHECK_VALUE(!validate || ids.numel() == 0 || ids.min().item<int64_t>() >= 0,
                      "lambda_advantages: group_ids must be non-negative");
  } else {
    TORCH_CHECK(rewards.dim() == 2,
                "lambda_advantages: rewards must be 2-D [P, G] (or 1-D [N] with group_ids), "
                "got shape ", rewards.sizes());
  }
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool,
                "lambda_advantages: mask must be a bool tensor, got ", mask->scalar_type());
    TORCH_CHECK(mask->device() == rewards.device(), "lambda_advantages: mask is on ",
                mask->device(), " but rewards is on ", rewards.device());
    TORCH_CHECK(mask->sizes() == rewards.sizes(), "lambda_advantages: mask has shape ",
                mask->sizes(), " but rewards has shape ", rewards.sizes());
  }
  TORCH_CHECK_VALUE(std::isfinite(beta), "lambda_advantages: beta must be finite, got ", beta);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0,
                    "lambda_advantages: eps must be finite and >= 0, got ", eps);
}

// Lays dense [P, G] groups, or ragged groups given by group ids in any order, out as
// contiguous segments. Runs on the inputs' device; only the ragged group table reads
// values back.
inline GroupSegments make_group_segments(const at::Tensor& rewards, const at::Tensor& scores,
                                         const std::optional<at::Tensor>& mask,
                                         const std::optional<at::Tensor>& group_ids,
                                         RaggedLayout layout) {
  GroupSegments seg;
  if (!group_ids.has_value()) {
    seg.rewards = rewards.to(at::kFloat).contiguous().view({-1});
    seg.scores = scores.to(at::kFloat).contiguous().view({-1});
    if (mask.has_value()) seg.valid = mask->contiguous().view({-1});
    seg.dense_group_size = rewards.size(1);
    seg.num_groups = rewards.size(0);
    seg.max_group_size = rewards.size(1);
    return seg;
  }
  auto [sorted_ids, order] = at::sort(group_ids->to(at::kLong), /*stable=*/true, 0, false);
  seg.order = order;
  seg.rewards = rewards.to(at::kFloat).index_select(0, order);
  seg.scores = scores.to(at::kFloat).index_select(0, order);
  if (mask.has_value()) seg.valid = mask->index_select(0, order);
  if (layout.member_bounds) {
    seg.member_begin = at::searchsorted(sorted_ids, sorted_ids, /*out_int32=*/false,
                                        /*right=*/false);
    seg.member_end = at::searchsorted(sorted_ids, sorted_ids, /*out_int32=*/false,
                                      /*right=*/true);
  }
  if (layout.group_table) {
    auto [unique_ids, inverse, counts] =
        at::unique_consecutive(sorted_ids, /*return_inverse=*/false, /*return_counts=*/true);
    seg.offsets = at::cat({at::zeros({1}, counts.options()), counts.cumsum(0)});
    seg.num_groups = counts.numel();
    seg.max_group_size = counts.numel() ? counts.max().item<int64_t>() : 0;
  }
  return seg;
}

// Finiteness of the valid members as a backend's kernel found it while reading them
// (masked-out members may hold anything, e.g. padding).
inline void check_valid_members_finite(bool rewards_finite, bool scores_finite) {
  TORCH_CHECK_VALUE(rewards_finite,
                    "lambda_advantages: rewards holds non-finite values in valid members");
  TORCH_CHECK_VALUE(scores_finite,
                    "lambda_advantages: scores holds non-finite values in valid members");
}

// The whole op around a backend's segment kernel:
// kernel(segments, beta, normalize, eps, validate, out[N] float32 in input order).
// validate=False trusts group ids and finiteness; with RaggedLayout{false, true} the op
// then reads nothing back from the device.
template <typename SegmentKernel>
at::Tensor lambda_advantages_impl(const at::Tensor& rewards, const at::Tensor& scores,
                                  const std::optional<at::Tensor>& mask,
                                  const std::optional<at::Tensor>& group_ids, double beta,
                                  std::string_view normalize, double eps, bool validate,
                                  RaggedLayout layout, SegmentKernel&& kernel) {
  const Normalize norm = parse_normalize(normalize);
  check_lambda_advantages_args(rewards, scores, mask, group_ids, beta, eps, validate);
  if (rewards.numel() == 0) return at::zeros(rewards.sizes(), rewards.options().dtype(at::kFloat));
  const GroupSegments seg = make_group_segments(rewards, scores, mask, group_ids, layout);
  at::Tensor out = at::empty({rewards.numel()}, rewards.options().dtype(at::kFloat));
  kernel(seg, static_cast<float>(beta), norm, eps, validate, out);
  return out.view(rewards.sizes());
}

}  // namespace lambdapo
