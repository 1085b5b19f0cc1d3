// Runs the CUDA MLP elementwise kernels of csrc/cuda/mlp/epilogue_kernels.cuh on the CPU emulation of runtime.h,
// launched by the header's own launch functions (the same kernel instantiations, grids and blocks as
// epilogue_kernels.cu): the forward epilogue then the backward epilogue, or the column sum. Blocks run one after
// another; the threads of a block run concurrently. Buffers have their exact sizes (build with
// -fsanitize=address to catch out-of-bounds accesses) and outputs start as NaN bytes (0xFF).
//
//   mlp_harness epilogue DTYPE ACTIVATION INPUT OUTPUT
//   mlp_harness column_sum DTYPE INPUT OUTPUT
// DTYPE: float16 | bfloat16 | float32; ACTIVATION: an operator activation name (none, gelu, ...). Binary formats:
// tests/test_mlp_cuda_emulated.py.
#include <barrier>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#define EMU_STATIC_SHARED  // the column sum declares a static __shared__ array
#include "runtime.h"
#include "cuda/mlp/epilogue_kernels.cuh"

using namespace tfm_kernels;

namespace {

using Buffer = std::vector<unsigned char>;

// Runs kernel over grid x block: one std::thread per CUDA thread of a block, reused block after block (threads are
// costly to start under AddressSanitizer); blocks run one after another in CUDA's linear order (x fastest), each
// with fresh barriers.
template <typename Params>
void run_blocks(void (*kernel)(Params), dim3 grid, dim3 block, const Params& params) {
  const unsigned threads = block.x * block.y * block.z, blocks = grid.x * grid.y * grid.z;
  auto state = std::make_unique<emu::Block>(int(threads), nullptr, 0);
  emu::block = state.get();
  std::barrier next_block(threads, [&]() noexcept {  // runs once every thread has finished the block
    state = std::make_unique<emu::Block>(int(threads), nullptr, 0);
    emu::block = state.get();
  });
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      emu::flush_denormals_as_the_device();
      threadIdx = {t % block.x, t / block.x % block.y, t / (block.x * block.y)};
      gridDim = grid;
      blockDim = block;
      for (unsigned b = 0; b < blocks; ++b) {
        blockIdx = {b % grid.x, b / grid.x % grid.y, b / (grid.x * grid.y)};
        emu::epoch = 0;
        kernel(params);
        next_block.arrive_and_wait();
      }
    });
  }
  for (auto& thread : pool) thread.join();
  emu::block = nullptr;
}

// The launch the header's launch functions call, in place of epilogue_kernels.cu's <<<grid, block, 0, stream>>>.
template <typename Params>
auto emulated_launch(const Params& params) {
  return [&params](void (*kernel)(Params), dim3 grid, dim3 block) { run_blocks(kernel, grid, block, params); };
}

struct DType {
  MlpDType value;
  size_t bytes;
};

DType parse_dtype(const std::string& name) {
  if (name == "float16") return {MlpDType::kFloat16, 2};
  if (name == "bfloat16") return {MlpDType::kBFloat16, 2};
  EMU_CHECK(name == "float32", "DTYPE must be float16, bfloat16 or float32");
  return {MlpDType::kFloat32, 4};
}

Buffer read_buffer(std::ifstream& in, size_t bytes) {
  Buffer b(bytes);
  in.read(reinterpret_cast<char*>(b.data()), std::streamsize(bytes));
  EMU_CHECK(bool(in), "input file too short");
  return b;
}

Buffer poisoned(size_t bytes) { return Buffer(bytes, 0xFF); }  // NaN in float16, bfloat16 and float32

void write_buffers(const char* path, const std::vector<const Buffer*>& buffers) {
  std::ofstream out(path, std::ios::binary);
  for (const Buffer* b : buffers) out.write(reinterpret_cast<const char*>(b->data()), std::streamsize(b->size()));
}

// Header of the epilogue input, all int64, then dropout_p as a double. ld_*: row strides in elements;
// row_block_limit: gridDim.y's limit for the launch (0: the real one).
struct EpilogueHeader {
  int64_t gated, rows, cols, ld_z, ld_out, ld_grad_out, has_bias, store_preact, out_aliases_z, seed,
      row_block_limit;
};

