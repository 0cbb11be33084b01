// linear_policy_loss (DESIGN.md section 4, issue 40): the PPO-clip policy loss of the
// lm-head's logits, softmax((hidden @ weight^T + bias) / T), with its gradient made in the
// forward.
//
// A policy loss is a sum of per-token terms whose derivative with respect to the token's
// log-prob (and entropy) is known as soon as that log-prob is. So the forward walks row
// chunks whose full-vocabulary logits fit a memory budget, and for each chunk:
//   1. logits = h_rows @ W^T (+ bias)                 one matmul, into a reused tile buffer
//   2. a row kernel: softmax statistics (max, sum exp, sum exp * shift) -> log-prob and
//      entropy of the row -> the row's loss term and its derivatives g_lp, g_H (row_terms
//      below) -> the tile overwritten in place with dloss/dlogits;
//   3. grad_hidden rows = dlogits @ W                  (only when hidden needs a gradient)
//      grad_weight (+)= dlogits^T @ h_rows             (only when weight needs a gradient)
//      grad_bias   (+)= column sums of dlogits         (fp32 accumulator for 16-bit)
// Three matmuls in all, never an [N, V] tensor, nothing recomputed. The backward only scales
// the stored gradients by the upstream scalar (lambdapo_ext/policy_loss.py).
//
// The weight gradient is accumulated over row chunks in the weight's dtype: for 16-bit
// weights each chunk's product is computed with fp32 accumulation and rounded once when
// added (ceil(N / chunk_size) roundings; chunk_size >= N gives one). An fp32 [V, H]
// accumulator would cost twice the gradient's memory, which the op exists to avoid.
//
// The matmuls are ATen's; a backend supplies the row kernel through `Kernels::rows`.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#if defined(__CUDACC__)
#define LAMBDAPO_HOST_DEVICE __host__ __device__
#else
#define LAMBDAPO_HOST_DEVICE
#endif

