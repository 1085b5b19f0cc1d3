// Host entry points of the CUDA attention kernels, one explicit instantiation per (head dim, element type)
// in the generated translation units of instantiations/ (csrc/generate_kernels.py). Each launches its kernels
// on `stream` and returns the first CUDA error (launch configuration or shared-memory attribute), so the
// caller (api.cpp) reports it through torch. No CUDA or torch headers: api.cpp includes this.
#pragma once
#include "cuda/attention/params.h"

struct CUstream_st;

namespace tfm_kernels::attention {

// Returns a cudaError_t as int (0 = success), keeping cuda_runtime.h out of this header.
template <int kHeadDim, ElementType kType>
int launch_forward(const ForwardParams& params, CUstream_st* stream);

// Runs the backward passes: delta = rowsum(grad_out * out), then dk/dv. With params.grad_q_accum set, the dk/dv
// pass also adds dQ into that float32 sum with atomics (not bit-reproducible); without it a third pass writes
// grad_q, and every gradient element is written by one thread block in a fixed order (deterministic).
template <int kHeadDim, ElementType kType>
int launch_backward(const BackwardParams& params, CUstream_st* stream);

}  // namespace tfm_kernels::attention
