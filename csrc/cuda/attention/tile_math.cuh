// Building blocks of the attention kernels: the per-warp tensor-core products every pass is made of,
// element-wise visits of an accumulator tile with its (row, column) coordinates, the dropout keep-mask of a
// tile, score scaling and masking, stores of an accumulator tile (to global memory, to shared memory, atomic
// adds to a float32 sum), and the key/value block ring of the query-block kernels. An accumulator tile is 16
// rows (mma M = 16); a warp multiplies one such row tile, or kMTiles of them with each B fragment it loads from
// shared memory used by all of them (the forward: half the shared-memory reads per multiply-add).
//
//   gemm_smem_nt:  acc (16 x N) += A (16 x K, shared, row-major) * B^T, B stored (N x K) row-major in shared.
//                  Scores S = Q K^T, dP = dO V^T (query-major) and S^T = K Q^T, dP^T = V dO^T (key-major).
//   gemm_reg_nn:   acc (16 x N) += A (16 x K, an fp32 accumulator tile rounded to T) * B, B stored (K x N)
//                  row-major in shared (read with ldmatrix.trans). O += P V, dQ += dS K, dV += P^T dO,
//                  dK += dS^T Q.
//   Both also take kMTiles row tiles at once: acc[m] (16 x N) with A's rows 16 m .. 16 m + 15.
//   gemm_smem_tn:  acc (16 x N) += A * B, A stored transposed (K x 16) and B (K x N), both row-major in
//                  shared. dQ += dS K of the fused backward, from the dS^T tile the dk/dv warps wrote.
// Tested through the attention kernels (tests/test_attention_cuda.py).
#pragma once
#include <cstdint>

#include "common/philox.h"
#include "cuda/attention/params.h"
#include "cuda/common/memory.cuh"
#include "cuda/common/mma.cuh"

namespace tfm_kernels::attention {

using cuda::load_tile_async;
using cuda::MmaOps;

// The lane's ldmatrix x4 address over a 16x16 tile stored row-major, rows kStride apart from `base`; its four
// 8x8 matrices taken (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 8-15).
template <int kStride, typename T>
__device__ __forceinline__ const T* x4_address_rows_first(const T* base, int lane) {
  return base + (lane % 8 + 8 * ((lane / 8) % 2)) * kStride + 8 * (lane / 16);
}

// As x4_address_rows_first, the matrices taken (rows 0-7, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols
// 0-7), (rows 8-15, cols 8-15).
template <int kStride, typename T>
__device__ __forceinline__ const T* x4_address_cols_first(const T* base, int lane) {
  return base + (lane % 8 + 8 * (lane / 16)) * kStride + 8 * ((lane / 8) % 2);
}

// A's 16 kMTiles rows start at sA; B's N rows start at sB; both kStride elements apart. kUnrollK: how many of
// the kK / 16 k-steps are unrolled (all by default); unrolled steps let the compiler load fragments of later
// steps early, which costs registers.
template <typename T, int kN, int kK, int kStride, int kMTiles, int kUnrollK = kK / 16>
__device__ __forceinline__ void gemm_smem_nt(float (&acc)[kMTiles][kN / 8][4], const T* sA, const T* sB, int lane) {
  static_assert(kN % 16 == 0 && kK % 16 == 0, "whole 16x16 steps");
  // ldmatrix lane addresses. A, x4 = (rows 0-7 | 8-15) x (cols 0-7 | 8-15) in the a0..a3 order.
  const T* a_row = x4_address_rows_first<kStride>(sA, lane);
  // B, x4 = b0, b1 of n-tile 2j (matrices 0, 1: k cols 0-7, 8-15) then of n-tile 2j+1 (rows 8-15).
  const T* b_row = x4_address_cols_first<kStride>(sB, lane);
#pragma unroll kUnrollK
  for (int ks = 0; ks < kK / 16; ++ks) {
    uint32_t a[kMTiles][4];
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) cuda::ldmatrix_x4(a[m], a_row + m * 16 * kStride + ks * 16);
#pragma unroll
    for (int nj = 0; nj < kN / 16; ++nj) {
      uint32_t b[4];
      cuda::ldmatrix_x4(b, b_row + nj * 16 * kStride + ks * 16);
#pragma unroll
      for (int m = 0; m < kMTiles; ++m) {
        MmaOps<T>::mma(acc[m][2 * nj], a[m], b[0], b[1]);
        MmaOps<T>::mma(acc[m][2 * nj + 1], a[m], b[2], b[3]);
      }
    }
  }
}

