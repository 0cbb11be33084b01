// linear_token_logprobs (DESIGN.md section 4): token log-probs and entropy of
// softmax((hidden @ weight^T + bias) / T) without materializing the [N, V] logits.
//
// Both passes walk tiles of `chunk` rows x `vocab_chunk` vocabulary entries; only one tile
// of logits exists at a time. The forward folds each tile into per-row online softmax state
// (max, sum exp, sum exp * shifted logit, target logit). The backward goes over vocabulary
// blocks, and within a block over row chunks, recomputing each tile's logits and turning
// them into dlogits in place from the saved per-row log-sum-exp and entropy, so that:
//   * a block's weight gradient is complete after its row chunks: written once in the
//     weight's dtype (one matmul when the block spans all rows; otherwise an fp32 block
//     accumulator for 16-bit weights), never an fp32 [V, H] buffer;
//   * the hidden gradient accumulates over blocks in place (fp32 [N, H] for 16-bit inputs,
//     none at all when one block spans the whole vocabulary);
//   * gradients not asked for (output_mask) cost neither a matmul nor a buffer.
// The matmuls are ATen's; a backend supplies the tile kernels and a 16-bit x 16-bit -> fp32
// accumulating matmul through `Kernels` (csrc/cpu and csrc/cuda).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace lambdapo {
namespace linear {

constexpr const char* kOp = "linear_token_logprobs";

// Columns of the per-row forward state.
enum StateColumn : int64_t { kMax = 0, kSumExp = 1, kSumExpShift = 2, kTargetLogit = 3 };
constexpr int64_t kStateColumns = 4;

// float32 results and state, float64 for float64 inputs (gradcheck).
inline at::ScalarType result_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool is_16_bit(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16;
}

// Everything a tile kernel needs, for one tile of rows [row0, row0 + rows) and vocabulary
// columns [col0, col0 + cols). `logits` is the contiguous [rows, cols] tile.
struct Tile {
  at::Tensor logits;
  at::Tensor targets;  // [rows] int64, each in [0, V) or ignore_index
  int64_t col0 = 0;
  double inv_temperature = 1.0;
  int64_t ignore_index = -100;
};

inline void check_args(const at::Tensor& hidden, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& targets,
                       double temperature, int64_t chunk_size, int64_t vocab_chunk_size) {
  TORCH_CHECK(hidden.dim() >= 1 && (hidden.scalar_type() == at::kFloat ||
                                    hidden.scalar_type() == at::kDouble ||
                                    is_16_bit(hidden.scalar_type())),
              kOp, ": hidden must be a floating-point tensor [..., H] (float32, float16, "
              "bfloat16 or float64), got ", hidden.scalar_type(), " of shape ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(-1), kOp,
              ": weight must be [V, H] with H = hidden.size(-1) = ", hidden.size(-1),
              ", got shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) > 0, kOp,
                    ": weight must have at least one row (a vocabulary of V > 0), got shape ",
                    weight.sizes());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), kOp, ": weight has dtype ",
              weight.scalar_type(), " but hidden has ", hidden.scalar_type());
  TORCH_CHECK(weight.device() == hidden.device(), kOp, ": weight is on ", weight.device(),
              " but hidden is on ", hidden.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), kOp,
                ": bias must be [V] with V = ", weight.size(0), ", got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == hidden.scalar_type() && bias->device() == hidden.device(),
                kOp, ": bias must have the dtype and device of hidden");
  }
  TORCH_CHECK(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt, kOp,
              ": targets must be int64 or int32, got ", targets.scalar_type());
  TORCH_CHECK(targets.device() == hidden.device(), kOp, ": targets is on ", targets.device(),
              " but hidden is on ", hidden.device());
  TORCH_CHECK(targets.sizes() == hidden.sizes().slice(0, hidden.dim() - 1), kOp,
              ": targets must have the leading shape of hidden ",
              hidden.sizes().slice(0, hidden.dim() - 1), ", got ", targets.sizes());
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, kOp,
                    ": temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK_VALUE(chunk_size > 0, kOp, ": chunk_size must be > 0, got ", chunk_size);
  TORCH_CHECK_VALUE(vocab_chunk_size > 0, kOp, ": vocab_chunk_size must be > 0, got ",
                    vocab_chunk_size);
}

// Targets as contiguous int64 [N], each ignore_index or in [0, V): one host read, skipped
// without validate (an unchecked out-of-range target then gives a NaN log-prob and adds no
// target term to the gradient; nothing is read out of bounds).
inline at::Tensor checked_targets(const at::Tensor& targets, int64_t vocab,
                                  int64_t ignore_index, bool validate) {
  at::Tensor flat = targets.reshape({-1}).to(at::kLong).contiguous();
  if (validate && flat.numel() > 0) {
    const bool ok = flat.eq(ignore_index).logical_or_(flat.ge(0).logical_and_(flat.lt(vocab)))
                        .all().item<bool>();
    TORCH_CHECK_VALUE(ok, kOp, ": targets must lie in [0, ", vocab, ") or equal ignore_index (",
                      ignore_index, ")");
  }
  return flat;
}

