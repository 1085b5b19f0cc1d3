// CPU attention backward in float32: recomputes the probabilities of each (query block, key block) tile, the
// forward's score blocks by the forward's own products (attention_cpu.h), from the saved log-sum-exp,
// P = exp2(s * scale * log2(e) - lse), and forms
//   dV += P_drop^T dO,  dP = dO V^T (dropped like P),  dS = P * (dP - delta),  dK += scale dS^T Q,
//   dQ += scale dS K,   with delta = rowsum(dO * O) computed by the host.
// Work split: at::parallel_for over units (batch, kv head, chunk of key blocks). A unit accumulates dK and dV
// of one key block in local buffers over every query head of its group and every query row that can see the
// block, then writes them: it owns those dK/dV rows. dQ sums over key blocks; when a head's key blocks are
// split into several chunks (too few batch x kv-head units to keep the threads busy), the first chunk adds into
// dQ and each other chunk into its own float32 dQ buffer, added to dQ in chunk order afterwards. The chunk count
// depends only on the shapes, so results are bit-identical from run to run and across thread counts. A head of
// at most 512 keys is one key block, so one unit: with fewer batch x kv-head pairs than threads, the backward
// leaves threads idle.
// Tests: tests/test_attention.py -k cpu, tests/test_attention_cpu.py.
#include <ATen/Parallel.h>
#include <ATen/ops/add.h>
#include <ATen/ops/copy.h>
#include <ATen/ops/zero.h>
#include <ATen/ops/zeros.h>

#include <vector>

#include "cpu/attention_cpu.h"
#include "cpu/row_loops.h"
#include "cpu/block_gemm.h"

namespace tfm_kernels::cpu {
namespace {

// Tiles are the forward's score blocks (attention_cpu.h), 64 x 512: five BLAS products per tile, each ~4 MFLOP
// at E = 64, large enough that the per-call cost of the ATen kernel stays small beside the product.
// Below this many batch x kv-head units the key blocks of a head are split into chunks (see above).
constexpr int64_t kMinUnits = 16;

struct BackwardScratch {
  std::vector<float> probs, grad_scores, keep, dk_acc, dv_acc;
  BackwardScratch(int64_t E, int64_t Ev, bool dropout)
      : probs(kScoreRows * kScoreCols),
        grad_scores(kScoreRows * kScoreCols),
        keep(dropout ? kScoreRows * kScoreCols : 0),
        dk_acc(kScoreCols * E),
        dv_acc(kScoreCols * Ev) {}
};

// The contributions of query rows [i0, i0 + rows) of head h to the key block [j0, j0 + cols) of kv head hk:
// adds into scratch.dk_acc (unscaled), scratch.dv_acc and the dQ rows in dq_rows.
void backward_tile(const AttentionProblem& problem, const HeadTensor& q_rows, const HeadTensor& k_rows,
                   const HeadTensor& v_rows, const HeadTensor& grad_rows, const HeadTensor& dq_rows,
                   const float* lse, const float* delta, BackwardScratch& scratch, int64_t b, int64_t h,
                   int64_t hk, int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
  const int64_t E = problem.head_dim, Ev = problem.value_dim, L = problem.q_len;
  const int64_t row_offset = (b * problem.q_heads + h) * L;  // of (b, h, 0) in lse and delta
  const at::Tensor q_block = matrix(q_rows.row(b, h, i0), rows, E, q_rows.row_stride);
  const at::Tensor grad_block = matrix(grad_rows.row(b, h, i0), rows, Ev, grad_rows.row_stride);
  at::Tensor probs = matrix(scratch.probs.data(), rows, cols, cols);
  at::Tensor grad_scores = matrix(scratch.grad_scores.data(), rows, cols, cols);

  matmul_accumulate(probs, q_block, transposed(k_rows.row(b, hk, j0), cols, E, k_rows.row_stride),
                    problem.score_scale_log2(), 0.0f);
  matmul_accumulate(grad_scores, grad_block, transposed(v_rows.row(b, hk, j0), cols, Ev, v_rows.row_stride),
                    1.0f, 0.0f);
  const Dropout& dropout = problem.dropout;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    float* p = scratch.probs.data() + r * cols;
    float* ds = scratch.grad_scores.data() + r * cols;
    prepare_score_row(problem, p, cols, problem.visible_keys(b, i) - j0, b, h, i, j0);
    exp2_row(p, cols, lse[row_offset + i]);  // lse = +inf (a row with no key) gives P = 0
    if (dropout.enabled) {
      float* keep = scratch.keep.data() + r * cols;
      dropout_row(keep, cols, dropout.seed, static_cast<uint64_t>(b * problem.q_heads + h),
                  static_cast<uint32_t>(i), static_cast<uint32_t>(j0), dropout.threshold, dropout.keep_scale);
      multiply_row(ds, keep, cols);
      softmax_grad_row(ds, p, cols, delta[row_offset + i]);
      multiply_row(p, keep, cols);  // from here on p holds the dropped weights dV needs
    } else {
      softmax_grad_row(ds, p, cols, delta[row_offset + i]);
    }
  }
  at::Tensor dv_block = matrix(scratch.dv_acc.data(), cols, Ev, Ev);
  at::Tensor dk_block = matrix(scratch.dk_acc.data(), cols, E, E);
  at::Tensor dq_block = matrix(dq_rows.row(b, h, i0), rows, E, dq_rows.row_stride);
  matmul_accumulate(dv_block, transposed(scratch.probs.data(), rows, cols, cols), grad_block, 1.0f, 1.0f);
  matmul_accumulate(dk_block, transposed(scratch.grad_scores.data(), rows, cols, cols), q_block, 1.0f, 1.0f);
  matmul_accumulate(dq_block, grad_scores, matrix(k_rows.row(b, hk, j0), cols, E, k_rows.row_stride),
                    problem.scale, 1.0f);
}

}  // namespace

