// Launches of the MLP elementwise kernels (epilogue_kernels.cuh: what they compute, work split, tests) on the
// caller's stream: the header picks the instantiation for the dtype, activation and gated flag, and the grid.
#include "cuda/mlp/epilogue_kernels.cuh"

namespace tfm_kernels {
namespace {

// What the header's launch functions call: kernel<<<grid, block>>>(params) on `stream`.
template <typename Params>
auto on_stream(const Params& params, cudaStream_t stream) {
  return [&params, stream](void (*kernel)(Params), dim3 grid, dim3 block) {
    kernel<<<grid, block, 0, stream>>>(params);
  };
}

}  // namespace

void launch_mlp_forward_epilogue(const MlpForwardEpilogueParams& params, cudaStream_t stream) {
  mlp::elementwise_launch(params, on_stream(params, stream));
}

void launch_mlp_backward_epilogue(const MlpBackwardEpilogueParams& params, cudaStream_t stream) {
  mlp::elementwise_launch(params, on_stream(params, stream));
}

void launch_column_sum(const ColumnSumParams& params, cudaStream_t stream) {
  mlp::column_sum_launch(params, on_stream(params, stream));
}

}  // namespace tfm_kernels