// Input: z (rows, ld_z), bias (z width) if has_bias, grad_out (rows, ld_grad_out), and if store_preact the
// backward's pre-activation (rows, z width) contiguous (without it, as for api.cpp's linear without activation,
// the backward gets z = nullptr). Output: z after the forward, out (rows, ld_out) (z again when out aliases it), dz
// (rows, z width). z width = 2 * cols when gated, else cols.
void run_epilogue(const DType& dtype, Activation activation, const char* input, const char* output) {
  std::ifstream in(input, std::ios::binary);
  EpilogueHeader h;
  double dropout_p;
  in.read(reinterpret_cast<char*>(&h), sizeof(h));
  in.read(reinterpret_cast<char*>(&dropout_p), sizeof(dropout_p));
  const size_t e = dtype.bytes;
  const int64_t width = h.gated ? 2 * h.cols : h.cols;
  Buffer z = read_buffer(in, size_t(h.rows * h.ld_z) * e);
  const Buffer bias = h.has_bias ? read_buffer(in, size_t(width) * e) : Buffer();
  const Buffer grad_out = read_buffer(in, size_t(h.rows * h.ld_grad_out) * e);
  const Buffer preact = h.store_preact ? read_buffer(in, size_t(h.rows * width) * e) : Buffer();
  Buffer out = poisoned(size_t(h.rows * h.ld_out) * e), dz = poisoned(size_t(h.rows * width) * e);

  // Dropout as api.cpp's dropout_params: threshold and scale from the host rule, the seed read on the device.
  const MlpDropout host = make_mlp_dropout(dropout_p, 0);
  MlpDropoutParams dropout;
  dropout.active = host.active;
  dropout.seed = &h.seed;
  dropout.threshold = host.threshold;
  dropout.keep_scale = host.keep_scale;
  const int64_t row_limit = h.row_block_limit > 0 ? h.row_block_limit : mlp::kMaxRowBlocks;

  MlpForwardEpilogueParams forward;
  forward.z = z.data();
  forward.bias = h.has_bias ? bias.data() : nullptr;
  forward.out = h.out_aliases_z ? z.data() : out.data();
  forward.rows = h.rows;
  forward.cols = h.cols;
  forward.ld_z = h.ld_z;
  forward.ld_out = h.ld_out;
  forward.store_preact = h.store_preact != 0;
  forward.gated = h.gated != 0;
  forward.dtype = dtype.value;
  forward.activation = activation;
  forward.dropout = dropout;
  mlp::elementwise_launch(forward, emulated_launch(forward), row_limit);
  if (h.out_aliases_z) out = z;

  MlpBackwardEpilogueParams backward;
  backward.grad_out = grad_out.data();
  backward.z = h.store_preact ? preact.data() : nullptr;
  backward.dz = dz.data();
  backward.rows = h.rows;
  backward.cols = h.cols;
  backward.ld_grad_out = h.ld_grad_out;
  backward.gated = h.gated != 0;
  backward.dtype = dtype.value;
  backward.activation = activation;
  backward.dropout = dropout;
  mlp::elementwise_launch(backward, emulated_launch(backward), row_limit);
  write_buffers(output, {&z, &out, &dz});
}

// Input: int64 rows, cols, then x (rows, cols) contiguous. Output: the column sums (cols,).
void run_column_sum(const DType& dtype, const char* input, const char* output) {
  std::ifstream in(input, std::ios::binary);
  int64_t shape[2];
  in.read(reinterpret_cast<char*>(shape), sizeof(shape));
  const Buffer x = read_buffer(in, size_t(shape[0] * shape[1]) * dtype.bytes);
  Buffer out = poisoned(size_t(shape[1]) * dtype.bytes);
  ColumnSumParams params;
  params.x = x.data();
  params.out = out.data();
  params.rows = shape[0];
  params.cols = shape[1];
  params.dtype = dtype.value;
  mlp::column_sum_launch(params, emulated_launch(params));
  write_buffers(output, {&out});
}

}  // namespace

int main(int argc, char** argv) {
  const std::string kernel = argc > 1 ? argv[1] : "";
  if (kernel == "epilogue" && argc == 6) {
    Activation activation;
    EMU_CHECK(parse_activation(argv[3], &activation), "unknown ACTIVATION");
    run_epilogue(parse_dtype(argv[2]), activation, argv[4], argv[5]);
  } else if (kernel == "column_sum" && argc == 5) {
    run_column_sum(parse_dtype(argv[2]), argv[3], argv[4]);
  } else {
    emu::fail("usage: mlp_harness epilogue DTYPE ACTIVATION INPUT OUTPUT | column_sum DTYPE INPUT OUTPUT");
  }
  return 0;
}
