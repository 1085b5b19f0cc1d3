// CUDA implementation of the MLP operators (schemas and layout contract: csrc/ops.cpp): every GEMM runs through
// cuBLASLt with the epilogue that fuses the most, on torch's current stream and cuBLASLt handle, with its
// workspace from torch's caching allocator; the elementwise remainder runs in epilogue_kernels.cuh.
//
//   forward  gelu_tanh, no dropout:   GELU_AUX_BIAS (out = GELU(z + b), z kept as the aux output), one kernel;
//            none, no dropout:        BIAS (out = z + b);
//            otherwise:               BIAS into z, then out = dropout(act(z)) in our epilogue kernel
//                                     (cuBLASLt has no erf-GELU, SiLU or dropout epilogue; its GELU is the tanh
//                                     approximation, and its ReLU aux is a bit mask, not the pre-activation);
//            gated:                   BIAS into [g, u], then out = dropout(act(g) * u) in our kernel.
//   backward dz = grad_out * dropout * act'(z) in our kernel, then grad_x = dz @ W (DEFAULT) and
//            grad_weight = dz^T @ x with BGRADB, which sums dz's rows into grad_bias inside the same GEMM;
//   block    (mlp_block_backward, both projections) for 16-bit gelu_tanh without dropout: the GEMM that produces the
//            hidden gradient, grad_out @ W2, applies GELU' from the saved pre-activation and sums the bias
//            gradient in its epilogue (DGELU_BGRAD), so dz never takes a separate pass.
// Each fused epilogue falls back to the plain GEMM plus our kernel (bias add, column sum) when cuBLASLt offers
// no algorithm for it (dtype, alignment, leading dimension), so every input shape runs.
//
// Row-major (M, N) = (M, K) @ (K, N) is the column-major GEMM D^T (N, M) = B^T (N, K) @ A^T (K, M): every call
// below passes the row-major operands swapped, and "m" is the column-major row count (our column count).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublasLt.h>
#include <torch/library.h>

#include <memory>
#include <string>
#include <tuple>

#include "common/mlp_checks.h"
#include "common/mlp_block.h"
#include "cuda/mlp/params.h"

namespace tfm_kernels {
namespace {

using at::Tensor;

constexpr int64_t kWorkspaceBytes = 32 << 20;  // the most any algorithm may use (Hopper kernels ask up to 32 MiB)
constexpr int64_t kAuxLdMultiple = 8;          // CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD for GELU must divide by 8
constexpr uintptr_t kMaxAlignment = 256;       // the alignment cuBLASLt's heuristics assume by default

#define TFM_CUBLASLT_CHECK(expr)                                                                             \
  do {                                                                                                       \
    const cublasStatus_t status = (expr);                                                                    \
    TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, #expr " failed: ", cublasLtGetStatusString(status), " (", \
                static_cast<int>(status), ")");                                                             \
  } while (0)

struct MatmulDescDeleter {
  void operator()(cublasLtMatmulDescOpaque_t* p) const { cublasLtMatmulDescDestroy(p); }
};
struct LayoutDeleter {
  void operator()(cublasLtMatrixLayoutOpaque_t* p) const { cublasLtMatrixLayoutDestroy(p); }
};
struct PreferenceDeleter {
  void operator()(cublasLtMatmulPreferenceOpaque_t* p) const { cublasLtMatmulPreferenceDestroy(p); }
};

cudaDataType_t cuda_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: return CUDA_R_32F;
  }
}

MlpDType mlp_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return MlpDType::kFloat16;
    case at::kBFloat16: return MlpDType::kBFloat16;
    default: return MlpDType::kFloat32;
  }
}

uint32_t alignment_of(const void* pointer) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(pointer);
  uintptr_t alignment = kMaxAlignment;
  while (alignment > 1 && address % alignment != 0) alignment /= 2;
  return static_cast<uint32_t>(alignment);
}

