// Attention forward: out = softmax(scale * q k^T, masked) v with optional dropout on the weights, and the
// base-2 log of the sum of exp of each row's scaled scores (lse), FlashAttention-2 style: one pass over the keys
// with an online softmax in registers, nothing of size L x S in memory.
//
// Work split: grid (ceil(L / kBlockM), Hq, B); block = 4 warps; warp w owns the kMTiles row tiles of 16 query rows
// from 16 kMTiles w of the block's kBlockM-row tile (kernel_traits.h: two at head dims up to 128, sharing every K and
// V fragment). Per key block of kBlockN rows: S = Q K^T (mma.m16n8k16, fp32 accumulate), scaled into base 2, masked
// (keys >= key length, causal j > i) to -inf, online max/sum update (quad shuffles; the output is rescaled only when a
// row's max grows by more than kStaleMaxSlack), P = exp2(S - m), optional dropout of P (Philox, common/philox.h),
// O += P V. K/V tiles arrive by cp.async, either both of block j+1 while block j is multiplied (three stages and one
// barrier a block, or two and two) or, with kSplitKV, V of block j during Q K^T and K of block j+1 during P V (two
// barriers a block; kernel_traits.h). Causal blocks skip key blocks entirely above the diagonal; only blocks crossing
// the diagonal or the key length pay for masking.
//
// Rows with no key (key length 0) get out = 0 and lse = +inf.
//
// Test: python -m pytest tests/test_attention_cuda.py -m gpu (against the float64 oracle);
// compute-sanitizer --tool memcheck python benchmarks/sanitize_attention.py.
#pragma once
#include <cmath>
#include <cstdint>

#include "cuda/attention/kernel_traits.h"
#include "cuda/attention/params.h"
#include "cuda/attention/tile_math.cuh"
#include "cuda/common/memory.cuh"
#include "cuda/common/reductions.cuh"

namespace tfm_kernels::attention {

// How far (base 2) a row's max may grow past the max its weights are taken relative to before the warp rescales:
// weights stay below 2^8, far from float32's range, and bfloat16/float16 round them to the same relative precision.
constexpr float kStaleMaxSlack = 8.0f;

// A row max to subtract from the scores: 0 while the row has no key (max -inf), so exp2 never sees -inf - -inf.
__device__ __forceinline__ float finite_max(float row_max) { return row_max == -INFINITY ? 0.0f : row_max; }

template <int D, typename T>
__global__ void __launch_bounds__(ForwardTraits<D>::kThreads) attention_forward_kernel(const ForwardParams params) {
  using Traits = ForwardTraits<D>;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kStride = Traits::kSmemStride;
  constexpr int kThreads = Traits::kThreads;

  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);  // (kBlockM, kStride)
  T* sK = sQ + kBlockM * kStride;      // (kStages, kBlockN, kStride)
  T* sV = sK + Traits::kStages * kBlockN * kStride;

  const int m_block = blockIdx.x;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int L = params.q_len;
  const int m_start = m_block * kBlockM;
  const KeyValueBlocks<D, kBlockM, kBlockN, kStride, kThreads, T> kv(params, b, h, m_start, sK, sV);

  if (kv.count > 0) {  // with no key block the loop below never waits, so nothing may be in flight
    const T* q = row_pointer<T>(params.q, params.q_strides, b, h, m_start);
    load_tile_async<kBlockM, D, kStride, kThreads>(sQ, q, params.q_strides.row, L - m_start);
    if constexpr (Traits::kSplitKV) {
      kv.load_k(0, 0);
    } else {
      kv.load(0, 0);
    }
  }
  cuda::cp_async_commit();

  const uint64_t seed = params.dropout ? static_cast<uint64_t>(*params.seed) : 0;
  const uint64_t z = static_cast<uint64_t>(b) * params.heads_q + h;
  constexpr int kMTiles = Traits::kMTiles;
  const int row0 = m_start + warp * kMTiles * kRowsPerWarp;  // first query row of this warp; tile m from row0 + 16 m
  const T* sQ_warp = sQ + (row0 - m_start) * kStride;

  float o_acc[kMTiles][D / 8][4];
  // Per row tile and lane: rows + lane/4 (index 0) and + lane/4 + 8 (index 1). row_max: the max (base-2 scaled
  // units) the row's weights are taken relative to, at most kStaleMaxSlack below the row's true max.
  float row_max[kMTiles][2];
  float row_sum[kMTiles][2];  // this lane's partial sums; reduced over the quad at the end
#pragma unroll
  for (int m = 0; m < kMTiles; ++m) {
    zero(o_acc[m]);
    row_max[m][0] = row_max[m][1] = -INFINITY;
    row_sum[m][0] = row_sum[m][1] = 0.0f;
  }

