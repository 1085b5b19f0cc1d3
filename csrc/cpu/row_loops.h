// Vectorised loops over one row, the elementwise part of the CPU kernels: attention's score blocks (the matrix
// products run in BLAS, see block_gemm.h) and the MLP's dropout (mlp.cpp). On x86-64 each function is compiled
// for AVX-512, AVX2 and baseline x86-64 and the best one the CPU supports is picked at load time; the loops are
// plain C++ that the compiler vectorises (built with -O3 -fno-trapping-math, see setup.py).
#pragma once

#include <cstdint>

namespace tfm_kernels::cpu {

// x[c] *= factor.
void scale_row(float* x, int64_t n, float factor);

// x[c] *= y[c].
void multiply_row(float* x, const float* y, int64_t n);

// x[c] = value.
void fill_row(float* x, int64_t n, float value);

// max over x[0, n); -inf for n == 0.
float row_max(const float* x, int64_t n);

// x[c] = 2^(x[c] - offset); returns the sum of the new x. exp2(-inf) == 0.
float exp2_row_sum(float* x, int64_t n, float offset);

// x[c] = 2^(x[c] - offset), and 0 where x[c] is -inf (a masked score) whatever the offset: in a row whose
// log-sum-exp is NaN (a NaN key it sees), its masked keys keep P = 0. offset may be +inf (then every x[c] is 0).
void exp2_row(float* x, int64_t n, float offset);

// The softmax gradient of one row: grad[c] = probs[c] * (grad[c] - delta), delta = rowsum(dO * O), and 0 where
// probs[c] is 0 even if delta is NaN, so that keys no row sees get the zero gradient of a masked score.
void softmax_grad_row(float* grad, const float* probs, int64_t n, float delta);

// Dropout multipliers of row i, columns [j0, j0 + n) of Philox stream z (csrc/common/philox.h):
// keep[c] = keep_scale if the shared rule keeps (z, i, j0 + c), else 0. Attention: z = b * Hq + h, query row i,
// key j0 + c; MLP: z = 0, token i, feature j0 + c.
void dropout_row(float* keep, int64_t n, uint64_t seed, uint64_t z, uint32_t i, uint32_t j0, uint32_t threshold,
                 float keep_scale);

}  // namespace tfm_kernels::cpu
