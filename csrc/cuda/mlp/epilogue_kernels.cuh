// MLP elementwise CUDA kernels: what cuBLASLt's fused epilogues cannot do (params.h).
//   forward epilogue:  out = dropout(act(z + bias)) for the activations without a cuBLASLt epilogue (erf GELU,
//                      SiLU, ReLU with a stored pre-activation) and whenever dropout is on; gated:
//                      out = dropout(act(g) * u) over the [g, u] GEMM output;
//   backward epilogue: dz = grad_out * dropout * act'(z) (gated: [dg, du]), the input of the gradient GEMMs;
//   column sum:        bias gradient where the BGRADB epilogue is unavailable.
// Work split: elementwise kernels use 256-thread blocks along a row, each thread one group of 8 consecutive
// columns (the columns one Philox call decides, read and written in 16-byte accesses where the group is whole
// and aligned), grid.y walks rows (grid-stride past 65535 rows); the column sum uses 32x8 blocks, 32 columns
// per block, 8 row-strided partial sums reduced in shared memory (deterministic, no atomics). All math in float.
// The kernels, their dtype/activation dispatch and their grids live here; epilogue_kernels.cu launches them, and
// tests/cuda_emulation/mlp_harness.cpp runs this same header on the CPU.
// Test: tests/test_mlp_cuda_emulated.py (CPU emulation), tests/test_mlp.py -m gpu (backend "cuda" against the
// float64 oracle), benchmarks/device_check.sh.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
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

// The memory of one group of kColumnsPerDraw consecutive elements of a row (the columns one Philox call decides):
// one 16-byte access for 16-bit types, two for float.
template <typename T>
struct alignas(16) GroupBits {
  T v[kColumnsPerDraw];
};

// Whether the group of `count` elements at p moves in vector accesses: whole and 16-byte aligned (not a group at
// the end of a row, nor in a row whose stride is not a multiple of 8 elements).
template <typename T>
__device__ __forceinline__ bool vector_group(const T* p, int count) {
  return count == kColumnsPerDraw && reinterpret_cast<uintptr_t>(p) % alignof(GroupBits<T>) == 0;
}

// The `count` (<= kColumnsPerDraw) elements at p as floats, the rest 0: in vector loads where vector_group (each
// thread's group takes one instruction where element loads took 8, each touching a warp's whole 512-byte span),
// else element by element.
template <typename T>
__device__ __forceinline__ void load_group(const T* p, int count, float (&values)[kColumnsPerDraw]) {
  if (vector_group(p, count)) {
    const GroupBits<T> bits = *reinterpret_cast<const GroupBits<T>*>(p);
#pragma unroll
    for (int c = 0; c < kColumnsPerDraw; ++c) values[c] = static_cast<float>(bits.v[c]);
  } else {
#pragma unroll
    for (int c = 0; c < kColumnsPerDraw; ++c) values[c] = c < count ? static_cast<float>(p[c]) : 0.0f;
  }
}

// Stores the first `count` of `values` at p in T, as load_group reads them.
template <typename T>
__device__ __forceinline__ void store_group(T* p, int count, const float (&values)[kColumnsPerDraw]) {
  if (vector_group(p, count)) {
    GroupBits<T> bits;
#pragma unroll
    for (int c = 0; c < kColumnsPerDraw; ++c) bits.v[c] = static_cast<T>(values[c]);
    *reinterpret_cast<GroupBits<T>*>(p) = bits;
  } else {
#pragma unroll
    for (int c = 0; c < kColumnsPerDraw; ++c) {
      if (c < count) p[c] = static_cast<T>(values[c]);  // constant indices: `values` stays in registers
    }
  }
}

