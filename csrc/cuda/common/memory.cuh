// Shared-memory staging primitives for sm_80+: asynchronous global->shared copies (cp.async) with
// zero-fill of out-of-bounds rows, a pipeline step of a two- or three-stage ring, ldmatrix fragment loads,
// 32-bit shared stores, float atomic adds to global memory, and a tiled copy of a (rows x cols) block of
// 16-bit elements into a padded shared-memory tile. Every helper is called by a whole thread block (tiles)
// or a whole warp (ldmatrix). Tested through the attention kernels (tests/test_attention_cuda.py).
#pragma once
#include <cstdint>

namespace tfm_kernels::cuda {

__device__ __forceinline__ uint32_t shared_address(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// Copies 16 bytes global -> shared, bypassing L1 (.cg). When `valid` is false nothing is read and the 16
// shared bytes are zero-filled (src-size 0), so partial tiles need no separate clearing pass.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(smem)), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}

// Copies 4 bytes global -> shared (through L1, .ca: the only cache mode for 4-byte copies); zero-fills when
// `valid` is false.
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(shared_address(smem)), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, and register i of lane t
// receives row t/4, columns 2*(t%4) and 2*(t%4)+1 of matrix i (lower column in the lower half).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&frag)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(frag[0]), "=r"(frag[1]), "=r"(frag[2]), "=r"(frag[3])
               : "r"(shared_address(smem_row)));
}

// As ldmatrix_x4, but each matrix is transposed on the way: register i of lane t receives the elements
// (row 2*(t%4), column t/4) and (row 2*(t%4)+1, column t/4) of stored matrix i.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&frag)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(frag[0]), "=r"(frag[1]), "=r"(frag[2]), "=r"(frag[3])
               : "r"(shared_address(smem_row)));
}

// Stores one 32-bit word (two 16-bit elements) to shared memory.
__device__ __forceinline__ void store_shared_b32(void* smem, uint32_t value) {
  *static_cast<uint32_t*>(smem) = value;
}

// gmem += value in global memory, atomically (a reduction: no value is returned).
__device__ __forceinline__ void atomic_add_global(float* gmem, float value) { atomicAdd(gmem, value); }

// The top of iteration `step` (of `steps`) of a kStages-stage cp.async ring, run by the whole thread block:
// issues the copies of step + 1 into its stage (load_next(step + 1, (step + 1) % kStages)), waits for this
// thread's copies of `step` and then for every thread's, so all warps can read the stage. The stage refilled
// here was last read at step + 1 - kStages: with two stages the caller ends each iteration with
// cp_async_ring_end, so that no warp still reads it; with three, this barrier of the previous step did (no warp
// passes it before every warp is done with the step before it). Loads of step 0 are issued and committed before the loop.
template <int kStages, typename LoadNext>
__device__ __forceinline__ void cp_async_pipeline_step(int step, int steps, LoadNext&& load_next) {
  static_assert(kStages == 2 || kStages == 3, "a ring of two stages (closed by cp_async_ring_end) or three");
  if (step + 1 < steps) {
    load_next(step + 1, (step + 1) % kStages);
    cp_async_commit();
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
  __syncthreads();
}

// The end of an iteration of a kStages-stage ring (cp_async_pipeline_step), run by the whole thread block: with
// two stages every warp must be done with this iteration's stage before the next step refills it; with three the
// next step's own barrier orders that, and nothing is needed here.
template <int kStages>
__device__ __forceinline__ void cp_async_ring_end() {
  if constexpr (kStages == 2) __syncthreads();
}

// Issues cp.async copies of a (kRows x kCols) tile of 16-bit elements, rows `row_stride` elements apart in
// global memory, into shared memory rows kSmemStride elements apart. Rows >= valid_rows are zero-filled and
// never read. Needs 16-byte aligned rows: gmem and row_stride multiples of 8 elements (checked by the host).
// Consecutive threads take consecutive 16-byte chunks of a row, so each warp's reads are coalesced. Where the
// threads cover whole rows per step (every head dim but 96), a thread's rows are kRowsPerStep apart, so its
// source address advances by one 64-bit add per step: the kernels' main loops call this for every key block,
// and a multiply per chunk there took about 20 instructions per copy (sm_90a SASS, the forward at head dim 128).
template <int kRows, int kCols, int kSmemStride, int kThreads, typename T>
__device__ __forceinline__ void load_tile_async(T* smem, const T* gmem, int64_t row_stride, int valid_rows) {
  constexpr int kChunksPerRow = kCols * int(sizeof(T)) / 16;
  constexpr int kElemsPerChunk = 16 / int(sizeof(T));
  static_assert(kCols * sizeof(T) % 16 == 0, "tile rows must be whole 16-byte chunks");
  constexpr int kChunks = kRows * kChunksPerRow;
  constexpr int kSteps = (kChunks + kThreads - 1) / kThreads;
  if constexpr (kThreads % kChunksPerRow == 0) {
    constexpr int kRowsPerStep = kThreads / kChunksPerRow;
    const int row = int(threadIdx.x) / kChunksPerRow;
    const int col = (int(threadIdx.x) % kChunksPerRow) * kElemsPerChunk;
    const T* src = gmem + row * row_stride + col;
    const int64_t step_stride = kRowsPerStep * row_stride;
#pragma unroll
    for (int step = 0; step < kSteps; ++step) {
      const int r = row + step * kRowsPerStep;
      if (kRows % kRowsPerStep != 0 && r >= kRows) break;
      const bool valid = r < valid_rows;
      cp_async_16(smem + r * kSmemStride + col, valid ? src : gmem, valid);  // an address is needed even unread
      src += step_stride;
    }
  } else {
#pragma unroll
    for (int step = 0; step < kSteps; ++step) {
      const int chunk = step * kThreads + int(threadIdx.x);
      if (kChunks % kThreads != 0 && chunk >= kChunks) break;
      const int row = chunk / kChunksPerRow;
      const int col = (chunk % kChunksPerRow) * kElemsPerChunk;
      const bool valid = row < valid_rows;
      cp_async_16(smem + row * kSmemStride + col, valid ? gmem + row * row_stride + col : gmem, valid);
    }
  }
}

}  // namespace tfm_kernels::cuda
