// Stand-in for CUDA's cuda_runtime_api.h in the CPU emulation (tests/cuda_emulation/): the stream type that the
// kernels' params headers declare their launch functions with.
#pragma once

using cudaStream_t = struct CUstream_st*;
