// CPU kernels of the MLP operators (schemas and layout contract: csrc/ops.cpp). Everything runs in float
// (the inputs are float16, bfloat16 or float32): the GEMMs through at::addmm / at::mm, the activation
// and its derivative through ATen's vectorised CPU kernels (at::gelu, at::silu_backward, ...), the same
// functions csrc/common/mlp_epilogue.h computes on the GPU; dropout is the shared Philox rule (z = 0, row =
// token, column = feature), applied in place by vectorised row loops (row_loops.h) parallel over rows
// (at::parallel_for). Test: tests/test_mlp.py, backend "cpu".
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "common/mlp_block.h"
#include "common/mlp_checks.h"
#include "common/mlp_epilogue.h"
#include "cpu/row_loops.h"

namespace tfm_kernels {
namespace {

using at::Tensor;

constexpr int64_t kRowsPerTask = 16;  // rows of one parallel task: >= 16 * N elements amortise the fork

// After check_dropout_args: the seed, one int64 element, is read only when dropout runs.
MlpDropout dropout_of(double dropout_p, const Tensor& seed) {
  return make_mlp_dropout(dropout_p, dropout_p > 0.0 ? seed.item<int64_t>() : 0);
}

// x @ weight^T (+ bias) in float, (M, N) contiguous.
Tensor linear_float(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  const Tensor x_f = x.to(at::kFloat), w_t = weight.to(at::kFloat).t();
  return bias.has_value() ? at::addmm(bias->to(at::kFloat), x_f, w_t) : at::mm(x_f, w_t);
}

// h (rows, cols) float contiguous: h[i, j] *= dropout multiplier of (token i, feature j), in place.
void apply_dropout_(Tensor& h, const MlpDropout& dropout) {
  if (!dropout.active) return;
  const int64_t rows = h.size(0), cols = h.size(1);
  float* h_ptr = h.data_ptr<float>();
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    std::vector<float> keep(cols);
    for (int64_t i = begin; i < end; ++i) {
      cpu::dropout_row(keep.data(), cols, dropout.seed, 0, static_cast<uint32_t>(i), 0, dropout.threshold,
                       dropout.keep_scale);
      cpu::multiply_row(h_ptr + i * cols, keep.data(), cols);
    }
  });
}

// act(z) for a float tensor z (z itself for no activation).
Tensor activate(const Tensor& z, Activation activation) {
  switch (activation) {
    case Activation::kGelu: return at::gelu(z, "none");
    case Activation::kGeluTanh: return at::gelu(z, "tanh");
    case Activation::kRelu: return at::relu(z);
    case Activation::kSilu: return at::silu(z);
    default: return z;
  }
}

// grad * act'(z) for float tensors grad and z of one shape. torch's tanh-GELU derivative overflows z * z into
// 0 * inf = NaN from |z| = 1.85e19 on, where the float64 reference has 1 or 0: z goes in clamped to +-1e10,
// where the float32 derivative is already exactly 1 or 0, and an infinite z stays NaN (z - z), as the reference.
Tensor activation_backward(const Tensor& grad, const Tensor& z, Activation activation) {
  constexpr double kGeluTanhFlat = 1e10;
  switch (activation) {
    case Activation::kGelu: return at::gelu_backward(grad, z, "none");
    case Activation::kGeluTanh:
      return at::gelu_backward(grad, z.clamp(-kGeluTanhFlat, kGeluTanhFlat) + (z - z), "tanh");
    case Activation::kRelu: return at::threshold_backward(grad, z, 0);
    case Activation::kSilu: return at::silu_backward(grad, z);
    default: return grad;
  }
}

// Float dropout(grad_out) (M, cols) contiguous, the gradient reaching the activation's output.
Tensor dropout_grad(const Tensor& grad_out, const MlpDropout& dropout) {
  Tensor dh = grad_out.to(at::kFloat).contiguous();
  if (!dropout.active) return dh;
  if (dh.is_same(grad_out)) dh = dh.clone();  // never scale the caller's tensor
  apply_dropout_(dh, dropout);
  return dh;
}

// grad_x = dz @ weight, grad_weight = dz^T @ x, grad_bias = sum over rows of dz, each where needed (else an empty
// (0,) tensor); dz (M, N) float, results in x's dtype.
std::tuple<Tensor, Tensor, Tensor> gemm_grads(const Tensor& dz, const Tensor& x, const Tensor& weight,
                                              const GradMask& needs) {
  const auto none = [&] { return at::empty({0}, x.options()); };  // a tensor each: outputs never alias
  return {needs.x ? at::mm(dz, weight.to(at::kFloat)).to(x.scalar_type()) : none(),
          needs.weight ? at::mm(dz.t(), x.to(at::kFloat)).to(x.scalar_type()) : none(),
          needs.bias ? dz.sum(0).to(x.scalar_type()) : none()};
}