// Calls group(row, first, count, keep) for each group of kColumnsPerDraw consecutive columns of a row that this
// thread owns (first: its first column; count: its columns inside the problem; keep: its dropout byte), strided
// over the grid.
template <typename Group>
__device__ __forceinline__ void for_each_group(int64_t rows, int64_t cols, const MlpDropout& dropout, Group&& group) {
  const int64_t groups = (cols + kColumnsPerDraw - 1) / kColumnsPerDraw;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < groups;
         g += int64_t(gridDim.x) * blockDim.x) {
      const int64_t first = g * kColumnsPerDraw;
      const int count = cols - first < kColumnsPerDraw ? static_cast<int>(cols - first) : kColumnsPerDraw;
      group(row, first, count, dropout.keep_byte(row, g));
    }
  }
}

template <typename T, Activation A, bool kGated>
__global__ void forward_epilogue_kernel(MlpForwardEpilogueParams p) {
  T* z = static_cast<T*>(p.z);
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  const MlpDropout dropout = device_dropout(p.dropout);
  for_each_group(p.rows, p.cols, dropout, [&](int64_t row, int64_t first, int count, uint32_t keep) {
    T* z_row = z + row * p.ld_z;
    float g[kColumnsPerDraw], h[kColumnsPerDraw], b[kColumnsPerDraw];
    load_group(z_row + first, count, g);
    if (bias != nullptr) {
      load_group(bias + first, count, b);
#pragma unroll
      for (int c = 0; c < kColumnsPerDraw; ++c) g[c] += b[c];
      if (p.store_preact) store_group(z_row + first, count, g);
    }
#pragma unroll
    for (int c = 0; c < kColumnsPerDraw; ++c) h[c] = activate<A>(g[c]);
    if constexpr (kGated) {
      float u[kColumnsPerDraw];
      load_group(z_row + p.cols + first, count, u);
      if (bias != nullptr) {
        load_group(bias + p.cols + first, count, b);
#pragma unroll
        for (int c = 0; c < kColumnsPerDraw; ++c) u[c] += b[c];
        if (p.store_preact) store_group(z_row + p.cols + first, count, u);
      }
#pragma unroll
      for (int c = 0; c < kColumnsPerDraw; ++c) h[c] *= u[c];
    }
#pragma unroll
    for (int c = 0; c < kColumnsPerDraw; ++c) h[c] *= dropout.multiplier(keep, c);
    store_group(out + row * p.ld_out + first, count, h);
  });
}

template <typename T, Activation A, bool kGated>
__global__ void backward_epilogue_kernel(MlpBackwardEpilogueParams p) {
  const T* grad_out = static_cast<const T*>(p.grad_out);
  const T* z = static_cast<const T*>(p.z);
  T* dz = static_cast<T*>(p.dz);
  const int64_t width = kGated ? 2 * p.cols : p.cols;
  const MlpDropout dropout = device_dropout(p.dropout);
  for_each_group(p.rows, p.cols, dropout, [&](int64_t row, int64_t first, int count, uint32_t keep) {
    float h[kColumnsPerDraw], g[kColumnsPerDraw];
    load_group(grad_out + row * p.ld_grad_out + first, count, h);
#pragma unroll
    for (int c = 0; c < kColumnsPerDraw; ++c) h[c] *= dropout.multiplier(keep, c);
    const int64_t at = row * width + first;
    if constexpr (kGated) {
      float u[kColumnsPerDraw], du[kColumnsPerDraw];
      load_group(z + at, count, g);
      load_group(z + at + p.cols, count, u);
#pragma unroll
      for (int c = 0; c < kColumnsPerDraw; ++c) {
        du[c] = h[c] * activate<A>(g[c]);
        g[c] = activation_backward<A>(h[c] * u[c], g[c]);
      }
      store_group(dz + at, count, g);
      store_group(dz + at + p.cols, count, du);
    } else if constexpr (A == Activation::kNone) {
      store_group(dz + at, count, h);
    } else {
      load_group(z + at, count, g);
#pragma unroll
      for (int c = 0; c < kColumnsPerDraw; ++c) g[c] = activation_backward<A>(h[c], g[c]);
      store_group(dz + at, count, g);
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
