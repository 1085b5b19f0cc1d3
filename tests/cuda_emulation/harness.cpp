// Runs the CUDA attention kernels of csrc/cuda/attention/ on the CPU emulation of runtime.h: forward, then the
// backward passes (fused dQ, or the deterministic three), with the grids, thread counts, dynamic shared-memory sizes and output layouts of
// launch_templates.cuh and api.cpp. Blocks run one after another; the threads of a block run concurrently.
// Shared memory is poisoned with NaN bytes before each block, global buffers have their exact sizes (build
// with -fsanitize=address to catch out-of-bounds accesses), and every block's shared-memory log is checked
// for reads racing an in-flight cp.async write.
//
//   harness INPUT OUTPUT   (binary formats: tests/test_attention_cuda_emulated.py)
#include <fstream>
#include <functional>
#include <thread>
#include <unordered_map>

#include "runtime.h"
#include "cuda/attention/backward_kernels.cuh"
#include "cuda/attention/forward_kernel.cuh"

namespace tfm_kernels::attention {
alignas(128) unsigned char smem[1 << 18];  // the kernels' extern __shared__ array, reused block after block
}

using namespace tfm_kernels::attention;

namespace {

long races = 0;

// A read races a cp.async write of the same word if it may overlap the copy in flight: another thread reads
// between the copy's issue and the barrier after its wait, or the issuing thread reads before its own wait.
void count_races(const std::vector<std::vector<emu::Access>>& logs) {
  std::unordered_map<long, std::vector<const emu::Access*>> writes;
  for (const auto& log : logs) {
    for (const auto& a : log) {
      if (a.write) writes[a.word].push_back(&a);
    }
  }
  for (const auto& log : logs) {
    for (const auto& r : log) {
      if (r.write) continue;
      const auto it = writes.find(r.word);
      if (it == writes.end()) continue;
      for (const emu::Access* w : it->second) {
        const bool overlaps = w->thread == r.thread ? w->order < r.order && r.order < w->wait_order
                                                    : w->epoch <= r.epoch && r.epoch <= w->wait_epoch;
        if (overlaps && races++ < 3) {
          std::fprintf(stderr, "race on shared word %ld: read by thread %d at barrier epoch %d, written by thread "
                       "%d in flight over epochs %d..%d\n", r.word, r.thread, r.epoch, w->thread, w->epoch,
                       w->wait_epoch);
        }
      }
    }
  }
}

template <typename Params>
void launch(void (*kernel)(Params), int grid_x, int grid_y, int grid_z, int threads, size_t smem_bytes,
            const Params& params) {
  EMU_CHECK(smem_bytes <= sizeof(smem), "dynamic shared memory larger than the emulator's");
  for (int z = 0; z < grid_z; ++z) {
    for (int y = 0; y < grid_y; ++y) {
      for (int x = 0; x < grid_x; ++x) {
        std::memset(smem, 0xFF, sizeof(smem));  // NaN in fp16 and bf16
        emu::Block block(threads, smem, smem_bytes);
        emu::block = &block;
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            emu::flush_denormals_as_the_device();
            threadIdx = {unsigned(t), 0, 0};
            blockIdx = {unsigned(x), unsigned(y), unsigned(z)};
            kernel(params);
          });
        }
        for (auto& thread : pool) thread.join();
        count_races(block.logs);
        emu::block = nullptr;
      }
    }
  }
}

// Header of the input file, all int64: the fields below in order, then scale and dropout_p as two doubles.
struct Header {
  int64_t head_dim, bf16, batch, heads_q, heads_k, q_len, kv_len, causal, deferred, packed, has_key_lengths, seed,
      fused_dq, mixed;
};

// Element strides of a (B, H, N, D) tensor stored (B, H, N, D) or, packed, (B, N, H, D).
Strides strides(const Header& h, int64_t heads, int64_t n, bool packed) {
  const int64_t D = h.head_dim;
  return packed ? Strides{n * heads * D, D, heads * D} : Strides{heads * n * D, n * D, D};
}

// Copies between a (B, H, N, D) contiguous array and a strided layout.
void restride(const uint16_t* src, const Strides& src_s, uint16_t* dst, const Strides& dst_s, const Header& h,
              int64_t heads, int64_t n) {
  for (int64_t b = 0; b < h.batch; ++b)
    for (int64_t hh = 0; hh < heads; ++hh)
      for (int64_t i = 0; i < n; ++i)
        std::memcpy(dst + b * dst_s.batch + hh * dst_s.head + i * dst_s.row,
                    src + b * src_s.batch + hh * src_s.head + i * src_s.row, h.head_dim * 2);
}

