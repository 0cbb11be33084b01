// Storage-type <-> accumulation-type conversions of the CPU kernels that keep 16-bit
// values inside vectorized loops (rms_norm, swiglu).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernel_constants.h"

namespace lambdapo {

// Conversions between the storage types and float in branch-free forms the compiler
// vectorizes (c10's branch, and GCC 12 lowers _Float16 to library calls without AVX512-FP16).
// Both round as c10 does: bfloat16 to nearest even on the bits, NaN kept quiet; float16 by
// the exponent-aligning float addition of the FP16 library's IEEE conversion.
inline __attribute__((always_inline)) uint32_t float_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
}
inline __attribute__((always_inline)) float bits_float(uint32_t bits) {
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

inline __attribute__((always_inline)) float round_to(float v, float*) { return v; }
inline __attribute__((always_inline)) double round_to(double v, double*) { return v; }
inline __attribute__((always_inline)) c10::BFloat16 round_to(float v, c10::BFloat16*) {
  const uint32_t bits = float_bits(v);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(v != v ? 0x7fc0u : rounded),
                       c10::BFloat16::from_bits());
}
inline __attribute__((always_inline)) c10::Half round_to(float v, c10::Half*) {
  const uint32_t w = float_bits(v), twice = w + w, sign = w & 0x80000000u;
  // Scaling up then down rounds away the bits float16 cannot hold and sends overflow to inf.
  float base = (std::fabs(v) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t exponent = twice & 0xff000000u;
  const uint32_t bias = exponent < 0x71000000u ? 0x71000000u : exponent;
  base = bits_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_bits(base);
  const uint32_t magnitude = ((bits >> 13) & 0x00007c00u) + (bits & 0x00000fffu);
  return c10::Half(static_cast<uint16_t>((sign >> 16) | (twice > 0xff000000u ? 0x7e00u
                                                                             : magnitude)),
                   c10::Half::from_bits());
}

template <typename T>
inline __attribute__((always_inline)) acc_type<T> widen(T v) {
  return static_cast<acc_type<T>>(v);
}
template <>
inline __attribute__((always_inline)) float widen(c10::Half v) {
  const uint32_t w = static_cast<uint32_t>(v.x) << 16, twice = w + w;
  const float normal = bits_float((twice >> 4) + (0xe0u << 23)) * 0x1.0p-112f;
  const float subnormal = bits_float((twice >> 17) | (126u << 23)) - 0.5f;
  return bits_float((w & 0x80000000u) |
                    (twice < (1u << 27) ? float_bits(subnormal) : float_bits(normal)));
}
template <typename scalar_t, typename acc_t>
inline __attribute__((always_inline)) scalar_t rounded(acc_t v) {
  return round_to(v, static_cast<scalar_t*>(nullptr));
}

}  // namespace lambdapo