namespace lambdapo {
namespace policy {

constexpr const char* kOp = "linear_policy_loss";

// float32 results, float64 for float64 inputs (gradcheck).
inline at::ScalarType result_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool is_float_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
         dtype == at::kBFloat16;
}

// The loss's scalar settings.
struct Settings {
  double kl_coef = 0.0;
  double entropy_coef = 0.0;
  double clip_low = 0.2;
  double clip_high = 0.2;
  double inv_temperature = 1.0;
  int64_t ignore_index = -100;
};

// A token's loss term and its derivatives with respect to the token's log-prob and entropy.
struct RowTerms {
  double loss;
  double grad_logprob;
  double grad_entropy;
};

// The loss term of one (not ignored) token, in double:
//   w * (-min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) + kl_coef k3 - entropy_coef H)
// with r = exp(lp - old) (old = lp when there is none: r = 1, the on-policy ratio) and
// k3 = exp(ref - lp) - (ref - lp) - 1. The KL and entropy terms are left out (not multiplied
// by 0) when their coefficient is 0. NaN in any input gives a NaN loss and gradient (the
// comparisons below pick the NaN-carrying branch), as torch's eager formula does.
LAMBDAPO_HOST_DEVICE inline RowTerms row_terms(double lp, double entropy, double advantage,
                                               double weight, double old, double ref,
                                               const Settings& s) {
  const double ratio = exp(lp - old);
  const double low = 1.0 - s.clip_low, high = 1.0 + s.clip_high;
  // A clamp that keeps NaN (fmin/fmax would drop it).
  const double clamped = ratio < low ? low : (ratio > high ? high : ratio);
  const double unclipped = ratio * advantage, clipped = clamped * advantage;
  // min picks the clipped term only when it is strictly smaller, which needs the ratio
  // outside the clip range: the clamp's gradient is 0 there. Otherwise d(-r A)/dlp = -r A.
  const bool take_clipped = clipped < unclipped;
  double loss = take_clipped ? -clipped : -unclipped;
  double grad_lp = take_clipped ? 0.0 : -unclipped;
  double grad_h = 0.0;
  if (s.kl_coef != 0.0) {
    const double d = ref - lp, e = exp(d);
    loss += s.kl_coef * (e - d - 1.0);
    grad_lp += s.kl_coef * (1.0 - e);
  }
  if (s.entropy_coef != 0.0) {
    loss -= s.entropy_coef * entropy;
    grad_h = -s.entropy_coef;
  }
  return {weight * loss, weight * grad_lp, weight * grad_h};
}

// Per-row inputs and outputs of one chunk, each [rows] contiguous in the result dtype
// (targets int64); `old` and `ref` are undefined when absent (not needed).
struct Chunk {
  at::Tensor logits;  // [rows, V] in the input dtype; overwritten with dlogits
  at::Tensor targets;
  at::Tensor advantages, token_weights, old, ref;
  at::Tensor logprobs, entropy, loss;  // outputs
  bool write_grad = true;               // false: the tile's values do not matter afterwards
};

inline void check_per_token(const char* name, const at::Tensor& x, const at::Tensor& hidden,
                            const at::Tensor& targets) {
  TORCH_CHECK(is_float_dtype(x.scalar_type()), kOp, ": ", name,
              " must be a floating-point tensor (float32, float16, bfloat16 or float64), got ",
              x.scalar_type());
  TORCH_CHECK(x.device() == hidden.device(), kOp, ": ", name, " is on ", x.device(),
              " but hidden is on ", hidden.device());
  TORCH_CHECK(x.sizes() == targets.sizes(), kOp, ": ", name,
              " must have the shape of targets ", targets.sizes(), " (one value per token), got ",
              x.sizes());
}

inline void check_args(const at::Tensor& hidden, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& targets,
                       const at::Tensor& advantages, const at::Tensor& token_weights,
                       const std::optional<at::Tensor>& old_logprobs,
                       const std::optional<at::Tensor>& ref_logprobs, double kl_coef,
                       double entropy_coef, double clip_low, double clip_high,
                       double temperature, int64_t chunk_size) {
  TORCH_CHECK(hidden.dim() >= 1 && is_float_dtype(hidden.scalar_type()), kOp,
              ": hidden must be a floating-point tensor [..., H] (float32, float16, bfloat16 or "
              "float64), got ", hidden.scalar_type(), " of shape ", hidden.sizes());
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
  check_per_token("advantages", advantages, hidden, targets);
  check_per_token("token_weights", token_weights, hidden, targets);
  if (old_logprobs.has_value()) check_per_token("old_logprobs", *old_logprobs, hidden, targets);
  if (ref_logprobs.has_value()) check_per_token("ref_logprobs", *ref_logprobs, hidden, targets);
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, kOp,
                    ": temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK_VALUE(clip_low >= 0 && clip_high >= 0, kOp,
                    ": clip_low and clip_high must be >= 0, got clip_low = ", clip_low,
                    ", clip_high = ", clip_high);
  TORCH_CHECK_VALUE(std::isfinite(kl_coef), kOp, ": kl_coef must be finite, got ", kl_coef);
  TORCH_CHECK_VALUE(std::isfinite(entropy_coef), kOp, ": entropy_coef must be finite, got ",
                    entropy_coef);
  TORCH_CHECK_VALUE(kl_coef == 0.0 || ref_logprobs.has_value(), kOp,
                    ": kl_coef = ", kl_coef, " needs ref_logprobs");
  TORCH_CHECK_VALUE(chunk_size > 0, kOp, ": chunk_size must be > 0, got ", chunk_size);
}

// Targets as contiguous int64 [N], each ignore_index or in [0, V): one host read, skipped
// without validate (an unchecked out-of-range target then gives a NaN log-prob, loss and
// gradient row; nothing is read out of bounds).
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

