// Argument checks of the MLP operators shared by the CPU (csrc/cpu/mlp.cpp) and CUDA (csrc/cuda/mlp/api.cpp)
// implementations; the layout contract they enforce is in csrc/ops.cpp.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

#include "common/mlp_epilogue.h"

namespace tfm_kernels {

inline Activation checked_activation(const std::string& name) {
  Activation activation;
  TORCH_CHECK(parse_activation(name.c_str(), &activation),
              "activation must be one of none, gelu, gelu_tanh, relu, silu; got ", name);
  return activation;
}

// x (M, K) and weight (N, K) with stride(-1) == 1, one dtype (float16, bfloat16, float32) and device; bias
// (bias_size,) of the same dtype and device, or none.
inline void check_mlp_operands(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               int64_t bias_size) {
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "x must be float16, bfloat16 or float32; got ", x.dtype());
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be 2-D (M, K) with stride(-1) == 1; got shape ", x.sizes(),
              " strides ", x.strides());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1) && weight.stride(1) == 1,
              "weight must be (N, K) with K = ", x.size(1), " and stride(-1) == 1; got shape ", weight.sizes(),
              " strides ", weight.strides());
  TORCH_CHECK(weight.dtype() == x.dtype(), "weight must have x's dtype ", x.dtype(), "; got ", weight.dtype());
  TORCH_CHECK(weight.device() == x.device(), "weight must be on x's device ", x.device(), "; got ",
              weight.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == bias_size, "bias must be (", bias_size, ",); got ",
                bias->sizes());
    TORCH_CHECK(bias->dtype() == x.dtype(), "bias must have x's dtype ", x.dtype(), "; got ", bias->dtype());
    TORCH_CHECK(bias->device() == x.device(), "bias must be on x's device ", x.device(), "; got ", bias->device());
  }
}

// weight (2F, K) of a gated operator: the gate rows, then the up rows.
inline void check_gated_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.size(0) % 2 == 0, "weight must have an even number of rows (2F: gate then up); got ",
              weight.sizes());
}

// A backward op's tensor `name` (grad_out, or what the forward saved: preact, gate_up): (rows, cols), x's dtype
// and device.
inline void check_backward_tensor(const char* name, const at::Tensor& t, const at::Tensor& x, int64_t rows,
                                  int64_t cols) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name, " must be (", rows, ", ", cols,
              "); got ", t.sizes());
  TORCH_CHECK(t.dtype() == x.dtype(), name, " must have x's dtype ", x.dtype(), "; got ", t.dtype());
  TORCH_CHECK(t.device() == x.device(), name, " must be on x's device ", x.device(), "; got ", t.device());
}

}  // namespace tfm_kernels
