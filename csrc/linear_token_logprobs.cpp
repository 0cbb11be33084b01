// linear_token_logprobs: token log-probs (and entropy) straight from hidden states and the
// lm-head weight, over chunks of rows, so that at most one chunk of [N, V] logits exists.
// Device-generic: the matmuls are ATen's, the log-prob kernels are lambdapo's own CPU or
// CUDA ones, reached through the dispatcher.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "token_logprobs.h"

namespace lambdapo {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_token_logprobs_forward(
    const at::Tensor& logits, const at::Tensor& targets, double temperature,
    int64_t ignore_index, bool return_entropy, bool validate) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lambdapo::token_logprobs_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, double, int64_t, bool, bool,
                           bool)>();
  return op.call(logits, targets, temperature, ignore_index, return_entropy, false, validate);
}

void call_token_logprobs_backward_inplace(const at::Tensor& grad_logprobs,
                                          const std::optional<at::Tensor>& grad_entropy,
                                          at::Tensor& logits, const at::Tensor& targets,
                                          const at::Tensor& lse, const at::Tensor& entropy,
                                          double temperature, int64_t ignore_index,
                                          bool validate) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lambdapo::token_logprobs_backward_inplace", "")
                       .typed<void(const at::Tensor&, const std::optional<at::Tensor>&,
                                   at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, double, int64_t, bool)>();
  op.call(grad_logprobs, grad_entropy, logits, targets, lse, entropy, temperature, ignore_index,
          validate);
}

void check_linear_args(const at::Tensor& hidden, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& targets,
                       int64_t chunk_size) {
  constexpr const char* op = "linear_token_logprobs";
  TORCH_CHECK(hidden.is_floating_point() && hidden.dim() >= 1, op,
              ": hidden must be a floating-point tensor [..., H], got ", hidden.scalar_type(),
              " of shape ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(-1), op,
              ": weight must be [V, H] with H = hidden.size(-1) = ", hidden.size(-1),
              ", got shape ", weight.sizes());
  TORCH_CHECK(weight.size(0) > 0, op, ": weight must have at least one row (V > 0)");
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), op, ": weight has dtype ",
              weight.scalar_type(), " but hidden has ", hidden.scalar_type());
  TORCH_CHECK(weight.device() == hidden.device(), op, ": weight is on ", weight.device(),
              " but hidden is on ", hidden.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                ": bias must be [V] with V = ", weight.size(0), ", got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == hidden.scalar_type() && bias->device() == hidden.device(),
                op, ": bias must have the dtype and device of hidden");
  }
  TORCH_CHECK(targets.device() == hidden.device(), op, ": targets is on ", targets.device(),
              " but hidden is on ", hidden.device());
  TORCH_CHECK(targets.sizes() == hidden.sizes().slice(0, hidden.dim() - 1), op,
              ": targets must have the leading shape of hidden ",
              hidden.sizes().slice(0, hidden.dim() - 1), ", got ", targets.sizes());
  TORCH_CHECK_VALUE(chunk_size > 0, op, ": chunk_size must be > 0, got ", chunk_size);
}

at::Tensor chunk_logits(const at::Tensor& hidden_chunk, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias) {
  return bias.has_value() ? at::addmm(*bias, hidden_chunk, weight.t())
                          : at::mm(hidden_chunk, weight.t());
}

