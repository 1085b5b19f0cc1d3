// MLP elementwise CUDA kernels: what cuBLASLt's fused epilogues cannot do (params.h).
//   forward epilogue:  out = dropout(act(z + bias)) for the activations without a cuBLASLt epilogue (erf GELU,
//                      SiLU, ReLU with a stored pre-activation) and whenever dropout is on; gated:
//                      out = dropout(act(g) * u) over the [g, u] GEMM output;
//   backward epilogue: dz = grad_out * dropout * act'(z) (gated: [dg, du]), the input of the gradient GEMMs;
//   column sum:        bias gradient where the BGRADB epilogue is unavailable.
// Work split: elementwise kernels use 256-thread blocks along a row, each thread one group of 8 consecutive
// columns (the columns one Philox call decides), grid.y walks rows (grid-stride past 65535 rows); the column
// sum uses 32x8 blocks, 32 columns per block, 8 row-strided partial sums reduced in shared memory
// (deterministic, no atomics). All math in float.
// The kernels, their dtype/activation dispatch and their grids live here; epilogue_kernels.cu launches them, and
// tests/cuda_emulation/mlp_harness.cpp runs this same header on the CPU.
// Test: tests/test_mlp_cuda_emulated.py (CPU emulation), tests/test_mlp.py -m gpu (backend "cuda" against the
// float64 oracle), benchmarks/device_check.sh.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>

#include "cuda/mlp/params.h"

namespace tfm_kernels::mlp {

constexpr int kThreads = 256;
constexpr int64_t kMaxColumnBlocks = 64;
constexpr int64_t kMaxRowBlocks = 65535;  // gridDim.y limit
constexpr int kSumColumns = 32;
constexpr int kSumRowLanes = 8;

template <typename T>
__device__ __forceinline__ float load_float(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

__device__ __forceinline__ MlpDropout device_dropout(const MlpDropoutParams& p) {
  const uint64_t seed = p.active ? static_cast<uint64_t>(*p.seed) : 0;
  return MlpDropout{seed, p.threshold, p.keep_scale, p.active};
}

// Calls element(row, col, multiplier) for each element of the (rows, cols) problem this thread owns: groups of
// 8 consecutive columns of a row, whose dropout one Philox call decides, strided over the grid.
template <typename Element>
__device__ __forceinline__ void for_each_element(int64_t rows, int64_t cols, const MlpDropout& dropout,
                                                 Element&& element) {
  const int64_t groups = (cols + kColumnsPerDraw - 1) / kColumnsPerDraw;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    for (int64_t group = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; group < groups;
         group += int64_t(gridDim.x) * blockDim.x) {
      const uint32_t keep = dropout.keep_byte(row, group);
      const int64_t first = group * kColumnsPerDraw;
      const int count = cols - first < kColumnsPerDraw ? static_cast<int>(cols - first) : kColumnsPerDraw;
      for (int c = 0; c < count; ++c) element(row, first + c, dropout.multiplier(keep, c));
    }
  }
}

template <typename T, Activation A, bool kGated>
__global__ void forward_epilogue_kernel(MlpForwardEpilogueParams p) {
  T* z = static_cast<T*>(p.z);
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  for_each_element(p.rows, p.cols, device_dropout(p.dropout), [&](int64_t row, int64_t col, float multiplier) {
    T* z_row = z + row * p.ld_z;
    float g = load_float(z_row, col);
    if (bias != nullptr) {
      g += load_float(bias, col);
      if (p.store_preact) z_row[col] = static_cast<T>(g);
    }
    float h = activate<A>(g);
    if constexpr (kGated) {
      float u = load_float(z_row, p.cols + col);
      if (bias != nullptr) {
        u += load_float(bias, p.cols + col);
        if (p.store_preact) z_row[p.cols + col] = static_cast<T>(u);
      }
      h *= u;
    }
    out[row * p.ld_out + col] = static_cast<T>(h * multiplier);
  });
}

template <typename T, Activation A, bool kGated>
__global__ void backward_epilogue_kernel(MlpBackwardEpilogueParams p) {
  const T* grad_out = static_cast<const T*>(p.grad_out);
  const T* z = static_cast<const T*>(p.z);
  T* dz = static_cast<T*>(p.dz);
  const int64_t width = kGated ? 2 * p.cols : p.cols;
  for_each_element(p.rows, p.cols, device_dropout(p.dropout), [&](int64_t row, int64_t col, float multiplier) {
    const float h = load_float(grad_out, row * p.ld_grad_out + col) * multiplier;
    const int64_t at = row * width + col;
    if constexpr (kGated) {
      const float g = load_float(z, at), u = load_float(z, at + p.cols);
      dz[at] = static_cast<T>(h * u * activation_grad<A>(g));
      dz[at + p.cols] = static_cast<T>(h * activate<A>(g));
    } else if constexpr (A == Activation::kNone) {
      dz[at] = static_cast<T>(h);
    } else {
      dz[at] = static_cast<T>(h * activation_grad<A>(load_float(z, at)));
    }
  });
}

template <typename T>
__global__ void column_sum_kernel(ColumnSumParams p) {
  __shared__ float partial[kSumRowLanes][kSumColumns + 1];  // +1: no bank conflicts on the transposed read
  const T* x = static_cast<const T*>(p.x);
  const int64_t col = blockIdx.x * int64_t(kSumColumns) + threadIdx.x;
  float sum = 0.0f;
  if (col < p.cols) {
    for (int64_t row = threadIdx.y; row < p.rows; row += kSumRowLanes) sum += load_float(x, row * p.cols + col);
  }
  partial[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < p.cols) {
    float total = 0.0f;
    for (int lane = 0; lane < kSumRowLanes; ++lane) total += partial[lane][threadIdx.x];
    static_cast<T*>(p.out)[col] = static_cast<T>(total);
  }
}

template <typename Fn>
inline void dispatch_dtype(MlpDType dtype, Fn&& fn) {
  switch (dtype) {
    case MlpDType::kFloat16: fn(__half{}); break;
    case MlpDType::kBFloat16: fn(__nv_bfloat16{}); break;
    default: fn(float{}); break;
  }
}

// Calls launch(T{}, integral_constant<Activation>, bool_constant<gated>) for the runtime dtype, activation and
// gated flag: one kernel instantiation per combination.
template <typename Launch>
inline void dispatch_elementwise(MlpDType dtype, Activation activation, bool gated, Launch&& launch) {
  dispatch_dtype(dtype, [&](auto zero) {
    dispatch_activation(activation, [&](auto act) {
      if (gated) {
        launch(zero, act, std::true_type{});
      } else {
        launch(zero, act, std::false_type{});
      }
    });
  });
}

// Grid of the elementwise kernels: one block per 256 groups of 8 columns (at most 64, then the group loop
// strides), one block row per row up to row_block_limit (then the row loop strides).
inline dim3 elementwise_grid(int64_t rows, int64_t cols, int64_t row_block_limit) {
  const int64_t groups = (cols + kColumnsPerDraw - 1) / kColumnsPerDraw;
  const int64_t column_blocks = std::min<int64_t>((groups + kThreads - 1) / kThreads, kMaxColumnBlocks);
  return dim3(static_cast<unsigned>(std::max<int64_t>(column_blocks, 1)),
              static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(rows, 1), row_block_limit)));
}

