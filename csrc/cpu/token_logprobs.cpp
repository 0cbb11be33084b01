// CPU kernels of token_logprobs: rows in parallel; each row is read once, in blocks that
// are converted to the accumulation type, scaled by 1/T, and folded into an online
// (max, sum exp, sum exp * shifted logit) state. Backward recomputes p from the saved
// log-sum-exp. Loops vectorize per ISA.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "token_logprobs.h"
#include "softmax_blocks.h"

namespace lambdapo {
namespace {

int64_t row_grain(int64_t vocab) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / vocab);
}

template <typename scalar_t>
void forward_rows(const TokenLogprobsRows& rows, at::Tensor& logprobs, const at::Tensor& entropy,
                  at::Tensor& lse) {
  using acc_t = acc_type<scalar_t>;
  const int64_t n_rows = rows.offsets.numel(), vocab = rows.logits.size(-1);
  const scalar_t* base = rows.logits.data_ptr<scalar_t>();
  const int64_t* row_offset = rows.offsets.data_ptr<int64_t>();
  const int64_t* target = rows.targets.data_ptr<int64_t>();
  const int64_t ignore_index = rows.ignore_index;
  acc_t* out_lp = logprobs.data_ptr<acc_t>();
  acc_t* out_h = entropy.defined() ? entropy.data_ptr<acc_t>() : nullptr;
  acc_t* out_lse = lse.data_ptr<acc_t>();
  const acc_t inv_t = static_cast<acc_t>(1.0 / rows.temperature);

  at::parallel_for(0, n_rows, row_grain(vocab), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(std::min(kBlock, vocab));
    for (int64_t r = begin; r < end; ++r) {
      if (target[r] == ignore_index) {
        out_lp[r] = 0;
        out_lse[r] = 0;
        if (out_h) out_h[r] = 0;
        continue;
      }
      const scalar_t* row = base + row_offset[r];
      acc_t m = -std::numeric_limits<acc_t>::infinity();
      double s = 0.0, t = 0.0;  // sum exp(x - m), sum exp(x - m) (x - m)
      for (int64_t b0 = 0; b0 < vocab; b0 += kBlock) {
        const int64_t n = std::min(kBlock, vocab - b0);
        load_scaled(row + b0, buf.data(), n, inv_t);
        const acc_t bm = block_max(buf.data(), n);
        if (bm > m) {  // rescale the running sums to the new max
          if (s > 0.0) {
            const double shift = static_cast<double>(m) - bm, c = std::exp(shift);
            t = c * (t + shift * s);
            s *= c;
          }
          m = bm;
        }
        if (m == -std::numeric_limits<acc_t>::infinity()) {  // all -inf (or NaN) so far
          if (block_has_nan(buf.data(), n)) s = std::numeric_limits<double>::quiet_NaN();
          continue;
        }
        acc_t bs, bt;
        block_exp_sums(buf.data(), n, m, &bs, &bt);
        s += bs;
        t += bt;
      }
      const double log_s = std::log(s);
      const double row_lse = m + log_s;
      // An unchecked target out of range (validate=False) gives NaN, never a stray read.
      const double x_target =
          target[r] >= 0 && target[r] < vocab
              ? static_cast<double>(static_cast<acc_t>(row[target[r]]) * inv_t)
              : std::numeric_limits<double>::quiet_NaN();
      out_lp[r] = static_cast<acc_t>(std::min(x_target - row_lse, 0.0));
      out_lse[r] = static_cast<acc_t>(row_lse);
      if (out_h) out_h[r] = static_cast<acc_t>(log_s - t / s);
    }
  });
}

template <typename scalar_t>
void backward_rows(const TokenLogprobsRows& rows, const at::Tensor& grad_logprobs,
                   const at::Tensor& grad_entropy, const at::Tensor& lse,
                   const at::Tensor& entropy, at::Tensor& dlogits, const at::Tensor& out_offsets) {
  using acc_t = acc_type<scalar_t>;
  const int64_t n_rows = rows.offsets.numel(), vocab = rows.logits.size(-1);
  const scalar_t* in_base = rows.logits.data_ptr<scalar_t>();
  scalar_t* out_base = dlogits.data_ptr<scalar_t>();
  const int64_t* in_offset = rows.offsets.data_ptr<int64_t>();
  const int64_t* out_offset = out_offsets.data_ptr<int64_t>();
  const int64_t* target = rows.targets.data_ptr<int64_t>();
  const int64_t ignore_index = rows.ignore_index;
  const acc_t* g_lp = grad_logprobs.data_ptr<acc_t>();
  const acc_t* g_h = grad_entropy.defined() ? grad_entropy.data_ptr<acc_t>() : nullptr;
  const acc_t* row_lse = lse.data_ptr<acc_t>();
  const acc_t* row_h = g_h ? entropy.data_ptr<acc_t>() : nullptr;
  const acc_t inv_t = static_cast<acc_t>(1.0 / rows.temperature);

  at::parallel_for(0, n_rows, row_grain(vocab), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> x(std::min(kBlock, vocab)), dz(std::min(kBlock, vocab));
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* in_row = in_base + in_offset[r];
      scalar_t* out_row = out_base + out_offset[r];
      if (target[r] == ignore_index) {
        std::fill(out_row, out_row + vocab, scalar_t(0));
        continue;
      }
      const acc_t grad_h = g_h ? g_h[r] : acc_t(0);
      const acc_t h = g_h ? row_h[r] : acc_t(0);
      for (int64_t b0 = 0; b0 < vocab; b0 += kBlock) {
        const int64_t n = std::min(kBlock, vocab - b0);
        load_scaled(in_row + b0, x.data(), n, inv_t);
        block_grad(x.data(), dz.data(), n, row_lse[r], g_lp[r], grad_h, h, inv_t);
        const int64_t y = target[r] - b0;
        if (y >= 0 && y < n) dz[y] += inv_t * g_lp[r];
        for (int64_t i = 0; i < n; ++i) out_row[b0 + i] = static_cast<scalar_t>(dz[i]);
      }
    }
  });
}

void forward_kernel(const TokenLogprobsRows& rows, at::Tensor& logprobs,
                    const at::Tensor& entropy, at::Tensor& lse) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.logits.scalar_type(),
                                  "token_logprobs", [&] {
    forward_rows<scalar_t>(rows, logprobs, entropy, lse);
  });
}

void backward_kernel(const TokenLogprobsRows& rows, const at::Tensor& grad_logprobs,
                     const at::Tensor& grad_entropy, const at::Tensor& lse,
                     const at::Tensor& entropy, at::Tensor& dlogits,
                     const at::Tensor& out_offsets) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.logits.scalar_type(),
                                  "token_logprobs_backward", [&] {
    backward_rows<scalar_t>(rows, grad_logprobs, grad_entropy, lse, entropy, dlogits,
                            out_offsets);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lambdapo, CPU, m) {
  m.impl("token_logprobs_forward", &token_logprobs_forward_op<forward_kernel>);
  m.impl("token_logprobs_backward", &token_logprobs_backward_op<backward_kernel>);
  m.impl("token_logprobs_backward_inplace", &token_logprobs_backward_inplace_op<backward_kernel>);
}

}  // namespace lambdapo