// One column-major cuBLASLt GEMM D (m, n) = op(A) @ op(B) with an optional epilogue.
struct LtGemm {
  bool transpose_a = false, transpose_b = false;
  int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;
  int64_t lda = 0;
  const void* b = nullptr;
  int64_t ldb = 0;
  void* d = nullptr;
  int64_t ldd = 0;
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  void* bias = nullptr;  // BIAS*: the (m,) bias read; BGRADB: the (n,) bias gradient written
  void* aux = nullptr;   // GELU_AUX*: the pre-activation written, (m, n) with leading dimension ld_aux
  int64_t ld_aux = 0;
};

template <typename T>
void set_attribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attribute, const T& value) {
  TFM_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(desc, attribute, &value, sizeof(value)));
}

std::unique_ptr<cublasLtMatrixLayoutOpaque_t, LayoutDeleter> make_layout(cudaDataType_t type, int64_t rows,
                                                                          int64_t cols, int64_t ld) {
  cublasLtMatrixLayout_t layout = nullptr;
  TFM_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&layout, type, rows, cols, ld));
  return std::unique_ptr<cublasLtMatrixLayoutOpaque_t, LayoutDeleter>(layout);
}

// Runs the GEMM; false (nothing launched) when cuBLASLt has no algorithm for this epilogue and these operands.
bool run_gemm(const LtGemm& g, at::ScalarType dtype, const Tensor& like) {
  // Empty problems never reach cuBLASLt (its leading dimensions must be >= 1, and k == 0 must still give D = 0):
  // a fused epilogue reports no algorithm, so the caller takes its plain path, and a plain GEMM writes the zeros.
  if (g.m == 0 || g.n == 0 || g.k == 0) {
    if (g.epilogue != CUBLASLT_EPILOGUE_DEFAULT) return false;
    if (g.m > 0 && g.n > 0) {
      const size_t element = c10::elementSize(dtype);
      C10_CUDA_CHECK(cudaMemset2DAsync(g.d, static_cast<size_t>(g.ldd) * element, 0,
                                       static_cast<size_t>(g.m) * element, static_cast<size_t>(g.n),
                                       at::cuda::getCurrentCUDAStream()));
    }
    return true;
  }
  const cudaDataType_t type = cuda_type(dtype);
  // The precision setting torch's own cuBLASLt GEMMs read: allowTF32CuBLAS() throws once the legacy and the new
  // API disagree, as they do after torch.backends.cuda.matmul.fp32_precision = "tf32".
  const bool tf32 = dtype == at::kFloat &&
                    at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
                        at::Float32Precision::TF32;
  cublasLtMatmulDesc_t raw_desc = nullptr;
  TFM_CUBLASLT_CHECK(cublasLtMatmulDescCreate(&raw_desc, tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F,
                                              CUDA_R_32F));
  std::unique_ptr<cublasLtMatmulDescOpaque_t, MatmulDescDeleter> desc(raw_desc);
  const cublasOperation_t op_a = g.transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = g.transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  set_attribute(raw_desc, CUBLASLT_MATMUL_DESC_TRANSA, op_a);
  set_attribute(raw_desc, CUBLASLT_MATMUL_DESC_TRANSB, op_b);
  set_attribute(raw_desc, CUBLASLT_MATMUL_DESC_EPILOGUE, g.epilogue);
  if (g.bias != nullptr) {
    set_attribute(raw_desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, g.bias);
    set_attribute(raw_desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, static_cast<int32_t>(type));
  }
  if (g.aux != nullptr) {
    set_attribute(raw_desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, g.aux);
    set_attribute(raw_desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, g.ld_aux);
  }
  auto a_layout = g.transpose_a ? make_layout(type, g.k, g.m, g.lda) : make_layout(type, g.m, g.k, g.lda);
  auto b_layout = g.transpose_b ? make_layout(type, g.n, g.k, g.ldb) : make_layout(type, g.k, g.n, g.ldb);
  auto d_layout = make_layout(type, g.m, g.n, g.ldd);

  cublasLtMatmulPreference_t raw_preference = nullptr;
  TFM_CUBLASLT_CHECK(cublasLtMatmulPreferenceCreate(&raw_preference));
  std::unique_ptr<cublasLtMatmulPreferenceOpaque_t, PreferenceDeleter> preference(raw_preference);
  const uint64_t workspace_bytes = kWorkspaceBytes;
  TFM_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(raw_preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                          &workspace_bytes, sizeof(workspace_bytes)));
  // Strided views (a weight slice, a row of a packed tensor) may start off the 256-byte alignment that the
  // heuristics otherwise assume.
  const uint32_t align_a = alignment_of(g.a), align_b = alignment_of(g.b), align_d = alignment_of(g.d);
  TFM_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(raw_preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                                          &align_a, sizeof(align_a)));
  TFM_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(raw_preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                          &align_b, sizeof(align_b)));
  TFM_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(raw_preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                                          &align_d, sizeof(align_d)));
  TFM_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(raw_preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                                          &align_d, sizeof(align_d)));

  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  cublasLtMatmulHeuristicResult_t heuristic = {};
  int found = 0;
  const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(handle, raw_desc, a_layout.get(), b_layout.get(),
                                                               d_layout.get(), d_layout.get(), raw_preference, 1,
                                                               &heuristic, &found);
  if (status != CUBLAS_STATUS_SUCCESS || found == 0) return false;
  // From torch's caching allocator: stream-ordered, so freeing it after the asynchronous launch is safe.
  const int64_t used_bytes = static_cast<int64_t>(heuristic.workspaceSize);
  const Tensor workspace = at::empty({std::max<int64_t>(used_bytes, 1)}, like.options().dtype(at::kByte));
  const float alpha = 1.0f, beta = 0.0f;
  TFM_CUBLASLT_CHECK(cublasLtMatmul(handle, raw_desc, &alpha, g.a, a_layout.get(), g.b, b_layout.get(), &beta, g.d,
                                    d_layout.get(), g.d, d_layout.get(), &heuristic.algo, workspace.data_ptr(),
                                    heuristic.workspaceSize, at::cuda::getCurrentCUDAStream()));
  return true;
}