// The forward or backward kernel instantiation for T, A, gated, picked by the params type.
template <typename T, Activation A, bool kGated>
auto elementwise_kernel(const MlpForwardEpilogueParams&) {
  return forward_epilogue_kernel<T, A, kGated>;
}
template <typename T, Activation A, bool kGated>
auto elementwise_kernel(const MlpBackwardEpilogueParams&) {
  return backward_epilogue_kernel<T, A, kGated>;
}

// The forward or backward epilogue: calls launch(kernel, grid, block) with the kernel instantiation and the grid
// the params need. epilogue_kernels.cu passes a <<<>>> launch on a stream, tests/cuda_emulation/mlp_harness.cpp
// one that runs the blocks on CPU threads. row_block_limit is gridDim.y's limit; the emulation passes a smaller
// one to reach the row grid-stride loop without 65536 rows.
template <typename Params, typename Launch>
void elementwise_launch(const Params& params, Launch&& launch, int64_t row_block_limit = kMaxRowBlocks) {
  const dim3 grid = elementwise_grid(params.rows, params.cols, row_block_limit);
  dispatch_elementwise(params.dtype, params.activation, params.gated, [&](auto zero, auto act, auto gated) {
    launch(elementwise_kernel<decltype(zero), decltype(act)::value, decltype(gated)::value>(params), grid,
           dim3(kThreads));
  });
}

// The column sum, launched likewise: 32 columns per block, 8 row lanes.
template <typename Launch>
void column_sum_launch(const ColumnSumParams& params, Launch&& launch) {
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>((params.cols + kSumColumns - 1) / kSumColumns, 1)));
  dispatch_dtype(params.dtype, [&](auto zero) {
    launch(column_sum_kernel<decltype(zero)>, grid, dim3(kSumColumns, kSumRowLanes));
  });
}

}  // namespace tfm_kernels::mlp
