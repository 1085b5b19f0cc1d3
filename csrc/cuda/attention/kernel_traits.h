// Tile sizes, thread counts and shared-memory footprints of the CUDA attention kernels, per head dim and
// element type. Shared-memory tiles are row-major with kSmemStride = D + 8 elements: the 16 padding bytes per
// row move the 8 row addresses of one ldmatrix 8x8 matrix onto 8 different 16-byte bank groups (row r starts
// at byte r * (2D + 16) = 16 r mod 128 for D a multiple of 64; 80 r mod 128 for D = 32, 96 -- also distinct).
//
// Resource report (nvcc 13.0 -O3 --use_fast_math, -Xptxas=-v; no static shared memory, no spills unless said):
//   kernel (threads)       D    registers sm_80 / sm_90a   dynamic shared memory   blocks per SM (regs, smem)
//   forward (128)          64   128 / 128                  46080 B                 4 on H100, 3 on A100 (smem)
//   forward (128)          128  168 / 180                  87040 B                 2 on H100, 1 on A100 (smem)
//   backward delta (128)   64   26 / 22                    0
//   backward delta (128)   128  36 / 34                    0
//   backward dk/dv (128)   64   208 / 210                  56320 B                 2 (registers)
//   backward dk/dv (128)   128  229 / 235                  70144 B                 2 (registers)
//   dk/dv + fused dQ (128) 64   225 / 217                  65536 B                 2 (registers)
//   dk/dv + fused dQ (128) 128  242 / 244                  75264 B                 2 (registers)
//   backward dq (128)      64   168 / 163                  55296 B                 3 (registers)
//   backward dq (128)      128  237 / 241                  104448 B                2 on H100, 1 on A100 (smem)
//   Behind TFM_KERNELS_HEAD_DIMS (sm_90a, no spills): D = 32: forward 96, dq 128, dk/dv 156 (fused dQ 164);
//   D = 96: forward 161, dq 219, dk/dv 201 (fused 241); D = 256: forward 252 (101376 B), dq 253 (135168 B),
//   dk/dv 236 (256 threads, 135680 B; fused 244, 140800 B).
// 8 to 16 warps per SM on H100, bound by registers except the d64 forward; A100's smaller shared memory
// halves the d128 forward and dq.
// Drawing the dropout mask as a bit mask four Philox streams at a time (tile_math.cuh) took the d128 forward
// from 255 registers with 24 B spilled to 184 without spills (180 after later changes).
#pragma once

namespace tfm_kernels::attention {

constexpr int kWarpSize = 32;
constexpr int kRowsPerWarp = 16;  // the M of mma.m16n8k16: each warp owns 16 rows of every tile it multiplies

template <int D>
constexpr int smem_stride() {
  return D + 8;
}

// Forward: a block owns kBlockM = 64 query rows (4 warps x 16 rows) and streams key/value blocks of kBlockN
// rows through a two-stage shared-memory pipeline. Per thread the output accumulator holds 16 x D fp32 / 32
// lanes = D / 2 registers and the score tile kBlockN / 2; kBlockN = 32 at D = 256 keeps that under ~170.
template <int D>
struct ForwardTraits {
  static constexpr int kHeadDim = D;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kBlockM = kWarps * kRowsPerWarp;
  static constexpr int kBlockN = D <= 128 ? 64 : 32;
  static constexpr int kSmemStride = smem_stride<D>();
  static constexpr int kStages = 2;
  // Q tile, then kStages x (K tile, V tile).
  static constexpr int kSmemElems = kBlockM * kSmemStride + kStages * 2 * kBlockN * kSmemStride;
  static_assert(D % 16 == 0 && kBlockN % 16 == 0, "mma k-steps are 16 wide");
};

// Backward dk/dv: a block owns kBlockN = 64 keys of one key/value head (4 key groups of 16, one per warp) and
// loops over every query block of every query head sharing that key/value head, with Q, dO, lse and delta
// tiles double-buffered. dK and dV stay in registers: 2 x 16 x D fp32 / 32 lanes = D registers per thread
// for the part of D a warp owns. At D = 256 that is too many, so 8 warps split D in two halves (kDSplit = 2):
// both warps of a pair recompute the same S^T and dP^T, and each accumulates its half of dK and dV.
// kBlockM shrinks with D because S^T and dP^T tiles cost kBlockM / 2 registers each.
template <int D>
struct BackwardKVTraits {
  static constexpr int kHeadDim = D;
  static constexpr int kDSplit = D <= 128 ? 1 : 2;
  static constexpr int kKeyGroups = 4;
  static constexpr int kWarps = kKeyGroups * kDSplit;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kBlockN = kKeyGroups * kRowsPerWarp;
  static constexpr int kBlockM = D <= 64 ? 64 : 32;
  static constexpr int kAccCols = D / kDSplit;  // columns of dK and dV one warp accumulates
  static constexpr int kSmemStride = smem_stride<D>();
  static constexpr int kStages = 2;
  // K tile, V tile, then kStages x (Q tile, dO tile), then kStages x (lse, delta) float vectors.
  static constexpr int kSmemElems = 2 * kBlockN * kSmemStride + kStages * 2 * kBlockM * kSmemStride;
  static constexpr int kSmemFloats = kStages * 2 * kBlockM;
  static_assert(kAccCols % 16 == 0 && kBlockM % 16 == 0, "mma k-steps are 16 wide");

  // Fused dQ (the default backward; the deterministic one runs the dq kernel instead): each step the warps
  // store dS^T (kBlockN keys x kBlockM queries) to shared memory, then warp w multiplies rows
  // 16 (w % kDqRowGroups).. of dS by columns kDqCols (w / kDqRowGroups).. of K and adds the product to the
  // float32 dQ sum with atomics. kDsStride pads rows by 16 bytes, like kSmemStride, for ldmatrix.
  static constexpr int kDqRowGroups = kBlockM / kRowsPerWarp;
  static constexpr int kDqCols = D / (kWarps / kDqRowGroups);
  static constexpr int kDsStride = kBlockM + 8;
  static constexpr int kSmemDsElems = kBlockN * kDsStride;
  static_assert(kWarps % kDqRowGroups == 0 && kDqCols % 16 == 0, "whole 16-column dQ slices per warp");

  // Dynamic shared memory of the kernel: the dS^T tile sits between the 16-bit tiles and the float vectors.
  static constexpr int smem_bytes(bool fused_dq, int element_size) {
    return (kSmemElems + (fused_dq ? kSmemDsElems : 0)) * element_size + kSmemFloats * int(sizeof(float));
  }
};

// Backward dq: the forward's split (4 warps x 16 query rows, key/value blocks streamed through two stages);
// the block recomputes P and dP per key block and accumulates dQ = dS K in registers (D / 2 per thread).
template <int D>
struct BackwardQTraits {
  static constexpr int kHeadDim = D;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kBlockM = kWarps * kRowsPerWarp;
  static constexpr int kBlockN = D <= 128 ? 64 : 32;
  static constexpr int kSmemStride = smem_stride<D>();
  static constexpr int kStages = 2;
  // Q tile, dO tile, then kStages x (K tile, V tile).
  static constexpr int kSmemElems = 2 * kBlockM * kSmemStride + kStages * 2 * kBlockN * kSmemStride;
};

// Backward preprocessing, delta = rowsum(dO * O): 8 lanes per row, 16-byte loads, 16 rows per 128 threads.
struct BackwardDeltaTraits {
  static constexpr int kThreads = 128;
  static constexpr int kLanesPerRow = 8;
  static constexpr int kRowsPerBlock = kThreads / kLanesPerRow;
};

}  // namespace tfm_kernels::attention
