// Philox-4x32-10 counter-based random numbers and the dropout keep rule shared by every backend
// (C++ CPU, CUDA; the Triton kernels and tfm_kernels/rng.py implement the same function).
// An element (z, i, j) of a dropout mask (z: batch*head or 0, i: row, j: column) reads 16 bits of the Philox
// output for counter (j / 8, i, lo32(z), hi32(z)) under the key (lo32(seed), hi32(seed)): word (j / 2) % 4,
// low half for even j, high half for odd j. It is kept iff those bits >= threshold = floor(p * 2^16),
// computed by the host. One Philox call thus decides 8 consecutive columns of a row.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define TFM_HOST_DEVICE __host__ __device__ __forceinline__
#define TFM_UNROLL _Pragma("unroll")
#else
#define TFM_HOST_DEVICE inline
#define TFM_UNROLL
#endif

namespace tfm_kernels {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
constexpr int kDropoutBits = 16;       // bits of one keep decision
constexpr int kColumnsPerDraw = 8;     // keep decisions per Philox call (128 output bits)

struct PhiloxWords {
  uint32_t w[4];
};

// The four output words of Philox-4x32-10 for counter (c0, c1, c2, c3) and key (k0, k1).
TFM_HOST_DEVICE PhiloxWords philox(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
TFM_UNROLL
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return PhiloxWords{{c0, c1, c2, c3}};
}

// The keep bits of columns 8g .. 8g + 7 of row i of stream z: bit c is set iff column 8g + c is kept, from
// half c % 2 (0: low) of output word c / 2.
TFM_HOST_DEVICE uint32_t dropout_keep_byte(uint64_t seed, uint64_t z, uint32_t i, uint32_t g, uint32_t threshold) {
  const PhiloxWords words = philox(g, i, static_cast<uint32_t>(z), static_cast<uint32_t>(z >> 32),
                                   static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  uint32_t bits = 0;
TFM_UNROLL
  for (int c = 0; c < kColumnsPerDraw; ++c) {
    const uint32_t half = (words.w[c / 2] >> (kDropoutBits * (c % 2))) & 0xFFFFu;
    bits |= static_cast<uint32_t>(half >= threshold) << c;
  }
  return bits;
}

// floor(p * 2^16): the threshold of the keep rule for dropout probability p in [0, 1) (as tfm_kernels/rng.py).
inline uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(p * static_cast<double>(1u << kDropoutBits));
}

// The multiplier of a kept element, 2^16 / (2^16 - threshold): the inverse of the keep probability that the
// threshold gives, so that dropout leaves every expectation unchanged (as tfm_kernels/rng.py).
inline float dropout_keep_scale(double p) {
  const double decisions = static_cast<double>(1u << kDropoutBits);
  return static_cast<float>(decisions / (decisions - dropout_threshold(p)));
}

}  // namespace tfm_kernels
