// Calls the lambdapo ops through the dispatcher from C++, as a libtorch user would.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <cstdio>
#include <optional>
#include <string>
#include <tuple>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s: %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

at::Tensor lambda_advantages(const at::Tensor& rewards, const at::Tensor& scores,
                             const std::optional<at::Tensor>& mask,
                             const std::optional<at::Tensor>& group_ids, double beta,
                             const std::string& normalize) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lambdapo::lambda_advantages", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&, double,
                                         c10::string_view, double, bool)>();
  return op.call(rewards, scores, mask, group_ids, beta, normalize, 1e-6, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs(const at::Tensor& logits,
                                                              const at::Tensor& targets) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lambdapo::token_logprobs_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, double, int64_t, bool, bool,
                           bool)>();
  return op.call(logits, targets, 1.0, -100, true, false, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs(const at::Tensor& hidden,
                                                                     const at::Tensor& weight,
                                                                     const at::Tensor& targets) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lambdapo::linear_token_logprobs_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const at::Tensor&, double, int64_t, bool, int64_t, int64_t, bool)>();
  return op.call(hidden, weight, std::nullopt, targets, 1.0, -100, true, 3, 256, true);
}

using PolicyLossOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

PolicyLossOutputs linear_policy_loss(const at::Tensor& hidden, const at::Tensor& weight,
                                     const at::Tensor& targets, const at::Tensor& advantages,
                                     const at::Tensor& token_weights) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lambdapo::linear_policy_loss_forward", "")
                       .typed<PolicyLossOutputs(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                           double, double, double, double, double, int64_t, int64_t,
                           std::array<bool, 3>, bool)>();
  return op.call(hidden, weight, std::nullopt, targets, advantages, token_weights, std::nullopt,
                 std::nullopt, 0.0, 0.0, 0.2, 0.2, 1.0, -100, 3, {true, true, false}, true);
}

}  // namespace

