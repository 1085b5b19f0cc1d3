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
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(threads)
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

inline unsigned __shfl_sync(unsigned mask, unsigned x, int src_lane) {
  EMU_CHECK(mask == 0xffffffffu, "shuffle with a partial mask");
  EMU_CHECK(0 <= src_lane && src_lane < 32, "shuffle from a lane outside the warp");
  auto& slots = emu::block->exchange[emu::warp()];
  std::memcpy(&slots[emu::lane()][0], &x, 4);
  emu::warp_sync();
  unsigned y;
  std::memcpy(&y, &slots[src_lane][0], 4);
  emu::warp_sync();
  return y;
}

inline float __shfl_xor_sync(unsigned mask, float x, int offset) {
  EMU_CHECK(mask == 0xffffffffu, "shuffle with a partial mask");
  auto& slots = emu::block->exchange[emu::warp()];
  std::memcpy(&slots[emu::lane()][0], &x, 4);
  emu::warp_sync();
  float y;
  std::memcpy(&y, &slots[emu::lane() ^ offset][0], 4);
  emu::warp_sync();
  return y;
}
