// Attention backward, FlashAttention-2 style (P recomputed from q, k and the saved lse; nothing of size
// L x S in memory). Default (fused): passes 1 and 2, where pass 2 also adds dQ = scale dS K into a float32 sum
// with atomics (kFusedDq; the order of the adds varies, so dQ may differ in its last bits from run to run).
// Deterministic (torch.use_deterministic_algorithms): passes 1, 2 and 3, with no atomics:
//
//   1. delta kernel:  delta_i = sum_d dO_id O_id (fp32)                grid (ceil(L / 16), Hq, B), 128 threads,
//                     8 lanes per row with 16-byte loads.
//   2. dk/dv kernel:  for one block of kBlockN keys (128; 64 at D = 96  grid (ceil(S / kBlockN), Hk, B), 8
//                     and 256) of one key/value head, loop over the     warps (4 at D = 96), warp w owning keys
//                     query blocks of every query head in its group     16(w%G)..+15 of the G key groups (and
//                     (GQA sums there, in a fixed order):               at D = 256 half w/4 of D).
//                       S^T = K Q^T, P^T = exp2(S^T scale_log2 - lse log2 e), dP^T = V dO^T,
//                       dV += P~^T dO, dS^T = P^T (dP~^T - delta), dK += dS^T Q; dK *= scale,
//                     where P~ = P keep / (1 - p) and dP~ = dP keep / (1 - p) under dropout.
//                     Q, dO, lse, delta tiles in a cp.async ring across (head, query block) steps.
//                     Fused dQ: dS^T goes to shared memory; warp w adds scale dS K for 16 query rows and
//                     D / (warps / (kBlockM / 16)) columns (kernel_traits.h) to the float32 sum with atomics.
//   3. dq kernel:     for one block of 64 query rows, loop over key    grid (ceil(L / 64), Hq, B), 4 warps,
//                     blocks: S, P, dP = dO V^T, dS = P (dP~ - delta),  warp w owning rows 16w..16w+15.
//                     dQ += dS K; dQ *= scale. K/V double-buffered.
// In the deterministic passes every gradient element is accumulated by one warp in a fixed order, so results
// repeat bit for bit; in the fused pass dK and dV still do, dQ's atomics do not.
// Masking (key length, causal, rows past L) matches the forward; rows with lse = +inf (no key) get P = 0
// and so zero gradients; keys past the key length get dk = dv = 0.
//
// Test: python -m pytest tests/test_attention_cuda.py -m gpu (gradients against the float64 oracle,
// determinism); compute-sanitizer --tool memcheck python benchmarks/sanitize_attention.py.
#pragma once
#include <cmath>
#include <cstdint>

#include "cuda/attention/kernel_traits.h"
#include "cuda/attention/params.h"
#include "cuda/attention/tile_math.cuh"
#include "cuda/common/memory.cuh"
#include "cuda/common/reductions.cuh"

namespace tfm_kernels::attention {

template <int D, typename T>
__global__ void __launch_bounds__(BackwardDeltaTraits::kThreads)
    attention_backward_delta_kernel(const BackwardParams params) {
  using Traits = BackwardDeltaTraits;
  constexpr int kElemsPerChunk = 16 / int(sizeof(T));
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int row = blockIdx.x * Traits::kRowsPerBlock + threadIdx.x / Traits::kLanesPerRow;
  const int lane_in_row = threadIdx.x % Traits::kLanesPerRow;
  const int L = params.q_len;

  float sum = 0.0f;
  if (row < L) {
    const T* out = row_pointer<T>(params.out, params.out_strides, b, h, row);
    const T* grad_out = row_pointer<T>(params.grad_out, params.grad_out_strides, b, h, row);
    for (int col = lane_in_row * kElemsPerChunk; col < D; col += Traits::kLanesPerRow * kElemsPerChunk) {
      const uint4 o = *reinterpret_cast<const uint4*>(out + col);
      const uint4 g = *reinterpret_cast<const uint4*>(grad_out + col);
      const uint32_t o_words[4] = {o.x, o.y, o.z, o.w};
      const uint32_t g_words[4] = {g.x, g.y, g.z, g.w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const float2 of = MmaOps<T>::unpack(o_words[w]);
        const float2 gf = MmaOps<T>::unpack(g_words[w]);
        sum += of.x * gf.x + of.y * gf.y;
      }
    }
  }
  sum = cuda::group_sum<Traits::kLanesPerRow>(sum);
  if (row < L && lane_in_row == 0) params.delta[(static_cast<int64_t>(b) * params.heads_q + h) * L + row] = sum;
}

template <int D, typename T, bool kFusedDq>
__global__ void __launch_bounds__(BackwardKVTraits<D>::kThreads)
    attention_backward_kv_kernel(const BackwardParams params) {
  using Traits = BackwardKVTraits<D>;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kStride = Traits::kSmemStride;
  constexpr int kThreads = Traits::kThreads;
  constexpr int kAccCols = Traits::kAccCols;
  static_assert(kThreads >= kBlockM, "one thread per row loads lse and delta");

  extern __shared__ __align__(16) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);                      // (kBlockN, kStride)
  T* sV = sK + kBlockN * kStride;                          // (kBlockN, kStride)
  T* sQ = sV + kBlockN * kStride;                          // (kStages, kBlockM, kStride)
  T* sdO = sQ + Traits::kStages * kBlockM * kStride;       // (kStages, kBlockM, kStride)
  T* sdS_t = sdO + Traits::kStages * kBlockM * kStride;    // (kBlockN, kDsStride), fused dQ only
  float* sLse = reinterpret_cast<float*>(sdS_t + (kFusedDq ? Traits::kSmemDsElems : 0));  // (kStages, kBlockM)
  float* sDelta = sLse + Traits::kStages * kBlockM;                                        // (kStages, kBlockM)

