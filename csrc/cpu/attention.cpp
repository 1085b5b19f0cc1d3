// CPU implementation of tfm_kernels::attention_forward / attention_backward (schemas and layout contract in
// csrc/ops.cpp): checks the arguments, allocates the outputs in the contract's layout, converts float16 and
// bfloat16 to float32 around the float32 kernels (attention_forward.cpp, attention_backward.cpp), and
// registers the kernels for the CPU dispatch key.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "common/attention_checks.h"
#include "common/attention_layout.h"
#include "common/philox.h"
#include "cpu/attention_cpu.h"

namespace tfm_kernels::cpu {
namespace {

// t converted to float32, its broadcast dims (zero strides) converted once and broadcast again: written out,
// a key or value broadcast over the batch would take batch times its memory.
at::Tensor to_float_keeping_broadcast(const at::Tensor& t) {
  std::vector<int64_t> stored = t.sizes().vec();  // t's sizes with each broadcast dim cut to 1
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.stride(d) == 0) stored[d] = std::min<int64_t>(stored[d], 1);
  }
  return t.as_strided(stored, t.strides()).to(at::kFloat).expand(t.sizes());
}

// t as float32 with contiguous rows: t itself when it already is (no copy for float32 inputs).
at::Tensor as_float_rows(const at::Tensor& t) {
  at::Tensor result = t.scalar_type() == at::kFloat ? t : to_float_keeping_broadcast(t);
  if (result.stride(-1) == 1 || result.size(-1) <= 1) {
    return result;
  }
  // contiguous() returns an empty tensor unchanged whatever its strides (it counts as contiguous), and
  // head_tensor needs stride(-1) == 1: a fresh empty tensor has it, and no elements to copy.
  return result.numel() == 0 ? at::empty(result.sizes(), result.options()) : result.contiguous();
}

// A float32 tensor to compute `result` into: result itself when float32, else a float32 twin of its layout.
at::Tensor float_target(const at::Tensor& result) {
  return result.scalar_type() == at::kFloat ? result : at::empty_like(result, result.options().dtype(at::kFloat));
}

AttentionProblem make_problem(const AttentionSizes& sizes, const std::optional<at::Tensor>& mask,
                              const std::optional<at::Tensor>& key_lengths, double dropout_p, bool is_causal,
                              double scale, const at::Tensor& seed) {
  AttentionProblem problem;
  problem.batch = sizes.batch;
  problem.q_heads = sizes.q_heads;
  problem.kv_heads = sizes.kv_heads;
  problem.q_len = sizes.q_len;
  problem.kv_len = sizes.kv_len;
  problem.head_dim = sizes.head_dim;
  problem.value_dim = sizes.value_dim;
  problem.scale = static_cast<float>(scale);
  problem.is_causal = is_causal;
  problem.key_lengths.assign(sizes.batch, sizes.kv_len);
  if (key_lengths.has_value()) {
    const at::Tensor lengths = key_lengths->to(at::kLong).contiguous();
    const int64_t* data = lengths.data_ptr<int64_t>();
    for (int64_t b = 0; b < sizes.batch; ++b) {
      problem.key_lengths[b] = std::clamp<int64_t>(data[b], 0, sizes.kv_len);
    }
  }
  if (mask.has_value()) {
    problem.mask.data = mask->const_data_ptr();
    problem.mask.dtype = mask->scalar_type();
    for (int d = 0; d < 4; ++d) {
      problem.mask.stride[d] = mask->stride(d);
    }
  }
  if (dropout_p > 0.0) {
    problem.dropout.enabled = true;
    problem.dropout.seed = static_cast<uint64_t>(seed.item<int64_t>());
    problem.dropout.threshold = dropout_threshold(dropout_p);
    problem.dropout.keep_scale = dropout_keep_scale(dropout_p);
  }
  return problem;
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const std::optional<at::Tensor>& mask,
                                                         const std::optional<at::Tensor>& key_lengths,
                                                         double dropout_p, bool is_causal, double scale,
                                                         const at::Tensor& seed) {
  const AttentionSizes sizes = check_attention_args("attention_forward", q, k, v, mask, key_lengths, dropout_p, seed);
  const AttentionProblem problem = make_problem(sizes, mask, key_lengths, dropout_p, is_causal, scale, seed);
  at::Tensor out = empty_heads_inner(sizes.batch, sizes.q_heads, sizes.q_len, sizes.value_dim, q.options());
  at::Tensor lse = at::empty({sizes.batch, sizes.q_heads, sizes.q_len}, q.options().dtype(at::kFloat));
  const at::Tensor out_float = float_target(out);
  attention_forward_kernel(problem, as_float_rows(q), as_float_rows(k), as_float_rows(v), out_float, lse);
  if (!out_float.is_same(out)) {
    out.copy_(out_float);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& key_lengths, double dropout_p, bool is_causal, double scale,
    const at::Tensor& seed) {
  const char* op = "attention_backward";
  const AttentionSizes sizes = check_attention_args(op, q, k, v, mask, key_lengths, dropout_p, seed);
  check_attention_backward_args(op, sizes, q, grad_out, out, lse);
  const AttentionProblem problem = make_problem(sizes, mask, key_lengths, dropout_p, is_causal, scale, seed);
  at::Tensor dq = empty_heads_inner(sizes.batch, sizes.q_heads, sizes.q_len, sizes.head_dim, q.options());
  at::Tensor dk = empty_heads_inner(sizes.batch, sizes.kv_heads, sizes.kv_len, sizes.head_dim, q.options());
  at::Tensor dv = empty_heads_inner(sizes.batch, sizes.kv_heads, sizes.kv_len, sizes.value_dim, q.options());
  const at::Tensor grad_float = as_float_rows(grad_out);
  const at::Tensor delta = (grad_float * out.to(at::kFloat)).sum(-1).contiguous();  // (B, Hq, L) rowsum(dO * O)
  const at::Tensor dq_float = float_target(dq), dk_float = float_target(dk), dv_float = float_target(dv);
  attention_backward_kernel(problem, as_float_rows(q), as_float_rows(k), as_float_rows(v), grad_float,
                            lse.contiguous(), delta, dq_float, dk_float, dv_float);
  for (auto [result, computed] : {std::pair{dq, dq_float}, std::pair{dk, dk_float}, std::pair{dv, dv_float}}) {
    if (!computed.is_same(result)) {
      result.copy_(computed);
    }
  }
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(tfm_kernels, CPU, m) {
  m.impl("attention_forward", &attention_forward_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
}

}  // namespace tfm_kernels::cpu
