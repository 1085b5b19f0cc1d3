// The dropout arguments every attention and MLP operator takes, checked alike (attention_checks.h,
// mlp_checks.h): each failure names the operator and the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace tfm_kernels {

// dropout_p in [0, 1): outside it (NaN included) the kernels would silently skip dropout or drop everything
// with an infinite keep scale. The seed is read only when dropout runs, and then must be one int64 element:
// item<int64_t>() would otherwise truncate a float or accept a bool or int32 seed.
inline void check_dropout_args(const char* op, double dropout_p, const at::Tensor& seed) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1); got ", dropout_p);
  if (dropout_p > 0.0) {
    TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1, op,
                ": seed must be an int64 tensor with one element; got ", seed.scalar_type(), " of shape ",
                seed.sizes());
  }
}

}  // namespace tfm_kernels
