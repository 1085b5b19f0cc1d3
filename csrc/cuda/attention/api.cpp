// CUDA implementations of tfm_kernels::attention_forward / attention_backward (schemas and layout contract in
// csrc/ops.cpp): argument checks with errors naming the argument, output allocation in the contract's layout
// ((B, L, H, D) memory seen as (B, H, L, D): common/attention_layout.h), the plain-data params of params.h, and
// dispatch over the compiled head dims and element types to the launchers of launch.h. The only file of the CUDA
// attention kernels that includes ATen. Kernels run on the current stream under a device guard; the dropout seed
// stays on the device (no host synchronisation), so the ops can be captured in CUDA graphs.
//
// Test: python -m pytest tests/test_attention_cuda.py (bad-input errors and everything else need a GPU).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "common/attention_checks.h"
#include "common/attention_layout.h"
#include "common/philox.h"
#include "cuda/attention/instantiations/head_dims.h"
#include "cuda/attention/launch.h"
#include "cuda/attention/params.h"
#include "cuda/common/static_switch.h"

namespace tfm_kernels::attention {
namespace {

constexpr double kLog2e = 1.4426950408889634;
constexpr int64_t kMaxGridYZ = 65535;         // heads go to gridDim.y, batch to gridDim.z
// 16-byte cp.async and vector loads: data pointers and batch/head/row strides must be multiples of 16 bytes.
constexpr int64_t kAlignmentBytes = 16;

std::string compiled_head_dims() {
  std::string dims;
#define TFM_APPEND_HEAD_DIM(D) dims += (dims.empty() ? "" : ", ") + std::to_string(D);
  TFM_ATTENTION_FOR_EACH_HEAD_DIM(TFM_APPEND_HEAD_DIM)
#undef TFM_APPEND_HEAD_DIM
  return dims;
}

bool is_compiled_head_dim(int64_t head_dim) {
#define TFM_MATCH_HEAD_DIM(D) \
  if (head_dim == D) return true;
  TFM_ATTENTION_FOR_EACH_HEAD_DIM(TFM_MATCH_HEAD_DIM)
#undef TFM_MATCH_HEAD_DIM
  return false;
}

void check_on_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor; got device ", t.device());
}

// What the CUDA kernels need of a 4-D q, k, v, grad_out or out beyond check_attention_args: a CUDA tensor with a
// contiguous last dimension (16-byte row loads).
void check_cuda_rows(const char* op, const char* name, const at::Tensor& t) {
  check_on_cuda(op, name, t);
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, op, ": ", name,
              " must have a contiguous last dimension (stride 1); got strides ", t.strides());
}

