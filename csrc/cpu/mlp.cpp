// CPU kernels of the MLP operators (schemas and layout contract: csrc/ops.cpp). The GEMMs run through
// at::matmul in the accumulation type (float for float16/bfloat16 inputs); bias, activation and dropout -- and
// in backward the dropout mask and activation derivative -- are one fused elementwise pass over the
// (tokens, features) tile, parallel over rows (at::parallel_for). Test: tests/test_mlp.py, backend "cpu".
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <string>
#include <tuple>

#include "common/mlp_checks.h"
#include "common/mlp_epilogue.h"

namespace tfm_kernels {
namespace {

using at::Tensor;

constexpr int64_t kRowsPerTask = 16;  // rows of one parallel task: >= 16 * N elements amortise the fork

MlpDropout dropout_of(double dropout_p, const Tensor& seed) {
  return make_mlp_dropout(dropout_p, dropout_p > 0.0 ? seed.item<int64_t>() : 0);
}

// x @ weight^T (+ bias) in the accumulation type `acc`, (M, N) contiguous.
Tensor linear_acc(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, at::ScalarType acc) {
  Tensor z = at::matmul(x.to(acc), weight.to(acc).t());
  if (bias.has_value()) z.add_(bias->to(acc));
  return z.contiguous();
}

// z = x @ weight^T + bias (stored to preact unless the activation is none), out = dropout(act(z)).
std::tuple<Tensor, Tensor> linear_forward(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                          std::string activation_name, double dropout_p, const Tensor& seed) {
  const int64_t N = weight.size(0);
  check_mlp_operands(x, weight, bias, N);
  const Activation activation = checked_activation(activation_name);
  const int64_t M = x.size(0);
  const MlpDropout dropout = dropout_of(dropout_p, seed);
  const bool store_preact = activation != Activation::kNone;
  Tensor out = at::empty({M, N}, x.options());
  Tensor preact = store_preact ? at::empty({M, N}, x.options()) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mlp_linear_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tensor z = linear_acc(x, weight, bias, c10::CppTypeToScalarType<acc_t>::value);
    const acc_t* z_ptr = z.data_ptr<acc_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    scalar_t* preact_ptr = store_preact ? preact.data_ptr<scalar_t>() : nullptr;
    dispatch_activation(activation, [&](auto act) {
      constexpr Activation A = decltype(act)::value;
      at::parallel_for(0, M, kRowsPerTask, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          for (int64_t j = 0; j < N; ++j) {
            const acc_t zij = z_ptr[i * N + j];
            if (preact_ptr) preact_ptr[i * N + j] = static_cast<scalar_t>(zij);
            const float h = activate<A>(static_cast<float>(zij));
            out_ptr[i * N + j] = static_cast<scalar_t>(h * dropout.multiplier(i, j));
          }
        }
      });
    });
  });
  return {out, preact};
}

// grad_x = dz @ weight, grad_weight = dz^T @ x, grad_bias = sum over rows of dz; dz (M, N) in the accumulation
// type, results in x's dtype.
std::tuple<Tensor, Tensor, Tensor> gemm_grads(const Tensor& dz, const Tensor& x, const Tensor& weight) {
  const Tensor grad_x = at::matmul(dz, weight.to(dz.scalar_type()));
  const Tensor grad_weight = at::matmul(dz.t(), x.to(dz.scalar_type()));
  const Tensor grad_bias = dz.sum(0);
  return {grad_x.to(x.scalar_type()), grad_weight.to(x.scalar_type()), grad_bias.to(x.scalar_type())};
}

// dz = grad_out * dropout multiplier * act'(preact), then the three gradient reductions.
std::tuple<Tensor, Tensor, Tensor> linear_backward(const Tensor& grad_out, const Tensor& x, const Tensor& weight,
                                                   const Tensor& preact, std::string activation_name,
                                                   double dropout_p, const Tensor& seed) {
  const int64_t N = weight.size(0);
  check_mlp_operands(x, weight, std::nullopt, N);
  const Activation activation = checked_activation(activation_name);
  const int64_t M = x.size(0);
  check_grad_out(grad_out, M, N);
  const MlpDropout dropout = dropout_of(dropout_p, seed);
  const Tensor dy = grad_out.contiguous();
  const Tensor z = activation != Activation::kNone ? preact.contiguous() : Tensor();
  Tensor dz;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mlp_linear_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dz = at::empty({M, N}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const scalar_t* dy_ptr = dy.data_ptr<scalar_t>();
    const scalar_t* z_ptr = z.defined() ? z.data_ptr<scalar_t>() : nullptr;
    acc_t* dz_ptr = dz.data_ptr<acc_t>();
    dispatch_activation(activation, [&](auto act) {
      constexpr Activation A = decltype(act)::value;
      at::parallel_for(0, M, kRowsPerTask, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          for (int64_t j = 0; j < N; ++j) {
            const float slope = z_ptr ? activation_grad<A>(static_cast<float>(z_ptr[i * N + j])) : 1.0f;
            dz_ptr[i * N + j] = static_cast<acc_t>(dy_ptr[i * N + j]) * (dropout.multiplier(i, j) * slope);
          }
        }
      });
    });
  });
  return gemm_grads(dz, x, weight);
}

