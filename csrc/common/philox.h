// Philox-4x32-10 counter-based random numbers and the dropout keep rule shared by every backend
// (C++ CPU, CUDA; the Triton kernels and tfm_kernels/rng.py implement the same function).
// An element (z, i, j) of a dropout mask (z: batch*head or 0, i: row, j: column) uses the counter
// (j, i, lo32(z), hi32(z)) under the key (lo32(seed), hi32(seed)); it is kept iff
// (first output word >> 8) >= threshold, with threshold = floor(p * 2^24) computed by the host.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define TFM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TFM_HOST_DEVICE inline
#endif

namespace tfm_kernels {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
constexpr int kDropoutBits = 24;  // a keep decision compares the top 24 bits of one 32-bit word

// First output word of Philox-4x32-10 for counter (c0, c1, c2, c3) and key (k0, k1).
TFM_HOST_DEVICE uint32_t philox_first_word(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                           uint32_t k1) {
#pragma unroll
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
  return c0;
}

TFM_HOST_DEVICE bool dropout_keep(uint64_t seed, uint64_t z, uint32_t i, uint32_t j, uint32_t threshold) {
  const uint32_t word = philox_first_word(j, i, static_cast<uint32_t>(z), static_cast<uint32_t>(z >> 32),
                                          static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return (word >> (32 - kDropoutBits)) >= threshold;
}

}  // namespace tfm_kernels
