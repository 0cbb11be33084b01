// Branch-free math for CPU loops that the compiler vectorizes once per ISA (target_clones):
// std::exp does not vectorize without -ffast-math.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernel_constants.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define LAMBDAPO_ISA_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LAMBDAPO_ISA_CLONES
#endif

namespace lambdapo {

// exp(x) to ~1 ulp (Cephes polynomial); x is clamped to [kExpNormalMin, kExpNormalMax], the
// normal float range, so exp(-inf) gives about 1.6e-38 rather than 0.
inline __attribute__((always_inline)) float exp_vectorizable(float x) {
  x = x < kExpNormalMin ? kExpNormalMin : x;
  x = x > kExpNormalMax ? kExpNormalMax : x;
  const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x/ln2)
  const float f = (x - k * 0.693359375f) + k * 2.12194440e-4f;            // x - k ln2
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;  // 2^k
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace lambdapo
