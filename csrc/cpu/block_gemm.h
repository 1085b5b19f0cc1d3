// Float32 block matrix products for the CPU attention kernels, run by ATen's CPU addmm kernel (the BLAS torch
// was built with) on non-owning views of the kernels' buffers. Called inside at::parallel_for, where the BLAS
// runs single-threaded, so each block product stays on its thread.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <ATen/ops/from_blob.h>

#include <cstdint>

namespace tfm_kernels::cpu {

// The rows x cols matrix whose element (r, c) is data[r * row_stride + c].
inline at::Tensor matrix(const float* data, int64_t rows, int64_t cols, int64_t row_stride) {
  return at::from_blob(const_cast<float*>(data), {rows, cols}, {row_stride, 1}, at::TensorOptions(at::kFloat));
}

// The transpose (cols x rows) of the rows x cols matrix stored at data with row_stride.
inline at::Tensor transposed(const float* data, int64_t rows, int64_t cols, int64_t row_stride) {
  return at::from_blob(const_cast<float*>(data), {cols, rows}, {1, row_stride}, at::TensorOptions(at::kFloat));
}

// c = alpha * a @ b + beta * c; beta == 0 ignores c's old contents (NaN included). The CPU kernel is called
// directly (at::cpu::), skipping the dispatcher: these products are small and many. With alpha == 0 (scale=0)
// addmm, as BLAS, does not read a and b at all, which would turn a NaN or infinity in q or k into a score of 0;
// the reference computes (q @ k^T) * scale, whose NaN reaches the output: so the product is formed and then
// scaled.
inline void matmul_accumulate(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, float alpha, float beta) {
  if (c.numel() == 0) {
    return;
  }
  if (alpha == 0.0f) {
    const at::Tensor product = at::cpu::mm(a, b).mul_(alpha);  // 0 * NaN = NaN, 0 * inf = NaN, else 0
    if (beta == 0.0f) {
      c.copy_(product);
    } else {
      c.mul_(beta).add_(product);
    }
    return;
  }
  at::cpu::addmm_out(c, c, a, b, beta, alpha);
}

}  // namespace tfm_kernels::cpu
