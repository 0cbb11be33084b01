// Fused token log-probs and entropy (DESIGN.md section 4): argument checks and the row
// layout shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

namespace lambdapo {

// Probabilities, log-probs and entropies come out in float32, or float64 for float64
// logits (so that gradcheck can run in double precision).
inline at::ScalarType token_logprobs_result_dtype(at::ScalarType logits_dtype) {
  return logits_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_token_logprobs_args(const char* op, const at::Tensor& logits,
                                      const at::Tensor& targets, double temperature) {
  // 16-bit and fp32 for use, fp64 for gradcheck.
  const at::ScalarType dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                  dtype == at::kDouble,
              op, ": logits must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK(logits.dim() >= 1 && logits.size(-1) > 0, op,
              ": logits must have a non-empty last (vocabulary) dimension, got shape ",
              logits.sizes());
  TORCH_CHECK(logits.stride(-1) == 1, op, ": logits must be contiguous in its last dimension");
  TORCH_CHECK(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt, op,
              ": targets must be int64 or int32, got ", targets.scalar_type());
  TORCH_CHECK(targets.device() == logits.device(), op, ": targets is on ", targets.device(),
              " but logits is on ", logits.device());
  TORCH_CHECK(targets.sizes() == logits.sizes().slice(0, logits.dim() - 1), op,
              ": targets must have the leading shape of logits ",
              logits.sizes().slice(0, logits.dim() - 1), ", got ", targets.sizes());
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, op,
                    ": temperature must be finite and > 0, got ", temperature);
}

// Targets as contiguous int64 [N]; with validate, checked (a host sync on CUDA): each is
// ignore_index or in [0, V). Unchecked, the kernels still never read outside a row: a
// target out of range gives a NaN log-prob and no target term in the gradient.
inline at::Tensor checked_targets(const char* op, const at::Tensor& targets, int64_t vocab,
                                  int64_t ignore_index, bool validate) {
  at::Tensor flat = targets.reshape({-1}).to(at::kLong).contiguous();
  if (validate && flat.numel() > 0) {
    const bool ok = flat.eq(ignore_index).logical_or_(flat.ge(0).logical_and_(flat.lt(vocab)))
                        .all().item<bool>();
    TORCH_CHECK_VALUE(ok, op, ": targets must lie in [0, ", vocab, ") or equal ignore_index (",
                      ignore_index, ")");
  }
  return flat;
}

// Element offset of each row of logits [..., V]: rows may be strided (a slice such as
// logits[:, :-1]) without a copy. O(N) int64 on the logits' device.
inline at::Tensor row_offsets(const at::Tensor& logits) {
  const auto opts = logits.options().dtype(at::kLong);
  at::Tensor offsets = at::zeros({1}, opts);
  for (int64_t d = 0; d + 1 < logits.dim(); ++d) {
    offsets = (offsets.unsqueeze(1) + at::arange(logits.size(d), opts).mul_(logits.stride(d)))
                  .reshape({-1});
  }
  return offsets;
}

inline std::vector<int64_t> leading_shape(const at::Tensor& logits) {
  const auto sizes = logits.sizes();
  return std::vector<int64_t>(sizes.begin(), sizes.end() - 1);
}

