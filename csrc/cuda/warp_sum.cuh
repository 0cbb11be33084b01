// The sum over a warp's 32 lanes by a fixed butterfly of shuffles: every lane gets the same
// result, in the same order on every run.
#pragma once

namespace lambdapo {

constexpr int kWarp = 32;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

}  // namespace lambdapo
