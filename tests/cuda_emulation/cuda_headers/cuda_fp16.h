// Stand-in for CUDA's cuda_fp16.h in the CPU emulation (tests/cuda_emulation/): __half as its 16 bits, with the
// float conversions the kernels use, rounding to nearest even like __float2half_rn (_Float16 does it in g++).
#pragma once
#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
  __half() = default;
  __half(float f) {
    const _Float16 h = static_cast<_Float16>(f);
    std::memcpy(&bits, &h, 2);
  }
  operator float() const {
    _Float16 h;
    std::memcpy(&h, &bits, 2);
    return static_cast<float>(h);
  }
};
