// Tile sizes, thread counts and shared-memory footprints of the CUDA attention kernels, per head dim and
// element type. Shared-memory tiles are row-major with kSmemStride = D + 8 elements: the 16 padding bytes per
// row move the 8 row addresses of one ldmatrix 8x8 matrix onto 8 different 16-byte bank groups (row r starts
// at byte r * (2D + 16) = 16 r mod 128 for D a multiple of 64; 80 r mod 128 for D = 32, 96 -- also distinct).
//
// Resource report (nvcc 13.0 -O3 --use_fast_math -lineinfo, -Xptxas=-v, bf16; no static shared memory, no
// spills):
//   kernel (threads)       D    registers sm_80 / sm_90a   dynamic shared memory   blocks per SM (regs, smem)
//   forward (128)          64   219 / 220                  73728 B                 2 (registers)
//   forward (128)          128  255 / 255                  69632 B                 2 (registers)
//   backward delta (128)   64   22 / 22                    0
//   backward delta (128)   128  35 / 34                    0
//   backward dk/dv (256)   64   203 / 230                  74752 B                 1 (registers)
//   backward dk/dv (256)   128  229 / 233                  122624 B                1 (registers)
//   dk/dv + fused dQ (256) 64   216 / 235                  93184 B                 1 (registers)
//   dk/dv + fused dQ (256) 128  230 / 241                  132864 B                1 (registers)
//   backward dq (128)      64   165 / 168                  55296 B                 3 (registers)
//   backward dq (128)      128  219 / 223                  104448 B                2 on H100, 1 on A100 (smem)
//   Behind TFM_KERNELS_HEAD_DIMS (sm_90a): D = 32: forward 167 (40960 B), dq 168, dk/dv 181 (256 threads;
//   fused dQ 204, 60416 B); D = 96: forward 223 (66560 B), dq 225, dk/dv 202 (128 threads; fused 208); D = 256:
//   forward 250 (101376 B), dq 247 (135168 B), dk/dv 233 (256 threads, 135680 B; fused 244, 140800 B). On sm_80
//   the forward spills at D = 256 (255 registers, 32 bytes).
// 8 to 12 warps per SM, bound by registers; A100's smaller shared memory halves the d128 dq.
// Two row tiles per forward warp (ForwardTraits) took the forward from 146 / 188 registers at d64 / d128 (sm_90a,
// these flags; 64-row blocks, 3 and 2 per SM, 1 at d128 on A100) to 250 / 242: 2 blocks of 128 rows per SM.
// 8 key groups in dk/dv (BackwardKVTraits; 4 before: 2 blocks of 64 keys per SM, the same 8 warps) kept the
// registers (fused dQ d64 / d128: 253 / 253 -> 247 / 250).
#pragma once
#include <algorithm>