// A view the kernels can read with 16-byte copies, copying only when the pointer or a stride is misaligned.
// The copy is a fresh allocation: contiguous() would hand back a contiguous tensor whose data pointer is
// misaligned (a view at an odd storage offset) unchanged.
at::Tensor aligned(const at::Tensor& t) {
  const int64_t element = static_cast<int64_t>(t.element_size());
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % kAlignmentBytes == 0;
  for (int dim = 0; dim < 3; ++dim) ok = ok && (t.size(dim) <= 1 || (t.stride(dim) * element) % kAlignmentBytes == 0);
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

Strides strides_of(const at::Tensor& t) { return Strides{t.stride(0), t.stride(1), t.stride(2)}; }

ElementType element_type(const at::Tensor& q) {
  return q.scalar_type() == at::kHalf ? ElementType::kFloat16 : ElementType::kBFloat16;
}

// Checks q, k, v and the options for operator `op` (check_attention_args, then the CUDA kernels' own limits),
// and fills every field of `params` but the output pointers. Returns the sizes, the aligned (possibly copied) q,
// k, v and the int32 key lengths, which must outlive the launch.
std::tuple<AttentionSizes, at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> prepare(
    const char* op, ForwardParams& params, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& key_lengths, double dropout_p,
    bool is_causal, double scale, const at::Tensor& seed) {
  const AttentionSizes sizes = check_attention_args(op, q_in, k_in, v_in, mask, key_lengths, dropout_p, seed);
  const int64_t B = sizes.batch, Hq = sizes.q_heads, L = sizes.q_len, S = sizes.kv_len, D = sizes.head_dim;
  TORCH_CHECK(q_in.scalar_type() == at::kHalf || q_in.scalar_type() == at::kBFloat16, op,
              ": q must be float16 or bfloat16 for the CUDA kernels; got ", q_in.scalar_type());
  check_cuda_rows(op, "q", q_in);
  check_cuda_rows(op, "k", k_in);
  check_cuda_rows(op, "v", v_in);
  TORCH_CHECK(sizes.value_dim == D, op, ": the CUDA kernels need v's head dim equal to q's ", D, "; got ",
              sizes.value_dim);
  TORCH_CHECK(is_compiled_head_dim(D), op, ": q's head dim must be one of the compiled head dims (",
              compiled_head_dims(), "; set TFM_KERNELS_HEAD_DIMS when building); got ", D);
  TORCH_CHECK(!mask.has_value(), op, ": mask is not supported by the CUDA kernels (use key_lengths, is_causal, "
              "or the triton/cpu backends); got a mask of shape ",
              mask.has_value() ? mask->sizes() : at::IntArrayRef{});
  TORCH_CHECK(B <= kMaxGridYZ && Hq <= kMaxGridYZ, op, ": batch and heads must be <= ", kMaxGridYZ,
              " (grid limits); got batch ", B, ", heads ", Hq);
  TORCH_CHECK(L <= std::numeric_limits<int>::max() / 2 && S <= std::numeric_limits<int>::max() / 2, op,
              ": sequence lengths must be < 2^30; got L ", L, ", S ", S);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite; got ", scale);
  if (dropout_p > 0.0) {
    TORCH_CHECK(seed.device() == q_in.device(), op, ": seed must be on q's device ", q_in.device(), "; got ",
                seed.device());
  }

  std::optional<at::Tensor> lengths;
  if (key_lengths.has_value()) {
    lengths = key_lengths->clamp(0, S).to(at::kInt).contiguous();  // stays on the device: no synchronisation
  }

  at::Tensor q = aligned(q_in), k = aligned(k_in), v = aligned(v_in);
  params.q = q.data_ptr();
  params.k = k.data_ptr();
  params.v = v.data_ptr();
  params.q_strides = strides_of(q);
  params.k_strides = strides_of(k);
  params.v_strides = strides_of(v);
  params.batch = static_cast<int>(B);
  params.heads_q = static_cast<int>(Hq);
  params.heads_k = static_cast<int>(sizes.kv_heads);
  params.q_len = static_cast<int>(L);
  params.kv_len = static_cast<int>(S);
  params.key_lengths = lengths.has_value() ? lengths->data_ptr<int32_t>() : nullptr;
  params.causal = is_causal;
  params.scale = static_cast<float>(scale);
  params.scale_log2 = static_cast<float>(scale * kLog2e);
  params.dropout = dropout_p > 0.0;
  params.dropout_threshold = dropout_threshold(dropout_p);
  params.dropout_rescale = dropout_keep_scale(dropout_p);
  params.seed = params.dropout ? seed.data_ptr<int64_t>() : nullptr;
  return {sizes, q, k, v, lengths};
}

template <typename Params>
using Launcher = int (*)(const Params&, CUstream_st*);

// The launcher of the compiled head dim `head_dim` for element type kType, from the generated list.
#define TFM_SELECT_HEAD_DIM(D)                                                          \
  if (head_dim == D) {                                                                  \
    if constexpr (std::is_same_v<Params, ForwardParams>) return &launch_forward<D, kType>; \
    else return &launch_backward<D, kType>;                                             \
  }

template <typename Params>
Launcher<Params> select_launcher(int64_t head_dim, ElementType type) {
  return BOOL_SWITCH(type == ElementType::kFloat16, kIsHalf, [&]() -> Launcher<Params> {
    constexpr ElementType kType = kIsHalf ? ElementType::kFloat16 : ElementType::kBFloat16;
    TFM_ATTENTION_FOR_EACH_HEAD_DIM(TFM_SELECT_HEAD_DIM)
    TORCH_CHECK(false, "attention (CUDA): no kernel for head dim ", head_dim);
  });
}
#undef TFM_SELECT_HEAD_DIM

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const std::optional<at::Tensor>& mask,
                                                          const std::optional<at::Tensor>& key_lengths,
                                                          double dropout_p, bool is_causal, double scale,
                                                          const at::Tensor& seed) {
  const char* op = "attention_forward";
  check_on_cuda(op, "q", q);  // before the guard, which needs a CUDA device
  const at::cuda::CUDAGuard guard(q.device());
  ForwardParams params;
  auto [sizes, q_a, k_a, v_a, lengths] =
      prepare(op, params, q, k, v, mask, key_lengths, dropout_p, is_causal, scale, seed);
  const int64_t B = sizes.batch, H = sizes.q_heads, L = sizes.q_len, D = sizes.head_dim;
  at::Tensor out = empty_heads_inner(B, H, L, D, q.options());  // (B, H, L, D), stored (B, L, H, D)
  at::Tensor lse = at::empty({B, H, L}, q.options().dtype(at::kFloat));
  params.out = out.data_ptr();
  params.out_strides = strides_of(out);
  params.lse = lse.data_ptr<float>();
  const int error = select_launcher<ForwardParams>(D, element_type(q))(params, at::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(static_cast<cudaError_t>(error));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& key_lengths,
    double dropout_p, bool is_causal, double scale, const at::Tensor& seed) {
  const char* op = "attention_backward";
  check_on_cuda(op, "q", q);  // before the guard, which needs a CUDA device
  const at::cuda::CUDAGuard guard(q.device());
  BackwardParams params;
  auto [sizes, q_a, k_a, v_a, lengths] =
      prepare(op, params, q, k, v, mask, key_lengths, dropout_p, is_causal, scale, seed);
  check_attention_backward_args(op, sizes, q, grad_out, out, lse);
  check_cuda_rows(op, "grad_out", grad_out);
  check_cuda_rows(op, "out", out);
  const int64_t B = sizes.batch, Hq = sizes.q_heads, L = sizes.q_len, D = sizes.head_dim;
  const int64_t Hk = sizes.kv_heads, S = sizes.kv_len;
  const at::Tensor grad_out_a = aligned(grad_out), out_a = aligned(out), lse_c = lse.contiguous();
  at::Tensor grad_q = empty_heads_inner(B, Hq, L, D, q.options());  // (B, Hq, L, D), stored (B, L, Hq, D)
  at::Tensor grad_k = empty_heads_inner(B, Hk, S, D, k.options());  // (B, Hk, S, D), stored (B, S, Hk, D)
  at::Tensor grad_v = empty_heads_inner(B, Hk, S, D, v.options());
  at::Tensor delta = at::empty({B, Hq, L}, q.options().dtype(at::kFloat));

  params.out = out_a.data_ptr();
  params.out_strides = strides_of(out_a);
  params.lse = lse_c.data_ptr<float>();
  params.grad_out = grad_out_a.data_ptr();
  params.grad_out_strides = strides_of(grad_out_a);
  params.grad_q = grad_q.data_ptr();
  params.grad_k = grad_k.data_ptr();
  params.grad_v = grad_v.data_ptr();
  params.grad_q_strides = strides_of(grad_q);
  params.grad_k_strides = strides_of(grad_k);
  params.grad_v_strides = strides_of(grad_v);
  params.delta = delta.data_ptr<float>();
  // By default dQ is summed in float32 by atomics inside the dk/dv pass, which saves the dq pass's second
  // computation of S and dP (7 -> 5 matrix products per tile) but fixes no order of the adds;
  // torch.use_deterministic_algorithms(True) selects the bit-reproducible three-pass backward.
  const bool fused_dq = !at::globalContext().deterministicAlgorithms();
  at::Tensor grad_q_accum;
  if (fused_dq) {
    grad_q_accum = at::zeros({B, L, Hq, D}, q.options().dtype(at::kFloat)).transpose(1, 2);  // (B, Hq, L, D)
    params.grad_q_accum = grad_q_accum.data_ptr<float>();
    params.grad_q_accum_strides = strides_of(grad_q_accum);
  }
  const int error =
      select_launcher<BackwardParams>(D, element_type(q))(params, at::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(static_cast<cudaError_t>(error));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (fused_dq) grad_q.copy_(grad_q_accum);
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(tfm_kernels, CUDA, m) {
  m.impl("attention_forward", &attention_forward_cuda);
  m.impl("attention_backward", &attention_backward_cuda);
}

}  // namespace tfm_kernels::attention
