"""Triton kernels of the MLP operators (contract: csrc/ops.cpp; registered in tfm_kernels/ops.py).

One tiled GEMM kernel, C = A @ B with arbitrary strides, serves every product:
  forward          out = dropout(act(x @ W^T + b)), storing the pre-activation z for backward;
  gated forward    the gate and up tiles of x @ [Wg; Wu]^T in one program (two accumulators), storing [g, u]
                   and writing dropout(act(g) * u);
  backward         dz = dy * dropout * act'(z) in one elementwise kernel (gated: dg, du), then
                   dx = dz @ W and dW = dz^T @ x; db = dz's column sums in torch. Not in dW's GEMM loop:
                   a row sum of the A tile beside the dot in a pipelined loop gave a wrong dW on an H200
                   (Triton 3.6; benchmarks/RESULTS.md, 2026-11-30).
Programs walk the output in GROUP_M-row bands so neighbouring programs share A and B tiles in L2. Accumulation
is float32; float32 inputs multiply in IEEE precision unless torch allows TF32. On Hopper and newer, 16-bit
operands with aligned layouts can also be read through tensor descriptors (TMA) by persistent programs; those
configs join the autotuning list. Products of at least AUTOTUNE_MIN_WORK multiply-adds are autotuned per shape
and epilogue, smaller ones take the first config that fits (tuning.py).
"""

import torch
import triton
import triton.language as tl

from ..backends import triton_interpreting
from ..rng import dropout_keep_scale, dropout_threshold
from .philox import dropout_keep, philox_key
from .precision import dot, dot_precision
from .replay import ReplayedLaunches
from .tuning import (
    TunedKernel,
    cdiv,
    descriptor,
    device_guard,
    needs_descriptors,
    next_power_of_2,
    tensor_descriptors_supported,
    unread_descriptors,
)

# Activation codes, equal to csrc/common/mlp_epilogue.h's Activation enum.
ACTIVATION_CODES = {"none": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "silu": 4}


# Constants as constexpr functions, not constexpr globals: philox.py says why.
@triton.constexpr_function
def inv_sqrt2():
    return 0.70710678118654752


@triton.constexpr_function
def inv_sqrt_2pi():
    return 0.39894228040143268


@triton.constexpr_function
def sqrt_2_over_pi():
    return 0.79788456080286536


@triton.constexpr_function
def gelu_tanh_cubic():
    return 0.044715


def _gemm_configs():
    """(configs, fallback): a small list for Hopper/Ampere (bf16/fp16 128x128-256 tiles), and the config run
    where none fits the device's shared memory; one config under the CPU interpreter, which never autotunes.
    Configs with TMA=True load tiles through tensor descriptors and run persistent (one program per SM looping
    over output tiles); only Hopper and newer run them, where autotuning measures whether they pay."""
    if triton_interpreting():
        config = _gemm_config(32, 32, 32, 4, 1, group_m=4)
        return [config], config
    # ptxas (Triton 3.8, sm_90a, bf16), plain GEMM: 106-239 registers, no spills, in every config and layout.
    # The gated GELU-tanh epilogue with dropout (two accumulators plus a Philox tile) spills, in bytes:
    # 128x256x64 3372 (and 240 KiB of shared memory: pruned), 128x128x64 244, 256x128x64 2288,
    # 128x128x32 2676, 64x128x64 none, 64x64x64 none (TMA 128x128x64 196, 64x128x64 200). Float32 gated
    # without TF32 runs only the smaller tiles (_gemm_usable).
    # The first config is the default below AUTOTUNE_MIN_WORK: 128x128x64 keeps a bias + GELU epilogue free
    # of spills (175 registers), where 128x256x64 spills 100 bytes.
    shapes = [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 32, 4, 4),
              (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)]
    # No 128x256x64 TMA config: on an H200 (Triton 3.6) it computed a wrong dW = dz^T @ x while every other config
    # passed the same test (benchmarks/RESULTS.md, 2026-11-28). The likelier cause, found on 2026-11-30 in
    # non-TMA configs too, was the bias gradient's row sum in dW's loop, since removed; the config stays out
    # until it passes on a GPU.
    tma_shapes = [(128, 128, 64, 8, 4), (64, 128, 64, 4, 4)]
    # The fallback, for float32 gated GEMMs on devices with 99 KiB (101376 bytes) per block (sm_86/sm_89:
    # RTX 30xx/40xx, A10, L4, L40S), where no listed config's estimate fits (the smallest, 128x128x32 in 4
    # stages, estimates 196608 bytes and compiles to 147456 on sm_86: OutOfResources). 64x64x32 in 2 stages
    # estimates 49152 bytes (float32 gated, the most any dtype takes), within every device's limit down to
    # sm_75's 64 KiB, and compiles to 24576 on sm_86 (one stage buffered), with the gated GELU-tanh + dropout
    # epilogue in 254 registers without spills (TF32: 32768 bytes, 32 spilled). It also takes float32 gated
    # on sm_80 (128x128x32 ran there past its estimate, 163840 of 166912 bytes with TF32) and plain float32
    # on sm_86.
    fallback = _gemm_config(64, 64, 32, 4, 2)
    return ([_gemm_config(*shape) for shape in shapes] +
            [_gemm_config(*shape, tma=True) for shape in tma_shapes]), fallback


