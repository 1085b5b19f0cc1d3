// Launchers of the CUDA attention kernels: grid shapes, dynamic shared memory (opted in above the 48 KB
// default), launch on the caller's stream. Included only by the generated translation units of
// instantiations/, one per (head dim, element type, pass); api.cpp calls them through launch.h.
// Test: python -m pytest tests/test_attention_cuda.py -m gpu.
#pragma once
#include <cuda_runtime.h>

#include "cuda/attention/backward_kernels.cuh"
#include "cuda/attention/forward_kernel.cuh"
#include "cuda/attention/kernel_traits.h"
#include "cuda/attention/launch.h"
#include "cuda/attention/params.h"

namespace tfm_kernels::attention {

template <ElementType kType>
struct ElementOf;
template <>
struct ElementOf<ElementType::kFloat16> {
  using type = __half;
};
template <>
struct ElementOf<ElementType::kBFloat16> {
  using type = __nv_bfloat16;
};

constexpr size_t kDefaultSharedMemoryBytes = 48 * 1024;

// Launches kernel<<<grid, threads, smem_bytes, stream>>>(params) when the grid is not empty.
template <typename Kernel, typename Params>
cudaError_t launch(Kernel kernel, dim3 grid, int threads, size_t smem_bytes, cudaStream_t stream,
                   const Params& params) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  if (smem_bytes > kDefaultSharedMemoryBytes) {
    const cudaError_t error =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
    if (error != cudaSuccess) return error;
  }
  kernel<<<grid, threads, smem_bytes, stream>>>(params);
  return cudaGetLastError();
}

template <int kHeadDim, ElementType kType>
int launch_forward(const ForwardParams& params, CUstream_st* stream) {
  using T = typename ElementOf<kType>::type;
  using Traits = ForwardTraits<kHeadDim>;
  const dim3 grid(ceil_div(params.q_len, Traits::kBlockM), params.heads_q, params.batch);
  return launch(attention_forward_kernel<kHeadDim, T>, grid, Traits::kThreads, Traits::kSmemElems * sizeof(T), stream,
                params);
}

template <int kHeadDim, ElementType kType>
int launch_backward(const BackwardParams& params, CUstream_st* stream) {
  using T = typename ElementOf<kType>::type;
  using DeltaTraits = BackwardDeltaTraits;
  using KVTraits = BackwardKVTraits<kHeadDim>;
  using QTraits = BackwardQTraits<kHeadDim>;
  const dim3 delta_grid(ceil_div(params.q_len, DeltaTraits::kRowsPerBlock), params.heads_q, params.batch);
  cudaError_t error = launch(attention_backward_delta_kernel<kHeadDim, T>, delta_grid, DeltaTraits::kThreads, 0,
                             stream, params);
  if (error != cudaSuccess) return error;
  const dim3 kv_grid(ceil_div(params.kv_len, KVTraits::kBlockN), params.heads_k, params.batch);
  const bool fused_dq = params.grad_q_accum != nullptr;
  const auto kv_kernel =
      fused_dq ? attention_backward_kv_kernel<kHeadDim, T, true> : attention_backward_kv_kernel<kHeadDim, T, false>;
  error = launch(kv_kernel, kv_grid, KVTraits::kThreads, KVTraits::smem_bytes(fused_dq, sizeof(T)), stream, params);
  if (error != cudaSuccess || fused_dq) return error;
  const dim3 q_grid(ceil_div(params.q_len, QTraits::kBlockM), params.heads_q, params.batch);
  return launch(attention_backward_q_kernel<kHeadDim, T>, q_grid, QTraits::kThreads, QTraits::kSmemElems * sizeof(T),
                stream, params);
}

}  // namespace tfm_kernels::attention
