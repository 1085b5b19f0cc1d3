// Vectorised row loops of the CPU kernels; see row_loops.h.
#include "cpu/row_loops.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "common/philox.h"

// One copy per instruction set, chosen at load time (GCC function multi-versioning; GCC 12 and newer, where
// these arch= names were checked to build). Other compilers build the baseline copy only.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__)
#define TFM_ROW_LOOP __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TFM_ROW_LOOP
#endif

namespace tfm_kernels::cpu {
namespace {

// Reductions keep kLanes partial results so that the compiler can vectorise them without reassociating float
// sums (the order, and with it the result, is fixed by the source, whatever the vector width).
constexpr int kLanes = 16;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// 2^x for x <= 127, within about 1 ulp; 0 for x < -126.5 (and -inf). Exponent by bit construction, 2^f on
// f in [-0.5, 0.5) by its degree-7 Taylor polynomial (truncation error 0.35^8 / 8! ~ 5e-9).
inline __attribute__((always_inline)) float exp2_approx(float x) {
  constexpr float kMin = -127.0f, kMax = 127.0f, kExponentBias = 127.0f;
  x = x < kMin ? kMin : x;
  x = x > kMax ? kMax : x;
  // x + 127.5 >= 0.5, so truncation is floor: biased = round(x) + 127, in [0, 254].
  const int32_t biased = static_cast<int32_t>(x + (kExponentBias + 0.5f));
  const float f = x - static_cast<float>(biased - 127);
  // Coefficients ln(2)^k / k!.
  float p = 1.5252733804059840e-05f;
  p = p * f + 1.5403530393381609e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.6181291076284772e-03f;
  p = p * f + 5.5504108664821580e-02f;
  p = p * f + 2.4022650695910071e-01f;
  p = p * f + 6.9314718055994531e-01f;
  p = p * f + 1.0f;
  const int32_t bits = biased << 23;  // biased == 0 gives the bit pattern of +0.0
  float power;
  std::memcpy(&power, &bits, sizeof(power));
  return p * power;
}

}  // namespace

TFM_ROW_LOOP void scale_row(float* __restrict x, int64_t n, float factor) {
  for (int64_t c = 0; c < n; ++c) {
    x[c] *= factor;
  }
}

TFM_ROW_LOOP void multiply_row(float* __restrict x, const float* __restrict y, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    x[c] *= y[c];
  }
}

TFM_ROW_LOOP void fill_row(float* __restrict x, int64_t n, float value) {
  for (int64_t c = 0; c < n; ++c) {
    x[c] = value;
  }
}

TFM_ROW_LOOP float row_max(const float* __restrict x, int64_t n) {
  // A GCC vector type: the compiler does not vectorise a float max reduction written with scalars (NaN and
  // signed-zero rules), but it lowers this one to the widest max instruction of each clone.
  using Lanes = float __attribute__((vector_size(kLanes * sizeof(float))));
  Lanes lanes = {};
  lanes += kNegInf;
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    Lanes block;
    std::memcpy(&block, x + c, sizeof(block));
    lanes = block > lanes ? block : lanes;
  }
  float result = kNegInf;
  for (; c < n; ++c) {
    result = x[c] > result ? x[c] : result;
  }
  for (int l = 0; l < kLanes; ++l) {
    result = lanes[l] > result ? lanes[l] : result;
  }
  return result;
}

TFM_ROW_LOOP void exp2_row(float* __restrict x, int64_t n, float offset) {
  for (int64_t c = 0; c < n; ++c) {
    x[c] = x[c] == kNegInf ? 0.0f : exp2_approx(x[c] - offset);
  }
}

TFM_ROW_LOOP float exp2_row_sum(float* __restrict x, int64_t n, float offset) {
  for (int64_t c = 0; c < n; ++c) {
    x[c] = exp2_approx(x[c] - offset);
  }
  float lanes[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      lanes[l] += x[c + l];
    }
  }
  float total = 0.0f;
  for (; c < n; ++c) {
    total += x[c];
  }
  for (int l = 0; l < kLanes; ++l) {
    total += lanes[l];
  }
  return total;
}

TFM_ROW_LOOP void softmax_grad_row(float* __restrict grad, const float* __restrict probs, int64_t n, float delta) {
  for (int64_t c = 0; c < n; ++c) {
    grad[c] = probs[c] == 0.0f ? 0.0f : probs[c] * (grad[c] - delta);
  }
}

TFM_ROW_LOOP void dropout_row(float* __restrict keep, int64_t n, uint64_t seed, uint64_t z, uint32_t i, uint32_t j0,
                              uint32_t threshold, float keep_scale) {
  // One Philox call per 8 columns (its keep byte); the calls of a chunk of groups are independent, so the
  // first loop vectorises across them.
  constexpr int64_t kGroupsPerChunk = 64;
  uint32_t bytes[kGroupsPerChunk];
  const int64_t end = static_cast<int64_t>(j0) + n;  // one past the last column
  for (int64_t g0 = j0 / kColumnsPerDraw; g0 * kColumnsPerDraw < end; g0 += kGroupsPerChunk) {
    const int64_t groups = std::min(kGroupsPerChunk, (end - 1) / kColumnsPerDraw - g0 + 1);
    for (int64_t g = 0; g < groups; ++g) {
      bytes[g] = dropout_keep_byte(seed, z, i, static_cast<uint32_t>(g0 + g), threshold);
    }
    const int64_t first = std::max<int64_t>(j0, g0 * kColumnsPerDraw);
    const int64_t last = std::min(end, (g0 + groups) * kColumnsPerDraw);
    for (int64_t j = first; j < last; ++j) {
      const uint32_t bit = (bytes[j / kColumnsPerDraw - g0] >> (j % kColumnsPerDraw)) & 1u;
      keep[j - j0] = bit ? keep_scale : 0.0f;
    }
  }
}

}  // namespace tfm_kernels::cpu