// (loss, logprobs, entropy, grad_hidden, grad_weight, grad_bias). A gradient left out of
// output_mask (or grad_bias without a bias) is an empty tensor and costs nothing.
template <typename Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& advantages, const at::Tensor& token_weights,
    const std::optional<at::Tensor>& old_logprobs, const std::optional<at::Tensor>& ref_logprobs,
    double kl_coef, double entropy_coef, double clip_low, double clip_high, double temperature,
    int64_t ignore_index, int64_t chunk_size, std::array<bool, 3> output_mask, bool validate) {
  check_args(hidden, weight, bias, targets, advantages, token_weights, old_logprobs,
             ref_logprobs, kl_coef, entropy_coef, clip_low, clip_high, temperature, chunk_size);
  const bool need_hidden = output_mask[0], need_weight = output_mask[1];
  const bool need_bias = output_mask[2] && bias.has_value();
  const bool need_grad = need_hidden || need_weight || need_bias;
  const int64_t rows = targets.numel(), vocab = weight.size(0), width = hidden.size(-1);
  const auto dtype = hidden.scalar_type(), acc = result_dtype(dtype);
  const auto acc_opts = hidden.options().dtype(acc);
  const Settings settings{kl_coef, entropy_coef, clip_low, clip_high, 1.0 / temperature,
                          ignore_index};

  const auto lead = hidden.sizes().slice(0, hidden.dim() - 1);
  at::Tensor logprobs = at::empty({rows}, acc_opts), entropy = at::empty({rows}, acc_opts);
  at::Tensor row_loss = at::empty({rows}, acc_opts);
  // Distinct empty tensors for the gradients not computed: outputs must not alias.
  const auto shape = [](bool needed, std::vector<int64_t> sizes) {
    return needed ? sizes : std::vector<int64_t>{0};
  };
  at::Tensor grad_hidden = at::empty(shape(need_hidden, {rows, width}), hidden.options());
  at::Tensor grad_weight = at::empty(shape(need_weight, {vocab, width}), weight.options());
  at::Tensor grad_bias = at::empty({need_bias ? vocab : 0}, weight.options());
  at::Tensor bias_acc = need_bias ? at::zeros({vocab}, acc_opts) : at::Tensor();
  if (rows == 0 && need_weight) grad_weight.zero_();

  const at::Tensor h = hidden.reshape({rows, width}).contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor t = checked_targets(targets, vocab, ignore_index, validate);
  const auto per_token = [&](const at::Tensor& x) { return x.reshape({rows}).to(acc).contiguous(); };
  const at::Tensor adv = per_token(advantages), tw = per_token(token_weights);
  const at::Tensor old = old_logprobs.has_value() ? per_token(*old_logprobs) : at::Tensor();
  const at::Tensor ref = kl_coef != 0.0 ? per_token(*ref_logprobs) : at::Tensor();

  const int64_t chunk = std::max<int64_t>(1, std::min(chunk_size, rows));
  // One tile buffer for every chunk (the last one uses its first rows).
  at::Tensor tile = at::empty({rows > 0 ? chunk : 0, vocab}, hidden.options());
  for (int64_t row0 = 0; row0 < rows; row0 += chunk) {
    const int64_t n = std::min(chunk, rows - row0);
    const at::Tensor h_rows = h.narrow(0, row0, n);
    at::Tensor logits = tile.narrow(0, 0, n);
    if (bias.has_value()) {
      at::addmm_out(logits, *bias, h_rows, w.t());
    } else {
      at::mm_out(logits, h_rows, w.t());
    }
    const auto part = [&](const at::Tensor& x) { return x.defined() ? x.narrow(0, row0, n) : x; };
    Chunk c{logits,          t.narrow(0, row0, n), adv.narrow(0, row0, n),
            tw.narrow(0, row0, n), part(old),      part(ref),
            logprobs.narrow(0, row0, n), entropy.narrow(0, row0, n),
            row_loss.narrow(0, row0, n), need_grad};
    Kernels::rows(c, settings);
    if (!need_grad) continue;
    const at::Tensor& dlogits = logits;  // overwritten in place
    if (need_hidden) {
      at::Tensor hidden_rows = grad_hidden.narrow(0, row0, n);
      at::mm_out(hidden_rows, dlogits, w);
    }
    if (need_weight) {
      if (row0 == 0) {
        at::mm_out(grad_weight, dlogits.t(), h_rows);
      } else {
        grad_weight.addmm_(dlogits.t(), h_rows);
      }
    }
    if (need_bias) bias_acc.add_(dlogits.sum(0, false, acc));
  }
  tile = at::Tensor();
  if (need_bias) grad_bias.copy_(bias_acc);
  const at::Tensor loss = row_loss.sum();
  return {loss, logprobs.view(lead), entropy.view(lead),
          need_hidden ? grad_hidden.view(hidden.sizes()) : grad_hidden, grad_weight,
          grad_bias};
}

}  // namespace policy
}  // namespace lambdapo
