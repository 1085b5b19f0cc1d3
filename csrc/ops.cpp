// Every operator schema of tfm_kernels, in one place, and the pybind11 module `_C` for what is not an
// operator (build information). Kernels register per device elsewhere with TORCH_LIBRARY_IMPL:
// CPU in csrc/cpu/, CUDA in csrc/cuda/*/api.cpp. Fake kernels and autograd live in tfm_kernels/ops.py.
#include <torch/library.h>
#include <torch/extension.h>

#ifdef TFM_KERNELS_WITH_CUDA
#include <cuda_runtime_api.h>

#include <string>

#include "cuda/attention/instantiations/head_dims.h"
#include "cuda/attention/kernel_traits.h"
#endif

TORCH_LIBRARY(tfm_kernels, m) {
  // Attention. Layout contract (shared with the Triton operators in tfm_kernels/ops.py):
  //   q (B, Hq, L, D), k (B, Hk, S, D), v (B, Hk, S, Dv), Hq % Hk == 0, any strides with stride(-1) == 1.
  //   mask: None, or (B, Hq, L, S) with any strides (zero strides for broadcast dims), bool (True = the key
  //         takes part) or floating (added to the scaled scores).
  //   key_lengths: None, or int32/int64 (B,): keys j >= key_lengths[b] take no part.
  //   is_causal: key j takes part in query row i only if j <= i (top-left aligned, as torch).
  //   seed: int64 tensor of shape () on q's device, read only when dropout_p > 0 (see tfm_kernels/rng.py).
  // Returns out (B, Hq, L, Dv) in q's dtype, stored as (B, L, Hq, Dv), and lse (B, Hq, L) float32, the
  // base-2 log of the sum of exp of the scaled, masked scores (log2(sum_j exp(s_j)), the kernels' units, so the
  // backward recomputes each weight as exp2(s_j * log2(e) - lse) with no conversion of lse to round); lse =
  // +inf for a row where no key takes part
  // (its output and gradients are 0). Gradients come back in the layout of out: (B, L, H, D) memory.
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? key_lengths, float dropout_p, "
        "bool is_causal, float scale, Tensor seed) -> (Tensor, Tensor)");
  m.def("attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, "
        "Tensor? key_lengths, float dropout_p, bool is_causal, float scale, Tensor seed) -> (Tensor, Tensor, Tensor)");

  // MLP. Layout contract (shared with the Triton operators triton_mlp_* in tfm_kernels/ops.py):
  //   x (M, K): M tokens, stride(-1) == 1, any row stride; weight (N, K) in nn.Linear layout, stride(-1) == 1;
  //   bias (N,) contiguous or None; all one dtype (float16, bfloat16, float32).
  //   activation: "none", "gelu" (erf), "gelu_tanh", "relu" or "silu".
  //   dropout after the activation, element (token i, feature j) drawn as tfm_kernels/rng.py with z = 0;
  //   seed: int64 tensor of shape () on x's device, read only when dropout_p > 0.
  // mlp_linear_forward: out = dropout(act(x @ weight^T + bias)) (M, N) contiguous, and preact = x @ weight^T +
  //   bias (M, N) contiguous for backward, or an empty (0,) tensor when activation == "none".
  // mlp_linear_backward: (grad_x (M, K), grad_weight (N, K), grad_bias (N,)), contiguous, in x's dtype;
  //   grad_bias is the column sum of dz = grad_out * dropout * act'(preact), returned with or without a bias.
  // mlp_gated_forward: weight (2F, K) = [gate; up], bias (2F,) or None; out = dropout(act(g) * u) (M, F), and
  //   gate_up = [g, u] = x @ weight^T + bias (M, 2F) for backward.
  // mlp_gated_backward: (grad_x (M, K), grad_weight (2F, K), grad_bias (2F,)).
  // The backward operators take a flag per gradient (needs_x, needs_weight, ...; all true by default, as autograd's
  // needs_input_grad): a gradient not needed is neither computed nor stored, and comes back as an empty (0,)
  // tensor (frozen weights skip their GEMM).
  m.def("mlp_linear_forward(Tensor x, Tensor weight, Tensor? bias, str activation, float dropout_p, Tensor seed) "
        "-> (Tensor, Tensor)");
  m.def("mlp_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor preact, str activation, "
        "float dropout_p, Tensor seed, bool needs_x=True, bool needs_weight=True, bool needs_bias=True) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("mlp_gated_forward(Tensor x, Tensor weight, Tensor? bias, str activation, float dropout_p, Tensor seed) "
        "-> (Tensor, Tensor)");
  m.def("mlp_gated_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor gate_up, str activation, "
        "float dropout_p, Tensor seed, bool needs_x=True, bool needs_weight=True, bool needs_bias=True) "
        "-> (Tensor, Tensor, Tensor)");
  // mlp_block_forward: the feed-forward block out = dropout(act(x @ w1^T + b1)) @ w2^T + b2, w1 (F, K),
  //   w2 (N, F); returns out (M, N), preact (M, F) (empty (0,) for activation "none") and hidden (M, F), the
  //   dropout output that w2 multiplies. One autograd boundary for both projections, so that the backward can
  //   fuse act' into the GEMM that produces the hidden gradient (cuBLASLt DGELU_BGRAD for gelu_tanh).
  // mlp_block_backward: (grad_x, grad_w1, grad_b1 (F,), grad_w2, grad_b2 (N,)).
  m.def("mlp_block_forward(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str activation, "
        "float dropout_p, Tensor seed) -> (Tensor, Tensor, Tensor)");
  m.def("mlp_block_backward(Tensor grad_out, Tensor x, Tensor w1, Tensor preact, Tensor hidden, Tensor w2, "
        "str activation, float dropout_p, Tensor seed, bool needs_x=True, bool needs_w1=True, bool needs_b1=True, "
        "bool needs_w2=True, bool needs_b2=True) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

namespace {

#ifdef TFM_KERNELS_WITH_CUDA
// "D:bytes,..." for each compiled head dim: the shared memory per block its CUDA attention kernels need.
std::string attention_shared_memory_bytes() {
  std::string text;
#define TFM_APPEND_SHARED_MEMORY(D) \
  text += (text.empty() ? "" : ",") + std::to_string(D) + ":" + \
          std::to_string(tfm_kernels::attention::max_shared_memory_bytes<D>());
  TFM_ATTENTION_FOR_EACH_HEAD_DIM(TFM_APPEND_SHARED_MEMORY)
#undef TFM_APPEND_SHARED_MEMORY
  return text;
}
#endif

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = TFM_KERNELS_VERSION;
  info["torch_version"] = TORCH_VERSION;
#ifdef TFM_KERNELS_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = TFM_KERNELS_CUDA_ARCHS;
  info["head_dims"] = TFM_KERNELS_HEAD_DIMS;
  info["attention_shared_memory_bytes"] = attention_shared_memory_bytes();
  info["cuda_runtime_version"] = CUDART_VERSION;
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
  info["head_dims"] = "";
  info["attention_shared_memory_bytes"] = "";
  info["cuda_runtime_version"] = 0;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, module) {
  module.doc() = "tfm_kernels compiled operators; the operators themselves live under torch.ops.tfm_kernels";
  module.def("build_info", &build_info,
             "How this extension was built: version, CUDA archs, head dims and their shared memory");
}
