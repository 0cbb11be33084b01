// CPU tile kernels of linear_token_logprobs (the driver is csrc/linear_token_logprobs.h):
// rows of a logits tile in parallel, each read in blocks converted to the accumulation type
// and scaled by 1/T. Forward folds a tile row into the row's online softmax state; backward
// overwrites the tile with dlogits. Loops vectorize per ISA.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "linear_token_logprobs.h"
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

int64_t row_grain(int64_t cols) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / cols);
}

template <typename scalar_t>
void forward_rows(const linear::Tile& tile, at::Tensor& state, bool first) {
  using acc_t = acc_type<scalar_t>;
  const int64_t rows = tile.logits.size(0), cols = tile.logits.size(1);
  const scalar_t* base = tile.logits.data_ptr<scalar_t>();
  const int64_t* target = tile.targets.data_ptr<int64_t>();
  acc_t* st = state.data_ptr<acc_t>();
  const int64_t st_stride = state.stride(0);
  const acc_t inv_t = static_cast<acc_t>(tile.inv_temperature);
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(std::min(kBlock, cols));
    for (int64_t r = begin; r < end; ++r) {
      acc_t* row_state = st + r * st_stride;
      if (target[r] == tile.ignore_index) {
        if (first) {
          row_state[linear::kMax] = 0, row_state[linear::kSumExp] = 1;
          row_state[linear::kSumExpShift] = 0, row_state[linear::kTargetLogit] = 0;
        }
        continue;
      }
      const scalar_t* row = base + r * cols;
      // Stays NaN unless a tile holds the target (an unvalidated out-of-range target).
      if (first) row_state[linear::kTargetLogit] = std::numeric_limits<acc_t>::quiet_NaN();
      double m = first ? 0.0 : row_state[linear::kMax];
      double s = first ? 0.0 : row_state[linear::kSumExp];
      double t = first ? 0.0 : row_state[linear::kSumExpShift];
      for (int64_t b0 = 0; b0 < cols; b0 += kBlock) {
        const int64_t n = std::min(kBlock, cols - b0);
        load_scaled(row + b0, buf.data(), n, inv_t);
        const acc_t bm = block_max(buf.data(), n);
        if (bm == -std::numeric_limits<acc_t>::infinity()) {  // all -inf (or NaN)
          if (block_has_nan(buf.data(), n)) s = std::numeric_limits<double>::quiet_NaN();
          continue;
        }
        acc_t bs, bt;
        block_exp_sums(buf.data(), n, bm, &bs, &bt);
        merge_state(m, s, t, bm, bs, bt);
      }
      row_state[linear::kMax] = static_cast<acc_t>(m);
      row_state[linear::kSumExp] = static_cast<acc_t>(s);
      row_state[linear::kSumExpShift] = static_cast<acc_t>(t);
      const int64_t y = target[r] - tile.col0;
      if (y >= 0 && y < cols) {
        row_state[linear::kTargetLogit] = static_cast<acc_t>(row[y]) * inv_t;
      }
    }
  });
}

template <typename scalar_t>
void backward_rows(linear::Tile& tile, const at::Tensor& grad_logprobs,
                   const at::Tensor& grad_entropy, const at::Tensor& lse,
                   const at::Tensor& entropy) {
  using acc_t = acc_type<scalar_t>;
  const int64_t rows = tile.logits.size(0), cols = tile.logits.size(1);
  scalar_t* base = tile.logits.data_ptr<scalar_t>();
  const int64_t* target = tile.targets.data_ptr<int64_t>();
  const acc_t* g_lp = grad_logprobs.data_ptr<acc_t>();
  const acc_t* g_h = grad_entropy.defined() ? grad_entropy.data_ptr<acc_t>() : nullptr;
  const acc_t* row_lse = lse.data_ptr<acc_t>();
  const acc_t* row_h = g_h ? entropy.data_ptr<acc_t>() : nullptr;
  const acc_t inv_t = static_cast<acc_t>(tile.inv_temperature);
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> x(std::min(kBlock, cols)), dz(std::min(kBlock, cols));
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* row = base + r * cols;
      if (target[r] == tile.ignore_index) {
        std::fill(row, row + cols, scalar_t(0));
        continue;
      }
      const acc_t grad_h = g_h ? g_h[r] : acc_t(0), h = g_h ? row_h[r] : acc_t(0);
      const int64_t y = target[r] - tile.col0;
      for (int64_t b0 = 0; b0 < cols; b0 += kBlock) {
        const int64_t n = std::min(kBlock, cols - b0);
        load_scaled(row + b0, x.data(), n, inv_t);
        block_grad(x.data(), dz.data(), n, row_lse[r], g_lp[r], grad_h, h, inv_t);
        if (y >= b0 && y < b0 + n) dz[y - b0] += inv_t * g_lp[r];
        for (int64_t i = 0; i < n; ++i) row[b0 + i] = static_cast<scalar_t>(dz[i]);
      }
    }
  });
}

struct CpuKernels {
  static void forward_tile(const linear::Tile& tile, at::Tensor& state, bool first) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tile.logits.scalar_type(),
                                    "linear_token_logprobs", [&] {
      forward_rows<scalar_t>(tile, state, first);
    });
  }

  static void backward_tile(linear::Tile& tile, const at::Tensor& grad_logprobs,
                            const at::Tensor& grad_entropy, const at::Tensor& lse,
                            const at::Tensor& entropy) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tile.logits.scalar_type(),
                                    "linear_token_logprobs_backward", [&] {
      backward_rows<scalar_t>(tile, grad_logprobs, grad_entropy, lse, entropy);
    });
  }

  // c (fp32) (+)= a @ b for 16-bit a, b. CPU BLAS has no 16-bit x 16-bit -> fp32 product
  // here, so the operands are upcast (a tile-sized temporary; the CPU is not where 16-bit
  // training runs).
  static void matmul_fp32_accumulate(at::Tensor& c, const at::Tensor& a, const at::Tensor& b,
                                     bool accumulate) {
    const at::Tensor a32 = a.to(c.scalar_type()), b32 = b.to(c.scalar_type());
    if (accumulate) {
      c.addmm_(a32, b32);
    } else {
      at::mm_out(c, a32, b32);
    }
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_op(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, double temperature, int64_t ignore_index, bool return_entropy,
    int64_t chunk_size, int64_t vocab_chunk_size, bool validate) {
  return linear::forward<CpuKernels>(hidden, weight, bias, targets, temperature, ignore_index,
                                     return_entropy, chunk_size, vocab_chunk_size, validate);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(
    const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& entropy,
    double temperature, int64_t ignore_index, int64_t chunk_size, int64_t vocab_chunk_size,
    std::array<bool, 3> output_mask, bool validate, bool unrounded_grad_hidden) {
  return linear::backward<CpuKernels>(grad_logprobs, grad_entropy, hidden, weight, bias, targets,
                                      lse, entropy, temperature, ignore_index, chunk_size,
                                      vocab_chunk_size, output_mask, validate,
                                      unrounded_grad_hidden);
}

}  // namespace

TORCH_LIBRARY_IMPL(lambdapo, CPU, m) {
  m.impl("linear_token_logprobs_forward", &forward_op);
  m.impl("linear_token_logprobs_backward", &backward_op);
}

}  // namespace lambdapo