def _gemm_config(block_m, block_n, block_k, num_warps, num_stages, *, group_m=8, tma=False):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m,
                          "TMA": tma}, num_warps=num_warps, num_stages=num_stages,
                         pre_hook=_set_descriptor_blocks if tma else _UNREAD_DESCRIPTORS)


def _set_descriptor_blocks(args):
    """Gives the tensor descriptors of a TMA launch the tile shapes of its config (a descriptor's block shape
    is part of the descriptor, fixed before the launch)."""
    block_m, block_n, block_k = args["BLOCK_M"], args["BLOCK_N"], args["BLOCK_K"]
    args["a_desc"].block_shape = [block_k, block_m] if args["A_T"] else [block_m, block_k]
    args["b_desc"].block_shape = [block_n, block_k] if args["B_T"] else [block_k, block_n]


_UNREAD_DESCRIPTORS = unread_descriptors("a_desc", "b_desc")  # the pre_hook of configs without TMA


def _shared_memory_bytes(config, args):
    """Shared memory of one _gemm_kernel program: num_stages pipelined A (BLOCK_M, BLOCK_K) and B (BLOCK_K,
    BLOCK_N) tiles, two B tiles when gated (gated 128x256x64 in three stages: 240 KiB in bf16, over every
    device's limit; float32 doubles every tile). Exact for sm_90 (Triton 3.8 compiles); sm_80 keeps one
    stage fewer in shared memory, so there it is an upper bound."""
    kw = config.kwargs
    b_tiles = 2 if args["GATED"] else 1
    per_stage = kw["BLOCK_M"] * kw["BLOCK_K"] + b_tiles * kw["BLOCK_K"] * kw["BLOCK_N"]
    return config.num_stages * per_stage * args["a_ptr"].element_size()


@triton.jit
def _gelu_tanh_sigmoid(z):
    """(s, s (1 - s)) for s = (1 + tanh(u)) / 2 = sigmoid(2u), u the tanh-GELU argument of z: from one
    exponential e = e^{-|2u|} in (0, 1], so nothing overflows and neither factor is a difference of nearby numbers
    (1 + tanh(u) loses GELU's negative tail to cancellation)."""
    x = 2.0 * sqrt_2_over_pi() * (z + z * z * z * gelu_tanh_cubic())
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    return tl.where(x < 0.0, e * r, r), e * r * r