// between_passes runs after the forward (mixed layouts: moves out to another layout for the backward).
template <int D, typename T>
void run(const Header& h, const ForwardParams& forward, const BackwardParams& backward,
         const std::function<void()>& between_passes) {
  using FT = ForwardTraits<D>;
  using KT = BackwardKVTraits<D>;
  using QT = BackwardQTraits<D>;
  launch(attention_forward_kernel<D, T>, ceil_div(int(h.q_len), FT::kBlockM), int(h.heads_q), int(h.batch),
         FT::kThreads, FT::kSmemElems * sizeof(T), forward);
  between_passes();
  launch(attention_backward_delta_kernel<D, T>, ceil_div(int(h.q_len), BackwardDeltaTraits::kRowsPerBlock),
         int(h.heads_q), int(h.batch), BackwardDeltaTraits::kThreads, 0, backward);
  const bool fused_dq = backward.grad_q_accum != nullptr;
  launch(fused_dq ? attention_backward_kv_kernel<D, T, true> : attention_backward_kv_kernel<D, T, false>,
         ceil_div(int(h.kv_len), KT::kBlockN), int(h.heads_k), int(h.batch), KT::kThreads,
         KT::smem_bytes(fused_dq, sizeof(T)), backward);
  if (fused_dq) return;
  launch(attention_backward_q_kernel<D, T>, ceil_div(int(h.q_len), QT::kBlockM), int(h.heads_q), int(h.batch),
         QT::kThreads, QT::kSmemElems * sizeof(T), backward);
}

// grad_q = the float32 dQ sum rounded to T, as api.cpp's copy after the fused backward.
template <typename T>
void round_sum(const std::vector<float>& sum, std::vector<uint16_t>& grad_q) {
  for (size_t i = 0; i < sum.size(); i += 2) {
    const uint32_t pair = MmaOps<T>::pack(sum[i], sum[i + 1]);
    grad_q[i] = uint16_t(pair & 0xffffu);
    grad_q[i + 1] = uint16_t(pair >> 16);
  }
}

template <typename T>
void read(std::ifstream& in, std::vector<T>& v, size_t n) {
  v.resize(n);
  in.read(reinterpret_cast<char*>(v.data()), std::streamsize(n * sizeof(T)));
  EMU_CHECK(bool(in), "input file too short");
}

}  // namespace