// [g, u] = x @ weight^T + bias (stored to gate_up), out = dropout(act(g) * u).
std::tuple<Tensor, Tensor> gated_forward(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                         std::string activation_name, double dropout_p, const Tensor& seed) {
  const int64_t N2 = weight.size(0);
  check_mlp_operands(x, weight, bias, N2);
  TORCH_CHECK(N2 % 2 == 0, "weight must have an even number of rows (2F: gate then up); got ", weight.sizes());
  const Activation activation = checked_activation(activation_name);
  const int64_t M = x.size(0), F = N2 / 2;
  const MlpDropout dropout = dropout_of(dropout_p, seed);
  Tensor out = at::empty({M, F}, x.options());
  Tensor gate_up = at::empty({M, N2}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mlp_gated_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tensor z = linear_acc(x, weight, bias, c10::CppTypeToScalarType<acc_t>::value);
    const acc_t* z_ptr = z.data_ptr<acc_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    scalar_t* gate_up_ptr = gate_up.data_ptr<scalar_t>();
    dispatch_activation(activation, [&](auto act) {
      constexpr Activation A = decltype(act)::value;
      at::parallel_for(0, M, kRowsPerTask, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          for (int64_t j = 0; j < F; ++j) {
            const acc_t g = z_ptr[i * N2 + j], u = z_ptr[i * N2 + F + j];
            gate_up_ptr[i * N2 + j] = static_cast<scalar_t>(g);
            gate_up_ptr[i * N2 + F + j] = static_cast<scalar_t>(u);
            const float h = activate<A>(static_cast<float>(g)) * static_cast<float>(u);
            out_ptr[i * F + j] = static_cast<scalar_t>(h * dropout.multiplier(i, j));
          }
        }
      });
    });
  });
  return {out, gate_up};
}

// dh = grad_out * dropout multiplier; dg = dh * u * act'(g), du = dh * act(g); then the gradient reductions.
std::tuple<Tensor, Tensor, Tensor> gated_backward(const Tensor& grad_out, const Tensor& x, const Tensor& weight,
                                                  const Tensor& gate_up, std::string activation_name,
                                                  double dropout_p, const Tensor& seed) {
  const int64_t N2 = weight.size(0);
  check_mlp_operands(x, weight, std::nullopt, N2);
  const Activation activation = checked_activation(activation_name);
  const int64_t M = x.size(0), F = N2 / 2;
  check_grad_out(grad_out, M, F);
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(0) == M && gate_up.size(1) == N2, "gate_up must be (", M, ", ",
              N2, "); got ", gate_up.sizes());
  const MlpDropout dropout = dropout_of(dropout_p, seed);
  const Tensor dy = grad_out.contiguous();
  const Tensor gu = gate_up.contiguous();
  Tensor dgu;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mlp_gated_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dgu = at::empty({M, N2}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const scalar_t* dy_ptr = dy.data_ptr<scalar_t>();
    const scalar_t* gu_ptr = gu.data_ptr<scalar_t>();
    acc_t* dgu_ptr = dgu.data_ptr<acc_t>();
    dispatch_activation(activation, [&](auto act) {
      constexpr Activation A = decltype(act)::value;
      at::parallel_for(0, M, kRowsPerTask, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          for (int64_t j = 0; j < F; ++j) {
            const float g = static_cast<float>(gu_ptr[i * N2 + j]);
            const float u = static_cast<float>(gu_ptr[i * N2 + F + j]);
            const float dh = static_cast<float>(dy_ptr[i * F + j]) * dropout.multiplier(i, j);
            dgu_ptr[i * N2 + j] = static_cast<acc_t>(dh * u * activation_grad<A>(g));
            dgu_ptr[i * N2 + F + j] = static_cast<acc_t>(dh * activate<A>(g));
          }
        }
      });
    });
  });
  return gemm_grads(dgu, x, weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(tfm_kernels, CPU, m) {
  m.impl("mlp_linear_forward", &linear_forward);
  m.impl("mlp_linear_backward", &linear_backward);
  m.impl("mlp_gated_forward", &gated_forward);
  m.impl("mlp_gated_backward", &gated_backward);
}

}  // namespace tfm_kernels
