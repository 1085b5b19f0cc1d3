// Float32 block matrix products for the CPU attention kernels, run by ATen's CPU addmm kernel (the BLAS torch
// was built with) on non-owning views of the kernels' buffers, inside at::parallel_for, each block product on
// the thread of its unit (SingleThreadedBlas).
#pragma once

#include <ATen/Config.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <ATen/ops/from_blob.h>

#include <cstdint>

#if AT_MKL_ENABLED()
// MKL's thread count for the calling thread only (0: its global count again); declared weak, as torch builds
// need not export it, and then null.
extern "C" int MKL_Set_Num_Threads_Local(int threads) __attribute__((weak));
#endif

namespace tfm_kernels::cpu {

// Within its scope the BLAS of this thread runs single-threaded. MKL's sgemm splits a product by the number of
// threads it may use, even inside at::parallel_for's threads and its one-thread path (taken for a single unit),
// and the split changes the rounding: an AVX-512 machine gave 64 x 64 x 64 products 5e-7 apart with 2 threads
// and with 1. Pinned to one thread, every block product is computed alike whatever torch's thread count, and
// each unit's results, so the kernels' outputs, do not depend on it (tests/test_attention_cpu.py).
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() {
#if AT_MKL_ENABLED()
    if (MKL_Set_Num_Threads_Local != nullptr) {
      previous_ = MKL_Set_Num_Threads_Local(1);
    }
#endif
  }
  ~SingleThreadedBlas() {
#if AT_MKL_ENABLED()
    if (MKL_Set_Num_Threads_Local != nullptr) {
      MKL_Set_Num_Threads_Local(previous_);
    }
#endif
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_ = 0;
};

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
