// CPU attention forward: tiled online softmax (FlashAttention-style) in float32.
// Work split: at::parallel_for over units (batch, query head, block of kScoreRows query rows); a unit walks the
// key blocks its rows may see (causal rows stop at the diagonal, key_lengths cut the tail), computes the score
// block (attention_cpu.h; the backward computes the same blocks) with one BLAS product, turns it into
// probabilities against a running row maximum, rescales its accumulator when the maximum grows and adds
// probs @ V with a second product. Each unit owns its output rows, so there are no races and results do not
// depend on the thread count.
// Tests: tests/test_attention.py -k cpu, tests/test_attention_cpu.py.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/attention_cpu.h"
#include "cpu/row_loops.h"
#include "cpu/block_gemm.h"

namespace tfm_kernels::cpu {

void attention_forward_kernel(const AttentionProblem& problem, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse) {
  const HeadTensor q_rows = head_tensor(q), k_rows = head_tensor(k), v_rows = head_tensor(v);
  const HeadTensor out_rows = head_tensor(out);
  float* lse_data = lse.data_ptr<float>();  // (B, Hq, L) contiguous
  const int64_t L = problem.q_len, E = problem.head_dim, Ev = problem.value_dim, Hq = problem.q_heads;
  const int64_t row_blocks = (L + kScoreRows - 1) / kScoreRows;
  const int64_t units = problem.batch * Hq * row_blocks;

  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    const SingleThreadedBlas single_threaded;
    std::vector<float> scores(kScoreRows * kScoreCols), acc(kScoreRows * Ev), keep(kScoreCols);
    std::vector<float> running_max(kScoreRows), running_sum(kScoreRows);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / (Hq * row_blocks), h = unit / row_blocks % Hq, i0 = unit % row_blocks * kScoreRows;
      const int64_t hk = h / problem.group_size();
      const int64_t rows = std::min(kScoreRows, L - i0);
      // Keys beyond what the last row of the block sees take part in no row: skip their blocks.
      const int64_t key_end = problem.visible_keys(b, i0 + rows - 1);
      std::fill(acc.begin(), acc.begin() + rows * Ev, 0.0f);
      std::fill(running_max.begin(), running_max.end(), -kInfinity);
      std::fill(running_sum.begin(), running_sum.end(), 0.0f);
      const at::Tensor q_block = matrix(q_rows.row(b, h, i0), rows, E, q_rows.row_stride);
      at::Tensor acc_block = matrix(acc.data(), rows, Ev, Ev);

      for (int64_t j0 = 0; j0 < key_end; j0 += kScoreCols) {
        const int64_t cols = score_block_cols(problem, b, i0, rows, j0);
        at::Tensor score_block = matrix(scores.data(), rows, cols, cols);
        matmul_accumulate(score_block, q_block, transposed(k_rows.row(b, hk, j0), cols, E, k_rows.row_stride),
                          problem.score_scale_log2(), 0.0f);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          float* s = scores.data() + r * cols;
          prepare_score_row(problem, s, cols, problem.visible_keys(b, i) - j0, b, h, i, j0);
          // row_max skips NaN; a row that has only NaN scores (a NaN in its query) takes NaN as its maximum, so
          // that its output and lse become NaN, as in the reference, instead of those of a row without keys.
          float new_max = std::max(running_max[r], row_max(s, cols));
          if (new_max == -kInfinity) {
            if (std::none_of(s, s + cols, [](float x) { return std::isnan(x); })) {
              fill_row(s, cols, 0.0f);  // no key of the row has taken part yet: its accumulator stays 0
              continue;
            }
            new_max = std::numeric_limits<float>::quiet_NaN();
          }
          const float rescale = std::exp2(running_max[r] - new_max);  // 0 when the old maximum was -inf
          running_sum[r] = running_sum[r] * rescale + exp2_row_sum(s, cols, new_max);
          running_max[r] = new_max;
          if (rescale != 1.0f) {
            scale_row(acc.data() + r * Ev, Ev, rescale);
          }
          if (problem.dropout.enabled) {  // the normaliser counts every weight; dropout acts on the output
            const Dropout& d = problem.dropout;
            dropout_row(keep.data(), cols, d.seed, static_cast<uint64_t>(b * Hq + h), static_cast<uint32_t>(i),
                        static_cast<uint32_t>(j0), d.threshold, d.keep_scale);
            multiply_row(s, keep.data(), cols);
          }
        }
        matmul_accumulate(acc_block, score_block, matrix(v_rows.row(b, hk, j0), cols, Ev, v_rows.row_stride),
                          1.0f, 1.0f);
      }

      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        const bool empty = running_sum[r] == 0.0f;
        float* out_row = out_rows.row(b, h, i);
        const float* acc_row = acc.data() + r * Ev;
        const float inverse_sum = empty ? 0.0f : 1.0f / running_sum[r];
        for (int64_t d = 0; d < Ev; ++d) {
          out_row[d] = acc_row[d] * inverse_sum;
        }
        lse_data[(b * Hq + h) * L + i] =
            empty ? kInfinity : running_max[r] + std::log2(running_sum[r]);
      }
    }
  });
}

}  // namespace tfm_kernels::cpu