namespace tfm_kernels::attention {

constexpr int kWarpSize = 32;
constexpr int kRowsPerWarp = 16;  // the M of mma.m16n8k16: the rows of a row tile, a warp's share of a tile

template <int D>
constexpr int smem_stride() {
  return D + 8;
}

// Forward: a block owns kBlockM query rows (4 warps x kMTiles row tiles of 16) and streams key/value blocks of
// kBlockN rows through shared memory. Each K and V fragment a warp loads from shared memory serves its kMTiles
// row tiles, and each K/V block loaded into shared memory serves kBlockM rows: with two row tiles (kBlockM = 128)
// both costs are half those of one. Per thread the output accumulator holds kMTiles x 16 x D fp32 / 32 lanes =
// kMTiles D / 2 registers and the score tile kMTiles kBlockN / 2; at D = 256 one row tile keeps them in 255.
// Two ways to stream the keys:
//  - kSplitKV = false: K and V of block j + 1 are in flight while block j is multiplied, so a copy has a whole
//    iteration to land. Three stages let one barrier a block do (cp_async_pipeline_step), where two need a
//    second one before a stage is refilled. At D = 64: 64 keys a block, 73728 B (2 blocks per SM on A100 and
//    H100; within the 93184 B the head dim's backward needs, so no device loses the head dim). At D = 256 a
//    third stage (135168 B) would leave H100 one block per SM: two stages.
//  - kSplitKV = true (one K tile, one V tile): V of block j is in flight while Q K^T of block j is multiplied,
//    and K of block j + 1 while P V of block j is. At D = 128 this holds 64 keys a block in the shared memory of
//    32 double-buffered (69632 B: 2 blocks per SM on A100 as on H100) and, with the same 2 barriers a block,
//    takes half as many barriers and rescale checks per key; each half of an iteration (128 mma a warp) covers
//    the copy's latency. 32 keys double-buffered issued 4.63 instructions per mma, 64 keys split 3.97 (sm_90a
//    SASS, benchmarks/RESULTS.md); 64 keys double-buffered would need 104448 B (1 block per SM on A100).
template <int D>
struct ForwardTraits {
  static constexpr int kHeadDim = D;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kMTiles = D <= 128 ? 2 : 1;
  static constexpr int kBlockM = kWarps * kMTiles * kRowsPerWarp;
  static constexpr bool kSplitKV = D == 128;
  static constexpr int kBlockN = D <= 64 || kSplitKV ? 64 : 32;
  static constexpr int kSmemStride = smem_stride<D>();
  static constexpr int kStages = kSplitKV ? 1 : D <= 96 ? 3 : 2;
  // Q tile, then kStages x (K tile, V tile).
  static constexpr int kSmemElems = kBlockM * kSmemStride + kStages * 2 * kBlockN * kSmemStride;
  static_assert(D % 16 == 0 && kBlockN % 16 == 0, "mma k-steps are 16 wide");
};

// Backward dk/dv: a block owns kBlockN keys of one key/value head (kKeyGroups key groups of 16, one per warp) and
// loops over every query block of every query head sharing that key/value head, with Q, dO, lse and delta tiles in a
// cp.async ring of kStages stages. Each Q and dO tile loaded serves the block's kBlockN keys, and the fused dQ adds
// one product per (key block, query block): 8 key groups (128 keys) halve both next to 4, where the fused dQ product
// still splits D into whole 16-column slices over the 8 warps (D = 32, 64, 128). dK and dV stay in registers:
// 2 x 16 x D fp32 / 32 lanes = D registers per thread for the part of D a warp owns. At D = 256 that is too many, so 8
// warps split D in two halves (kDSplit = 2): both warps of a pair recompute the same S^T and dP^T, and each
// accumulates its half of dK and dV. kBlockM shrinks with D because S^T and dP^T tiles cost kBlockM / 2 registers
// each.
template <int D>
struct BackwardKVTraits {
  static constexpr int kHeadDim = D;
  static constexpr int kDSplit = D <= 128 ? 1 : 2;
  static constexpr int kKeyGroups = D == 32 || D == 64 || D == 128 ? 8 : 4;
  static constexpr int kWarps = kKeyGroups * kDSplit;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kBlockN = kKeyGroups * kRowsPerWarp;
  static constexpr int kBlockM = D <= 64 ? 64 : 32;
  static constexpr int kAccCols = D / kDSplit;  // columns of dK and dV one warp accumulates
  static constexpr int kSmemStride = smem_stride<D>();
  // Three stages of Q, dO, lse and delta at D = 128 take the step's closing barrier away (cp_async_pipeline_step:
  // 2 a step left, the fused dQ's included), which here stalls all 8 warps of the SM's only block; they cost
  // 17664 bytes more (132864 B fused, within A100's 163 KiB). At D = 64 they would put the fused pass (112128 B)
  // past the 99 KiB of sm_86 and sm_89, which run that head dim now; at D = 256 past A100's.
  static constexpr int kStages = D == 128 ? 3 : 2;
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

// The most dynamic shared memory a kernel of head dim D asks for (forward, dk/dv with or without fused dQ, dq;
// 16-bit elements): what a device must allow per block for the CUDA backend to run head dim D. Reported by
// tfm_kernels.build_info() and checked before a launch (tfm_kernels/backends.py).
template <int D>
constexpr int max_shared_memory_bytes() {
  constexpr int kElement = 2;
  return std::max({ForwardTraits<D>::kSmemElems * kElement, BackwardKVTraits<D>::smem_bytes(true, kElement),
                   BackwardKVTraits<D>::smem_bytes(false, kElement), BackwardQTraits<D>::kSmemElems * kElement});
}

// Backward preprocessing, delta = rowsum(dO * O): 8 lanes per row, 16-byte loads, 16 rows per 128 threads.
struct BackwardDeltaTraits {
  static constexpr int kThreads = 128;
  static constexpr int kLanesPerRow = 8;
  static constexpr int kRowsPerBlock = kThreads / kLanesPerRow;
};

}  // namespace tfm_kernels::attention
