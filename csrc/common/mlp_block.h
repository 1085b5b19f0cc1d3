// The device-generic MLP block backward (defined in csrc/cpu/mlp_block.cpp, registered for every device): also
// the CUDA kernel's path where no fused cuBLASLt epilogue applies.
#pragma once
#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>

namespace tfm_kernels {

using MlpBlockGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Which gradients of one linear a backward operator computes (the needs_* flags of its schema); the others come
// back as empty (0,) tensors.
struct GradMask {
  bool x, weight, bias;
};

// grad_x, grad_w1, grad_b1, grad_w2, grad_b2, where `up` (x, w1, b1) and `down` (w2, b2; its x is the hidden
// gradient, needed when any of up's is) need them, through the fused linear backward operators (dispatched by
// device).
MlpBlockGrads block_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1,
                             const at::Tensor& preact, const at::Tensor& hidden, const at::Tensor& w2,
                             std::string activation, double dropout_p, const at::Tensor& seed, const GradMask& up,
                             bool needs_w2, bool needs_b2);

// tfm_kernels::mlp_linear_backward through the dispatcher.
std::tuple<at::Tensor, at::Tensor, at::Tensor> call_linear_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                    const at::Tensor& weight, const at::Tensor& preact,
                                                                    const std::string& activation, double dropout_p,
                                                                    const at::Tensor& seed, const GradMask& needs);

}  // namespace tfm_kernels
