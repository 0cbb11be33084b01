// Numbers and types that several kernels (CPU and CUDA) share, named once.
#pragma once

#include <cstdint>
#include <type_traits>

namespace lambdapo {

// CUDA launch limits: gridDim.x may reach 2^31 - 1 blocks, gridDim.y and gridDim.z 65535.
// Launch sizes are checked against them on the host before a kernel is launched.
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridY = 65535;

// expf's argument range where the result is a normal float: exp(-87) = 1.6e-38 lies just
// above FLT_MIN = 2^-126 (exp(-87.34)) and exp(88) = 1.7e38 just below FLT_MAX. Kernels
// clamp to it (or flush below kExpNormalMin to 0) so that no subnormal or inf enters a sum
// and a -inf logit never meets 0 * inf.
constexpr float kExpNormalMin = -87.0f;
constexpr float kExpNormalMax = 88.0f;
// CUDA's __fdividef(a, b) is accurate for |b| up to 2^126 and returns 0 beyond: with
// |x| <= 80, b = 1 + exp(x) stays below 5.6e34, far inside that range.
constexpr float kFastDivideExpBound = 80.0f;

// Accumulation type of the softmax kernels: fp32 for 16-bit and fp32 inputs, fp64 for fp64
// (gradcheck).
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The widest load a CUDA thread issues (one 128-bit transaction), and a vector of N
// elements of T loaded or stored as one (sizeof(T) * N == kVecBytes).
constexpr int kVecBytes = 16;
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

}  // namespace lambdapo