void run_gemm_or_fail(const LtGemm& g, at::ScalarType dtype, const Tensor& like) {
  TORCH_CHECK(run_gemm(g, dtype, like), "cuBLASLt found no algorithm for a plain ", g.m, "x", g.n, "x", g.k,
              " GEMM in ", dtype);
}

// A 2-D operand whose row stride cuBLASLt accepts as a leading dimension (>= the row length): rows read
// through a zero or overlapping stride (an expanded tensor) are copied; a single row may have any stride.
Tensor gemm_operand(const Tensor& t) {
  return t.dim() == 2 && t.size(0) > 1 && t.stride(0) < t.size(1) ? t.contiguous() : t;
}

int64_t leading_dim(const Tensor& t) { return std::max(t.stride(0), t.size(1)); }

// out (M, N) row-major = x (M, K) @ weight^T, weight (N, K) row-major: column-major out^T = weight^T' @ x^T.
LtGemm forward_gemm(const Tensor& x, const Tensor& weight, Tensor& out) {
  return LtGemm{.transpose_a = true, .m = weight.size(0), .n = x.size(0), .k = x.size(1), .a = weight.data_ptr(),
                .lda = leading_dim(weight), .b = x.data_ptr(), .ldb = leading_dim(x), .d = out.data_ptr(),
                .ldd = out.size(1)};
}

// Every entry point's first check, before its device guard: CUDAGuard accepts only a CUDA device, and the
// dispatcher picks these kernels for CPU x too when another argument (the seed, grad_out) is a CUDA tensor.
void check_cuda_x(const char* op, const Tensor& x) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor; got device ", x.device());
}

// The dropout of the epilogue kernels, which read the seed on the device: dropout_p and the seed's dtype and size
// passed check_dropout_args; the seed must also be on x's device.
MlpDropoutParams dropout_params(const char* op, double dropout_p, const Tensor& seed, const Tensor& x) {
  MlpDropoutParams params;
  params.active = dropout_p > 0.0;
  if (params.active) {
    TORCH_CHECK(seed.device() == x.device(), op, ": seed must be on x's device ", x.device(), "; got ",
                seed.device());
    const MlpDropout host = make_mlp_dropout(dropout_p, 0);
    params.seed = seed.data_ptr<int64_t>();
    params.threshold = host.threshold;
    params.keep_scale = host.keep_scale;
  }
  return params;
}