// grad_weight (fp32/fp64) += dlogits^T h without rounding each chunk's product to a
// 16-bit dtype: cuBLAS writes fp32 directly; on the CPU the chunk is upcast first.
void accumulate_weight_grad(at::Tensor& grad_weight, const at::Tensor& dlogits,
                            const at::Tensor& hidden_chunk) {
  const auto acc = grad_weight.scalar_type();
  if (dlogits.scalar_type() == acc) {
    grad_weight.addmm_(dlogits.t(), hidden_chunk);
  } else if (dlogits.is_cuda()) {
    grad_weight.add_(at::mm(dlogits.t(), hidden_chunk, acc));
  } else {
    grad_weight.addmm_(dlogits.t().to(acc), hidden_chunk.to(acc));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, double temperature, int64_t ignore_index, bool return_entropy,
    int64_t chunk_size, bool validate) {
  check_linear_args(hidden, weight, bias, targets, chunk_size);
  const int64_t rows = targets.numel();
  const at::Tensor h = hidden.reshape({rows, hidden.size(-1)});
  const at::Tensor t = targets.reshape({rows});
  const auto opts = hidden.options().dtype(token_logprobs_result_dtype(hidden.scalar_type()));
  at::Tensor logprobs = at::empty({rows}, opts), lse = at::empty({rows}, opts);
  at::Tensor entropy = at::empty({return_entropy ? rows : 0}, opts);
  for (int64_t start = 0; start < rows; start += chunk_size) {
    const int64_t n = std::min(chunk_size, rows - start);
    const at::Tensor logits = chunk_logits(h.narrow(0, start, n), weight, bias);
    auto [lp_c, h_c, lse_c] = call_token_logprobs_forward(logits, t.narrow(0, start, n),
                                                          temperature, ignore_index,
                                                          return_entropy, validate);
    logprobs.narrow(0, start, n).copy_(lp_c);
    lse.narrow(0, start, n).copy_(lse_c);
    if (return_entropy) entropy.narrow(0, start, n).copy_(h_c);
  }
  const auto lead = leading_shape(hidden);
  return {logprobs.view(lead), return_entropy ? entropy.view(lead) : entropy, lse.view(lead)};
}

// Gradients for hidden, weight and bias (an empty tensor when there is no bias). The
// weight and bias gradients accumulate over chunks in fp32 (float64 for float64 inputs).
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_backward(
    const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& entropy,
    double temperature, int64_t ignore_index, int64_t chunk_size, bool validate) {
  check_linear_args(hidden, weight, bias, targets, chunk_size);
  const int64_t rows = targets.numel();
  const at::Tensor h = hidden.reshape({rows, hidden.size(-1)});
  const at::Tensor t = targets.reshape({rows});
  const at::Tensor g_lp = grad_logprobs.reshape({rows});
  const std::optional<at::Tensor> g_h =
      grad_entropy.has_value() ? std::optional<at::Tensor>(grad_entropy->reshape({rows}))
                               : std::nullopt;
  const at::Tensor lse_flat = lse.reshape({rows});
  const at::Tensor h_flat = grad_entropy.has_value() ? entropy.reshape({rows}) : entropy;
  const auto acc = token_logprobs_result_dtype(hidden.scalar_type());

  at::Tensor grad_hidden = at::empty({rows, hidden.size(-1)}, hidden.options());
  at::Tensor grad_weight = at::zeros(weight.sizes(), weight.options().dtype(acc));
  at::Tensor grad_bias = at::zeros({bias.has_value() ? weight.size(0) : 0},
                                   weight.options().dtype(acc));
  for (int64_t start = 0; start < rows; start += chunk_size) {
    const int64_t n = std::min(chunk_size, rows - start);
    const at::Tensor h_c = h.narrow(0, start, n);
    at::Tensor logits = chunk_logits(h_c, weight, bias);
    call_token_logprobs_backward_inplace(
        g_lp.narrow(0, start, n),
        g_h.has_value() ? std::optional<at::Tensor>(g_h->narrow(0, start, n)) : std::nullopt,
        logits, t.narrow(0, start, n), lse_flat.narrow(0, start, n),
        g_h.has_value() ? h_flat.narrow(0, start, n) : h_flat, temperature, ignore_index,
        validate);
    const at::Tensor& dlogits = logits;
    at::Tensor grad_hidden_chunk = grad_hidden.narrow(0, start, n);
    at::mm_out(grad_hidden_chunk, dlogits, weight);
    accumulate_weight_grad(grad_weight, dlogits, h_c);
    if (bias.has_value()) grad_bias.add_(dlogits.sum(0, /*keepdim=*/false, acc));
  }
  return {grad_hidden.view(hidden.sizes()), grad_weight.to(weight.scalar_type()),
          bias.has_value() ? grad_bias.to(bias->scalar_type()) : grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(lambdapo, CompositeExplicitAutograd, m) {
  m.impl("linear_token_logprobs_forward", &linear_token_logprobs_forward);
  m.impl("linear_token_logprobs_backward", &linear_token_logprobs_backward);
}

}  // namespace lambdapo