// z = x @ weight^T + bias (stored to preact unless the activation is none), out = dropout(act(z)).
std::tuple<Tensor, Tensor> linear_forward(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                          std::string activation_name, double dropout_p, const Tensor& seed) {
  const char* op = "mlp_linear_forward";
  check_mlp_operands(op, x, weight, bias);
  const Activation activation = checked_activation(op, activation_name);
  check_dropout_args(op, dropout_p, seed);
  const Tensor z = linear_float(x, weight, bias);
  Tensor h = activate(z, activation);
  apply_dropout_(h, dropout_of(dropout_p, seed));
  Tensor preact = activation != Activation::kNone ? z.to(x.scalar_type()) : at::empty({0}, x.options());
  return {h.to(x.scalar_type()), preact};
}

// dz = grad_out * dropout multiplier * act'(preact), then the three gradient reductions.
std::tuple<Tensor, Tensor, Tensor> linear_backward(const Tensor& grad_out, const Tensor& x, const Tensor& weight,
                                                   const Tensor& preact, std::string activation_name,
                                                   double dropout_p, const Tensor& seed, bool needs_x,
                                                   bool needs_weight, bool needs_bias) {
  const char* op = "mlp_linear_backward";
  check_mlp_operands(op, x, weight, std::nullopt);
  const Activation activation = checked_activation(op, activation_name);
  check_dropout_args(op, dropout_p, seed);
  check_backward_tensor(op, "grad_out", grad_out, x, x.size(0), weight.size(0));
  if (activation != Activation::kNone) check_backward_tensor(op, "preact", preact, x, x.size(0), weight.size(0));
  const Tensor dh = dropout_grad(grad_out, dropout_of(dropout_p, seed));
  const Tensor dz = activation != Activation::kNone ? activation_backward(dh, preact.to(at::kFloat), activation) : dh;
  return gemm_grads(dz, x, weight, {needs_x, needs_weight, needs_bias});
}

// [g, u] = x @ weight^T + bias (stored to gate_up), out = dropout(act(g) * u).
std::tuple<Tensor, Tensor> gated_forward(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                         std::string activation_name, double dropout_p, const Tensor& seed) {
  const char* op = "mlp_gated_forward";
  check_mlp_operands(op, x, weight, bias);
  check_gated_weight(op, weight);
  const Activation activation = checked_activation(op, activation_name);
  check_dropout_args(op, dropout_p, seed);
  const int64_t F = weight.size(0) / 2;
  const Tensor z = linear_float(x, weight, bias);
  Tensor h = at::mul(activate(z.narrow(1, 0, F), activation), z.narrow(1, F, F));
  apply_dropout_(h, dropout_of(dropout_p, seed));
  return {h.to(x.scalar_type()), z.to(x.scalar_type())};
}

// dh = grad_out * dropout multiplier; dg = dh * u * act'(g), du = dh * act(g); then the gradient reductions.
std::tuple<Tensor, Tensor, Tensor> gated_backward(const Tensor& grad_out, const Tensor& x, const Tensor& weight,
                                                  const Tensor& gate_up, std::string activation_name,
                                                  double dropout_p, const Tensor& seed, bool needs_x,
                                                  bool needs_weight, bool needs_bias) {
  const char* op = "mlp_gated_backward";
  check_mlp_operands(op, x, weight, std::nullopt);
  const Activation activation = checked_activation(op, activation_name);
  check_dropout_args(op, dropout_p, seed);
  check_gated_weight(op, weight);
  const int64_t N2 = weight.size(0), M = x.size(0), F = N2 / 2;
  check_backward_tensor(op, "grad_out", grad_out, x, M, F);
  check_backward_tensor(op, "gate_up", gate_up, x, M, N2);
  const Tensor dh = dropout_grad(grad_out, dropout_of(dropout_p, seed));
  const Tensor gu = gate_up.to(at::kFloat);
  const Tensor g = gu.narrow(1, 0, F), u = gu.narrow(1, F, F);
  Tensor dgu = at::empty({M, N2}, dh.options());
  dgu.narrow(1, 0, F).copy_(activation_backward(dh * u, g, activation));
  Tensor du = dgu.narrow(1, F, F);
  at::mul_out(du, dh, activate(g, activation));
  return gemm_grads(dgu, x, weight, {needs_x, needs_weight, needs_bias});
}

}  // namespace

TORCH_LIBRARY_IMPL(tfm_kernels, CPU, m) {
  m.impl("mlp_linear_forward", &linear_forward);
  m.impl("mlp_linear_backward", &linear_backward);
  m.impl("mlp_gated_forward", &gated_forward);
  m.impl("mlp_gated_backward", &gated_backward);
}

}  // namespace tfm_kernels
