// CPU kernel of decode_attention: (row, key-value head) pairs in parallel; each reads its
// keys and then its values once for all its query heads (scores into a small scratch row per
// head, the softmax in the accumulation type), in loops the compiler vectorizes per ISA. Three torch calls (baddbmm, softmax, bmm) and their [B, H, seen]
// intermediates become one pass over the buffers.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "decode_attention.h"
#include "float_conversions.h"
#include "kernel_constants.h"
#include "vectorizable_math.h"

namespace lambdapo {
namespace {

// Elements per parallel task: below this, a thread's start-up costs more than the work.
constexpr int64_t kElementsPerTask = 32768;

// exp(x), exactly 0 below the normal range (a masked column's -inf score must weigh 0).
inline __attribute__((always_inline)) float exp_or_zero(float x) {
  const float e = exp_vectorizable(x);
  return x < kExpNormalMin ? 0.0f : e;
}
inline __attribute__((always_inline)) double exp_or_zero(double x) { return std::exp(x); }

// kDim: the head width at compile time, or 0 for runtime_dim.
template <int64_t kDim, typename scalar_t>
inline __attribute__((always_inline)) void attend_impl(
    const scalar_t* __restrict q, const scalar_t* __restrict keys,
    const scalar_t* __restrict values, const scalar_t* __restrict mask, scalar_t* __restrict out,
    acc_type<scalar_t>* __restrict scratch, int64_t groups, int64_t seen, int64_t runtime_dim,
    acc_type<scalar_t> scale) {
  using acc_t = acc_type<scalar_t>;
  const int64_t dim = kDim > 0 ? kDim : runtime_dim;
  acc_t* queries = scratch;                  // [groups, dim]
  acc_t* scores = queries + groups * dim;    // [groups, seen]
  acc_t* sums = scores + groups * seen;      // [groups, dim]
  acc_t* inverses = sums + groups * dim;     // [groups]
  for (int64_t i = 0; i < groups * dim; ++i) queries[i] = widen(q[i]) * scale;
  for (int64_t j = 0; j < seen; ++j) {
    const scalar_t* key = keys + j * dim;
    const acc_t bias = mask == nullptr ? acc_t(0) : widen(mask[j]);
    for (int64_t g = 0; g < groups; ++g) {
      const acc_t* query = queries + g * dim;
      acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < dim; ++d) dot += query[d] * widen(key[d]);
      scores[g * seen + j] = dot + bias;
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    acc_t* row = scores + g * seen;
    acc_t top = row[0];
    for (int64_t j = 1; j < seen; ++j) top = row[j] > top ? row[j] : top;
    acc_t total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < seen; ++j) {
      row[j] = exp_or_zero(row[j] - top);
      total += row[j];
    }
    inverses[g] = acc_t(1) / total;
  }
  // Each value row is read once for all the query heads of its key-value head.
  std::fill(sums, sums + groups * dim, acc_t(0));
  for (int64_t j = 0; j < seen; ++j) {
    const scalar_t* value = values + j * dim;
    for (int64_t g = 0; g < groups; ++g) {
      const acc_t p = scores[g * seen + j];
      acc_t* sum = sums + g * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) sum[d] += p * widen(value[d]);
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    const acc_t* sum = sums + g * dim;
    scalar_t* o = out + g * dim;
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) o[d] = rounded<scalar_t>(sum[d] * inverses[g]);
  }
}

// One clone set per dtype (target_clones applies to plain functions, not templates). The
// common head widths get a compile-time width: the loops over it unroll and its running sums
// stay in registers (1.5-2x over the runtime-width loop at 64).
#define LAMBDAPO_DECODE_ATTENTION(scalar_t)                                                  \
  LAMBDAPO_ISA_CLONES void attend(const scalar_t* q, const scalar_t* keys,                  \
                                  const scalar_t* values, const scalar_t* mask, scalar_t* out, \
                                  acc_type<scalar_t>* scratch, int64_t groups, int64_t seen, \
                                  int64_t dim, acc_type<scalar_t> scale) {                   \
    if (dim == 64) {                                                                         \
      attend_impl<64>(q, keys, values, mask, out, scratch, groups, seen, dim, scale);        \
    } else if (dim == 128) {                                                                 \
      attend_impl<128>(q, keys, values, mask, out, scratch, groups, seen, dim, scale);       \
    } else {                                                                                 \
      attend_impl<0>(q, keys, values, mask, out, scratch, groups, seen, dim, scale);         \
    }                                                                                        \
  }
LAMBDAPO_DECODE_ATTENTION(float)
LAMBDAPO_DECODE_ATTENTION(double)
LAMBDAPO_DECODE_ATTENTION(c10::BFloat16)
LAMBDAPO_DECODE_ATTENTION(c10::Half)
#undef LAMBDAPO_DECODE_ATTENTION

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& keys,
                                const at::Tensor& values, const std::optional<at::Tensor>& mask,
                                int64_t seen, double scale) {
  const at::Tensor mask_or_none = mask.has_value() ? *mask : at::Tensor();
  check_decode_attention_args("decode_attention", q, keys, values, mask_or_none, seen, scale);
  const at::Tensor qc = q.contiguous(), kc = keys.contiguous(), vc = values.contiguous();
  const at::Tensor mc = mask_or_none.defined() ? mask_or_none.contiguous() : at::Tensor();
  at::Tensor out = at::empty(q.sizes(), qc.options());
  const int64_t batch = q.size(0), heads = q.size(1), groups = q.size(2), dim = q.size(3);
  const int64_t width = keys.size(2), mask_width = mc.defined() ? mc.size(1) : 0;
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / (seen * dim * (groups + 1)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "decode_attention",
                                  [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* qp = qc.const_data_ptr<scalar_t>();
    const scalar_t* kp = kc.const_data_ptr<scalar_t>();
    const scalar_t* vp = vc.const_data_ptr<scalar_t>();
    const scalar_t* mp = mc.defined() ? mc.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch * heads, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(groups * (2 * dim + seen + 1));
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / heads;
        attend(qp + bh * groups * dim, kp + bh * width * dim, vp + bh * width * dim,
               mp == nullptr ? nullptr : mp + b * mask_width, op + bh * groups * dim,
               scratch.data(), groups, seen, dim, static_cast<acc_t>(scale));
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lambdapo, CPU, m) {
  m.impl("decode_attention", &decode_attention_cpu);
}

}  // namespace lambdapo
