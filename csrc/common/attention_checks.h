// Argument checks of the attention operators (schemas and layout contract in csrc/ops.cpp), shared by the
// device implementations: each failure names the argument, what was expected and what was given.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <utility>
#include <vector>

#include "common/dropout_checks.h"

namespace tfm_kernels {

struct AttentionSizes {
  int64_t batch, q_heads, kv_heads, q_len, kv_len, head_dim, value_dim;
};

// Checks q (B, Hq, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev), mask, key_lengths, dropout_p and seed for
// operator `op`; returns the sizes.
inline AttentionSizes check_attention_args(const char* op, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const std::optional<at::Tensor>& mask,
                                           const std::optional<at::Tensor>& key_lengths, double dropout_p,
                                           const at::Tensor& seed) {
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D (B, Hq, L, E); got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, op, ": k must be 4-D (B, Hk, S, E); got shape ", k.sizes());
  TORCH_CHECK(v.dim() == 4, op, ": v must be 4-D (B, Hk, S, Ev); got shape ", v.sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": q must be float32, float16 or bfloat16; got ", dtype);
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype, op,
              ": k and v must have q's dtype ", dtype, "; got ", k.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), op, ": k and v must be on q's device ",
              q.device(), "; got ", k.device(), " and ", v.device());
  const AttentionSizes sizes{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  TORCH_CHECK(k.size(0) == sizes.batch && v.size(0) == sizes.batch, op, ": k and v must have q's batch size ",
              sizes.batch, "; got ", k.size(0), " and ", v.size(0));
  TORCH_CHECK(v.size(1) == sizes.kv_heads && v.size(2) == sizes.kv_len, op,
              ": v must have k's heads and length (", sizes.kv_heads, ", ", sizes.kv_len, "); got (", v.size(1),
              ", ", v.size(2), ")");
  TORCH_CHECK(k.size(3) == sizes.head_dim, op, ": k must have q's head dim ", sizes.head_dim, "; got ",
              k.size(3));
  TORCH_CHECK(sizes.kv_heads > 0 && sizes.q_heads % sizes.kv_heads == 0, op,
              ": the kv heads must divide the query heads; got Hq=", sizes.q_heads, ", Hk=", sizes.kv_heads);
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.sizes() == at::IntArrayRef({sizes.batch, sizes.q_heads, sizes.q_len, sizes.kv_len}), op,
                ": mask must have shape (B, Hq, L, S) = (", sizes.batch, ", ", sizes.q_heads, ", ", sizes.q_len,
                ", ", sizes.kv_len, ") (zero strides for broadcast dims); got ", m.sizes());
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == at::kFloat || m.scalar_type() == dtype, op,
                ": mask must be bool, float32 or q's dtype ", dtype, "; got ", m.scalar_type());
    TORCH_CHECK(m.device() == q.device(), op, ": mask must be on q's device ", q.device(), "; got ", m.device());
  }
  if (key_lengths.has_value()) {
    const at::Tensor& lengths = *key_lengths;
    TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == sizes.batch, op, ": key_lengths must have shape (",
                sizes.batch, ",); got ", lengths.sizes());
    TORCH_CHECK(lengths.scalar_type() == at::kInt || lengths.scalar_type() == at::kLong, op,
                ": key_lengths must be int32 or int64; got ", lengths.scalar_type());
    TORCH_CHECK(lengths.device() == q.device(), op, ": key_lengths must be on q's device ", q.device(), "; got ",
                lengths.device());
  }
  check_dropout_args(op, dropout_p, seed);
  return sizes;
}

// Checks the backward's extra arguments against the forward's sizes: grad_out and out (B, Hq, L, Ev) in q's
// dtype, lse (B, Hq, L) float32.
inline void check_attention_backward_args(const char* op, const AttentionSizes& sizes, const at::Tensor& q,
                                          const at::Tensor& grad_out, const at::Tensor& out,
                                          const at::Tensor& lse) {
  const std::vector<int64_t> out_shape{sizes.batch, sizes.q_heads, sizes.q_len, sizes.value_dim};
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"grad_out", grad_out}, {"out", out}}) {
    TORCH_CHECK(t.sizes() == at::IntArrayRef(out_shape), op, ": ", name, " must have shape (B, Hq, L, Ev) = ",
                at::IntArrayRef(out_shape), "; got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ", q.scalar_type(),
                "; got ", t.scalar_type());
    TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on q's device ", q.device(), "; got ",
                t.device());
  }
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({sizes.batch, sizes.q_heads, sizes.q_len}), op,
              ": lse must have shape (B, Hq, L) = (", sizes.batch, ", ", sizes.q_heads, ", ", sizes.q_len,
              "); got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, op, ": lse must be float32; got ", lse.scalar_type());
  TORCH_CHECK(lse.device() == q.device(), op, ": lse must be on q's device ", q.device(), "; got ", lse.device());
}

}  // namespace tfm_kernels