@triton.jit
def _activate(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        return 0.5 * z * (1.0 + tl.erf(z * inv_sqrt2()))
    elif ACTIVATION == 2:
        s, _ = _gelu_tanh_sigmoid(z)
        return z * s
    elif ACTIVATION == 3:
        return tl.where(z < 0.0, 0.0, z)  # NaN stays NaN, as in torch.relu
    elif ACTIVATION == 4:
        return z * tl.sigmoid(z)
    else:
        return z


@triton.jit
def _activation_backward(grad, z, ACTIVATION: tl.constexpr):
    """grad * act'(z); relu selects grad or 0 as torch's relu backward does (0 where z <= 0 even for an infinite
    grad; grad where z is NaN)."""
    if ACTIVATION == 1:
        return grad * (0.5 * (1.0 + tl.erf(z * inv_sqrt2())) + z * tl.exp(-0.5 * z * z) * inv_sqrt_2pi())
    elif ACTIVATION == 2:
        s, slope = _gelu_tanh_sigmoid(z)
        # z * z capped where the slope is long 0: it overflows from |z| = 1.85e19 on, and 0 * inf is NaN where the
        # float64 reference has a number (an infinite z still gives inf * 0 = NaN, as the reference does)
        z2 = tl.minimum(z * z, 1e20)
        return grad * (s + 2.0 * z * slope * (1.0 + z2 * gelu_tanh_cubic() * 3.0) * sqrt_2_over_pi())
    elif ACTIVATION == 3:
        return tl.where(z <= 0.0, 0.0, grad)
    elif ACTIVATION == 4:
        s = tl.sigmoid(z)
        return grad * (s * (1.0 + z * (1.0 - s)))
    else:
        return grad


@triton.jit
def _dropout_multiplier(seed_ptr, row0, col0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, threshold, keep_scale):
    """(BLOCK_M, BLOCK_N) float32 over rows row0.. and columns col0..: keep_scale where the element is kept,
    else 0 (z = 0 for MLPs)."""
    k0, k1 = philox_key(seed_ptr)
    z = tl.zeros((), dtype=tl.int64)
    keep = dropout_keep(k0, k1, z, row0, col0, BLOCK_M, BLOCK_N, threshold)
    return tl.where(keep, keep_scale, 0.0)


@triton.jit
def _gemm_kernel(a_ptr, b_ptr, a_desc, b_desc, c_ptr, bias_ptr, preact_ptr, seed_ptr, M, N, K,
                 stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_pm, gate_offset,
                 threshold, keep_scale,
                 HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PREACT: tl.constexpr,
                 DROPOUT: tl.constexpr, GATED: tl.constexpr, INPUT_PRECISION: tl.constexpr, A_T: tl.constexpr,
                 B_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr, TMA: tl.constexpr):
    """c (M, N) = epilogue(a (M, K) @ b (K, N)).

    GATED: b's columns [gate_offset, gate_offset + N) are the up projection (bias[gate_offset:] its bias);
    the output is act(g) * u and preact holds g at column j and u at column N + j. Otherwise act(z).
    Epilogue order: + bias, store preact, activation (gated product), dropout, cast to c's dtype.
    TMA: a and b are read through the tensor descriptors a_desc (over a, or over a^T (K, M) when A_T) and
    b_desc (over b, or over b^T (N + gate_offset, K) when B_T), and each program loops over the output tiles
    tile = program_id, program_id + num_programs, ... (persistent); otherwise one tile per program, read
    through a_ptr and b_ptr with their strides.
    """
    if TMA:
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            _gemm_tile(tile, a_ptr, b_ptr, a_desc, b_desc, c_ptr, bias_ptr, preact_ptr, seed_ptr, M, N, K,
                       stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_pm, gate_offset, threshold,
                       keep_scale, HAS_BIAS, ACTIVATION, STORE_PREACT, DROPOUT, GATED, INPUT_PRECISION, A_T, B_T,
                       BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, TMA)
    else:
        _gemm_tile(tl.program_id(0), a_ptr, b_ptr, a_desc, b_desc, c_ptr, bias_ptr, preact_ptr, seed_ptr, M, N, K,
                   stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_pm, gate_offset, threshold,
                   keep_scale, HAS_BIAS, ACTIVATION, STORE_PREACT, DROPOUT, GATED, INPUT_PRECISION, A_T, B_T,
                   BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, TMA)


@triton.jit
def _gemm_tile(tile, a_ptr, b_ptr, a_desc, b_desc, c_ptr, bias_ptr, preact_ptr, seed_ptr, M, N, K,
               stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_pm, gate_offset, threshold, keep_scale,
               HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PREACT: tl.constexpr, DROPOUT: tl.constexpr,
               GATED: tl.constexpr, INPUT_PRECISION: tl.constexpr, A_T: tl.constexpr, B_T: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
               TMA: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) output tile of _gemm_kernel. Tiles walk the output in GROUP_M-row bands."""
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    band = GROUP_M * grid_n
    first_m = (tile // band) * GROUP_M
    group_rows = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % band) % group_rows
    pid_n = (tile % band) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < M
    col_in = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if TMA:  # out-of-range rows and columns of a descriptor's tile read 0
        for k0 in range(0, K, BLOCK_K):
            if A_T:
                a = a_desc.load([k0, pid_m * BLOCK_M]).T
            else:
                a = a_desc.load([pid_m * BLOCK_M, k0])
            if B_T:
                b = b_desc.load([pid_n * BLOCK_N, k0]).T
            else:
                b = b_desc.load([k0, pid_n * BLOCK_N])
            acc = dot(a, b, acc, INPUT_PRECISION)
            if GATED:
                if B_T:
                    b_up = b_desc.load([gate_offset + pid_n * BLOCK_N, k0]).T
                else:
                    b_up = b_desc.load([k0, gate_offset + pid_n * BLOCK_N])
                acc_up = dot(a, b_up, acc_up, INPUT_PRECISION)
    else:
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + ks.to(tl.int64)[None, :] * stride_ak
        b_ptrs = b_ptr + ks.to(tl.int64)[:, None] * stride_bk + cols.to(tl.int64)[None, :] * stride_bn
        up_offset = tl.cast(gate_offset, tl.int64) * stride_bn  # 64-bit: F * K elements when b is W^T
        # 64-bit steps: a row stride of 2^25 elements (x = h[:, 0] of a long sequence) times BLOCK_K is 2^31
        a_step = BLOCK_K * tl.cast(stride_ak, tl.int64)
        b_step = BLOCK_K * tl.cast(stride_bk, tl.int64)
        for k0 in range(0, K, BLOCK_K):
            k_in = ks < K - k0
            a = tl.load(a_ptrs, mask=row_in[:, None] & k_in[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_in[:, None] & col_in[None, :], other=0.0)
            acc = dot(a, b, acc, INPUT_PRECISION)
            if GATED:
                b_up = tl.load(b_ptrs + up_offset, mask=k_in[:, None] & col_in[None, :], other=0.0)
                acc_up = dot(a, b_up, acc_up, INPUT_PRECISION)
            a_ptrs += a_step
            b_ptrs += b_step

    out_mask = row_in[:, None] & col_in[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(bias_ptr + gate_offset + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    if STORE_PREACT:
        p_ptrs = preact_ptr + rows.to(tl.int64)[:, None] * stride_pm + cols[None, :]
        tl.store(p_ptrs, acc.to(preact_ptr.dtype.element_ty), mask=out_mask)
        if GATED:
            tl.store(p_ptrs + N, acc_up.to(preact_ptr.dtype.element_ty), mask=out_mask)
    h = _activate(acc, ACTIVATION)
    if GATED:
        h = h * acc_up
    if DROPOUT:
        h = h * _dropout_multiplier(seed_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, BLOCK_M, BLOCK_N, threshold, keep_scale)
    c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :]
    tl.store(c_ptrs, h.to(c_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _grad_preact_kernel(dy_ptr, preact_ptr, dz_ptr, seed_ptr, M, N, stride_dym, threshold, keep_scale,
                        ACTIVATION: tl.constexpr, DROPOUT: tl.constexpr, GATED: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dz = dy * dropout * act'(z), (M, N). GATED: preact and dz are (M, 2N) [gate, up]; with
    h = dy * dropout, dg = h * u * act'(g) goes to column j and du = h * act(g) to column N + j."""
    row0, col0 = tl.program_id(0) * BLOCK_M, tl.program_id(1) * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    row_offsets = rows.to(tl.int64)[:, None]
    dh = tl.load(dy_ptr + row_offsets * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if DROPOUT:
        dh = dh * _dropout_multiplier(seed_ptr, row0, col0, BLOCK_M, BLOCK_N, threshold, keep_scale)
    width = 2 * N if GATED else N
    z_ptrs = preact_ptr + row_offsets * width + cols[None, :]
    dz_ptrs = dz_ptr + row_offsets * width + cols[None, :]
    if ACTIVATION == 0 and not GATED:  # identity: nothing stored in preact, act' = 1
        tl.store(dz_ptrs, dh.to(dz_ptr.dtype.element_ty), mask=mask)
        return
    z = tl.load(z_ptrs, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        u = tl.load(z_ptrs + N, mask=mask, other=0.0).to(tl.float32)
        tl.store(dz_ptrs, _activation_backward(dh * u, z, ACTIVATION).to(dz_ptr.dtype.element_ty), mask=mask)
        tl.store(dz_ptrs + N, (dh * _activate(z, ACTIVATION)).to(dz_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(dz_ptrs, _activation_backward(dh, z, ACTIVATION).to(dz_ptr.dtype.element_ty), mask=mask)


GRAD_BLOCK = 64  # 64x64 elementwise tiles: 4096 elements per program, enough work to hide the Philox cost


# Products of at least this many multiply-adds (M * N * K) are autotuned, once per size class (tuning.py).
AUTOTUNE_MIN_WORK = 1 << 30


def _gemm_size_class(args):
    """The size class of a GEMM launch: M, N and K each rounded up to a power of 2. The token count is M (or K,
    for dW) and varies from call to call (prompts, packed batches); exact sizes would time every new one."""
    return tuple(next_power_of_2(args[n]) for n in ("M", "N", "K"))


_GEMM_CONFIGS, _GEMM_FALLBACK = _gemm_configs()
# Exact float32 dots ("ieee", no tensor cores) unroll into fused multiply-adds in registers. The gated GEMM's two
# accumulators past this many elements a thread compile to 32 registers and 27-80 KB of spill stores (ptxas,
# sm_90, gated GELU-tanh + dropout + bias: 128x128x32 40164 bytes, 64x128x64 32056); 64x64x64 and the fallback
# 64x64x32 spill none. The plain GEMM spills at most 1.8 KB in any config.
FMA_GATED_ACCUMULATOR_ELEMENTS = 64
_gemm_has_descriptors = needs_descriptors("a_desc", "b_desc")


def _gemm_usable(config, args):
    """Whether a listed config may run: TMA ones where the launch has tensor descriptors, and for exact float32
    gated GEMMs those within FMA_GATED_ACCUMULATOR_ELEMENTS a thread."""
    kw = config.kwargs
    accumulators_spill = (args["INPUT_PRECISION"] == "ieee" and args["GATED"] and 2 * kw["BLOCK_M"] * kw["BLOCK_N"]
                          > FMA_GATED_ACCUMULATOR_ELEMENTS * 32 * config.num_warps)
    return not accumulators_spill and _gemm_has_descriptors(config, args)


_GRAD_PREACT = ReplayedLaunches(_grad_preact_kernel)
# The key names every constexpr but the tile's: the epilogue changes a config's registers and so its speed.
_GEMM = TunedKernel(_gemm_kernel, _GEMM_CONFIGS, ["HAS_BIAS", "ACTIVATION", "STORE_PREACT", "DROPOUT", "GATED",
                                                 "INPUT_PRECISION", "A_T", "B_T"],
                    _shared_memory_bytes, min_work=AUTOTUNE_MIN_WORK, probe="a_ptr", fallback=_GEMM_FALLBACK,
                    usable=_gemm_usable, size_class=_gemm_size_class)
TUNED_KERNELS = {"gemm": _GEMM}  # as attention's: by the name the benchmark table gives their tiles
# Programs of a persistent (TMA) launch off the GPU, where there are no SMs to count: few, so that the
# interpreter's programs each take several tiles.
PERSISTENT_PROGRAMS_OFF_GPU = 3


def _dropout_args(dropout_p):
    return dropout_threshold(dropout_p), dropout_keep_scale(dropout_p)


def _persistent_programs(device):
    if device.type != "cuda":
        return PERSISTENT_PROGRAMS_OFF_GPU
    return torch.cuda.get_device_properties(device).multi_processor_count


def _matrix_descriptor(t, rows, cols, transposed):
    """A tensor descriptor over the (rows, cols) matrix t, or over t^T (cols, rows) when `transposed` (then
    t's rows are contiguous); None where TMA cannot read it (tuning.descriptor)."""
    view = t.t() if transposed else t  # the stored row-major matrix
    return descriptor(view, [cols, rows] if transposed else [rows, cols], view.stride())


def _gemm(a, b, c, *, bias=None, preact=None, seed=None, activation="none", dropout_p=0.0,
          gated=False, gate_offset=0):
    """Launches _gemm_kernel: c (M, N) = epilogue(a (M, K) @ b (K, N)); a and b are any strided views
    (gated: b's up columns follow at gate_offset)."""
    M, K = a.shape
    N = c.shape[1]
    threshold, keep_scale = _dropout_args(dropout_p)
    a_t, b_t = a.stride(0) == 1 and a.stride(1) != 1, b.stride(0) == 1 and b.stride(1) != 1
    a_desc = b_desc = None
    if _GEMM.may_read_descriptors(M * N * K) and tensor_descriptors_supported(a.device):
        a_desc = _matrix_descriptor(a, M, K, a_t)
        b_desc = _matrix_descriptor(b, K, N + gate_offset, b_t)
    if a_desc is None or b_desc is None:
        a_desc, b_desc = a, b  # placeholders: only TMA configs read them, and those need descriptors
    tiles = lambda meta: cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])  # noqa: E731
    grid = lambda meta: (min(tiles(meta), _persistent_programs(a.device)) if meta["TMA"] else tiles(meta),)  # noqa: E731
    args = (a, b, a_desc, b_desc, c, bias if bias is not None else c, preact if preact is not None else c,
            seed if seed is not None else c, M, N, K,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0),
            preact.stride(0) if preact is not None else 0, gate_offset, threshold, keep_scale)
    constexprs = dict(HAS_BIAS=bias is not None, ACTIVATION=ACTIVATION_CODES[activation],
                      STORE_PREACT=preact is not None, DROPOUT=dropout_p > 0.0, GATED=gated,
                      INPUT_PRECISION=dot_precision(a.dtype), A_T=a_t, B_T=b_t)
    with device_guard(a):
        _GEMM.launch(grid, M * N * K, args, constexprs)


def _contiguous_bias(bias):
    """The epilogue reads the bias with unit stride."""
    return bias.contiguous() if bias is not None else None


def linear_forward(x, weight, bias, activation, dropout_p, seed):
    """x (M, K), weight (N, K) -> (out (M, N), preact (M, N) or (0,) when activation == "none")."""
    bias = _contiguous_bias(bias)
    M, N = x.shape[0], weight.shape[0]
    out = x.new_empty(M, N)
    preact = x.new_empty(M, N) if activation != "none" else x.new_empty(0)
    _gemm(x, weight.t(), out, bias=bias, preact=preact if activation != "none" else None, seed=seed,
          activation=activation, dropout_p=dropout_p)
    return out, preact


def gated_forward(x, weight, bias, activation, dropout_p, seed):
    """x (M, K), weight (2F, K) = [gate; up] -> (out (M, F), gate_up (M, 2F))."""
    bias = _contiguous_bias(bias)
    M, F = x.shape[0], weight.shape[0] // 2
    out = x.new_empty(M, F)
    gate_up = x.new_empty(M, 2 * F)
    _gemm(x, weight[:F].t(), out, bias=bias, preact=gate_up, seed=seed, activation=activation,
          dropout_p=dropout_p, gated=True, gate_offset=F)
    return out, gate_up


def _grad_preact(grad_out, preact, activation, dropout_p, seed, gated):
    """dz (M, width) in grad_out's dtype; width = N, or 2F for the gated [dg, du]. The kernel reads grad_out's
    rows with unit column stride and preact as a contiguous (M, width) matrix."""
    if grad_out.stride(1) != 1:
        grad_out = grad_out.contiguous()
    preact = preact.contiguous()
    M, N = grad_out.shape
    dz = grad_out.new_empty(M, 2 * N if gated else N)
    threshold, keep_scale = _dropout_args(dropout_p)
    grid = (cdiv(M, GRAD_BLOCK), cdiv(N, GRAD_BLOCK))
    with device_guard(grad_out):
        _GRAD_PREACT.launch(grid, (grad_out, preact, dz, seed, M, N, grad_out.stride(0), threshold, keep_scale),
                            dict(ACTIVATION=ACTIVATION_CODES[activation], DROPOUT=dropout_p > 0.0, GATED=gated,
                                 BLOCK_M=GRAD_BLOCK, BLOCK_N=GRAD_BLOCK))
    return dz


def _weight_grads(dz, x, weight, needs_x, needs_weight, needs_bias):
    """grad_x = dz @ W (M, K), grad_weight = dz^T @ x (N, K) and grad_bias = column sums of dz (N,), each where
    needed (else an empty (0,) tensor)."""
    M, K = x.shape
    N = weight.shape[0]
    grad_x, grad_weight, grad_bias = (x.new_empty(0) for _ in range(3))  # three tensors: outputs never alias
    if needs_x:
        grad_x = x.new_empty(M, K)
        _gemm(dz, weight, grad_x)
    if needs_weight:
        grad_weight = weight.new_empty(N, K)
        if K:
            _gemm(dz.t(), x, grad_weight)
    if needs_bias:
        grad_bias = dz.sum(0, dtype=torch.float32).to(x.dtype)
    return grad_x, grad_weight, grad_bias


def linear_backward(grad_out, x, weight, preact, activation, dropout_p, seed, *needs):
    """-> (grad_x (M, K), grad_weight (N, K), grad_bias (N,)); needs: needs_x, needs_weight, needs_bias."""
    if activation == "none" and dropout_p == 0.0:
        dz = grad_out
    else:
        dz = _grad_preact(grad_out, preact, activation, dropout_p, seed, gated=False)
    return _weight_grads(dz, x, weight, *needs)


def gated_backward(grad_out, x, weight, gate_up, activation, dropout_p, seed, *needs):
    """-> (grad_x (M, K), grad_weight (2F, K), grad_bias (2F,)); needs: needs_x, needs_weight, needs_bias."""
    dgu = _grad_preact(grad_out, gate_up, activation, dropout_p, seed, gated=True)  # (M, 2F)
    return _weight_grads(dgu, x, weight, *needs)
