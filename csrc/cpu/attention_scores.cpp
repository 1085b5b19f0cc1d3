// Score preparation shared by the CPU attention forward and backward: the attention mask on base-2 logits, read
// elementwise through its strides (broadcast dims have stride 0 and are never expanded).
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/attention_cpu.h"
#include "cpu/row_loops.h"

namespace tfm_kernels::cpu {
namespace {

// The lowest scaled mask value (base-2 logits): finfo.min * log2(e) overflows to -inf, which would mean "no key",
// while torch keeps finite masks finite. The backward gives the keys of a row with every key at the floor the
// weight torch's CPU kernel gives them (1 each: log2(S) is lost in the log-sum-exp at this magnitude).
constexpr float kMaskFloor = -0x1p127f;

// scores[c] += mask[c] * log2(e) for an additive mask of element type T.
template <typename T>
void add_mask_row(float* scores, int64_t n, const T* mask, int64_t mask_stride) {
  for (int64_t c = 0; c < n; ++c) {
    const float m = static_cast<float>(mask[c * mask_stride]);
    scores[c] += m > -kInfinity ? std::max(m * kLog2e, kMaskFloor) : m;  // -inf stays
  }
}

// scores[c] = -inf where the key takes no part (mask false).
void apply_bool_mask_row(float* scores, int64_t n, const bool* mask, int64_t mask_stride) {
  for (int64_t c = 0; c < n; ++c) {
    scores[c] = mask[c * mask_stride] ? scores[c] : -kInfinity;
  }
}

}  // namespace

HeadTensor head_tensor(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.dim() == 4 && t.scalar_type() == at::kFloat && (t.stride(3) == 1 || t.size(3) <= 1));
  return HeadTensor{t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2)};
}

void prepare_score_row(const AttentionProblem& problem, float* scores, int64_t n, int64_t valid, int64_t b,
                       int64_t h, int64_t i, int64_t j0) {
  const int64_t taking_part = std::clamp<int64_t>(valid, 0, n);
  fill_row(scores + taking_part, n - taking_part, -kInfinity);
  const MaskView& mask = problem.mask;
  if (mask.data == nullptr) {
    return;
  }
  const int64_t offset = b * mask.stride[0] + h * mask.stride[1] + i * mask.stride[2] + j0 * mask.stride[3];
  const int64_t stride = mask.stride[3];
  switch (mask.dtype) {
    case at::kBool:
      apply_bool_mask_row(scores, taking_part, static_cast<const bool*>(mask.data) + offset, stride);
      break;
    case at::kFloat:
      add_mask_row(scores, taking_part, static_cast<const float*>(mask.data) + offset, stride);
      break;
    case at::kHalf:
      add_mask_row(scores, taking_part, static_cast<const c10::Half*>(mask.data) + offset, stride);
      break;
    case at::kBFloat16:
      add_mask_row(scores, taking_part, static_cast<const c10::BFloat16*>(mask.data) + offset, stride);
      break;
    default:
      TORCH_INTERNAL_ASSERT(false, "unexpected mask dtype ", mask.dtype);
  }
}

}  // namespace tfm_kernels::cpu