int main() {
  at::manual_seed(0);
  const at::Tensor rewards = at::randn({8, 33});
  const at::Tensor scores = -at::rand({8, 33});

  // beta = 0 is RLOO: r_i - mean of the others.
  const at::Tensor rloo = rewards - (rewards.sum(-1, true) - rewards) / 32.0;
  const at::Tensor adv0 = lambda_advantages(rewards, scores, std::nullopt, std::nullopt, 0.0, "mean");
  expect(at::allclose(adv0, rloo, 1e-5, 1e-5), "beta=0 equals RLOO");

  const at::Tensor adv = lambda_advantages(rewards, scores, std::nullopt, std::nullopt, 2.0, "mean");
  expect(adv.scalar_type() == at::kFloat && adv.sizes() == rewards.sizes(), "float32 [P, G] output");
  expect(adv.sum(-1).abs().max().item<float>() < 1e-4, "each group sums to zero");

  // Ragged groups given by ids equal the dense rows.
  const at::Tensor ids = at::arange(8).repeat_interleave(33);
  const at::Tensor ragged = lambda_advantages(rewards.flatten(), scores.flatten(), std::nullopt,
                                              ids, 2.0, "mean");
  expect(at::allclose(ragged.view({8, 33}), adv, 1e-6, 1e-6), "ragged equals dense");

  bool raised = false;
  try {
    lambda_advantages(rewards, scores, std::nullopt, std::nullopt, 1.0, "median");
  } catch (const c10::Error& e) {
    raised = std::string(e.what()).find("normalize") != std::string::npos;
  }
  expect(raised, "unknown normalize raises an error naming it");

  // token_logprobs equals log_softmax + gather; entropy equals -sum p log p.
  const at::Tensor logits = at::randn({6, 1000}).mul_(3);
  const at::Tensor targets = at::randint(0, 1000, {6});
  const auto [logprobs, entropy, lse] = token_logprobs(logits, targets);
  const at::Tensor log_p = at::log_softmax(logits, -1);
  expect(at::allclose(logprobs, log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1), 1e-5, 1e-5),
         "token_logprobs equals log_softmax + gather");
  expect(at::allclose(entropy, -(log_p.exp() * log_p).sum(-1), 1e-5, 1e-5),
         "entropy from the same pass");

  // linear_token_logprobs in tiles of 3 rows x 256 vocabulary entries equals the full matmul.
  const at::Tensor hidden = at::randn({7, 16});
  const at::Tensor weight = at::randn({1000, 16});
  const at::Tensor linear_targets = at::randint(0, 1000, {7});
  const auto [linear_lp, linear_h, linear_lse] = linear_token_logprobs(hidden, weight, linear_targets);
  const auto [full_lp, full_h, full_lse] = token_logprobs(at::mm(hidden, weight.t()), linear_targets);
  expect(at::allclose(linear_lp, full_lp, 1e-5, 1e-5) && at::allclose(linear_h, full_h, 1e-5, 1e-5),
         "linear_token_logprobs equals matmul + token_logprobs");

  // linear_policy_loss on-policy (ratio 1, never clipped): loss = -sum w A, and the gradients
  // of the lm-head made in the forward, dlogits = w A (softmax - onehot), in chunks of 3 rows.
  const at::Tensor advantages = at::randn({7});
  const at::Tensor token_weights = at::rand({7});
  const auto [policy_loss, policy_lp, policy_h, grad_hidden, grad_weight, grad_bias] =
      linear_policy_loss(hidden, weight, linear_targets, advantages, token_weights);
  const at::Tensor full_logits = at::mm(hidden, weight.t());
  const at::Tensor dlogits =
      (token_weights * advantages).unsqueeze(1) *
      (at::softmax(full_logits, -1) - at::one_hot(linear_targets, 1000).to(at::kFloat));
  expect(at::allclose(policy_loss, -(token_weights * advantages).sum(), 1e-5, 1e-5) &&
             at::allclose(policy_lp, full_lp, 1e-5, 1e-5) &&
             at::allclose(policy_h, full_h, 1e-5, 1e-5),
         "linear_policy_loss on-policy loss, log-probs and entropy");
  expect(at::allclose(grad_hidden, at::mm(dlogits, weight), 1e-4, 1e-5) &&
             at::allclose(grad_weight, at::mm(dlogits.t(), hidden), 1e-4, 1e-5) &&
             grad_bias.numel() == 0,
         "linear_policy_loss gradients made in the forward");

  // Semantic density: "1 2 3 2" vs "2 3 4": 2 clipped unigram matches, 1 bigram, LCS 2.
  const at::Tensor cand_values = at::tensor({1, 2, 3, 2}, at::kLong);
  const at::Tensor ref_values = at::tensor({2, 3, 4}, at::kLong);
  const at::Tensor zero = at::zeros({1}, at::kLong);
  const at::Tensor ref_index = at::zeros({1}, at::kLong);
  const auto overlap = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("lambdapo::ngram_overlap", "")
                           .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                               const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, int64_t, bool)>();
  const auto [matches, cand_counts, ref_counts] =
      overlap.call(cand_values, zero, at::full({1}, 4, at::kLong), ref_values, zero,
                   at::full({1}, 3, at::kLong), ref_index, 2, true);
  expect(matches[0][0].item<int64_t>() == 2 && matches[0][1].item<int64_t>() == 1 &&
             cand_counts[0][1].item<int64_t>() == 3 && ref_counts[0][1].item<int64_t>() == 2,
         "ngram_overlap clipped counts");
  const auto lcs = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lambdapo::lcs_length", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, bool)>();
  const auto [lcs_value, cand_length, ref_length] =
      lcs.call(cand_values, zero, at::full({1}, 4, at::kLong), ref_values, zero,
               at::full({1}, 3, at::kLong), ref_index, true);
  expect(lcs_value[0].item<int64_t>() == 2 && cand_length[0].item<int64_t>() == 4 &&
             ref_length[0].item<int64_t>() == 3,
         "lcs_length");
  // validate=False: an out-of-range ref_index means an empty reference, not a stray read.
  const auto [unchecked, unchecked_cand, unchecked_ref] =
      lcs.call(cand_values, zero, at::full({1}, 4, at::kLong), ref_values, zero,
               at::full({1}, 3, at::kLong), at::full({1}, 7, at::kLong), false);
  expect(unchecked[0].item<int64_t>() == 0 && unchecked_ref[0].item<int64_t>() == 0,
         "lcs_length unchecked ref_index");

  std::printf("%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