// A bias cuBLASLt can read: contiguous and 16-byte aligned (a view into a larger tensor may not be).
Tensor gemm_ready_bias(const std::optional<Tensor>& bias) {
  if (!bias.has_value()) return Tensor();
  Tensor b = bias->contiguous();
  return alignment_of(b.data_ptr()) >= 16 ? b : b.clone();
}

// z (M, width) = x @ weight^T (+ bias in the GEMM when cuBLASLt can); returns whether the bias is still to add.
bool gemm_with_bias(const Tensor& x, const Tensor& weight, const Tensor& bias, Tensor& z) {
  LtGemm g = forward_gemm(x, weight, z);
  if (bias.defined()) {
    g.epilogue = CUBLASLT_EPILOGUE_BIAS;
    g.bias = bias.data_ptr();
    if (run_gemm(g, x.scalar_type(), x)) return false;
    g.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    g.bias = nullptr;
  }
  run_gemm_or_fail(g, x.scalar_type(), x);
  return bias.defined();
}

std::tuple<Tensor, Tensor> linear_forward(const Tensor& x_in, const Tensor& weight_in,
                                          const std::optional<Tensor>& bias, std::string activation_name,
                                          double dropout_p, const Tensor& seed) {
  const char* op = "mlp_linear_forward";
  check_cuda_x(op, x_in);
  check_dropout_args(op, dropout_p, seed);
  const Tensor x = gemm_operand(x_in), weight = gemm_operand(weight_in);
  check_mlp_operands(op, x, weight, bias);
  const int64_t M = x.size(0), N = weight.size(0);
  const Activation activation = checked_activation(op, activation_name);
  const c10::cuda::CUDAGuard guard(x.device());
  const bool store_preact = activation != Activation::kNone;
  Tensor out = at::empty({M, N}, x.options());
  Tensor preact = store_preact ? at::empty({M, N}, x.options()) : at::empty({0}, x.options());
  const Tensor b = gemm_ready_bias(bias);
  const MlpDropoutParams dropout = dropout_params(op, dropout_p, seed, x);

  if (!dropout.active && activation == Activation::kGeluTanh && N % kAuxLdMultiple == 0) {
    LtGemm g = forward_gemm(x, weight, out);
    g.epilogue = b.defined() ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
    g.bias = b.defined() ? b.data_ptr() : nullptr;
    g.aux = preact.data_ptr();
    g.ld_aux = N;
    if (run_gemm(g, x.scalar_type(), x)) return {out, preact};
  }
  if (!dropout.active && activation == Activation::kNone && !gemm_with_bias(x, weight, b, out)) {
    return {out, preact};
  }
  Tensor z = store_preact ? preact : out;
  const bool bias_pending = (!dropout.active && activation == Activation::kNone) || gemm_with_bias(x, weight, b, z);
  MlpForwardEpilogueParams params;
  params.z = z.data_ptr();
  params.bias = bias_pending ? b.data_ptr() : nullptr;
  params.out = out.data_ptr();
  params.rows = M;
  params.cols = N;
  params.ld_z = N;
  params.ld_out = N;
  params.store_preact = store_preact;
  params.dtype = mlp_dtype(x.scalar_type());
  params.activation = activation;
  params.dropout = dropout;
  launch_mlp_forward_epilogue(params, at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, preact};
}

