// CPU emulation of the CUDA execution model the attention and MLP kernels use, so their sources run without a
// GPU: one std::thread per CUDA thread, std::barrier for __syncthreads() and for warp-collective operations
// (shuffles, ldmatrix, mma), and a log of shared-memory reads and cp.async writes for race checks.
// Used by harness.cpp (tests/test_attention_cuda_emulated.py) and mlp_harness.cpp
// (tests/test_mlp_cuda_emulated.py).
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Shared memory: an `extern __shared__` array (the attention kernels' dynamic allocation) is defined by the
// harness. A statically sized `__shared__` array must be one object for the whole block, so a harness whose
// kernels declare one defines EMU_STATIC_SHARED: the array becomes a function-local static, one per kernel
// instantiation, which works because blocks run one at a time (it is zeroed once, not poisoned per block).
#if defined(EMU_STATIC_SHARED)
#define __shared__ static
#else
#define __shared__
#endif
#define __align__(n) __attribute__((aligned(n)))

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

struct EmulatedDim3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint4 {
  uint32_t x, y, z, w;
};
struct float2 {
  float x, y;
};
inline thread_local EmulatedDim3 threadIdx, blockIdx;
inline thread_local dim3 gridDim, blockDim;  // set by launches whose kernels read them (mlp_harness.cpp)

namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "emulation check failed: %s\n", what);
  std::abort();
}
#define EMU_CHECK(cond, what) \
  do {                        \
    if (!(cond)) ::emu::fail(what); \
  } while (0)

// One 4-byte shared-memory word touched: a read (ldmatrix), or a cp.async write with the barrier epochs and
// program-order positions of its issue and of the wait that completed it.
struct Access {
  int thread;
  bool write;
  int epoch, wait_epoch;
  long order, wait_order;
  long word;
};

struct Block {
  unsigned char* smem;
  size_t smem_bytes;
  std::barrier<> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  uint64_t exchange[32][32][8];  // [warp][lane][word]: operands of warp-collective operations
  std::vector<std::vector<Access>> logs;  // [thread]: each thread appends to its own, without a lock
  Block(int threads, unsigned char* s, size_t bytes)
      : smem(s), smem_bytes(bytes), block_barrier(threads), logs(threads) {
    for (int w = 0; w < threads / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
  }
};

inline Block* block = nullptr;
inline thread_local int epoch = 0;  // __syncthreads() passed by this thread
inline thread_local long order = 0;  // this thread's shared-memory operations so far
inline int thread() { return int(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)); }
inline int warp() { return thread() / 32; }
inline int lane() { return thread() % 32; }
inline void warp_sync() { block->warp_barriers[warp()]->arrive_and_wait(); }

// The device code is built with --use_fast_math, under which float32 arithmetic flushes denormal inputs and
// results to zero; each emulated thread's SSE unit is set to do the same (x86: MXCSR flush-to-zero and
// denormals-are-zero), so that e.g. a tiny exp2 that the GPU makes 0 is 0 here too.
inline void flush_denormals_as_the_device() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_setcsr(_mm_getcsr() | 0x8040);
#endif
}

// The warp-collective operations. Lanes of one warp that reach different ones would pair up on the same warp
// barrier and read each other's operands as their own; on a GPU that is undefined behaviour.
enum class Collective : uint64_t { kShuffle = 1, kShuffleXor, kVote, kLdmatrix, kMma };

// The first barrier of a collective: publishes this lane's operation (exchange word 6) and checks, once every
// lane has arrived, that the whole warp runs the same one.
inline void collective_sync(Collective kind) {
  auto& slots = block->exchange[warp()];
  slots[lane()][6] = uint64_t(kind);
  warp_sync();
  for (int other = 0; other < 32; ++other) {
    EMU_CHECK(slots[other][6] == uint64_t(kind), "lanes of a warp in different warp-collective operations");
  }
}

// Byte offset of a shared-memory access, checked against the launch's dynamic allocation and alignment.
inline long smem_offset(const void* p, int bytes) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  EMU_CHECK(c >= block->smem && c + bytes <= block->smem + block->smem_bytes,
            "shared-memory access outside the dynamic allocation");
  EMU_CHECK((c - block->smem) % bytes == 0, "misaligned shared-memory access");
  return long(c - block->smem);
}

inline void log_access(const Access& a, int bytes) {
  std::vector<Access>& log = block->logs[thread()];
  for (int b = 0; b < bytes; b += 4) {
    Access word = a;
    word.word += b / 4;
    log.push_back(word);
  }
}

}  // namespace emu

inline void __syncthreads() {
  emu::block->block_barrier.arrive_and_wait();
  ++emu::epoch;
}

namespace emu {

// x of the lane `source` (every lane of the warp calls it), its bits copied whatever its type, as CUDA's
// overloads for int, unsigned, float, ... move them.
template <typename T>
T shuffle(unsigned mask, T x, int source, Collective kind) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "a shuffle moves 8 bytes at most");
  EMU_CHECK(mask == 0xffffffffu, "shuffle with a partial mask");
  EMU_CHECK(0 <= source && source < 32, "shuffle from a lane outside the warp");
  auto& slots = block->exchange[warp()];
  std::memcpy(&slots[lane()][0], &x, sizeof(T));
  collective_sync(kind);
  T y;
  std::memcpy(&y, &slots[source][0], sizeof(T));
  warp_sync();
  return y;
}

}  // namespace emu

template <typename T>
T __shfl_sync(unsigned mask, T x, int src_lane) {
  return emu::shuffle(mask, x, src_lane, emu::Collective::kShuffle);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T x, int offset) {
  return emu::shuffle(mask, x, emu::lane() ^ offset, emu::Collective::kShuffleXor);
}

inline bool __any_sync(unsigned mask, bool pred) {
  EMU_CHECK(mask == 0xffffffffu, "vote with a partial mask");
  auto& slots = emu::block->exchange[emu::warp()];
  slots[emu::lane()][0] = pred;
  emu::collective_sync(emu::Collective::kVote);
  bool any = false;
  for (int other = 0; other < 32; ++other) any = any || slots[other][0] != 0;
  emu::warp_sync();
  return any;
}