// Rows may share memory (stride 0, or strides shorter than a row) for reading, never for
// writing gradients in place. Sufficient test: with the dimensions of size > 1 sorted by
// stride, each stride passes the last element reachable through the smaller ones.
inline void check_rows_writable(const char* op, const at::Tensor& logits) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  for (int64_t d = 0; d < logits.dim(); ++d) {
    if (logits.size(d) > 1) dims.emplace_back(logits.stride(d), logits.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t reach = 0;  // largest offset reachable through the dimensions seen so far
  for (const auto& [stride, size] : dims) {
    TORCH_CHECK(stride > reach, op,
                ": in-place backward needs logits whose rows do not overlap in memory (got "
                "sizes ", logits.sizes(), " and strides ", logits.strides(),
                "); pass inplace_backward=False or contiguous logits");
    reach += (size - 1) * stride;
  }
}

inline void check_backward_args(const char* op, const at::Tensor& grad_logprobs,
                                const std::optional<at::Tensor>& grad_entropy,
                                const at::Tensor& logits, const at::Tensor& lse,
                                const at::Tensor& entropy) {
  const auto lead = logits.sizes().slice(0, logits.dim() - 1);
  TORCH_CHECK(grad_logprobs.sizes() == lead, op, ": grad_logprobs must have shape ", lead,
              ", got ", grad_logprobs.sizes());
  TORCH_CHECK(lse.sizes() == lead, op, ": lse must have shape ", lead, ", got ", lse.sizes());
  TORCH_CHECK(grad_logprobs.device() == logits.device() && lse.device() == logits.device(), op,
              ": grad_logprobs and lse must be on the device of logits (", logits.device(), ")");
  if (grad_entropy.has_value()) {
    TORCH_CHECK(grad_entropy->sizes() == lead, op, ": grad_entropy must have shape ", lead,
                ", got ", grad_entropy->sizes());
    TORCH_CHECK(entropy.sizes() == lead, op,
                ": a gradient for entropy needs the forward's entropy of shape ", lead,
                ", got ", entropy.sizes());
    TORCH_CHECK(grad_entropy->device() == logits.device() && entropy.device() == logits.device(),
                op, ": grad_entropy and entropy must be on the device of logits");
  }
}

// Tensors handed to a backend's row kernels, all checked and laid out.
struct TokenLogprobsRows {
  at::Tensor logits;       // [..., V], rows at `offsets`
  at::Tensor offsets;      // [N] int64 element offset of each row of logits
  at::Tensor targets;      // [N] int64, each in [0, V) or ignore_index
  double temperature = 1.0;
  int64_t ignore_index = -100;
};

// Forward around a backend kernel:
// kernel(rows, logprobs[N], entropy[N] or undefined, lse[N]), outputs in the result dtype.
template <typename ForwardKernel>
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_forward_impl(
    const at::Tensor& logits, const at::Tensor& targets, double temperature,
    int64_t ignore_index, bool return_entropy, bool validate, ForwardKernel&& kernel) {
  constexpr const char* op = "token_logprobs";
  check_token_logprobs_args(op, logits, targets, temperature);
  TokenLogprobsRows rows{logits, row_offsets(logits),
                         checked_targets(op, targets, logits.size(-1), ignore_index, validate),
                         temperature, ignore_index};
  const auto opts = logits.options().dtype(token_logprobs_result_dtype(logits.scalar_type()));
  const int64_t n = rows.offsets.numel();
  at::Tensor logprobs = at::empty({n}, opts), lse = at::empty({n}, opts);
  at::Tensor entropy = at::empty({return_entropy ? n : 0}, opts);
  if (n > 0) kernel(rows, logprobs, return_entropy ? entropy : at::Tensor(), lse);
  const auto lead = leading_shape(logits);
  return {logprobs.view(lead), return_entropy ? entropy.view(lead) : entropy, lse.view(lead)};
}

// Backward around a backend kernel: kernel(rows, grad_logprobs[N], grad_entropy[N] or
// undefined, lse[N], entropy[N] or undefined, dlogits, dlogits_offsets[N]), per-row
// tensors contiguous in the result dtype. dlogits may be logits itself (in place).
template <typename BackwardKernel>
void token_logprobs_backward_impl(const char* op, const at::Tensor& grad_logprobs,
                                  const std::optional<at::Tensor>& grad_entropy,
                                  const at::Tensor& logits, const at::Tensor& targets,
                                  const at::Tensor& lse, const at::Tensor& entropy,
                                  double temperature, int64_t ignore_index, bool validate,
                                  at::Tensor& dlogits, BackwardKernel&& kernel) {
  check_token_logprobs_args(op, logits, targets, temperature);
  check_backward_args(op, grad_logprobs, grad_entropy, logits, lse, entropy);
  TokenLogprobsRows rows{logits, row_offsets(logits),
                         checked_targets(op, targets, logits.size(-1), ignore_index, validate),
                         temperature, ignore_index};
  if (rows.offsets.numel() == 0) return;
  const auto acc = token_logprobs_result_dtype(logits.scalar_type());
  const auto per_row = [&](const at::Tensor& t) { return t.reshape({-1}).to(acc).contiguous(); };
  const bool with_entropy = grad_entropy.has_value();
  kernel(rows, per_row(grad_logprobs), with_entropy ? per_row(*grad_entropy) : at::Tensor(),
         per_row(lse), with_entropy ? per_row(entropy) : at::Tensor(), dlogits,
         dlogits.is_same(logits) ? rows.offsets : row_offsets(dlogits));
}

// The three op entry points over a backend's two row kernels; each backend registers
// token_logprobs_*_op<its kernels>.
template <auto forward_kernel>
std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_forward_op(
    const at::Tensor& logits, const at::Tensor& targets, double temperature,
    int64_t ignore_index, bool return_entropy, bool /*inplace_backward*/, bool validate) {
  return token_logprobs_forward_impl(logits, targets, temperature, ignore_index, return_entropy,
                                     validate, forward_kernel);
}

template <auto backward_kernel>
at::Tensor token_logprobs_backward_op(const at::Tensor& grad_logprobs,
                                      const std::optional<at::Tensor>& grad_entropy,
                                      const at::Tensor& logits, const at::Tensor& targets,
                                      const at::Tensor& lse, const at::Tensor& entropy,
                                      double temperature, int64_t ignore_index, bool validate) {
  at::Tensor dlogits = at::empty(logits.sizes(), logits.options());
  token_logprobs_backward_impl("token_logprobs_backward", grad_logprobs, grad_entropy, logits,
                               targets, lse, entropy, temperature, ignore_index, validate,
                               dlogits, backward_kernel);
  return dlogits;
}

template <auto backward_kernel>
void token_logprobs_backward_inplace_op(const at::Tensor& grad_logprobs,
                                        const std::optional<at::Tensor>& grad_entropy,
                                        at::Tensor& logits, const at::Tensor& targets,
                                        const at::Tensor& lse, const at::Tensor& entropy,
                                        double temperature, int64_t ignore_index,
                                        bool validate) {
  constexpr const char* op = "token_logprobs_backward_inplace";
  check_rows_writable(op, logits);
  token_logprobs_backward_impl(op, grad_logprobs, grad_entropy, logits, targets, lse, entropy,
                               temperature, ignore_index, validate, logits, backward_kernel);
}

}  // namespace lambdapo