std::tuple<Tensor, Tensor> gated_forward(const Tensor& x_in, const Tensor& weight_in,
                                         const std::optional<Tensor>& bias, std::string activation_name,
                                         double dropout_p, const Tensor& seed) {
  const char* op = "mlp_gated_forward";
  check_cuda_x(op, x_in);
  check_dropout_args(op, dropout_p, seed);
  const Tensor x = gemm_operand(x_in), weight = gemm_operand(weight_in);
  check_mlp_operands(op, x, weight, bias);
  const int64_t M = x.size(0), N2 = weight.size(0);
  check_gated_weight(op, weight);
  const Activation activation = checked_activation(op, activation_name);
  const c10::cuda::CUDAGuard guard(x.device());
  const MlpDropoutParams dropout = dropout_params(op, dropout_p, seed, x);  // checks the seed before any launch
  Tensor out = at::empty({M, N2 / 2}, x.options());
  Tensor gate_up = at::empty({M, N2}, x.options());
  const Tensor b = gemm_ready_bias(bias);
  const bool bias_pending = gemm_with_bias(x, weight, b, gate_up);
  MlpForwardEpilogueParams params;
  params.z = gate_up.data_ptr();
  params.bias = bias_pending ? b.data_ptr() : nullptr;
  params.out = out.data_ptr();
  params.rows = M;
  params.cols = N2 / 2;
  params.ld_z = N2;
  params.ld_out = N2 / 2;
  params.store_preact = true;
  params.gated = true;
  params.dtype = mlp_dtype(x.scalar_type());
  params.activation = activation;
  params.dropout = dropout;
  launch_mlp_forward_epilogue(params, at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, gate_up};
}