inline std::vector<int64_t> leading_shape(const at::Tensor& hidden) {
  const auto sizes = hidden.sizes();
  return std::vector<int64_t>(sizes.begin(), sizes.end() - 1);
}

// Logits of hidden rows h_rows [n, H] against vocabulary rows [col0, col0 + cols).
inline at::Tensor tile_logits(const at::Tensor& h_rows, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, int64_t col0,
                              int64_t cols) {
  const at::Tensor w = weight.narrow(0, col0, cols);
  return bias.has_value() ? at::addmm(bias->narrow(0, col0, cols), h_rows, w.t())
                          : at::mm(h_rows, w.t());
}

// C (+)= A @ B with C in the result dtype and A, B in the input dtype: for 16-bit inputs
// through the backend's fp32-accumulating matmul, never a rounded 16-bit partial sum.
template <typename Kernels>
void matmul_into(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (c.scalar_type() != a.scalar_type()) {
    Kernels::matmul_fp32_accumulate(c, a, b, accumulate);
  } else if (accumulate) {
    c.addmm_(a, b);
  } else {
    at::mm_out(c, a, b);
  }
}

// Forward: (logprobs, entropy or empty, lse), each of the leading shape of hidden.
template <typename Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, double temperature, int64_t ignore_index, bool return_entropy,
    int64_t chunk_size, int64_t vocab_chunk_size, bool validate) {
  check_args(hidden, weight, bias, targets, temperature, chunk_size, vocab_chunk_size);
  const int64_t rows = targets.numel(), vocab = weight.size(0);
  const at::Tensor h = hidden.reshape({rows, hidden.size(-1)}).contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor t = checked_targets(targets, vocab, ignore_index, validate);
  const auto opts = hidden.options().dtype(result_dtype(hidden.scalar_type()));
  at::Tensor state = at::empty({rows, kStateColumns}, opts);
  for (int64_t row0 = 0; row0 < rows; row0 += chunk_size) {
    const int64_t n = std::min(chunk_size, rows - row0);
    const at::Tensor h_rows = h.narrow(0, row0, n);
    at::Tensor state_rows = state.narrow(0, row0, n);
    for (int64_t col0 = 0; col0 < vocab; col0 += vocab_chunk_size) {
      const int64_t cols = std::min(vocab_chunk_size, vocab - col0);
      const Tile tile{tile_logits(h_rows, w, bias, col0, cols), t.narrow(0, row0, n), col0,
                      1.0 / temperature, ignore_index};
      Kernels::forward_tile(tile, state_rows, /*first=*/col0 == 0);
    }
  }
  // log-sum-exp, log-prob (<= 0) and entropy of each row from its state; 0 when ignored.
  const at::Tensor max = state.select(1, kMax), sum_exp = state.select(1, kSumExp);
  const at::Tensor log_sum = sum_exp.log();
  const at::Tensor kept = t.ne(ignore_index);
  const at::Tensor lse = at::where(kept, max + log_sum, 0.0);
  const at::Tensor logprobs =
      at::where(kept, (state.select(1, kTargetLogit) - lse).clamp_max_(0.0), 0.0);
  at::Tensor entropy = at::empty({0}, opts);
  if (return_entropy) {
    entropy = at::where(kept, log_sum - state.select(1, kSumExpShift) / sum_exp, 0.0);
  }
  const auto lead = leading_shape(hidden);
  return {logprobs.view(lead), return_entropy ? entropy.view(lead) : entropy, lse.view(lead)};
}

