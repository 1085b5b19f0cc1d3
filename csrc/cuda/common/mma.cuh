// Tensor-core matrix multiply-accumulate for sm_80+: mma.sync.aligned.m16n8k16 with fp16 or bf16 inputs and
// fp32 accumulators, packing of two floats into (and out of) one 32-bit register, and conversions between the
// accumulator (C) and input (A) fragment layouts.
//
// Fragment layouts (g = lane / 4, c = lane % 4; each .b32 register holds two 16-bit values, the lower column
// or row index in the lower half):
//   A (16x16, row-major):  a0 = (g, 2c..2c+1)  a1 = (g+8, 2c..2c+1)  a2 = (g, 2c+8..2c+9)  a3 = (g+8, 2c+8..)
//   B (16x8, "col"):       b0 = (k 2c..2c+1, n g)                      b1 = (k 2c+8..2c+9, n g)
//   C/D (16x8, fp32):      d0, d1 = (g, 2c), (g, 2c+1)                 d2, d3 = (g+8, 2c), (g+8, 2c+1)
// Tested through the attention kernels (tests/test_attention_cuda.py).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace tfm_kernels::cuda {

template <typename T>
struct MmaOps;

template <>
struct MmaOps<__half> {
  __device__ static __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static __forceinline__ float2 unpack(uint32_t packed) {
    return __half22float2(*reinterpret_cast<const __half2*>(&packed));
  }
  // d += a * b
  __device__ static __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct MmaOps<__nv_bfloat16> {
  __device__ static __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static __forceinline__ float2 unpack(uint32_t packed) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&packed));
  }
  __device__ static __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// The A fragment of k-step `ks` (columns 16ks..16ks+15) of a 16-row accumulator tile: an accumulator's
// n-tiles 2ks and 2ks+1 cover exactly those columns, in the same rows, so the conversion is register-local.
template <typename T, int kNTiles>
__device__ __forceinline__ void accumulator_to_a(uint32_t (&a)[4], const float (&acc)[kNTiles][4], int ks) {
  a[0] = MmaOps<T>::pack(acc[2 * ks][0], acc[2 * ks][1]);
  a[1] = MmaOps<T>::pack(acc[2 * ks][2], acc[2 * ks][3]);
  a[2] = MmaOps<T>::pack(acc[2 * ks + 1][0], acc[2 * ks + 1][1]);
  a[3] = MmaOps<T>::pack(acc[2 * ks + 1][2], acc[2 * ks + 1][3]);
}

}  // namespace tfm_kernels::cuda