  const int n_block = blockIdx.x;
  const int hk = blockIdx.y;
  const int b = blockIdx.z;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int key_group = warp % Traits::kKeyGroups;
  const int d_slice = warp / Traits::kKeyGroups;
  const int group = params.heads_q / params.heads_k;
  const int L = params.q_len;
  const int keys = keys_taking_part(params.key_lengths, params.kv_len, b);
  const int n_start = n_block * kBlockN;
  const int key0 = n_start + key_group * kRowsPerWarp;  // first key of this warp

  // Causal: query rows below n_start see none of these keys. Keys past the key length see no query.
  const int m_first = params.causal ? n_start / kBlockM : 0;
  const int m_blocks = n_start < keys ? max(0, ceil_div(L, kBlockM) - m_first) : 0;
  const int steps = group * m_blocks;  // (query head in the group, query block) pairs, head-major

  // A step's query head and query block, advanced one step at a time (no division by m_blocks in the loop).
  struct Step {
    int h;
    int m_block;
  };
  const auto following = [&](Step s) {
    return s.m_block + 1 < m_first + m_blocks ? Step{s.h, s.m_block + 1} : Step{s.h + 1, m_first};
  };
  auto load_step = [&](Step s, int stage) {
    const int m_start = s.m_block * kBlockM;
    const T* q = row_pointer<T>(params.q, params.q_strides, b, s.h, m_start);
    const T* grad_out = row_pointer<T>(params.grad_out, params.grad_out_strides, b, s.h, m_start);
    load_tile_async<kBlockM, D, kStride, kThreads>(sQ + stage * kBlockM * kStride, q, params.q_strides.row,
                                                   L - m_start);
    load_tile_async<kBlockM, D, kStride, kThreads>(sdO + stage * kBlockM * kStride, grad_out,
                                                   params.grad_out_strides.row, L - m_start);
    const int64_t row_base = (static_cast<int64_t>(b) * params.heads_q + s.h) * L;
    const int i = threadIdx.x;
    if (i < kBlockM) {
      const bool valid = m_start + i < L;  // rows past L read 0; the mask drops them
      cuda::cp_async_4(sLse + stage * kBlockM + i, params.lse + (valid ? row_base + m_start + i : 0), valid);
      cuda::cp_async_4(sDelta + stage * kBlockM + i, params.delta + (valid ? row_base + m_start + i : 0), valid);
    }
  };

  if (steps > 0) {
    const T* k = row_pointer<T>(params.k, params.k_strides, b, hk, n_start);
    const T* v = row_pointer<T>(params.v, params.v_strides, b, hk, n_start);
    load_tile_async<kBlockN, D, kStride, kThreads>(sK, k, params.k_strides.row, keys - n_start);
    load_tile_async<kBlockN, D, kStride, kThreads>(sV, v, params.v_strides.row, keys - n_start);
    load_step(Step{hk * group, m_first}, 0);
  }
  cuda::cp_async_commit();

  const uint64_t seed = params.dropout ? static_cast<uint64_t>(*params.seed) : 0;
  const T* sK_warp = sK + key_group * kRowsPerWarp * kStride;
  const T* sV_warp = sV + key_group * kRowsPerWarp * kStride;

