// Emulated replacement for the asm part of csrc/cuda/common/memory.cuh: cp.async that lands either at issue
// or, deferred, only at the cp.async.wait_group that retires its group (the latest the hardware may), with
// every write logged for race checks; ldmatrix x4 (.trans) per the PTX layout: lanes 8i..8i+7 give the row
// addresses of matrix i; register i of lane t gets row t/4, columns 2(t%4), 2(t%4)+1 of matrix i (transposed:
// rows 2(t%4), 2(t%4)+1 of column t/4); logged shared stores; float atomic adds. The test prepends this to the
// rest of memory.cuh (pipeline step, tile loads), so those run unchanged.
#pragma once
#include <atomic>
#include <deque>

#include "runtime.h"

namespace tfm_kernels::cuda {

inline bool deferred_copies = true;

struct PendingCopy {
  void* smem;
  const void* gmem;
  int bytes;
  bool valid;
  int epoch;
  long order;
};
inline thread_local std::vector<PendingCopy> open_group;
inline thread_local std::deque<std::vector<PendingCopy>> committed_groups;

inline void land(const PendingCopy& copy) {
  if (copy.valid) {
    std::memcpy(copy.smem, copy.gmem, copy.bytes);
  } else {
    std::memset(copy.smem, 0, copy.bytes);
  }
  const long offset = static_cast<unsigned char*>(copy.smem) - emu::block->smem;
  emu::log_access({emu::thread(), true, copy.epoch, emu::epoch, copy.order, emu::order, offset / 4}, copy.bytes);
}

inline void cp_async(void* smem, const void* gmem, bool valid, int bytes) {
  emu::smem_offset(smem, bytes);
  EMU_CHECK(reinterpret_cast<uintptr_t>(gmem) % bytes == 0, "misaligned cp.async global address");
  const PendingCopy copy{smem, gmem, bytes, valid, emu::epoch, emu::order++};
  if (deferred_copies) {
    open_group.push_back(copy);
  } else {
    land(copy);
  }
}
inline void cp_async_16(void* smem, const void* gmem, bool valid) { cp_async(smem, gmem, valid, 16); }
inline void cp_async_4(void* smem, const void* gmem, bool valid) { cp_async(smem, gmem, valid, 4); }
inline void cp_async_commit() {
  committed_groups.push_back(open_group);
  open_group.clear();
}
template <int kPending>
inline void cp_async_wait() {
  ++emu::order;
  for (; int(committed_groups.size()) > kPending; committed_groups.pop_front()) {
    for (const PendingCopy& copy : committed_groups.front()) land(copy);
  }
}

inline void ldmatrix(uint32_t (&frag)[4], const void* row, bool transpose) {
  const long offset = emu::smem_offset(row, 16);
  emu::log_access({emu::thread(), false, emu::epoch, 0, emu::order++, 0, offset / 4}, 16);
  auto& slots = emu::block->exchange[emu::warp()];
  slots[emu::lane()][7] = reinterpret_cast<uintptr_t>(row);
  emu::collective_sync(emu::Collective::kLdmatrix);
  const int g = emu::lane() / 4, c = emu::lane() % 4;
  for (int i = 0; i < 4; ++i) {
    uint16_t m[8][8];
    for (int r = 0; r < 8; ++r) std::memcpy(m[r], reinterpret_cast<const void*>(slots[8 * i + r][7]), 16);
    const uint16_t lo = transpose ? m[2 * c][g] : m[g][2 * c];
    const uint16_t hi = transpose ? m[2 * c + 1][g] : m[g][2 * c + 1];
    frag[i] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
  emu::warp_sync();
}
inline void ldmatrix_x4(uint32_t (&frag)[4], const void* row) { ldmatrix(frag, row, false); }
inline void ldmatrix_x4_trans(uint32_t (&frag)[4], const void* row) { ldmatrix(frag, row, true); }

// A plain store is visible to other threads after the next barrier: logged as a write that completes in its
// own epoch, so a read of the word by another thread in that epoch (before or after it) counts as a race.
inline void store_shared_b32(void* smem, uint32_t value) {
  const long offset = emu::smem_offset(smem, 4);
  std::memcpy(smem, &value, 4);
  const long order = emu::order++;
  emu::log_access({emu::thread(), true, emu::epoch, emu::epoch, order, order, offset / 4}, 4);
}

inline void atomic_add_global(float* gmem, float value) { std::atomic_ref<float>(*gmem).fetch_add(value); }

}  // namespace tfm_kernels::cuda