// One row tile: acc (16 x N).
template <typename T, int kN, int kK, int kStride>
__device__ __forceinline__ void gemm_smem_nt(float (&acc)[kN / 8][4], const T* sA, const T* sB, int lane) {
  gemm_smem_nt<T, kN, kK, kStride, 1>(reinterpret_cast<float (&)[1][kN / 8][4]>(acc), sA, sB, lane);
}

// acc[m] (16 x kN) += a[m] * B[16 ks..16 ks + 15, :], a[m] being row tile m's A fragment of k-step ks; B stored
// (K x N) row-major, b_row = x4_address_rows_first of its first row: x4.trans = b0, b1 of n-tile 2j (matrices 0,
// 1: k rows 0-7, 8-15) then of n-tile 2j+1 (cols 8-15).
template <typename T, int kN, int kStride, int kMTiles>
__device__ __forceinline__ void mma_row_major_b(float (&acc)[kMTiles][kN / 8][4], const uint32_t (&a)[kMTiles][4],
                                                const T* b_row, int ks) {
#pragma unroll
  for (int nj = 0; nj < kN / 16; ++nj) {
    uint32_t b[4];
    cuda::ldmatrix_x4_trans(b, b_row + ks * 16 * kStride + nj * 16);
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
      MmaOps<T>::mma(acc[m][2 * nj], a[m], b[0], b[1]);
      MmaOps<T>::mma(acc[m][2 * nj + 1], a[m], b[2], b[3]);
    }
  }
}

// a_tile[m] is row tile m's 16 x kK fp32 (kK / 8 n-tiles); sB points at B's row 0, first of the kN columns this
// warp owns.
template <typename T, int kN, int kK, int kStride, int kMTiles>
__device__ __forceinline__ void gemm_reg_nn(float (&acc)[kMTiles][kN / 8][4], const float (&a_tile)[kMTiles][kK / 8][4],
                                            const T* sB, int lane) {
  static_assert(kN % 16 == 0 && kK % 16 == 0, "whole 16x16 steps");
  const T* b_row = x4_address_rows_first<kStride>(sB, lane);
#pragma unroll
  for (int ks = 0; ks < kK / 16; ++ks) {
    uint32_t a[kMTiles][4];
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) cuda::accumulator_to_a<T>(a[m], a_tile[m], ks);
    mma_row_major_b<T, kN, kStride>(acc, a, b_row, ks);
  }
}

// One row tile: acc (16 x kN), a_tile (16 x kK).
template <typename T, int kN, int kK, int kStride>
__device__ __forceinline__ void gemm_reg_nn(float (&acc)[kN / 8][4], const float (&a_tile)[kK / 8][4], const T* sB,
                                            int lane) {
  gemm_reg_nn<T, kN, kK, kStride, 1>(reinterpret_cast<float (&)[1][kN / 8][4]>(acc),
                                     reinterpret_cast<const float (&)[1][kK / 8][4]>(a_tile), sB, lane);
}

// sAT holds A transposed: A^T (kK x 16) row-major, rows kStrideA apart (read with ldmatrix.trans); B as in
// gemm_reg_nn. dQ += dS K in the fused backward, where dS^T is what the dk/dv warps hold.
template <typename T, int kN, int kK, int kStrideA, int kStrideB>
__device__ __forceinline__ void gemm_smem_tn(float (&acc)[kN / 8][4], const T* sAT, const T* sB, int lane) {
  static_assert(kN % 16 == 0 && kK % 16 == 0, "whole 16x16 steps");
  // A, x4.trans = a0..a3: stored A^T (k rows 0-7 | 8-15) x (m cols 0-7 | 8-15), matrix i = (k half i / 2,
  // m half i % 2), each transposed on the way into the A fragment.
  const T* a_row = x4_address_cols_first<kStrideA>(sAT, lane);
  const T* b_row = x4_address_rows_first<kStrideB>(sB, lane);
#pragma unroll
  for (int ks = 0; ks < kK / 16; ++ks) {
    uint32_t a[1][4];
    cuda::ldmatrix_x4_trans(a[0], a_row + ks * 16 * kStrideA);
    mma_row_major_b<T, kN, kStrideB>(reinterpret_cast<float (&)[1][kN / 8][4]>(acc), a, b_row, ks);
  }
}