// The column sums of dz (M, N contiguous) into grad_bias (N,), in our kernel.
void column_sum(const Tensor& dz, const Tensor& grad_bias) {
  ColumnSumParams sum;
  sum.x = dz.data_ptr();
  sum.out = grad_bias.data_ptr();
  sum.rows = dz.size(0);
  sum.cols = dz.size(1);
  sum.dtype = mlp_dtype(dz.scalar_type());
  launch_column_sum(sum, at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// grad_weight (N, K) = dz^T @ x; with `grad_bias` defined, also its column sums of dz (M, N) into grad_bias (N,).
Tensor weight_grad(const Tensor& dz, const Tensor& x, const Tensor& grad_bias) {
  const int64_t M = x.size(0), K = x.size(1), N = dz.size(1);
  Tensor grad_weight = at::empty({N, K}, x.options());
  // grad_weight^T (K, N) = x^T (K, M) @ dz (M, N); BGRADB reduces op(B) = dz over k = M into grad_bias (N,).
  LtGemm dw{.transpose_b = true, .m = K, .n = N, .k = M, .a = x.data_ptr(), .lda = leading_dim(x), .b = dz.data_ptr(),
            .ldb = N, .d = grad_weight.data_ptr(), .ldd = K};
  if (grad_bias.defined()) {
    dw.epilogue = CUBLASLT_EPILOGUE_BGRADB;
    dw.bias = grad_bias.data_ptr();
    if (run_gemm(dw, x.scalar_type(), x)) return grad_weight;
    dw.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    dw.bias = nullptr;
    column_sum(dz, grad_bias);
  }
  run_gemm_or_fail(dw, x.scalar_type(), x);
  return grad_weight;
}

// grad_weight and grad_bias where needed: the bias gradient fused into the weight gradient's GEMM, or alone in
// our column-sum kernel for a frozen weight; an empty (0,) tensor for each gradient not needed.
std::tuple<Tensor, Tensor> weight_and_bias_grads(const Tensor& dz, const Tensor& x, bool needs_weight,
                                                 bool needs_bias) {
  const auto none = [&] { return at::empty({0}, x.options()); };  // a tensor each: outputs never alias
  Tensor grad_bias = needs_bias ? at::empty({dz.size(1)}, x.options()) : Tensor();
  if (needs_weight) return {weight_grad(dz, x, grad_bias), needs_bias ? grad_bias : none()};
  if (needs_bias) column_sum(dz, grad_bias);
  return {none(), needs_bias ? grad_bias : none()};
}

// grad_x (M, K) = dz (M, N) @ weight (N, K): column-major grad_x^T (K, M) = weight^T (K, N) @ dz^T (N, M).
Tensor input_grad(const Tensor& dz, const Tensor& weight) {
  const int64_t M = dz.size(0), N = weight.size(0), K = weight.size(1);
  Tensor grad_x = at::empty({M, K}, dz.options());
  const LtGemm dx{.m = K, .n = M, .k = N, .a = weight.data_ptr(), .lda = leading_dim(weight), .b = dz.data_ptr(),
                  .ldb = N, .d = grad_x.data_ptr(), .ldd = K};
  run_gemm_or_fail(dx, dz.scalar_type(), dz);
  return grad_x;
}

// grad_x = dz @ weight, grad_weight = dz^T @ x and grad_bias = column sums of dz (M, N contiguous), where needed.
std::tuple<Tensor, Tensor, Tensor> weight_grads(const Tensor& dz, const Tensor& x, const Tensor& weight,
                                                const GradMask& needs) {
  auto [grad_weight, grad_bias] = weight_and_bias_grads(dz, x, needs.weight, needs.bias);
  return {needs.x ? input_grad(dz, weight) : at::empty({0}, x.options()), grad_weight, grad_bias};
}

Tensor grad_preact(const Tensor& grad_out, const Tensor& z, int64_t width, Activation activation, bool gated,
                   const MlpDropoutParams& dropout) {
  Tensor dz = at::empty({grad_out.size(0), width}, grad_out.options());
  MlpBackwardEpilogueParams params;
  params.grad_out = grad_out.data_ptr();
  params.z = z.numel() > 0 ? z.data_ptr() : nullptr;
  params.dz = dz.data_ptr();
  params.rows = grad_out.size(0);
  params.cols = grad_out.size(1);
  params.ld_grad_out = grad_out.stride(0);
  params.gated = gated;
  params.dtype = mlp_dtype(grad_out.scalar_type());
  params.activation = activation;
  params.dropout = dropout;
  launch_mlp_backward_epilogue(params, at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dz;
}

std::tuple<Tensor, Tensor, Tensor> linear_backward(const Tensor& grad_out, const Tensor& x_in,
                                                   const Tensor& weight_in, const Tensor& preact,
                                                   std::string activation_name, double dropout_p, const Tensor& seed,
                                                   bool needs_x, bool needs_weight, bool needs_bias) {
  const char* op = "mlp_linear_backward";
  check_cuda_x(op, x_in);
  check_dropout_args(op, dropout_p, seed);
  const Tensor x = gemm_operand(x_in), weight = gemm_operand(weight_in);
  check_mlp_operands(op, x, weight, std::nullopt);
  const int64_t M = x.size(0), N = weight.size(0);
  const Activation activation = checked_activation(op, activation_name);
  check_backward_tensor(op, "grad_out", grad_out, x, M, N);
  if (activation != Activation::kNone) check_backward_tensor(op, "preact", preact, x, M, N);
  const c10::cuda::CUDAGuard guard(x.device());
  const MlpDropoutParams dropout = dropout_params(op, dropout_p, seed, x);
  const Tensor dy = grad_out.stride(1) == 1 ? grad_out : grad_out.contiguous();
  const GradMask needs{needs_x, needs_weight, needs_bias};
  if (activation == Activation::kNone && !dropout.active) return weight_grads(dy.contiguous(), x, weight, needs);
  return weight_grads(grad_preact(dy, preact.contiguous(), N, activation, false, dropout), x, weight, needs);
}

std::tuple<Tensor, Tensor, Tensor> gated_backward(const Tensor& grad_out, const Tensor& x_in, const Tensor& weight_in,
                                                  const Tensor& gate_up, std::string activation_name,
                                                  double dropout_p, const Tensor& seed, bool needs_x,
                                                  bool needs_weight, bool needs_bias) {
  const char* op = "mlp_gated_backward";
  check_cuda_x(op, x_in);
  check_dropout_args(op, dropout_p, seed);
  const Tensor x = gemm_operand(x_in), weight = gemm_operand(weight_in);
  check_mlp_operands(op, x, weight, std::nullopt);
  const int64_t M = x.size(0), N2 = weight.size(0);
  const Activation activation = checked_activation(op, activation_name);
  check_gated_weight(op, weight);
  check_backward_tensor(op, "grad_out", grad_out, x, M, N2 / 2);
  check_backward_tensor(op, "gate_up", gate_up, x, M, N2);
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor dy = grad_out.stride(1) == 1 ? grad_out : grad_out.contiguous();
  const Tensor dgu =
      grad_preact(dy, gate_up.contiguous(), N2, activation, true, dropout_params(op, dropout_p, seed, x));
  return weight_grads(dgu, x, weight, {needs_x, needs_weight, needs_bias});
}

// The block's backward with the up projection's GELU-tanh derivative and bias gradient fused into the GEMM that
// produces the hidden gradient (cuBLASLt DGELU_BGRAD, the pre-activation as its aux input), for float16 and
// bfloat16; every other case (float32, another activation, dropout, F not a multiple of 8, no algorithm) takes
// the generic composition. Float32 is left out because the epilogue's bias gradient was not float32-accurate on
// an H200 (cuBLASLt of CUDA 13.0: 5.5e-05 off on values near 5 summed over 9 tokens, where torch's own float32
// is within 1.3e-06; benchmarks/RESULTS.md, 2026-11-30); in 16-bit types that is below their rounding.
MlpBlockGrads block_backward_cuda(const Tensor& grad_out, const Tensor& x_in, const Tensor& w1_in,
                                  const Tensor& preact, const Tensor& hidden_in, const Tensor& w2_in,
                                  std::string activation_name, double dropout_p, const Tensor& seed, bool needs_x,
                                  bool needs_w1, bool needs_b1, bool needs_w2, bool needs_b2) {
  const char* op = "mlp_block_backward";
  check_cuda_x(op, x_in);
  const Activation activation =
      check_mlp_block_backward(op, grad_out, x_in, w1_in, preact, hidden_in, w2_in, activation_name, dropout_p, seed);
  const int64_t M = x_in.size(0), F = w1_in.size(0), N = w2_in.size(0);
  const GradMask up{needs_x, needs_w1, needs_b1};
  const bool fusable = x_in.scalar_type() != at::kFloat && activation == Activation::kGeluTanh &&
                       dropout_p == 0.0 && F % kAuxLdMultiple == 0 && (needs_x || needs_w1 || needs_b1);
  auto generic = [&] {
    return block_backward(grad_out, x_in, w1_in, preact, hidden_in, w2_in, activation_name, dropout_p, seed, up,
                          needs_w2, needs_b2);
  };
  if (!fusable) return generic();
  const Tensor x = gemm_operand(x_in), w1 = gemm_operand(w1_in), hidden = gemm_operand(hidden_in);
  const Tensor w2 = gemm_operand(w2_in);
  Tensor aux = preact.contiguous();
  if (alignment_of(aux.data_ptr()) < 16) aux = aux.clone();  // as gemm_ready_bias: 16-byte epilogue pointers
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor dy = grad_out.contiguous();
  Tensor grad_b1 = at::empty({F}, x.options());
  Tensor dz = at::empty({M, F}, x.options());
  // dz^T (F, M) = dGELU(w2^T (F, N) @ dy^T (N, M), preact^T), grad_b1 = its sums over tokens.
  const LtGemm hidden_grad{.m = F, .n = M, .k = N, .a = w2.data_ptr(), .lda = leading_dim(w2), .b = dy.data_ptr(),
                           .ldb = N, .d = dz.data_ptr(), .ldd = F, .epilogue = CUBLASLT_EPILOGUE_DGELU_BGRAD,
                           .bias = grad_b1.data_ptr(), .aux = aux.data_ptr(), .ld_aux = F};
  if (!run_gemm(hidden_grad, x.scalar_type(), x)) return generic();
  const auto none = [&] { return at::empty({0}, x.options()); };
  auto [grad_w2, grad_b2] = weight_and_bias_grads(dy, hidden, needs_w2, needs_b2);
  return {needs_x ? input_grad(dz, w1) : none(), needs_w1 ? weight_grad(dz, x, Tensor()) : none(),
          needs_b1 ? grad_b1 : none(), grad_w2, grad_b2};
}

}  // namespace

TORCH_LIBRARY_IMPL(tfm_kernels, CUDA, m) {
  m.impl("mlp_block_backward", &block_backward_cuda);
  m.impl("mlp_linear_forward", &linear_forward);
  m.impl("mlp_linear_backward", &linear_backward);
  m.impl("mlp_gated_forward", &gated_forward);
  m.impl("mlp_gated_backward", &gated_backward);
}

}  // namespace tfm_kernels
