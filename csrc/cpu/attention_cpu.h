// The CPU attention kernels' shared vocabulary: the problem description the host code (attention.cpp) builds
// from the operator's arguments, views of float32 (B, H, N, D) tensors, and the two kernel entry points
// (attention_forward.cpp, attention_backward.cpp). The kernels compute in float32 on float32 tensors; the host
// converts float16/bfloat16 inputs and outputs around them.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace tfm_kernels::cpu {

constexpr float kLog2e = 1.4426950408889634f;  // scores are kept in base 2: exp(x) = exp2(x * log2(e))
constexpr float kInfinity = std::numeric_limits<float>::infinity();

// A float32 (B, H, N, D) tensor whose last dim is contiguous: row (b, h, n) starts at row(b, h, n).
struct HeadTensor {
  float* data = nullptr;
  int64_t batch_stride = 0, head_stride = 0, row_stride = 0;

  float* row(int64_t b, int64_t h, int64_t n) const {
    return data + b * batch_stride + h * head_stride + n * row_stride;
  }
};

// Views t (float32, 4-D, stride(-1) == 1 or size(-1) == 1) as a HeadTensor.
HeadTensor head_tensor(const at::Tensor& t);

// The attention mask (B, Hq, L, S), read through its strides (zero for broadcast dims); dtype bool (true = the
// key takes part) or floating (float32, float16, bfloat16: added to the scaled scores).
struct MaskView {
  const void* data = nullptr;  // null: no mask
  at::ScalarType dtype = at::kBool;
  int64_t stride[4] = {0, 0, 0, 0};
};

// Dropout on the attention weights with the shared Philox scheme (csrc/common/philox.h): element (b, h, i, j)
// draws with z = b * Hq + h; kept weights are multiplied by keep_scale = dropout_keep_scale(p).
struct Dropout {
  bool enabled = false;
  uint64_t seed = 0;
  uint32_t threshold = 0;  // dropout_threshold(p) (common/philox.h)
  float keep_scale = 1.0f;
};

struct AttentionProblem {
  int64_t batch = 0, q_heads = 0, kv_heads = 0, q_len = 0, kv_len = 0, head_dim = 0, value_dim = 0;
  float scale = 1.0f;  // multiplies q @ k^T
  bool is_causal = false;
  std::vector<int64_t> key_lengths;  // (B,) keys taking part per batch, clamped to [0, kv_len]
  MaskView mask;
  Dropout dropout;

  int64_t group_size() const { return q_heads / kv_heads; }

  // The score product's alpha: q @ k^T comes out as base-2 logits, exp(scale * x) = exp2(x * scale * log2(e)).
  float score_scale_log2() const { return scale * kLog2e; }

  // How many leading keys query row i of batch b may see before the mask: key j takes part only if
  // j < key_lengths[b] and, when causal, j <= i.
  int64_t visible_keys(int64_t b, int64_t i) const {
    const int64_t length = key_lengths[b];
    return is_causal ? std::min(length, i + 1) : length;
  }
};

// The score blocks, which both kernels compute with one BLAS product each: query rows [i0, i0 + kScoreRows) of
// one head, i0 a multiple of kScoreRows, against keys [j0, j0 + score_block_cols(...)), j0 a multiple of
// kScoreCols. The backward rebuilds each weight as exp2(s - lse) from the forward's lse, so it must compute
// every score s bit for bit as the forward did. A BLAS sums a product's terms in an order that depends on the
// product's shape: blocks of 64 x 512 in the forward and 128 x 128 in the backward gave scores apart by up to
// 3e-7 relative, rows of weights that missed 1 by 2e-5 at scores near 100, and dv 8x torch's error. So both
// multiply the same blocks. 64 rows give B * Hq * L / 64 forward units (256 at B=4, H=8, L=512) to spread over
// the threads; a 64 x 512 float32 block (128 KiB) fits L2, and 512 keys take S = 512 in one pass of the online
// softmax (blocks of 128 x 128 made the forward about 1.3x slower at that shape).
constexpr int64_t kScoreRows = 64;
constexpr int64_t kScoreCols = 512;

// The columns of the score block of query rows [i0, i0 + rows) at key j0 in batch b: the keys its last row sees
// (the most any of its rows sees), at most kScoreCols.
inline int64_t score_block_cols(const AttentionProblem& problem, int64_t b, int64_t i0, int64_t rows, int64_t j0) {
  return std::clamp<int64_t>(problem.visible_keys(b, i0 + rows - 1) - j0, 0, kScoreCols);
}

// Completes the base-2 logits of query row i against keys [j0, j0 + n) (b, h fixed), which the score product
// wrote already scaled (q_i . k_j * problem.score_scale_log2()): adds the additive mask * log2(e), or sets -inf
// where the key takes no part (bool mask false, or j0 + c >= j0 + valid). `valid` may be <= 0 (no key of the
// block is visible) or > n (all are).
void prepare_score_row(const AttentionProblem& problem, float* scores, int64_t n, int64_t valid, int64_t b,
                       int64_t h, int64_t i, int64_t j0);

// Forward. q (B, Hq, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev) float32 views with contiguous rows; writes
// out (B, Hq, L, Ev) float32 view and lse (B, Hq, L) contiguous float32 (base-2 log of the sum of exp; +inf for
// empty rows).
void attention_forward_kernel(const AttentionProblem& problem, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse);

// Backward. As the forward, plus grad_out (B, Hq, L, Ev), the forward's lse and delta = rowsum(dO * O),
// both (B, Hq, L) contiguous float32. Writes dq (B, Hq, L, E), dk (B, Hk, S, E), dv (B, Hk, S, Ev) float32
// views, every element (zero where no score takes part). Deterministic: a fixed summation order per element.
void attention_backward_kernel(const AttentionProblem& problem, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& grad_out, const at::Tensor& lse,
                               const at::Tensor& delta, const at::Tensor& dq, const at::Tensor& dk,
                               const at::Tensor& dv);

}  // namespace tfm_kernels::cpu
