// The output layout of the attention operators' contract (csrc/ops.cpp), shared by the device implementations.
#pragma once

#include <ATen/ATen.h>

namespace tfm_kernels {

// An uninitialised (B, H, N, D) tensor stored as (B, N, H, D). Allocated with these strides, not as a transposed
// view: an operator output that is a view cannot be modified in place under autograd.
inline at::Tensor empty_heads_inner(int64_t B, int64_t H, int64_t N, int64_t D, const at::TensorOptions& options) {
  return at::empty_strided({B, H, N, D}, {N * H * D, D, H * D, 1}, options);
}

}  // namespace tfm_kernels