void attention_backward_kernel(const AttentionProblem& problem, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& grad_out, const at::Tensor& lse,
                               const at::Tensor& delta, const at::Tensor& dq, const at::Tensor& dk,
                               const at::Tensor& dv) {
  const int64_t B = problem.batch, Hq = problem.q_heads, Hk = problem.kv_heads, L = problem.q_len;
  const int64_t S = problem.kv_len, E = problem.head_dim, Ev = problem.value_dim;
  const HeadTensor q_rows = head_tensor(q), k_rows = head_tensor(k), v_rows = head_tensor(v);
  const HeadTensor grad_rows = head_tensor(grad_out), dk_rows = head_tensor(dk), dv_rows = head_tensor(dv);
  const float* lse_data = lse.data_ptr<float>();
  const float* delta_data = delta.data_ptr<float>();

  const int64_t key_blocks = (S + kScoreCols - 1) / kScoreCols;
  const int64_t head_units = B * Hk;
  const int64_t chunks =
      std::max<int64_t>(1, std::min(key_blocks, (kMinUnits + head_units - 1) / std::max<int64_t>(head_units, 1)));
  // dQ accumulators: dq itself for chunk 0, and (chunks - 1, B, L, Hq, E) float32 buffers for the others, added
  // to it below (chunks - 1 times dQ's size: 15 at B * Hk = 1, where a buffer for chunk 0 too made it 16).
  dq.zero_();
  at::Tensor dq_partial;
  if (chunks > 1) {
    dq_partial = at::zeros({chunks - 1, B, L, Hq, E}, dq.options()).permute({0, 1, 3, 2, 4});  // (C-1, B, Hq, L, E)
  }

  at::parallel_for(0, head_units * chunks, 1, [&](int64_t begin, int64_t end) {
    const SingleThreadedBlas single_threaded;
    BackwardScratch scratch(E, Ev, problem.dropout.enabled);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / (Hk * chunks), hk = unit / chunks % Hk, chunk = unit % chunks;
      const HeadTensor dq_rows = chunk == 0 ? head_tensor(dq) : head_tensor(dq_partial[chunk - 1]);
      for (int64_t kb = chunk * key_blocks / chunks; kb < (chunk + 1) * key_blocks / chunks; ++kb) {
        const int64_t j0 = kb * kScoreCols;
        const int64_t cols = std::min(kScoreCols, S - j0);
        std::fill(scratch.dk_acc.begin(), scratch.dk_acc.begin() + cols * E, 0.0f);
        std::fill(scratch.dv_acc.begin(), scratch.dv_acc.begin() + cols * Ev, 0.0f);
        for (int64_t h = hk * problem.group_size(); h < (hk + 1) * problem.group_size(); ++h) {
          for (int64_t i0 = 0; i0 < L; i0 += kScoreRows) {
            const int64_t rows = std::min(kScoreRows, L - i0);
            // The forward's score block: keys past the key length, or (causal) past the block's last row, take
            // no part in it; keys that take part in no block keep gradients 0.
            const int64_t active_cols = score_block_cols(problem, b, i0, rows, j0);
            if (active_cols > 0) {
              backward_tile(problem, q_rows, k_rows, v_rows, grad_rows, dq_rows, lse_data, delta_data, scratch, b,
                            h, hk, i0, rows, j0, active_cols);
            }
          }
        }
        for (int64_t c = 0; c < cols; ++c) {
          float* dk_row = dk_rows.row(b, hk, j0 + c);
          float* dv_row = dv_rows.row(b, hk, j0 + c);
          for (int64_t d = 0; d < E; ++d) {
            dk_row[d] = scratch.dk_acc[c * E + d] * problem.scale;
          }
          for (int64_t d = 0; d < Ev; ++d) {
            dv_row[d] = scratch.dv_acc[c * Ev + d];
          }
        }
      }
    }
  });

  for (int64_t chunk = 1; chunk < chunks; ++chunk) {
    dq.add_(dq_partial[chunk - 1]);  // in chunk order: the same sum every run
  }
}

}  // namespace tfm_kernels::cpu