template <int kNTiles>
__device__ __forceinline__ void zero(float (&acc)[kNTiles][4]) {
#pragma unroll
  for (int t = 0; t < kNTiles; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[t][e] = 0.0f;
  }
}

// Calls fn(value&, row, col, half) for every element this lane holds of a 16 x (8 kNTiles) accumulator tile
// whose element (0, 0) has coordinates (row0, col0); half (0 or 1, a constant after unrolling) says whether the
// element lies in the lane's first row (row0 + lane/4) or second (row0 + lane/4 + 8), for per-row registers.
template <int kNTiles, typename Fn>
__device__ __forceinline__ void for_each_element(float (&acc)[kNTiles][4], int row0, int col0, int lane, Fn&& fn) {
#pragma unroll
  for (int t = 0; t < kNTiles; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      fn(acc[t][e], row0 + lane / 4 + 8 * (e / 2), col0 + t * 8 + 2 * (lane % 4) + e % 2, e / 2);
    }
  }
}

// As for_each_element, over the same element of two tiles of equal shape: fn(a&, b&, row, col, half).
template <int kNTiles, typename Fn>
__device__ __forceinline__ void for_each_element_pair(float (&acc_a)[kNTiles][4], float (&acc_b)[kNTiles][4], int row0,
                                                      int col0, int lane, Fn&& fn) {
#pragma unroll
  for (int t = 0; t < kNTiles; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      fn(acc_a[t][e], acc_b[t][e], row0 + lane / 4 + 8 * (e / 2), col0 + t * 8 + 2 * (lane % 4) + e % 2, e / 2);
    }
  }
}

// Philox draws that a group of kSharers lanes all need (lane = base + s * kStride, s = 0 .. kSharers - 1): the
// lane with index s computes draws s, s + kSharers, ... as keep bytes (keep_byte(o): common/philox.h), and each
// draw's byte reaches the whole group through one shuffle; consume(o, byte) then sees draws o = 0 .. kDraws - 1
// in order. Every lane of the warp must call it (the shuffles are warp-wide).
template <int kDraws, int kSharers, int kStride, typename KeepByte, typename Consume>
__device__ __forceinline__ void shared_keep_bytes(int lane, KeepByte&& keep_byte, Consume&& consume) {
  static_assert(kDraws % kSharers == 0, "each sharer computes the same number of draws");
  const int s = (lane / kStride) % kSharers;
  const int base = lane - s * kStride;
  uint32_t mine[kDraws / kSharers];
#pragma unroll
  for (int k = 0; k < kDraws / kSharers; ++k) mine[k] = keep_byte(k * kSharers + s);
#pragma unroll
  for (int o = 0; o < kDraws; ++o) {
    consume(o, __shfl_sync(0xffffffffu, mine[o / kSharers], base + (o % kSharers) * kStride));
  }
}

