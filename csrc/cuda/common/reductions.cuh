// Warp-level reductions. The mma.sync accumulator layout spreads one matrix row over the 4 lanes of a quad
// (lanes 4g..4g+3 hold row g), so row statistics reduce over a quad with two xor-shuffles. Tested through
// the attention kernels (tests/test_attention_cuda.py).
#pragma once

namespace tfm_kernels::cuda {

constexpr unsigned kFullWarpMask = 0xffffffffu;

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(kFullWarpMask, x, 1));
  return fmaxf(x, __shfl_xor_sync(kFullWarpMask, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(kFullWarpMask, x, 1);
  return x + __shfl_xor_sync(kFullWarpMask, x, 2);
}

// Whether `pred` holds in any lane of the warp (every lane must call it).
__device__ __forceinline__ bool warp_any(bool pred) { return __any_sync(kFullWarpMask, pred); }

// Sum over aligned groups of kWidth lanes (kWidth a power of two <= 32).
template <int kWidth>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(kFullWarpMask, x, offset);
  }
  return x;
}

}  // namespace tfm_kernels::cuda
