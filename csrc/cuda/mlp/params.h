// Plain-data parameters of the MLP elementwise CUDA kernels (no torch headers): the parts of the fused
// linear / gated linear that cuBLASLt's epilogues cannot do. Launched by api.cpp, defined in epilogue_kernels.cu.
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

#include "common/mlp_epilogue.h"

namespace tfm_kernels {

enum class MlpDType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// Dropout of the MLP operators on the device: the seed is read from device memory (a () int64 tensor), so
// no host synchronisation and the launch is CUDA-graph safe.
struct MlpDropoutParams {
  const int64_t* seed = nullptr;  // read only when active
  uint32_t threshold = 0;         // floor(p * 2^16), common/philox.h
  float keep_scale = 1.0f;        // dropout_keep_scale(p), common/philox.h
  bool active = false;
};

// Forward epilogue over z (rows, z_cols) row-major with row stride ld_z:
//   linear: z_ij (+ bias_j) -> preact (written back into z when store_preact), out_ij = dropout(act(z_ij));
//   gated:  z = [g, u] (rows, 2 * cols): out_ij = dropout(act(g_ij) * u_ij), bias (2 * cols) added to both.
// out is (rows, cols) with row stride ld_out; it may alias z (linear, no stored pre-activation).
struct MlpForwardEpilogueParams {
  void* z = nullptr;
  const void* bias = nullptr;  // nullptr: already added by the GEMM (or none)
  void* out = nullptr;
  int64_t rows = 0, cols = 0, ld_z = 0, ld_out = 0;
  bool store_preact = false;   // write z + bias back (only needed when bias != nullptr)
  bool gated = false;
  MlpDType dtype = MlpDType::kFloat16;
  Activation activation = Activation::kNone;
  MlpDropoutParams dropout;
};

// Backward epilogue: dz = grad_out * dropout * act'(z) (rows, cols); gated: z = [g, u] and dz = [dg, du]
// (rows, 2 * cols) with dg = h * u * act'(g), du = h * act(g), h = grad_out * dropout. All row-major contiguous
// except grad_out (row stride ld_grad_out).
struct MlpBackwardEpilogueParams {
  const void* grad_out = nullptr;
  const void* z = nullptr;  // unused for a linear with activation none
  void* dz = nullptr;
  int64_t rows = 0, cols = 0, ld_grad_out = 0;
  bool gated = false;
  MlpDType dtype = MlpDType::kFloat16;
  Activation activation = Activation::kNone;
  MlpDropoutParams dropout;
};

// Column sums of x (rows, cols) row-major contiguous into out (cols,), accumulated in float: the bias
// gradient where cuBLASLt's BGRADB epilogue is not available.
struct ColumnSumParams {
  const void* x = nullptr;
  void* out = nullptr;
  int64_t rows = 0, cols = 0;
  MlpDType dtype = MlpDType::kFloat16;
};

void launch_mlp_forward_epilogue(const MlpForwardEpilogueParams& params, cudaStream_t stream);
void launch_mlp_backward_epilogue(const MlpBackwardEpilogueParams& params, cudaStream_t stream);
void launch_column_sum(const ColumnSumParams& params, cudaStream_t stream);

}  // namespace tfm_kernels
