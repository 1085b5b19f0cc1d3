// Argument checks of the MLP operators shared by the CPU (csrc/cpu/mlp.cpp, mlp_block.cpp) and CUDA
// (csrc/cuda/mlp/api.cpp) implementations; the layout contract they enforce is in csrc/ops.cpp. Every failure
// starts with "<op>: " (op = the schema name, as in attention_checks.h) and names the argument as the caller
// passed it, so that the block operators report w2 as w2, not as the inner linear's weight.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

#include "common/dropout_checks.h"
#include "common/mlp_epilogue.h"

namespace tfm_kernels {

inline Activation checked_activation(const char* op, const std::string& name) {
  Activation activation;
  TORCH_CHECK(parse_activation(name.c_str(), &activation), op,
              ": activation must be one of none, gelu, gelu_tanh, relu, silu; got ", name);
  return activation;
}

// Input `name` (rows, cols): 2-D with stride(-1) == 1, float16, bfloat16 or float32; `shape` names its dims in
// the message, e.g. "(M, K)".
inline void check_mlp_input(const char* op, const char* name, const at::Tensor& x, const char* shape) {
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, op,
              ": ", name, " must be float16, bfloat16 or float32; got ", x.dtype());
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, op, ": ", name, " must be 2-D ", shape,
              " with stride(-1) == 1; got shape ", x.sizes(), " strides ", x.strides());
}

// Weight `name` (rows_dim, cols_dim) with cols_dim = in_features and stride(-1) == 1, in x's dtype and on x's
// device; rows_dim and cols_dim are the letters the message uses ("N", "K").
inline void check_mlp_weight(const char* op, const char* name, const at::Tensor& weight, const char* rows_dim,
                             const char* cols_dim, int64_t in_features, const at::Tensor& x) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == in_features && weight.stride(1) == 1, op, ": ", name,
              " must be (", rows_dim, ", ", cols_dim, ") with ", cols_dim, " = ", in_features,
              " and stride(-1) == 1; got shape ", weight.sizes(), " strides ", weight.strides());
  TORCH_CHECK(weight.dtype() == x.dtype(), op, ": ", name, " must have x's dtype ", x.dtype(), "; got ",
              weight.dtype());
  TORCH_CHECK(weight.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), "; got ",
              weight.device());
}

// Bias `name` (size,) in x's dtype and on x's device, or none.
inline void check_mlp_bias(const char* op, const char* name, const std::optional<at::Tensor>& bias, int64_t size,
                           const at::Tensor& x) {
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == size, op, ": ", name, " must be (", size, ",); got ",
              bias->sizes());
  TORCH_CHECK(bias->dtype() == x.dtype(), op, ": ", name, " must have x's dtype ", x.dtype(), "; got ",
              bias->dtype());
  TORCH_CHECK(bias->device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), "; got ",
              bias->device());
}

// x (M, K), weight (N, K) and bias (N,) or none of a linear or gated operator.
inline void check_mlp_operands(const char* op, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias) {
  check_mlp_input(op, "x", x, "(M, K)");
  check_mlp_weight(op, "weight", weight, "N", "K", x.size(1), x);
  check_mlp_bias(op, "bias", bias, weight.size(0), x);
}

// weight (2F, K) of a gated operator: the gate rows, then the up rows.
inline void check_gated_weight(const char* op, const at::Tensor& weight) {
  TORCH_CHECK(weight.size(0) % 2 == 0, op, ": weight must have an even number of rows (2F: gate then up); got ",
              weight.sizes());
}

// A backward op's tensor `name` (grad_out, or what the forward saved: preact, gate_up, hidden): (rows, cols), x's
// dtype and device.
inline void check_backward_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                                  int64_t rows, int64_t cols) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, ": ", name, " must be (", rows, ", ",
              cols, "); got ", t.sizes());
  TORCH_CHECK(t.dtype() == x.dtype(), op, ": ", name, " must have x's dtype ", x.dtype(), "; got ", t.dtype());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), "; got ",
              t.device());
}

// The block's two projections: x (M, K), w1 (F, K), b1 (F,) or none, w2 (N, F), b2 (N,) or none. Checked by
// their own names before the block calls the linear operators, whose messages say x, weight and bias.
inline void check_mlp_block_operands(const char* op, const at::Tensor& x, const at::Tensor& w1,
                                     const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                                     const std::optional<at::Tensor>& b2) {
  check_mlp_input(op, "x", x, "(M, K)");
  check_mlp_weight(op, "w1", w1, "F", "K", x.size(1), x);
  check_mlp_bias(op, "b1", b1, w1.size(0), x);
  check_mlp_weight(op, "w2", w2, "N", "F", w1.size(0), x);
  check_mlp_bias(op, "b2", b2, w2.size(0), x);
}

// Every argument of mlp_block_forward; returns the activation.
inline Activation check_mlp_block_forward(const char* op, const at::Tensor& x, const at::Tensor& w1,
                                          const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                                          const std::optional<at::Tensor>& b2, const std::string& activation_name,
                                          double dropout_p, const at::Tensor& seed) {
  check_mlp_block_operands(op, x, w1, b1, w2, b2);
  const Activation activation = checked_activation(op, activation_name);
  check_dropout_args(op, dropout_p, seed);
  return activation;
}

// Every argument of mlp_block_backward: the forward's, plus grad_out (M, N), preact (M, F) (read only with an
// activation) and hidden (M, F), which the down projection's backward reads as its input; returns the activation.
inline Activation check_mlp_block_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                                           const at::Tensor& w1, const at::Tensor& preact, const at::Tensor& hidden,
                                           const at::Tensor& w2, const std::string& activation_name,
                                           double dropout_p, const at::Tensor& seed) {
  const Activation activation = check_mlp_block_forward(op, x, w1, std::nullopt, w2, std::nullopt,
                                                        activation_name, dropout_p, seed);
  const int64_t M = x.size(0), F = w1.size(0), N = w2.size(0);
  check_backward_tensor(op, "grad_out", grad_out, x, M, N);
  if (activation != Activation::kNone) check_backward_tensor(op, "preact", preact, x, M, F);
  check_mlp_input(op, "hidden", hidden, "(M, F)");
  check_backward_tensor(op, "hidden", hidden, x, M, F);
  return activation;
}

}  // namespace tfm_kernels