  float dk_acc[kAccCols / 8][4];
  float dv_acc[kAccCols / 8][4];
  zero(dk_acc);
  zero(dv_acc);

  Step current{hk * group, m_first};
  for (int step = 0; step < steps; ++step, current = following(current)) {
    const int stage = step % Traits::kStages;
    cuda::cp_async_pipeline_step<Traits::kStages>(
        step, steps, [&](int, int next_stage) { load_step(following(current), next_stage); });

    const int h = current.h;
    const int m_start = current.m_block * kBlockM;
    const uint64_t z = static_cast<uint64_t>(b) * params.heads_q + h;
    const T* sQ_stage = sQ + stage * kBlockM * kStride;
    const T* sdO_stage = sdO + stage * kBlockM * kStride;
    const float* lse = sLse + stage * kBlockM;
    const float* delta = sDelta + stage * kBlockM;

    // P^T (16 keys x kBlockM queries); P^T = 0 where masked, also in a row whose lse is NaN (a NaN key it sees).
    float p_t[kBlockM / 8][4];
    zero(p_t);
    gemm_smem_nt<T, kBlockM, D, kStride>(p_t, sK_warp, sQ_stage, lane);
    const bool needs_mask =
        n_start + kBlockN > keys || m_start + kBlockM > L || (params.causal && n_start + kBlockN - 1 > m_start);
    for_each_element(p_t, key0, m_start, lane, [&](float& x, int key, int query, int) {
      const bool masked = needs_mask && (key >= keys || query >= L || (params.causal && key > query));
      // lse = +inf (no key in the row) gives 0
      x = masked ? 0.0f : exp2f(x * params.scale_log2 - lse[query - m_start]);
    });

    float dp_t[kBlockM / 8][4];
    zero(dp_t);
    gemm_smem_nt<T, kBlockM, D, kStride>(dp_t, sV_warp, sdO_stage, lane);

    // dp_t becomes dS^T = P^T (dP~^T - delta); p_t becomes P~^T, the weights dropout kept (rescaled).
    uint32_t keep_bits = 0;
    if (params.dropout) {
      keep_bits = dropout_keep_bits<kBlockM / 8, true>(seed, z, key0, m_start, lane, params.dropout_threshold);
      apply_keep_bits(dp_t, keep_bits, params.dropout_rescale);
    }
    // dS^T = 0 where P^T = 0 even if delta is NaN: keys no row sees keep zero gradients.
    for_each_element_pair(p_t, dp_t, key0, m_start, lane, [&](float& p, float& dp, int, int query, int) {
      dp = p == 0.0f ? 0.0f : p * (dp - delta[query - m_start]);
    });
    if (params.dropout) apply_keep_bits(p_t, keep_bits, params.dropout_rescale);

    if (kFusedDq && d_slice == 0) {
      store_tile_shared<T, Traits::kDsStride>(dp_t, sdS_t + key_group * kRowsPerWarp * Traits::kDsStride, lane);
    }

    gemm_reg_nn<T, kAccCols, kBlockM, kStride>(dv_acc, p_t, sdO_stage + d_slice * kAccCols, lane);
    gemm_reg_nn<T, kAccCols, kBlockM, kStride>(dk_acc, dp_t, sQ_stage + d_slice * kAccCols, lane);

    if constexpr (kFusedDq) {
      __syncthreads();  // the block's dS^T tile is complete
      // dQ[rows, cols] += scale * dS[rows, all kBlockN keys] K[keys, cols] for this warp's 16 rows and kDqCols.
      const int dq_row = (warp % Traits::kDqRowGroups) * kRowsPerWarp;
      const int dq_col = (warp / Traits::kDqRowGroups) * Traits::kDqCols;
      float dq_part[Traits::kDqCols / 8][4];
      zero(dq_part);
      gemm_smem_tn<T, Traits::kDqCols, kBlockN, Traits::kDsStride, kStride>(dq_part, sdS_t + dq_row, sK + dq_col,
                                                                           lane);
      float* grad_q = row_pointer<float>(params.grad_q_accum, params.grad_q_accum_strides, b, h, m_start + dq_row);
      add_tile_atomic(dq_part, grad_q + dq_col, params.grad_q_accum_strides.row, L - m_start - dq_row, params.scale,
                      lane);
    }
    cuda::cp_async_ring_end<Traits::kStages>();  // with two stages this also frees the dS^T tile for the next step
  }

