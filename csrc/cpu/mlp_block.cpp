// The MLP block operators (csrc/ops.cpp) as compositions of the fused linear operators, registered for every
// device (CompositeExplicitAutograd): the two linears of the forward, and the backward of the down projection
// then of the up projection. CUDA overrides mlp_block_backward (csrc/cuda/mlp/api.cpp) where cuBLASLt fuses
// the activation gradient into the hidden-gradient GEMM. Both check every argument by its own name first
// (mlp_checks.h): an inner linear operator would report w2 as "weight" and hidden as "x".
// Test: tests/test_mlp.py (test_mlp_block, opcheck, check_backward_operator_errors).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "common/mlp_block.h"
#include "common/mlp_checks.h"

namespace tfm_kernels {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor> call_linear_forward(const Tensor& x, const Tensor& weight,
                                               const std::optional<Tensor>& bias, const std::string& activation,
                                               double dropout_p, const Tensor& seed) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("tfm_kernels::mlp_linear_forward", "")
                             .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&,
                                                               const std::optional<Tensor>&, std::string, double,
                                                               const Tensor&)>();
  return op.call(x, weight, bias, activation, dropout_p, seed);
}

std::tuple<Tensor, Tensor, Tensor> block_forward(const Tensor& x, const Tensor& w1, const std::optional<Tensor>& b1,
                                                 const Tensor& w2, const std::optional<Tensor>& b2,
                                                 std::string activation, double dropout_p, const Tensor& seed) {
  check_mlp_block_forward("mlp_block_forward", x, w1, b1, w2, b2, activation, dropout_p, seed);
  auto [hidden, preact] = call_linear_forward(x, w1, b1, activation, dropout_p, seed);
  auto [out, unused] = call_linear_forward(hidden, w2, b2, "none", 0.0, seed);
  return {out, preact, hidden};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> call_linear_backward(const Tensor& grad_out, const Tensor& x,
                                                        const Tensor& weight, const Tensor& preact,
                                                        const std::string& activation, double dropout_p,
                                                        const Tensor& seed, const GradMask& needs) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("tfm_kernels::mlp_linear_backward", "")
                             .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                       const Tensor&, std::string, double,
                                                                       const Tensor&, bool, bool, bool)>();
  return op.call(grad_out, x, weight, preact, activation, dropout_p, seed, needs.x, needs.weight, needs.bias);
}

// Runs no block-level check: its callers (checked_block_backward below, CUDA's block_backward_cuda) have run
// check_mlp_block_backward already.
MlpBlockGrads block_backward(const Tensor& grad_out, const Tensor& x, const Tensor& w1, const Tensor& preact,
                             const Tensor& hidden, const Tensor& w2, std::string activation, double dropout_p,
                             const Tensor& seed, const GradMask& up, bool needs_w2, bool needs_b2) {
  const bool needs_hidden = up.x || up.weight || up.bias;
  auto [grad_hidden, grad_w2, grad_b2] = call_linear_backward(grad_out, hidden, w2, at::empty({0}, x.options()),
                                                              "none", 0.0, seed, {needs_hidden, needs_w2, needs_b2});
  if (!needs_hidden) {
    const auto none = [&] { return at::empty({0}, x.options()); };  // a tensor each: outputs never alias
    return {none(), none(), none(), grad_w2, grad_b2};
  }
  auto [grad_x, grad_w1, grad_b1] = call_linear_backward(grad_hidden, x, w1, preact, activation, dropout_p, seed, up);
  return {grad_x, grad_w1, grad_b1, grad_w2, grad_b2};
}

namespace {

MlpBlockGrads checked_block_backward(const Tensor& grad_out, const Tensor& x, const Tensor& w1, const Tensor& preact,
                                     const Tensor& hidden, const Tensor& w2, std::string activation,
                                     double dropout_p, const Tensor& seed, bool needs_x, bool needs_w1,
                                     bool needs_b1, bool needs_w2, bool needs_b2) {
  check_mlp_block_backward("mlp_block_backward", grad_out, x, w1, preact, hidden, w2, activation, dropout_p, seed);
  return block_backward(grad_out, x, w1, preact, hidden, w2, activation, dropout_p, seed,
                        {needs_x, needs_w1, needs_b1}, needs_w2, needs_b2);
}

}  // namespace

TORCH_LIBRARY_IMPL(tfm_kernels, CompositeExplicitAutograd, m) {
  m.impl("mlp_block_forward", &block_forward);
  m.impl("mlp_block_backward", &checked_block_backward);
}

}  // namespace tfm_kernels