// Backward: (grad_hidden, grad_weight, grad_bias); a gradient not in output_mask (or the
// bias gradient without a bias) is an empty tensor and costs nothing. grad_hidden is in
// hidden's dtype, or with unrounded_grad_hidden in the result dtype (float32; float64 for
// float64 inputs), as accumulated: the vocabulary-parallel path sums the ranks' shares
// before its one rounding.
template <typename Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& entropy,
    double temperature, int64_t ignore_index, int64_t chunk_size, int64_t vocab_chunk_size,
    std::array<bool, 3> output_mask, bool validate, bool unrounded_grad_hidden) {
  check_args(hidden, weight, bias, targets, temperature, chunk_size, vocab_chunk_size);
  const auto lead = hidden.sizes().slice(0, hidden.dim() - 1);
  TORCH_CHECK(grad_logprobs.sizes() == lead && lse.sizes() == lead, kOp,
              ": grad_logprobs and lse must have the leading shape of hidden ", lead, ", got ",
              grad_logprobs.sizes(), " and ", lse.sizes());
  TORCH_CHECK(grad_logprobs.device() == hidden.device() && lse.device() == hidden.device(), kOp,
              ": grad_logprobs and lse must be on the device of hidden");
  if (grad_entropy.has_value()) {
    TORCH_CHECK(grad_entropy->sizes() == lead && entropy.sizes() == lead, kOp,
                ": a gradient for entropy needs grad_entropy and the forward's entropy of "
                "shape ", lead, ", got ", grad_entropy->sizes(), " and ", entropy.sizes());
    TORCH_CHECK(grad_entropy->device() == hidden.device() &&
                    entropy.device() == hidden.device(),
                kOp, ": grad_entropy and entropy must be on the device of hidden");
  }
  const bool need_hidden = output_mask[0], need_weight = output_mask[1];
  const bool need_bias = output_mask[2] && bias.has_value();
  const int64_t rows = targets.numel(), vocab = weight.size(0), width = hidden.size(-1);
  const auto dtype = hidden.scalar_type(), acc = result_dtype(dtype);
  // Distinct empty tensors for the gradients not computed: outputs must not alias.
  const auto shape = [](bool needed, std::vector<int64_t> sizes) {
    return needed ? sizes : std::vector<int64_t>{0};
  };
  at::Tensor grad_hidden = at::empty(shape(need_hidden, {rows, width}),
                                     hidden.options().dtype(unrounded_grad_hidden ? acc : dtype));
  at::Tensor grad_weight = at::empty(shape(need_weight, {vocab, width}), weight.options());
  at::Tensor grad_bias = at::empty({need_bias ? vocab : 0}, weight.options());
  const auto finish = [&]() -> std::tuple<at::Tensor, at::Tensor, at::Tensor> {
    return {need_hidden ? grad_hidden.view(hidden.sizes()) : grad_hidden, grad_weight,
            grad_bias};
  };
  if (!(need_hidden || need_weight || need_bias)) return finish();
  if (rows == 0) {
    if (need_weight) grad_weight.zero_();
    if (need_bias) grad_bias.zero_();
    return finish();
  }

  const at::Tensor h = hidden.reshape({rows, width}).contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor t = checked_targets(targets, vocab, ignore_index, validate);
  const auto per_row = [&](const at::Tensor& x) { return x.reshape({rows}).to(acc).contiguous(); };
  const at::Tensor g_lp = per_row(grad_logprobs), row_lse = per_row(lse);
  const bool with_entropy = grad_entropy.has_value();
  const at::Tensor g_h = with_entropy ? per_row(*grad_entropy) : at::Tensor();
  const at::Tensor row_h = with_entropy ? per_row(entropy) : at::Tensor();

  const int64_t vocab_blocks = (vocab + vocab_chunk_size - 1) / vocab_chunk_size;
  const int64_t row_chunks = (rows + chunk_size - 1) / chunk_size;
  // Where the hidden gradient accumulates over vocabulary blocks: in place, or in fp32 for
  // a 16-bit grad_hidden when there is more than one block.
  at::Tensor hidden_acc = grad_hidden;
  if (need_hidden && vocab_blocks > 1 && is_16_bit(grad_hidden.scalar_type())) {
    hidden_acc = at::empty({rows, width}, hidden.options().dtype(acc));
  }
  // Where a block's weight gradient accumulates over row chunks (16-bit, > 1 chunk only).
  const bool weight_block_acc = need_weight && row_chunks > 1 && is_16_bit(dtype);
  at::Tensor bias_acc = need_bias ? at::zeros({vocab}, weight.options().dtype(acc)) : at::Tensor();

  for (int64_t col0 = 0; col0 < vocab; col0 += vocab_chunk_size) {
    const int64_t cols = std::min(vocab_chunk_size, vocab - col0);
    const at::Tensor w_block = w.narrow(0, col0, cols);
    at::Tensor weight_block = need_weight ? grad_weight.narrow(0, col0, cols) : at::Tensor();
    at::Tensor weight_acc = weight_block_acc ? at::empty({cols, width}, weight.options().dtype(acc))
                                             : weight_block;
    for (int64_t row0 = 0; row0 < rows; row0 += chunk_size) {
      const int64_t n = std::min(chunk_size, rows - row0);
      const at::Tensor h_rows = h.narrow(0, row0, n);
      Tile tile{tile_logits(h_rows, w, bias, col0, cols), t.narrow(0, row0, n), col0,
                1.0 / temperature, ignore_index};
      Kernels::backward_tile(tile, g_lp.narrow(0, row0, n),
                             with_entropy ? g_h.narrow(0, row0, n) : g_h,
                             row_lse.narrow(0, row0, n),
                             with_entropy ? row_h.narrow(0, row0, n) : row_h);
      const at::Tensor& dlogits = tile.logits;  // [n, cols], overwritten in place
      if (need_weight) {
        matmul_into<Kernels>(weight_acc, dlogits.t(), h_rows, /*accumulate=*/row0 > 0);
      }
      if (need_hidden) {
        at::Tensor hidden_rows = hidden_acc.narrow(0, row0, n);
        matmul_into<Kernels>(hidden_rows, dlogits, w_block, /*accumulate=*/col0 > 0);
      }
      if (need_bias) bias_acc.narrow(0, col0, cols).add_(dlogits.sum(0, false, acc));
    }
    if (weight_block_acc) weight_block.copy_(weight_acc);
  }
  if (need_hidden && !hidden_acc.is_same(grad_hidden)) grad_hidden.copy_(hidden_acc);
  if (need_bias) grad_bias.copy_(bias_acc);
  return finish();
}

}  // namespace linear
}  // namespace lambdapo
