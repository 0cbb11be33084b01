// CPU row kernel of linear_policy_loss (the driver is csrc/linear_policy_loss.h): the rows
// of a chunk's full-vocabulary logits in parallel. Each row is read twice while it is in
// cache: once for its softmax statistics (blocks converted to the accumulation type and
// scaled by 1/T, merged online in double), then, after the row's loss term and derivatives,
// once more to overwrite it with dloss/dlogits. Loops vectorize per ISA (softmax_blocks.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "linear_policy_loss.h"
#include "softmax_blocks.h"

namespace lambdapo {
namespace {

// Online (max, sum exp, sum exp * shift) merge in double: (m, s, t) absorbs (bm, bs, bt).
void merge_state(double& m, double& s, double& t, double bm, double bs, double bt) {
  if (bs == 0.0) return;
  if (s == 0.0) {
    m = bm, s = bs, t = bt;
    return;
  }
  const double top = std::max(m, bm), da = m - top, db = bm - top;
  const double ca = std::exp(da), cb = std::exp(db);
  t = ca * (t + da * s) + cb * (bt + db * bs);
  s = ca * s + cb * bs;
  m = top;
}

template <typename scalar_t>
void policy_rows(policy::Chunk& c, const policy::Settings& settings) {
  using acc_t = acc_type<scalar_t>;
  const int64_t rows = c.logits.size(0), cols = c.logits.size(1);
  scalar_t* base = c.logits.data_ptr<scalar_t>();
  const int64_t* target = c.targets.data_ptr<int64_t>();
  const acc_t* adv = c.advantages.data_ptr<acc_t>();
  const acc_t* tw = c.token_weights.data_ptr<acc_t>();
  const acc_t* old = c.old.defined() ? c.old.data_ptr<acc_t>() : nullptr;
  const acc_t* ref = c.ref.defined() ? c.ref.data_ptr<acc_t>() : nullptr;
  acc_t* out_lp = c.logprobs.data_ptr<acc_t>();
  acc_t* out_h = c.entropy.data_ptr<acc_t>();
  acc_t* out_loss = c.loss.data_ptr<acc_t>();
  const acc_t inv_t = static_cast<acc_t>(settings.inv_temperature);
  const bool write_grad = c.write_grad;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> x(std::min(kBlock, cols)), dz(std::min(kBlock, cols));
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* row = base + r * cols;
      if (target[r] == settings.ignore_index) {
        out_lp[r] = 0, out_h[r] = 0, out_loss[r] = 0;
        if (write_grad) std::fill(row, row + cols, scalar_t(0));
        continue;
      }
      double m = 0.0, s = 0.0, t = 0.0;
      for (int64_t b0 = 0; b0 < cols; b0 += kBlock) {
        const int64_t n = std::min(kBlock, cols - b0);
        load_scaled(row + b0, x.data(), n, inv_t);
        const acc_t bm = block_max(x.data(), n);
        if (bm == -std::numeric_limits<acc_t>::infinity()) continue;  // all -inf
        acc_t bs, bt;
        block_exp_sums(x.data(), n, bm, &bs, &bt);
        merge_state(m, s, t, bm, bs, bt);
      }
      const double log_sum = std::log(s), lse = m + log_sum;
      const int64_t y = target[r];
      // NaN for an unvalidated out-of-range target: its loss and gradient row are NaN.
      const double lp = y >= 0 && y < cols
                            ? std::min(static_cast<double>(static_cast<acc_t>(row[y]) * inv_t) - lse, 0.0)
                            : std::numeric_limits<double>::quiet_NaN();
      const double h = log_sum - t / s;
      const policy::RowTerms terms = policy::row_terms(
          lp, h, adv[r], tw[r], old ? static_cast<double>(old[r]) : lp,
          ref ? static_cast<double>(ref[r]) : 0.0, settings);
      out_lp[r] = static_cast<acc_t>(lp);
      out_h[r] = static_cast<acc_t>(h);
      out_loss[r] = static_cast<acc_t>(terms.loss);
      if (!write_grad) continue;
      const acc_t g_lp = static_cast<acc_t>(terms.grad_logprob);
      const acc_t g_h = static_cast<acc_t>(terms.grad_entropy);
      const acc_t row_lse = static_cast<acc_t>(lse), row_h = static_cast<acc_t>(h);
      for (int64_t b0 = 0; b0 < cols; b0 += kBlock) {
        const int64_t n = std::min(kBlock, cols - b0);
        load_scaled(row + b0, x.data(), n, inv_t);
        block_grad(x.data(), dz.data(), n, row_lse, g_lp, g_h, row_h, inv_t);
        if (y >= b0 && y < b0 + n) dz[y - b0] += inv_t * g_lp;
        for (int64_t i = 0; i < n; ++i) row[b0 + i] = static_cast<scalar_t>(dz[i]);
      }
    }
  });
}

struct CpuKernels {
  static void rows(policy::Chunk& c, const policy::Settings& settings) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.logits.scalar_type(),
                                    "linear_policy_loss", [&] {
      policy_rows<scalar_t>(c, settings);
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_op(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& advantages, const at::Tensor& token_weights,
    const std::optional<at::Tensor>& old_logprobs, const std::optional<at::Tensor>& ref_logprobs,
    double kl_coef, double entropy_coef, double clip_low, double clip_high, double temperature,
    int64_t ignore_index, int64_t chunk_size, std::array<bool, 3> output_mask, bool validate) {
  return policy::forward<CpuKernels>(hidden, weight, bias, targets, advantages, token_weights,
                                     old_logprobs, ref_logprobs, kl_coef, entropy_coef, clip_low,
                                     clip_high, temperature, ignore_index, chunk_size,
                                     output_mask, validate);
}

}  // namespace

TORCH_LIBRARY_IMPL(lambdapo, CPU, m) {
  m.impl("linear_policy_loss_forward", &forward_op);
}

}  // namespace lambdapo
