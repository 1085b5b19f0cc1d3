// Plain-data parameters of the CUDA attention kernels: pointers, 64-bit element strides, sizes and flags.
// Filled by api.cpp (the only file of this folder that includes ATen) and read by the kernels; no torch or
// CUDA headers here, so the kernel translation units compile without ATen.
//
// Logical layouts (elements; every last dimension is contiguous):
//   q (B, Hq, L, D), k and v (B, Hk, S, D), out (B, Hq, L, D); lse (B, Hq, L) float32, contiguous.
//   Grouped-query attention: query head h reads key/value head h / (Hq / Hk).
#pragma once
#include <cstdint>

namespace tfm_kernels::attention {

// Element strides of one (batch, head, row) tensor; the last dimension has stride 1.
struct Strides {
  int64_t batch = 0;
  int64_t head = 0;
  int64_t row = 0;
};

struct ForwardParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // (B, Hq, L) contiguous: log2 of the sum of exp of the scaled scores, +inf if empty
  Strides q_strides, k_strides, v_strides, out_strides;

  int batch = 0;
  int heads_q = 0;
  int heads_k = 0;
  int q_len = 0;   // L
  int kv_len = 0;  // S

  const int32_t* key_lengths = nullptr;  // (B,) or null: keys j >= key_lengths[b] take no part
  bool causal = false;                   // key j takes part in row i only if j <= i (top-left aligned)
  float scale = 1.0f;                    // multiplier of q . k
  float scale_log2 = 1.0f;               // scale * log2(e): the kernels work in base 2 (exp2)

  // Dropout (tfm_kernels/rng.py): element (z = b * Hq + h, row i, key j) is kept by the rule of
  // common/philox.h with dropout_threshold = floor(p * 2^16); kept weights are multiplied by
  // dropout_rescale = dropout_keep_scale(p).
  bool dropout = false;
  uint32_t dropout_threshold = 0;
  float dropout_rescale = 1.0f;
  const int64_t* seed = nullptr;  // on the device, read by the kernels (no host synchronisation)
};

struct BackwardParams : ForwardParams {
  const void* grad_out = nullptr;  // (B, Hq, L, D)
  void* grad_q = nullptr;          // (B, Hq, L, D)
  void* grad_k = nullptr;          // (B, Hk, S, D)
  void* grad_v = nullptr;          // (B, Hk, S, D)
  float* delta = nullptr;          // (B, Hq, L) contiguous float32 workspace: rowsum(grad_out * out)
  Strides grad_out_strides, grad_q_strides, grad_k_strides, grad_v_strides;
  // Non-null: the fused backward adds dQ into this zeroed (B, Hq, L, D) float32 sum with atomics and leaves
  // grad_q to the caller; null: the deterministic backward's dq kernel writes grad_q.
  float* grad_q_accum = nullptr;
  Strides grad_q_accum_strides;
};

// The element types the kernels are built for; api.cpp maps torch dtypes onto these.
enum class ElementType { kFloat16, kBFloat16 };

}  // namespace tfm_kernels::attention