int main(int argc, char** argv) {
  EMU_CHECK(argc == 3, "usage: harness INPUT OUTPUT");
  std::ifstream in(argv[1], std::ios::binary);
  Header h;
  double scale_and_p[2];
  in.read(reinterpret_cast<char*>(&h), sizeof(h));
  in.read(reinterpret_cast<char*>(scale_and_p), sizeof(scale_and_p));
  const int64_t B = h.batch, Hq = h.heads_q, Hk = h.heads_k, L = h.q_len, S = h.kv_len, D = h.head_dim;
  std::vector<int32_t> key_lengths;
  if (h.has_key_lengths) read(in, key_lengths, size_t(B));
  std::vector<uint16_t> q_in, k_in, v_in, grad_out;
  read(in, q_in, size_t(B * Hq * L * D));
  read(in, k_in, size_t(B * Hk * S * D));
  read(in, v_in, size_t(B * Hk * S * D));
  read(in, grad_out, size_t(B * Hq * L * D));

  // Inputs in the requested layout; outputs (B, N, H, D) memory as api.cpp allocates them, NaN-poisoned.
  const Strides q_s = strides(h, Hq, L, h.packed), k_s = strides(h, Hk, S, h.packed);
  // Mixed: v and grad_out in the other layout than k and q, and out read back by the backward from a third
  // buffer, (B, H, N, D) contiguous: each tensor's strides reach the kernels on their own, as from api.cpp.
  const Strides v_s = strides(h, Hk, S, h.mixed ? !h.packed : h.packed);
  const Strides grad_out_s = strides(h, Hq, L, h.mixed ? !h.packed : h.packed);
  const Strides q_contiguous = strides(h, Hq, L, false), k_contiguous = strides(h, Hk, S, false);
  const Strides out_s = strides(h, Hq, L, true), kv_out_s = strides(h, Hk, S, true);
  std::vector<uint16_t> q(q_in.size()), k(k_in.size()), v(v_in.size()), grad_out_laid(grad_out.size());
  restride(q_in.data(), q_contiguous, q.data(), q_s, h, Hq, L);
  restride(grad_out.data(), q_contiguous, grad_out_laid.data(), grad_out_s, h, Hq, L);
  restride(k_in.data(), k_contiguous, k.data(), k_s, h, Hk, S);
  restride(v_in.data(), k_contiguous, v.data(), v_s, h, Hk, S);
  std::vector<uint16_t> out(q.size(), 0xFFFF), grad_q(q.size(), 0xFFFF), grad_k(k.size(), 0xFFFF),
      grad_v(v.size(), 0xFFFF);
  std::vector<float> lse(size_t(B * Hq * L), NAN), delta(size_t(B * Hq * L), NAN);
  const int64_t seed = h.seed;

  BackwardParams params;
  params.q = q.data();
  params.k = k.data();
  params.v = v.data();
  params.out = out.data();
  params.lse = lse.data();
  params.q_strides = q_s;
  params.k_strides = k_s;
  params.v_strides = v_s;
  params.out_strides = out_s;
  params.batch = int(B);
  params.heads_q = int(Hq);
  params.heads_k = int(Hk);
  params.q_len = int(L);
  params.kv_len = int(S);
  params.key_lengths = h.has_key_lengths ? key_lengths.data() : nullptr;
  params.causal = h.causal != 0;
  params.scale = float(scale_and_p[0]);
  params.scale_log2 = float(scale_and_p[0] * 1.4426950408889634);  // as api.cpp
  params.dropout = scale_and_p[1] > 0.0;
  params.dropout_threshold = tfm_kernels::dropout_threshold(scale_and_p[1]);
  params.dropout_rescale = tfm_kernels::dropout_keep_scale(scale_and_p[1]);
  params.seed = &seed;
  params.grad_out = grad_out_laid.data();
  params.grad_out_strides = grad_out_s;
  params.grad_q = grad_q.data();
  params.grad_k = grad_k.data();
  params.grad_v = grad_v.data();
  params.grad_q_strides = out_s;
  params.grad_k_strides = kv_out_s;
  params.grad_v_strides = kv_out_s;
  params.delta = delta.data();
  std::vector<float> grad_q_sum;  // (B, L, Hq, D) like grad_q, zeroed, as api.cpp allocates it
  if (h.fused_dq) {
    grad_q_sum.assign(grad_q.size(), 0.0f);
    params.grad_q_accum = grad_q_sum.data();
    params.grad_q_accum_strides = out_s;
  }
  tfm_kernels::cuda::deferred_copies = h.deferred != 0;

  std::vector<uint16_t> out_contiguous(out.size(), 0xFFFF);
  auto between_passes = [&] {
    if (!h.mixed) return;
    restride(out.data(), out_s, out_contiguous.data(), q_contiguous, h, Hq, L);
    params.out = out_contiguous.data();
    params.out_strides = q_contiguous;
  };
  const ForwardParams& forward = params;
  bool known = false;
#define TFM_EMULATE_HEAD_DIM(DIM)                                            \
  if (D == DIM) {                                                            \
    known = true;                                                            \
    if (h.bf16) run<DIM, __nv_bfloat16>(h, forward, params, between_passes); \
    else run<DIM, __half>(h, forward, params, between_passes);               \
  }
  TFM_EMULATE_HEAD_DIM(32)
  TFM_EMULATE_HEAD_DIM(64)
  TFM_EMULATE_HEAD_DIM(96)
  TFM_EMULATE_HEAD_DIM(128)
  TFM_EMULATE_HEAD_DIM(256)
  EMU_CHECK(known, "head dim not emulated");
  if (h.fused_dq) {
    if (h.bf16) round_sum<__nv_bfloat16>(grad_q_sum, grad_q);
    else round_sum<__half>(grad_q_sum, grad_q);
  }

  // Output: out, grad_q, grad_k, grad_v as contiguous (B, H, N, D) 16-bit words, lse float32, races int64.
  std::ofstream file(argv[2], std::ios::binary);
  std::vector<uint16_t> contiguous;
  auto write_bhnd = [&](const std::vector<uint16_t>& t, const Strides& s, int64_t heads, int64_t n) {
    contiguous.assign(t.size(), 0);
    restride(t.data(), s, contiguous.data(), strides(h, heads, n, false), h, heads, n);
    file.write(reinterpret_cast<const char*>(contiguous.data()), std::streamsize(contiguous.size() * 2));
  };
  write_bhnd(out, out_s, Hq, L);
  write_bhnd(grad_q, out_s, Hq, L);
  write_bhnd(grad_k, kv_out_s, Hk, S);
  write_bhnd(grad_v, kv_out_s, Hk, S);
  file.write(reinterpret_cast<const char*>(lse.data()), std::streamsize(lse.size() * 4));
  file.write(reinterpret_cast<const char*>(&races), 8);
  return 0;
}