// The dropout keep-mask of the elements this lane holds of a 16 x (8 kNTiles) tile at (row0, col0): bit 4t + e
// is set iff element [t][e] is kept (common/philox.h). Tiles are query-major (rows = queries, columns = keys)
// or, with kKeyMajor, key-major (the transposed tiles of the dk/dv pass); the mask is always drawn at
// (query i, key j), one Philox draw per query and group of 8 keys. The tile's key start (col0, or row0 when
// key-major) must be a multiple of 8. Lane (r, q) = (lane / 4, lane % 4) holds rows r and r + 8 and columns
// 8t + 2q, 8t + 2q + 1. Query-major: the 4 lanes of a row need the same 2 kNTiles draws (one per tile and row),
// lane q taking bits 2q and 2q + 1 of each. Key-major: the 8 lanes of a column pair need the same 4 kNTiles
// draws (tile, query column, key row group), lane r taking bit r of each. The sharers split the draws.
template <int kNTiles, bool kKeyMajor>
__device__ __forceinline__ uint32_t dropout_keep_bits(uint64_t seed, uint64_t z, int row0, int col0, int lane,
                                                      uint32_t threshold) {
  static_assert(kNTiles * 4 <= 32, "one bit per element of a 32-bit mask");
  static_assert(kNTiles % 2 == 0, "the sharers split the draws evenly");
  const int r = lane / 4, q = lane % 4;
  uint32_t bits = 0;
  if constexpr (kKeyMajor) {
    // Draw o = 4t + 2 query + key_group: query col0 + 8t + 2q + query, keys row0 + 8 key_group + 0..7.
    shared_keep_bytes<4 * kNTiles, 8, 4>(
        lane,
        [&](int o) {
          const uint32_t query = static_cast<uint32_t>(col0 + 8 * (o / 4) + 2 * q + (o / 2) % 2);
          return dropout_keep_byte(seed, z, query, static_cast<uint32_t>(row0 / kColumnsPerDraw + o % 2), threshold);
        },
        [&](int o, uint32_t byte) {  // element e = 2 key_group + query of tile t
          bits |= ((byte >> r) & 1u) << (4 * (o / 4) + 2 * (o % 2) + (o / 2) % 2);
        });
  } else {
    // Draw o = 2t + half: query row0 + r + 8 half, keys col0 + 8t + 0..7.
    shared_keep_bytes<2 * kNTiles, 4, 1>(
        lane,
        [&](int o) {
          const uint32_t query = static_cast<uint32_t>(row0 + r + 8 * (o % 2));
          return dropout_keep_byte(seed, z, query, static_cast<uint32_t>(col0 / kColumnsPerDraw + o / 2), threshold);
        },
        [&](int o, uint32_t byte) {  // elements e = 2 half and 2 half + 1 of tile t
          bits |= ((byte >> (2 * q)) & 3u) << (4 * (o / 2) + 2 * (o % 2));
        });
  }
  return bits;
}

// acc[t][e] *= kept ? multiplier : 0, with the keep bits of dropout_keep_bits.
template <int kNTiles>
__device__ __forceinline__ void apply_keep_bits(float (&acc)[kNTiles][4], uint32_t bits, float multiplier) {
#pragma unroll
  for (int t = 0; t < kNTiles; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[t][e] *= ((bits >> (4 * t + e)) & 1u) ? multiplier : 0.0f;
  }
}

// Writes acc * multiplier (16 x 8 kNTiles, this warp's rows) as T to gmem: row r of the tile goes to
// gmem + r * row_stride; rows >= valid_rows are not written. Each lane stores pairs of adjacent columns.
template <typename T, int kNTiles>
__device__ __forceinline__ void store_tile(const float (&acc)[kNTiles][4], T* gmem, int64_t row_stride, int valid_rows,
                                           float multiplier, int lane) {
  const int row = lane / 4;
#pragma unroll
  for (int t = 0; t < kNTiles; ++t) {
    const int col = t * 8 + 2 * (lane % 4);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      if (row + 8 * half < valid_rows) {
        *reinterpret_cast<uint32_t*>(gmem + (row + 8 * half) * row_stride + col) =
            MmaOps<T>::pack(acc[t][2 * half] * multiplier, acc[t][2 * half + 1] * multiplier);
      }
    }
  }
}

// Writes a 16 x (8 kNTiles) accumulator tile (this warp's rows) as T to shared memory, rows kStride apart.
template <typename T, int kStride, int kNTiles>
__device__ __forceinline__ void store_tile_shared(const float (&acc)[kNTiles][4], T* smem, int lane) {
#pragma unroll
  for (int t = 0; t < kNTiles; ++t) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      cuda::store_shared_b32(smem + (lane / 4 + 8 * half) * kStride + t * 8 + 2 * (lane % 4),
                             MmaOps<T>::pack(acc[t][2 * half], acc[t][2 * half + 1]));
    }
  }
}

// gmem[r * row_stride + c] += acc[r][c] * multiplier atomically for the rows r < valid_rows of a 16 x
// (8 kNTiles) accumulator tile (this warp's rows). Each of the lane's two rows is one pointer and one branch, the
// columns constant offsets from it: an address and a branch per element took about 12 instructions besides
// each pair of atomics (sm_90a SASS, the fused dQ at head dim 128).
template <int kNTiles>
__device__ __forceinline__ void add_tile_atomic(const float (&acc)[kNTiles][4], float* gmem, int64_t row_stride,
                                                int valid_rows, float multiplier, int lane) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = lane / 4 + 8 * half;
    if (row < valid_rows) {
      float* dst = gmem + row * row_stride + 2 * (lane % 4);
#pragma unroll
      for (int t = 0; t < kNTiles; ++t) {
        cuda::atomic_add_global(dst + t * 8, acc[t][2 * half] * multiplier);
        cuda::atomic_add_global(dst + t * 8 + 1, acc[t][2 * half + 1] * multiplier);
      }
    }
  }
}

