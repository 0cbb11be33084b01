// Calls the lambdapo ops through the dispatcher from C++, as a libtorch user would.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <optional>
#include <string>

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
                                         c10::string_view, double)>();
  return op.call(rewards, scores, mask, group_ids, beta, normalize, 1e-6);
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

  std::printf("%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
