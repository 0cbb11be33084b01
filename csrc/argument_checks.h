// Argument checks that several ops share, so that they word the same error the same way.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace lambdapo {

// The floating dtypes every float op takes: 16-bit and fp32 for use, fp64 for gradcheck.
inline void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
  const at::ScalarType dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                  dtype == at::kDouble,
              op, ": ", name, " must be float32, float16, bfloat16 or float64, got ", dtype);
}

}  // namespace lambdapo