// Row `row` of head h of batch b of a (B, H, N, D) tensor; 64-bit offsets.
template <typename T>
__device__ __forceinline__ const T* row_pointer(const void* base, const Strides& strides, int b, int h, int64_t row) {
  return static_cast<const T*>(base) + b * strides.batch + h * strides.head + row * strides.row;
}
template <typename T>
__device__ __forceinline__ T* row_pointer(void* base, const Strides& strides, int b, int h, int64_t row) {
  return static_cast<T*>(base) + b * strides.batch + h * strides.head + row * strides.row;
}

// The number of keys of batch b that take part: min(S, key_lengths[b]) clamped at 0 (api.cpp clamps too).
__device__ __forceinline__ int keys_taking_part(const int32_t* key_lengths, int kv_len, int b) {
  return key_lengths == nullptr ? kv_len : max(0, min(kv_len, key_lengths[b]));
}

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// The key/value side of a kernel that owns kBlockM query rows (forward, dq): which key blocks the rows see
// (none past the key length, none wholly above the causal diagonal) and their loads into a shared-memory ring
// of K and V tiles, (stages, kBlockN, kStride) each: both of a block at once, or each on its own (the split
// forward).
template <int D, int kBlockM, int kBlockN, int kStride, int kThreads, typename T>
struct KeyValueBlocks {
  const T* k;
  const T* v;
  int64_t k_row;
  int64_t v_row;
  T* sK;
  T* sV;
  int keys;   // keys taking part in batch b
  int count;  // key blocks to visit

  __device__ __forceinline__ KeyValueBlocks(const ForwardParams& params, int b, int h, int m_start, T* sK_, T* sV_)
      : k_row(params.k_strides.row), v_row(params.v_strides.row), sK(sK_), sV(sV_) {
    const int hk = h / (params.heads_q / params.heads_k);
    k = row_pointer<T>(params.k, params.k_strides, b, hk, 0);
    v = row_pointer<T>(params.v, params.v_strides, b, hk, 0);
    keys = keys_taking_part(params.key_lengths, params.kv_len, b);
    count = ceil_div(keys, kBlockN);
    if (params.causal) count = min(count, ceil_div(min(params.q_len, m_start + kBlockM), kBlockN));
  }

  __device__ __forceinline__ void load(int n_block, int stage) const {
    load_k(n_block, stage);
    load_v(n_block, stage);
  }
  __device__ __forceinline__ void load_k(int n_block, int stage) const {
    const int n_start = n_block * kBlockN;
    load_tile_async<kBlockN, D, kStride, kThreads>(k_tile(stage), k + n_start * k_row, k_row, keys - n_start);
  }
  __device__ __forceinline__ void load_v(int n_block, int stage) const {
    const int n_start = n_block * kBlockN;
    load_tile_async<kBlockN, D, kStride, kThreads>(v_tile(stage), v + n_start * v_row, v_row, keys - n_start);
  }
  __device__ __forceinline__ T* k_tile(int stage) const { return sK + stage * kBlockN * kStride; }
  __device__ __forceinline__ T* v_tile(int stage) const { return sV + stage * kBlockN * kStride; }
};

// Scales a query-major score tile (16 rows from row0 x 8 kNTiles keys from n_start) into base 2 and sets the
// scores of keys that take no part (past the key length; causal: j > i) to -inf. Scaling comes first: a
// negative scale must not turn -inf into +inf. Only tiles crossing the key length or the diagonal (m_start is
// the block's first row) pay for the mask.
template <int kNTiles>
__device__ __forceinline__ void scale_and_mask_scores(float (&s)[kNTiles][4], const ForwardParams& params, int keys,
                                                      int m_start, int row0, int n_start, int lane) {
  constexpr int kBlockN = kNTiles * 8;
  const bool needs_mask = n_start + kBlockN > keys || (params.causal && n_start + kBlockN - 1 > m_start);
  for_each_element(s, row0, n_start, lane, [&](float& x, int row, int col, int) {
    x *= params.scale_log2;
    if (needs_mask && (col >= keys || (params.causal && col > row))) x = -INFINITY;
  });
}

}  // namespace tfm_kernels::attention
