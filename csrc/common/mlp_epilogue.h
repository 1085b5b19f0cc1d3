// Elementwise math of the MLP epilogues shared by the CPU (csrc/cpu/mlp.cpp) and CUDA (csrc/cuda/mlp/) kernels:
// the activations and their derivatives in float, and the dropout rule of the MLP operators (philox.h with
// z = 0, row = token index, column = feature index). The Triton kernels (tfm_kernels/triton/mlp.py) and the
// torch reference (tfm_kernels/reference.py) compute the same functions.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/philox.h"

namespace tfm_kernels {

enum class Activation : int { kNone = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3, kSilu = 4 };

constexpr float kInvSqrt2 = 0.70710678118654752f;      // 1 / sqrt(2): erf-GELU argument
constexpr float kInvSqrt2Pi = 0.39894228040143268f;    // 1 / sqrt(2 pi): normal density
constexpr float kSqrt2OverPi = 0.79788456080286536f;   // sqrt(2 / pi): tanh-GELU argument
constexpr float kGeluTanhCubic = 0.044715f;             // cubic coefficient of the tanh approximation

// Parses an operator's activation argument; false for an unknown name.
inline bool parse_activation(const char* name, Activation* activation) {
  static const struct { const char* name; Activation value; } kNames[] = {
      {"none", Activation::kNone}, {"gelu", Activation::kGelu}, {"gelu_tanh", Activation::kGeluTanh},
      {"relu", Activation::kRelu}, {"silu", Activation::kSilu}};
  for (const auto& entry : kNames) {
    if (std::strcmp(name, entry.name) == 0) {
      *activation = entry.value;
      return true;
    }
  }
  return false;
}

TFM_HOST_DEVICE float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

// s = (1 + tanh(u)) / 2 = sigmoid(2u) for u the tanh-GELU argument of z, and s (1 - s) in *slope: from one
// exponential e = e^{-|2u|} in (0, 1], so nothing overflows and neither value is a difference of nearby numbers
// (1 + tanh(u) loses GELU's negative tail to cancellation). expf stays accurate under --use_fast_math, where
// tanhf would become tanh.approx (relative error 2^-11, visible in float32).
TFM_HOST_DEVICE float gelu_tanh_sigmoid(float z, float* slope) {
  const float x = 2.0f * kSqrt2OverPi * (z + kGeluTanhCubic * z * z * z);
  const float e = expf(-fabsf(x));
  const float r = 1.0f / (1.0f + e);
  *slope = e * r * r;
  return x < 0.0f ? e * r : r;
}

template <Activation A>
TFM_HOST_DEVICE float activate(float z) {
  if constexpr (A == Activation::kGelu) {
    return 0.5f * z * (1.0f + erff(z * kInvSqrt2));
  } else if constexpr (A == Activation::kGeluTanh) {
    float slope;
    return z * gelu_tanh_sigmoid(z, &slope);
  } else if constexpr (A == Activation::kRelu) {
    return z < 0.0f ? 0.0f : z;  // NaN stays NaN, as in torch.relu
  } else if constexpr (A == Activation::kSilu) {
    return z * sigmoid(z);
  } else {
    return z;
  }
}

// grad * act'(z); relu selects grad or 0 as torch's relu backward does (0 where z <= 0 even for an infinite
// grad; grad where z is NaN).
template <Activation A>
TFM_HOST_DEVICE float activation_backward(float grad, float z) {
  if constexpr (A == Activation::kGelu) {
    return grad * (0.5f * (1.0f + erff(z * kInvSqrt2)) + z * kInvSqrt2Pi * expf(-0.5f * z * z));
  } else if constexpr (A == Activation::kGeluTanh) {
    float slope;
    const float s = gelu_tanh_sigmoid(z, &slope);
    // z * z capped where the slope is long 0: it overflows from |z| = 1.85e19 on, and 0 * inf is NaN where the
    // float64 reference has a number (an infinite z still gives inf * 0 = NaN, as the reference does)
    const float z2 = fminf(z * z, 1e20f);
    return grad * (s + 2.0f * z * slope * kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhCubic * z2));
  } else if constexpr (A == Activation::kRelu) {
    return z <= 0.0f ? 0.0f : grad;
  } else if constexpr (A == Activation::kSilu) {
    const float s = sigmoid(z);
    return grad * (s * (1.0f + z * (1.0f - s)));
  } else {
    return grad;
  }
}

// Calls fn(std::integral_constant<Activation, A>{}) for the runtime value `activation`, so kernels are
// compiled once per activation with the branch resolved at compile time.
template <typename Fn>
decltype(auto) dispatch_activation(Activation activation, Fn&& fn) {
  switch (activation) {
    case Activation::kGelu: return fn(std::integral_constant<Activation, Activation::kGelu>{});
    case Activation::kGeluTanh: return fn(std::integral_constant<Activation, Activation::kGeluTanh>{});
    case Activation::kRelu: return fn(std::integral_constant<Activation, Activation::kRelu>{});
    case Activation::kSilu: return fn(std::integral_constant<Activation, Activation::kSilu>{});
    default: return fn(std::integral_constant<Activation, Activation::kNone>{});
  }
}

// Dropout of the MLP operators: the multiplier of element (row, col), 0 (dropped) or keep_scale (kept), read
// from the keep byte of the column's group of 8 (one Philox call, common/philox.h).
// threshold and keep_scale (common/philox.h) come from the host; p == 0 keeps everything.
struct MlpDropout {
  uint64_t seed;
  uint32_t threshold;
  float keep_scale;
  bool active;

  // The keep bits of columns 8 group .. 8 group + 7 of `row` (bit c: column 8 group + c), all set when inactive.
  TFM_HOST_DEVICE uint32_t keep_byte(int64_t row, int64_t group) const {
    if (!active) return 0xFFu;
    return dropout_keep_byte(seed, 0, static_cast<uint32_t>(row), static_cast<uint32_t>(group), threshold);
  }

  // The multiplier of column 8 group + c from that group's keep byte.
  TFM_HOST_DEVICE float multiplier(uint32_t keep_byte, int c) const {
    if (!active) return 1.0f;
    return ((keep_byte >> c) & 1u) ? keep_scale : 0.0f;
  }
};

inline MlpDropout make_mlp_dropout(double dropout_p, int64_t seed) {
  MlpDropout dropout;
  dropout.active = dropout_p > 0.0;
  dropout.seed = static_cast<uint64_t>(seed);
  dropout.threshold = dropout_threshold(dropout_p);
  dropout.keep_scale = dropout_keep_scale(dropout_p);
  return dropout;
}

}  // namespace tfm_kernels
