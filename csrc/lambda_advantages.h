// Pairwise lambda advantages (DESIGN.md section 2): argument checks and the device-generic
// layout of groups as contiguous segments, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string_view>
#include <utility>

namespace lambdapo {

enum class Normalize : int { Mean = 0, None = 1, Std = 2 };

inline Normalize parse_normalize(std::string_view normalize) {
  if (normalize == "mean") return Normalize::Mean;
  if (normalize == "none") return Normalize::None;
  if (normalize == "std") return Normalize::Std;
  TORCH_CHECK_VALUE(false, "lambda_advantages: normalize must be one of \"mean\", \"none\", "
                    "\"std\", got \"", std::string(normalize), "\"");
}

// Groups as segments [offsets[g], offsets[g+1]) of flat float32 buffers in segment order.
struct GroupSegments {
  at::Tensor rewards;  // [N] float32
  at::Tensor scores;   // [N] float32
  at::Tensor valid;    // [N] bool, or undefined when every member is valid
  at::Tensor offsets;  // [num_groups + 1] int64, on the inputs' device
  at::Tensor order;    // [N] int64 input position of each segment slot; undefined if dense
  int64_t num_groups = 0;
  int64_t max_group_size = 0;
};

inline void check_lambda_advantages_args(const at::Tensor& rewards, const at::Tensor& scores,
                                         const std::optional<at::Tensor>& mask,
                                         const std::optional<at::Tensor>& group_ids,
                                         double beta, double eps) {
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
    TORCH_CHECK_VALUE(ids.numel() == 0 || ids.min().item<int64_t>() >= 0,
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
// contiguous segments. Runs on the inputs' device.
inline GroupSegments make_group_segments(const at::Tensor& rewards, const at::Tensor& scores,
                                         const std::optional<at::Tensor>& mask,
                                         const std::optional<at::Tensor>& group_ids) {
  GroupSegments seg;
  const auto long_opts = rewards.options().dtype(at::kLong);
  if (!group_ids.has_value()) {
    const int64_t P = rewards.size(0), G = rewards.size(1);
    seg.rewards = rewards.to(at::kFloat).contiguous().view({-1});
    seg.scores = scores.to(at::kFloat).contiguous().view({-1});
    if (mask.has_value()) seg.valid = mask->contiguous().view({-1});
    seg.offsets = at::arange(P + 1, long_opts).mul_(G);
    seg.num_groups = P;
    seg.max_group_size = G;
    return seg;
  }
  auto [sorted_ids, order] = at::sort(group_ids->to(at::kLong), /*stable=*/true, 0, false);
  auto [unique_ids, inverse, counts] =
      at::unique_consecutive(sorted_ids, /*return_inverse=*/false, /*return_counts=*/true);
  seg.order = order;
  seg.rewards = rewards.to(at::kFloat).index_select(0, order);
  seg.scores = scores.to(at::kFloat).index_select(0, order);
  if (mask.has_value()) seg.valid = mask->index_select(0, order);
  seg.offsets = at::cat({at::zeros({1}, long_opts), counts.cumsum(0)});
  seg.num_groups = counts.numel();
  seg.max_group_size = counts.numel() ? counts.max().item<int64_t>() : 0;
  return seg;
}

// Masked-out members may hold anything (padding); valid ones must be finite. Backends
// whose kernel does not check as it reads (CUDA) call this on the segments.
inline void check_valid_members_finite(const GroupSegments& seg) {
  for (const auto& [name, values] : {std::pair<const char*, const at::Tensor&>{"rewards", seg.rewards},
                                     std::pair<const char*, const at::Tensor&>{"scores", seg.scores}}) {
    at::Tensor finite = at::isfinite(values);
    if (seg.valid.defined()) finite.logical_or_(seg.valid.logical_not());
    TORCH_CHECK_VALUE(finite.all().item<bool>(), "lambda_advantages: ", name,
                      " holds non-finite values in valid members");
  }
}

// Puts per-segment results back in input order and shape.
inline at::Tensor scatter_to_input_order(const GroupSegments& seg, const at::Tensor& out_segments,
                                         const at::Tensor& rewards) {
  if (!seg.order.defined()) return out_segments.view(rewards.sizes());
  at::Tensor out = at::empty_like(out_segments);
  out.index_copy_(0, seg.order, out_segments);
  return out;
}

// The whole op around a backend's segment kernel:
// kernel(segments, beta, normalize, eps, out[N] float32).
template <typename SegmentKernel>
at::Tensor lambda_advantages_impl(const at::Tensor& rewards, const at::Tensor& scores,
                                  const std::optional<at::Tensor>& mask,
                                  const std::optional<at::Tensor>& group_ids, double beta,
                                  std::string_view normalize, double eps,
                                  SegmentKernel&& kernel) {
  const Normalize norm = parse_normalize(normalize);
  check_lambda_advantages_args(rewards, scores, mask, group_ids, beta, eps);
  if (rewards.numel() == 0) return at::zeros(rewards.sizes(), rewards.options().dtype(at::kFloat));
  GroupSegments seg = make_group_segments(rewards, scores, mask, group_ids);
  at::Tensor out = at::empty({rewards.numel()}, rewards.options().dtype(at::kFloat));
  kernel(seg, static_cast<float>(beta), norm, eps, out);
  return scatter_to_input_order(seg, out, rewards);
}

}  // namespace lambdapo