  for (int n_block = 0; n_block < kv.count; ++n_block) {
    const int stage = n_block % Traits::kStages;
    if constexpr (Traits::kSplitKV) {
      // K of this block has landed, and every warp is done with the V tile (the last block's P V): refill it.
      cuda::cp_async_wait<0>();
      __syncthreads();
      kv.load_v(n_block, 0);
      cuda::cp_async_commit();
    } else {
      cuda::cp_async_pipeline_step<Traits::kStages>(n_block, kv.count,
                                                    [&](int next, int next_stage) { kv.load(next, next_stage); });
    }

    const int n_start = n_block * kBlockN;
    float s[kMTiles][kBlockN / 8][4];
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) zero(s[m]);
    // k-steps rolled: unrolled, the compiler loads Q and K fragments of later steps early and, beside two row
    // tiles' accumulators, spills (ptxas, kernel_traits.h)
    gemm_smem_nt<T, kBlockN, D, kStride, kMTiles, 1>(s, sQ_warp, kv.k_tile(stage), lane);

    // block_max: each row's true max over the keys so far. row_max moves only when some row of the warp grows
    // past it by more than kStaleMaxSlack: then every row of the warp moves to its true max and the output and
    // sum are rescaled. Otherwise (most key blocks, once the first have set the max) the rescale's kMTiles D / 2
    // multiplies per lane are skipped; out and lse do not depend on the base the weights are taken from.
    float block_max[kMTiles][2];
    bool moves = false;
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
      scale_and_mask_scores(s[m], params, kv.keys, m_start, row0 + m * kRowsPerWarp, n_start, lane);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float lane_max = row_max[m][r];
#pragma unroll
        for (int t = 0; t < kBlockN / 8; ++t) lane_max = fmaxf(lane_max, fmaxf(s[m][t][2 * r], s[m][t][2 * r + 1]));
        block_max[m][r] = cuda::quad_max(lane_max);
        moves |= block_max[m][r] > row_max[m][r] + kStaleMaxSlack;  // -inf > -inf: still no key
      }
    }
    if (cuda::warp_any(moves)) {
#pragma unroll
      for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float correction = exp2f(row_max[m][r] - finite_max(block_max[m][r]));  // exp2(-inf) = 0 at first
          row_max[m][r] = block_max[m][r];
          row_sum[m][r] *= correction;
#pragma unroll
          for (int t = 0; t < D / 8; ++t) {
            o_acc[m][t][2 * r] *= correction;
            o_acc[m][t][2 * r + 1] *= correction;
          }
        }
      }
    }
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float base = finite_max(row_max[m][r]);
#pragma unroll
        for (int t = 0; t < kBlockN / 8; ++t) {
#pragma unroll
          for (int e = 2 * r; e < 2 * r + 2; ++e) {
            s[m][t][e] = exp2f(s[m][t][e] - base);
            row_sum[m][r] += s[m][t][e];
          }
        }
      }
      // The normaliser sums every weight; dropout zeroes some of them in the product with V only.
      if (params.dropout) {
        apply_keep_bits(s[m], dropout_keep_bits<kBlockN / 8, false>(seed, z, row0 + m * kRowsPerWarp, n_start, lane,
                                                                    params.dropout_threshold), 1.0f);
      }
    }

    if constexpr (Traits::kSplitKV) {
      // V of this block has landed, and every warp is done with the K tile: the next block's K goes in.
      cuda::cp_async_wait<0>();
      __syncthreads();
      if (n_block + 1 < kv.count) kv.load_k(n_block + 1, 0);
      cuda::cp_async_commit();
    }
    gemm_reg_nn<T, D, kBlockN, kStride>(o_acc, s, kv.v_tile(stage), lane);
    if constexpr (!Traits::kSplitKV) cuda::cp_async_ring_end<Traits::kStages>();
  }

  float* lse = params.lse + (static_cast<int64_t>(b) * params.heads_q + h) * L;
#pragma unroll
  for (int m = 0; m < kMTiles; ++m) {
    const int tile_row0 = row0 + m * kRowsPerWarp;
    const int tile_rows = L - tile_row0;  // rows of this tile inside the sequence (may be <= 0)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float sum = cuda::quad_sum(row_sum[m][r]);
      const bool empty = sum == 0.0f;  // a NaN sum (a NaN score) is not empty: out and lse become NaN
      const float inverse = empty ? 0.0f : params.dropout_rescale / sum;
      const int row = lane / 4 + 8 * r;
      if (lane % 4 == 0 && row < tile_rows) lse[tile_row0 + row] = empty ? INFINITY : row_max[m][r] + log2f(sum);
#pragma unroll
      for (int t = 0; t < D / 8; ++t) {
        o_acc[m][t][2 * r] *= inverse;
        o_acc[m][t][2 * r + 1] *= inverse;
      }
    }
    T* out = row_pointer<T>(params.out, params.out_strides, b, h, tile_row0);
    store_tile<T>(o_acc[m], out, params.out_strides.row, tile_rows, 1.0f, lane);
  }
}

}  // namespace tfm_kernels::attention
