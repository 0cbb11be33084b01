// Attention of one new query token per row over a key-value buffer (a decode step): argument
// checks shared by the CPU and CUDA kernels. q [B, Hkv, G, D] holds G query heads per key-value
// head; keys and values [B, Hkv, W, D] are buffers of W columns of which the first `seen` are
// attended; mask [B, W] is added to the scores (0, or -inf on padding).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <utility>

#include "argument_checks.h"

namespace lambdapo {

inline void check_decode_attention_args(const char* op, const at::Tensor& q,
                                        const at::Tensor& keys, const at::Tensor& values,
                                        const at::Tensor& mask, int64_t seen, double scale) {
  check_float_dtype(op, "q", q);
  TORCH_CHECK(q.dim() == 4 && q.size(3) > 0 && q.size(2) > 0, op,
              ": q must be [B, kv_heads, heads per kv head, head_dim] with non-empty heads, got "
              "shape ", q.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"keys", keys},
                                {"values", values}}) {
    TORCH_CHECK(t.dim() == 4 && t.size(0) == q.size(0) && t.size(1) == q.size(1) &&
                    t.size(3) == q.size(3),
                op, ": ", name, " must be [", q.size(0), ", ", q.size(1), ", W, ", q.size(3),
                "] (B, kv_heads and head_dim of q), got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ",
                t.scalar_type(), " but q has ", q.scalar_type());
    TORCH_CHECK(t.device() == q.device(), op, ": ", name, " is on ", t.device(),
                " but q is on ", q.device());
  }
  TORCH_CHECK(keys.size(2) == values.size(2), op, ": keys and values must have the same width, got ",
              keys.size(2), " and ", values.size(2));
  TORCH_CHECK_VALUE(seen >= 1 && seen <= keys.size(2), op, ": seen must lie in [1, ",
                    keys.size(2), "] (the buffers' width), got ", seen);
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  if (mask.defined()) {
    TORCH_CHECK(mask.dim() == 2 && mask.size(0) == q.size(0) && mask.size(1) >= seen, op,
                ": mask must be [", q.size(0), ", >= seen] (one additive row per batch row), "
                "got shape ", mask.sizes());
    TORCH_CHECK(mask.scalar_type() == q.scalar_type(), op, ": mask has dtype ",
                mask.scalar_type(), " but q has ", q.scalar_type());
    TORCH_CHECK(mask.device() == q.device(), op, ": mask is on ", mask.device(),
                " but q is on ", q.device());
  }
}

}  // namespace lambdapo