  const int warp_rows = params.kv_len - key0;  // keys past the key length are written as 0
  T* grad_k = row_pointer<T>(params.grad_k, params.grad_k_strides, b, hk, key0) + d_slice * kAccCols;
  T* grad_v = row_pointer<T>(params.grad_v, params.grad_v_strides, b, hk, key0) + d_slice * kAccCols;
  store_tile<T>(dk_acc, grad_k, params.grad_k_strides.row, warp_rows, params.scale, lane);
  store_tile<T>(dv_acc, grad_v, params.grad_v_strides.row, warp_rows, 1.0f, lane);
}

// Up to D = 64, 3 blocks per SM asked of the compiler: on sm_80 it otherwise took 214 registers (2 blocks) where
// 165 fit without spills.
template <int D, typename T>
__global__ void __launch_bounds__(BackwardQTraits<D>::kThreads, D <= 64 ? 3 : 1)
    attention_backward_q_kernel(const BackwardParams params) {
  using Traits = BackwardQTraits<D>;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kStride = Traits::kSmemStride;
  constexpr int kThreads = Traits::kThreads;

  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);  // (kBlockM, kStride)
  T* sdO = sQ + kBlockM * kStride;     // (kBlockM, kStride)
  T* sK = sdO + kBlockM * kStride;     // (kStages, kBlockN, kStride)
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
    const T* grad_out = row_pointer<T>(params.grad_out, params.grad_out_strides, b, h, m_start);
    load_tile_async<kBlockM, D, kStride, kThreads>(sQ, q, params.q_strides.row, L - m_start);
    load_tile_async<kBlockM, D, kStride, kThreads>(sdO, grad_out, params.grad_out_strides.row, L - m_start);
    kv.load(0, 0);
  }
  cuda::cp_async_commit();

  const uint64_t seed = params.dropout ? static_cast<uint64_t>(*params.seed) : 0;
  const uint64_t z = static_cast<uint64_t>(b) * params.heads_q + h;
  const int row0 = m_start + warp * kRowsPerWarp;
  const T* sQ_warp = sQ + warp * kRowsPerWarp * kStride;
  const T* sdO_warp = sdO + warp * kRowsPerWarp * kStride;

  // lse (base 2) and delta of this lane's two rows; rows past L get lse = +inf, so P = 0 there.
  float lse_log2[2];
  float delta[2];
  const int64_t row_base = (static_cast<int64_t>(b) * params.heads_q + h) * L;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + lane / 4 + 8 * r;
    lse_log2[r] = row < L ? params.lse[row_base + row] : INFINITY;
    delta[r] = row < L ? params.delta[row_base + row] : 0.0f;
  }

  float dq_acc[D / 8][4];
  zero(dq_acc);

  for (int n_block = 0; n_block < kv.count; ++n_block) {
    const int stage = n_block % Traits::kStages;
    cuda::cp_async_pipeline_step<Traits::kStages>(n_block, kv.count,
                                                  [&](int next, int next_stage) { kv.load(next, next_stage); });

    const int n_start = n_block * kBlockN;
    const T* sK_stage = kv.k_tile(stage);
    const T* sV_stage = kv.v_tile(stage);

    float p[kBlockN / 8][4];
    zero(p);
    gemm_smem_nt<T, kBlockN, D, kStride>(p, sQ_warp, sK_stage, lane);
    scale_and_mask_scores(p, params, kv.keys, m_start, row0, n_start, lane);
    for_each_element(p, row0, n_start, lane, [&](float& x, int, int, int half) { x = exp2f(x - lse_log2[half]); });

    float dp[kBlockN / 8][4];
    zero(dp);
    gemm_smem_nt<T, kBlockN, D, kStride>(dp, sdO_warp, sV_stage, lane);

    // p becomes dS = P (dP~ - delta).
    if (params.dropout) {
      apply_keep_bits(dp, dropout_keep_bits<kBlockN / 8, false>(seed, z, row0, n_start, lane, params.dropout_threshold),
                      params.dropout_rescale);
    }
    for_each_element_pair(p, dp, row0, n_start, lane,
                          [&](float& x, float& dp_x, int, int, int half) { x = x * (dp_x - delta[half]); });

    gemm_reg_nn<T, D, kBlockN, kStride>(dq_acc, p, sK_stage, lane);
    cuda::cp_async_ring_end<Traits::kStages>();
  }

  T* grad_q = row_pointer<T>(params.grad_q, params.grad_q_strides, b, h, row0);
  store_tile<T>(dq_acc, grad_q, params.grad_q_strides.row, L - row0, params.scale, lane);
}

}  // namespace tfm_kernels::attention
