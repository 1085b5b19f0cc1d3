// Emulated replacement for the asm part of csrc/cuda/common/mma.cuh: MmaOps over the 16-bit types of
// cuda_headers/, whose mma() is warp-collective and follows the PTX fragment layouts of mma.m16n8k16.row.col
// (g = lane / 4, c = lane % 4): A a0 = (g, 2c..2c+1), a1 = (g+8, ..), a2 = (g, 2c+8..), a3 = (g+8, 2c+8..);
// B b0 = (k 2c..2c+1, n g), b1 = (k 2c+8.., n g); C/D d0, d1 = (g, 2c), (g, 2c+1), d2, d3 = row g+8. The test
// prepends this to the rest of mma.cuh (the layout conversions), so those run unchanged.
#pragma once
#include "cuda_headers/cuda_bf16.h"
#include "cuda_headers/cuda_fp16.h"
#include "runtime.h"

namespace tfm_kernels::cuda {

// A float to the 16 bits of a T, rounded to nearest even as __floats2half2_rn / __floats2bfloat162_rn, and back.
template <typename T>
struct Bits16 {
  static uint16_t from_float(float f) { return T(f).bits; }
  static float to_float(uint16_t b) {
    T t;
    t.bits = b;
    return float(t);
  }
};

template <typename T>
struct MmaOps {
  static uint32_t pack(float lo, float hi) {
    return uint32_t(Bits16<T>::from_float(lo)) | (uint32_t(Bits16<T>::from_float(hi)) << 16);
  }
  static float2 unpack(uint32_t packed) {
    return {Bits16<T>::to_float(uint16_t(packed & 0xffffu)), Bits16<T>::to_float(uint16_t(packed >> 16))};
  }
  // d += a * b over the warp: every lane publishes its fragments, then computes its own four outputs.
  static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    auto& slots = emu::block->exchange[emu::warp()];
    for (int i = 0; i < 4; ++i) slots[emu::lane()][i] = a[i];
    slots[emu::lane()][4] = b0;
    slots[emu::lane()][5] = b1;
    emu::collective_sync(emu::Collective::kMma);
    float A[16][16], B[16][8];
    for (int t = 0; t < 32; ++t) {
      const int g = t / 4, c = t % 4;
      const int a_rows[4] = {g, g + 8, g, g + 8}, a_cols[4] = {2 * c, 2 * c, 2 * c + 8, 2 * c + 8};
      for (int i = 0; i < 4; ++i) {
        const float2 v = unpack(uint32_t(slots[t][i]));
        A[a_rows[i]][a_cols[i]] = v.x;
        A[a_rows[i]][a_cols[i] + 1] = v.y;
      }
      for (int i = 0; i < 2; ++i) {
        const float2 v = unpack(uint32_t(slots[t][4 + i]));
        B[2 * c + 8 * i][g] = v.x;
        B[2 * c + 8 * i + 1][g] = v.y;
      }
    }
    emu::warp_sync();
    const int g = emu::lane() / 4, c = emu::lane() % 4;
    for (int e = 0; e < 4; ++e) {
      const int row = g + 8 * (e / 2), col = 2 * c + e % 2;
      for (int k = 0; k < 16; ++k) d[e] += A[row][k] * B[k][col];
    }
  }
};

}  // namespace tfm_kernels::cuda
