// The device-generic MLP block backward (defined in csrc/cpu/mlp_block.cpp, registered for every device): also
// the CUDA kernel's path where no fused cuBLASLt epilogue applies.
#pragma once
#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>

namespace tfm_kernels {

using MlpBlockGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// grad_x, grad_w1, grad_b1, grad_w2, grad_b2 through the fused linear backward operators (dispatched by device).
MlpBlockGrads block_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1,
                             const at::Tensor& preact, const at::Tensor& hidden, const at::Tensor& w2,
                             std::string activation, double dropout_p, const at::Tensor& seed);

// tfm_kernels::mlp_linear_backward through the dispatcher.
std::tuple<at::Tensor, at::Tensor, at::Tensor> call_linear_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                    const at::Tensor& weight, const at::Tensor& preact,
                                                                    const std::string& activation, double dropout_p,
                                                                    const at::Tensor& seed);

}  // namespace tfm_kernels
