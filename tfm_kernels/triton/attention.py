"""Fused attention in Triton, forward and backward (FlashAttention-2 style).

Forward: one program per (BLOCK_M query rows, batch*head); it streams BLOCK_N key/value blocks through an
online softmax in float32 (exp2, with log2(e) folded into the scale), never writing an L x S matrix, and
saves the log-sum-exp of every row in base 2, the scores' units. Backward: a preprocessing pass delta =
rowsum(dO * O), then one program per (BLOCK_N keys, batch*kv-head) accumulating dK, dV over all query rows of
the kv head's query group (so grouped-query K/V are never repeated and no atomics are needed), and one program
per (BLOCK_M rows, batch*head) accumulating dQ. P is recomputed from the saved log-sum-exp. On Hopper and
newer every kernel also has TMA configs, which read the streamed tiles (forward and dQ: K, V; dK/dV: Q, dO)
through 4-D tensor descriptors instead of pointer tiles, with fewer registers; autotuning decides whether
they run.

Masking, in every kernel through `_masked_scores`: causal (key j visible to row i iff j <= i; key blocks above
the diagonal are skipped, only the diagonal blocks are masked), key_lengths (keys j >= key_lengths[b]),
attn_mask tiles (bool: True takes part; floating: added to the scaled scores) read through arbitrary strides.
Dropout keeps element (b * Hq + h, i, j) by the shared Philox scheme (tfm_kernels/triton/philox.py), so
forward and backward draw the same mask without storing it. Layout contract: csrc/ops.cpp.

Head dims are padded to a power of two >= 16 with masked loads. Batch/head offsets are 64-bit; in-tile offsets
stay 32-bit and pointers advance block by block. Problems of at least AUTOTUNE_MIN_WORK score elements
autotune over a short Hopper config list (once per head dims, causal, mask kind, dropout, dtype, layout and
power-of-2 class of the sequence lengths); smaller ones, and every call with TFM_KERNELS_AUTOTUNE=0, take the
first listed config that fits.
Tests: tests/test_attention.py, tests/test_attention_ops.py, tests/test_tuning.py (every config).
"""

import torch
import triton
import triton.language as tl

from ..backends import triton_interpreting
from ..layout import empty_heads_inner, last_dim_contiguous
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


# Constants as constexpr functions, not constexpr globals: philox.py says why.
@triton.constexpr_function
def log2e():
    return 1.4426950408889634


@triton.constexpr_function
def mask_floor():
    """The lowest scaled additive mask value (base-2 logits); csrc/cpu/attention_scores.cpp says why."""
    return -(2.0**127)


MASK_NONE, MASK_BOOL, MASK_ADDITIVE = 0, 1, 2

# Problems of at least this much work (B * H * L * S score elements) are autotuned (tuning.py).
AUTOTUNE_MIN_WORK = 1 << 26
# The tile estimate of _tile_shared_bytes for tensor-core dots leaves out the layout-conversion scratch (Triton
# 3.8, sm_90a, head dim 256: 8.2 KiB for dK/dV 64x64); this margin, added to it, covers that. Hopper: 227 - 27 =
# 200 KiB of tiles; Ampere: 163 - 27 = 136 KiB; sm_86/sm_89: 99 - 27 = 72 KiB.
SHARED_MEMORY_MARGIN = 27 * 1024


# ---------------------------------------------------------------------------------------------------------
# Shared pieces


@triton.jit
def _load_tile(ptrs, dim0_ok, dim1_ok, CHECK0: tl.constexpr, CHECK1: tl.constexpr):
    """Loads a 2-D tile, 0 where a checked dimension is out of range (unchecked ones are known in range)."""
    if CHECK0 and CHECK1:
        return tl.load(ptrs, mask=dim0_ok & dim1_ok, other=0.0)
    elif CHECK0:
        return tl.load(ptrs, mask=dim0_ok, other=0.0)
    elif CHECK1:
        return tl.load(ptrs, mask=dim1_ok, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _masked_scores(s, rows, cols, row0, col0, col_end, mask_bh, stride_ml, stride_ms, L, S,
                   MASK_KIND: tl.constexpr, APPLY_CAUSAL: tl.constexpr, APPLY_COL_END: tl.constexpr):
    """Scores tile s (log2 units) with every mask applied: -inf where key `cols` takes no part in row `rows`.

    rows, cols: int32 tensors broadcasting to s's shape, either orientation ((M, 1) x (1, N) or transposed);
    row0, col0: the tile's first row and column. mask_bh: the attn_mask pointer at this batch and head."""
    if MASK_KIND != 0:
        # 64-bit offset of the tile, 32-bit offsets inside it: a tile of 64-bit pointers costs 64 registers.
        mask_tile = mask_bh + tl.cast(row0, tl.int64) * stride_ml + tl.cast(col0, tl.int64) * stride_ms
        mask_ptrs = mask_tile + ((rows - row0) * stride_ml + (cols - col0) * stride_ms)
        in_bounds = (rows < L) & (cols < S)
        if MASK_KIND == 1:
            takes_part = tl.load(mask_ptrs, mask=in_bounds, other=0) != 0
            s = tl.where(takes_part, s, float("-inf"))
        else:
            additive = tl.load(mask_ptrs, mask=in_bounds, other=0.0).to(tl.float32)
            # finfo.min * log2(e) overflows to -inf (no key): finite masks stay finite, as in torch; -inf stays.
            s = s + tl.where(additive > float("-inf"), tl.maximum(additive * log2e(), mask_floor()), additive)
    if APPLY_CAUSAL:
        s = tl.where(cols <= rows, s, float("-inf"))
    if APPLY_COL_END:
        s = tl.where(cols < col_end, s, float("-inf"))
    return s


@triton.jit
def _key_end(KeyLengths, b, S, HAS_KEY_LENGTHS: tl.constexpr):
    """One past the last key that can take part for batch b: min(S, key_lengths[b]), at least 0."""
    if HAS_KEY_LENGTHS:
        length = tl.load(KeyLengths + b).to(tl.int64)
        return tl.minimum(tl.maximum(length, 0), S).to(tl.int32)
    else:
        return S


@triton.jit
def _key_blocks(m_start, col_end, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For query rows [m_start, m_start + BLOCK_M): keys [0, full_end) need no per-element masking (whole
    blocks, all visible), keys [full_end, end) are the diagonal/boundary blocks; keys >= end are skipped."""
    if IS_CAUSAL:
        end = tl.minimum(col_end, m_start + BLOCK_M)
        # A key block is entirely visible once its last key j satisfies j <= m_start.
        full_end = tl.minimum((m_start + 1) // BLOCK_N * BLOCK_N, col_end // BLOCK_N * BLOCK_N)
    else:
        end = col_end
        full_end = col_end // BLOCK_N * BLOCK_N
    return full_end, end


# The tiles each kernel's TMA configs read through tensor descriptors: argument -> (rows, columns) of its
# block and the launch's constexpr that says its layout: each tile is of one (batch, head) of a (B, H, N, D)
# tensor stored (B, H, N, D), or (B, N, H, D) where that flag is set (heads inside rows: the layout of
# projections and of this module's outputs).
FORWARD_DESCRIPTORS = {"KDesc": ("BLOCK_N", "BLOCK_D", "K_HEADS_INNER"),
                       "VDesc": ("BLOCK_N", "BLOCK_DV", "V_HEADS_INNER")}
BACKWARD_KV_DESCRIPTORS = {"QDesc": ("BLOCK_M", "BLOCK_D", "Q_HEADS_INNER"),
                           "GradOutDesc": ("BLOCK_M", "BLOCK_DV", "DO_HEADS_INNER")}
BACKWARD_Q_DESCRIPTORS = FORWARD_DESCRIPTORS


def _config(block_m, block_n, num_warps, num_stages, descriptors, tma=False):
    """A tile config; with tma, the tiles named in `descriptors` load through tensor descriptors (Hopper and
    newer), whose block shapes its pre_hook sets (without, the placeholder block shape: unread_descriptors)."""
    def set_descriptor_blocks(args):
        for name, (rows, cols, heads_inner) in descriptors.items():
            rows, cols = args[rows], args[cols]
            args[name].block_shape = [1, rows, 1, cols] if args[heads_inner] else [1, 1, rows, cols]

    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "TMA": tma}, num_warps=num_warps,
                         num_stages=num_stages,
                         pre_hook=set_descriptor_blocks if tma else unread_descriptors(*descriptors))


def _config_lists(hopper_configs, fallback, interpreter_config):
    """(configs, fallback). The interpreter runs on CPU and cannot autotune more than one config."""
    if triton_interpreting():
        return [interpreter_config], interpreter_config
    return hopper_configs, fallback


# Tile configs for Hopper (sm_90a), few so that autotuning compiles little. The first config that fits shared memory is
# the default for problems too small to autotune; the fallback is used where none fits (float32 with TF32 at head dim
# 256) and for float32 without TF32 (_listed_configs_usable). Register use by ptxas (Triton 3.8, sm_90a, bf16, head dim
# 128, no mask or dropout): forward 128x64 with 8 warps 230 registers and no spills; dK/dV 32x128 255 registers, 4 bytes
# spilled; dQ 128x64 235, none. With every feature on (additive mask, causal, dropout, key lengths) all configs reach
# 255 registers and spill, in bytes stored: forward 128x64 1292, 128x128 1328, 64x64 1692, 64x32 28; dK/dV 32x128 456,
# 64x128 1204, 64x64 896, 16x64 372; dQ 128x64 112, 64x64 384, 64x32 none. Forward 128x128 spills most at small head
# dims (same features: 3476 at 16, 8244 at 40, 4568 at 64); head dim 40 (strides not multiples of 16 elements, so no
# asynchronous copies) spills in every config but the smallest (forward 128x64 1500, 64x64 3272).
# The TMA configs read the streamed tiles through tensor descriptors where the device and layouts allow them
# (autotuning decides whether they run).
# Forward: BLOCK_M query rows resident (128 keeps the wgmma M dimension full), BLOCK_N keys streamed.
FORWARD_CONFIGS, FORWARD_FALLBACK = _config_lists(
    [_config(128, 64, 8, 3, FORWARD_DESCRIPTORS), _config(128, 128, 8, 2, FORWARD_DESCRIPTORS),
     _config(64, 64, 4, 3, FORWARD_DESCRIPTORS), _config(64, 32, 4, 2, FORWARD_DESCRIPTORS),
     _config(128, 64, 8, 3, FORWARD_DESCRIPTORS, tma=True), _config(128, 128, 8, 2, FORWARD_DESCRIPTORS, tma=True)],
    _config(32, 32, 4, 1, FORWARD_DESCRIPTORS), _config(32, 16, 4, 1, FORWARD_DESCRIPTORS))
# dK/dV: BLOCK_N keys resident while BLOCK_M query rows stream past.
BACKWARD_KV_CONFIGS, BACKWARD_KV_FALLBACK = _config_lists(
    [_config(32, 128, 8, 2, BACKWARD_KV_DESCRIPTORS), _config(64, 128, 8, 2, BACKWARD_KV_DESCRIPTORS),
     _config(64, 64, 8, 2, BACKWARD_KV_DESCRIPTORS), _config(16, 64, 4, 3, BACKWARD_KV_DESCRIPTORS),
     _config(32, 128, 8, 2, BACKWARD_KV_DESCRIPTORS, tma=True),
     _config(64, 128, 8, 2, BACKWARD_KV_DESCRIPTORS, tma=True)],
    _config(16, 32, 4, 1, BACKWARD_KV_DESCRIPTORS), _config(16, 32, 4, 1, BACKWARD_KV_DESCRIPTORS))
# dQ: BLOCK_M query rows resident while BLOCK_N keys stream past.
BACKWARD_Q_CONFIGS, BACKWARD_Q_FALLBACK = _config_lists(
    [_config(128, 64, 8, 2, BACKWARD_Q_DESCRIPTORS), _config(64, 64, 4, 3, BACKWARD_Q_DESCRIPTORS),
     _config(64, 32, 4, 2, BACKWARD_Q_DESCRIPTORS), _config(128, 64, 8, 2, BACKWARD_Q_DESCRIPTORS, tma=True),
     _config(64, 64, 4, 3, BACKWARD_Q_DESCRIPTORS, tma=True)],
    _config(32, 16, 4, 1, BACKWARD_Q_DESCRIPTORS), _config(32, 16, 4, 1, BACKWARD_Q_DESCRIPTORS))
AUTOTUNE_KEY = ["BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "MASK_KIND", "HAS_DROPOUT", "DOT_PRECISION"]
# Sequence lengths are tuned in power-of-2 classes up to this length; longer ones share its class.
LONGEST_SEQUENCE_CLASS = 16384


def _sequence_class(args):
    """The size class of an attention launch: its query and key lengths, each rounded up to a power of 2 (at
    most LONGEST_SEQUENCE_CLASS). A kernel's loop runs over one of them and its grid over the other, and the
    tiles and pipeline depth that pay differ between a short loop and a long one."""
    return tuple(next_power_of_2(min(args[n], LONGEST_SEQUENCE_CLASS)) for n in ("L", "S"))


@triton.jit
def _program_ids(num_row_blocks, REVERSE: tl.constexpr):
    """(row block, batch*head) of this program from a 1-D grid (a 1-D grid has no 65535 limit on the head
    count). Row blocks vary fastest, so neighbouring programs share K/V in L2. REVERSE starts with the last
    row blocks, the most work under a causal mask, so the tail of the launch is short."""
    pid = tl.program_id(0)
    block = pid % num_row_blocks
    if REVERSE:
        block = num_row_blocks - 1 - block
    return block, pid // num_row_blocks


@triton.jit
def _query_block_program(L, H, GROUP, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """A program owning BLOCK_M query rows of one (batch, head): b, and as int64 h, its kv head h // GROUP
    and the flat batch*head index b * H + h (also the dropout z); plus the first row."""
    pid_m, pid_bh = _program_ids(tl.cdiv(L, BLOCK_M), IS_CAUSAL)
    b = pid_bh // H
    h = pid_bh % H
    return b, h.to(tl.int64), (h // GROUP).to(tl.int64), pid_bh.to(tl.int64), pid_m * BLOCK_M


@triton.jit
def _dropout_key(Seed, HAS_DROPOUT: tl.constexpr):
    """The Philox key of this call's seed when dropout is on (unused placeholders otherwise)."""
    if HAS_DROPOUT:
        return philox_key(Seed)
    else:
        return 0, 0


@triton.jit
def _descriptor_tile(desc, b, h, row, ROWS: tl.constexpr, COLS: tl.constexpr, HEADS_INNER: tl.constexpr):
    """The (ROWS, COLS) tile at `row` of head h of batch b, through a 4-D descriptor over (B, H, N, D) memory,
    or over (B, N, H, D) memory when HEADS_INNER; rows past N and head-dim padding read 0."""
    if HEADS_INNER:
        tile = desc.load([b, row, h, 0])
    else:
        tile = desc.load([b, h, row, 0])
    return tile.reshape(ROWS, COLS)


# ---------------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _forward_steps(acc, l_i, m_i, q, k_ptrs, v_ptrs, k_desc, v_desc, b, kv_h, lo, hi, rows, row0, offs_n, d_ok,
                   dv_ok, col_end, mask_bh, stride_ml, stride_ms, stride_kn, stride_vn, L, S, scale_log2, k0, k1, z,
                   threshold, MASK_KIND: tl.constexpr, APPLY_CAUSAL: tl.constexpr, BOUNDARY: tl.constexpr,
                   HAS_DROPOUT: tl.constexpr, CHECK_D: tl.constexpr, CHECK_DV: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DV: tl.constexpr, TMA: tl.constexpr, K_HEADS_INNER: tl.constexpr,
                   V_HEADS_INNER: tl.constexpr):
    """Online-softmax steps over key blocks [lo, hi). k_ptrs (BLOCK_D, BLOCK_N) and v_ptrs (BLOCK_N, BLOCK_DV)
    point at key lo; with TMA the tiles come from k_desc and v_desc at (b, kv_h) instead, keys past S and
    head-dim padding reading 0 and V rows past col_end zeroed. BOUNDARY: the blocks may hold keys >= col_end
    (masked loads and scores)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n[None, :]  # (1, BLOCK_N)
        col_ok = cols < col_end
        if TMA:
            k = _descriptor_tile(k_desc, b, kv_h, start_n, BLOCK_N, BLOCK_D, K_HEADS_INNER).T  # (BLOCK_D, BLOCK_N)
        else:
            k = _load_tile(k_ptrs, d_ok[:, None], col_ok, CHECK_D, BOUNDARY)  # (BLOCK_D, BLOCK_N)
        s = dot(q, k, None, DOT_PRECISION) * scale_log2  # (BLOCK_M, BLOCK_N)
        s = _masked_scores(s, rows, cols, row0, start_n, col_end, mask_bh, stride_ml, stride_ms, L, S,
                           MASK_KIND, APPLY_CAUSAL, BOUNDARY)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no visible key so far keeps m = -inf; shifting by 0 keeps its p and alpha at 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            p = tl.where(dropout_keep(k0, k1, z, row0, start_n, q.shape[0], BLOCK_N, threshold), p, 0.0)
        if TMA:
            v = _descriptor_tile(v_desc, b, kv_h, start_n, BLOCK_N, BLOCK_DV, V_HEADS_INNER)  # (BLOCK_N, BLOCK_DV)
            if BOUNDARY:  # rows past key_lengths hold whatever the caller left there (NaN * 0 would be NaN)
                v = tl.where((start_n + offs_n)[:, None] < col_end, v, 0.0)
        else:
            v = _load_tile(v_ptrs, (start_n + offs_n)[:, None] < col_end, dv_ok[None, :], BOUNDARY, CHECK_DV)
        acc = dot(p.to(v.dtype), v, acc, DOT_PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["L", "S"])
def _forward_kernel(Q, K, V, KDesc, VDesc, Out, Lse, Mask, KeyLengths, Seed, stride_qb, stride_qh, stride_qm,
                    stride_kb,
                    stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                    stride_mb, stride_mh, stride_ml, stride_ms, H, GROUP, L, S, scale_log2, threshold,
                    inv_keep, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_DV: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                    HAS_KEY_LENGTHS: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr, K_HEADS_INNER: tl.constexpr,
                    V_HEADS_INNER: tl.constexpr):
    b, h64, kv_h64, bh64, m_start = _query_block_program(L, H, GROUP, IS_CAUSAL, BLOCK_M)
    kv_h = kv_h64.to(tl.int32)  # a descriptor coordinate
    b64 = b.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = m_start + offs_m[:, None]  # (BLOCK_M, 1)
    row_ok = rows < L
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V
    CHECK_D: tl.constexpr = BLOCK_D != HEAD_DIM
    CHECK_DV: tl.constexpr = BLOCK_DV != HEAD_DIM_V

    q_ptrs = (Q + b64 * stride_qb + h64 * stride_qh + m_start.to(tl.int64) * stride_qm
              + offs_m[:, None] * stride_qm + offs_d[None, :])
    q = _load_tile(q_ptrs, row_ok, d_ok[None, :], True, CHECK_D)  # (BLOCK_M, BLOCK_D)
    k_base = K + b64 * stride_kb + kv_h64 * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None]
    v_base = V + b64 * stride_vb + kv_h64 * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :]
    mask_bh = Mask + b64 * stride_mb + h64 * stride_mh
    k0, k1 = _dropout_key(Seed, HAS_DROPOUT)

    col_end = _key_end(KeyLengths, b, S, HAS_KEY_LENGTHS)
    full_end, end = _key_blocks(m_start, col_end, IS_CAUSAL, BLOCK_M, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc, l_i, m_i = _forward_steps(acc, l_i, m_i, q, k_base, v_base, KDesc, VDesc, b, kv_h, 0, full_end, rows,
                                   m_start, offs_n, d_ok, dv_ok, col_end, mask_bh, stride_ml, stride_ms, stride_kn,
                                   stride_vn, L, S, scale_log2, k0, k1, bh64, threshold, MASK_KIND, False, False,
                                   HAS_DROPOUT, CHECK_D, CHECK_DV, DOT_PRECISION, BLOCK_N, BLOCK_D, BLOCK_DV, TMA,
                                   K_HEADS_INNER, V_HEADS_INNER)
    k_diagonal = k_base + full_end.to(tl.int64) * stride_kn
    v_diagonal = v_base + full_end.to(tl.int64) * stride_vn
    acc, l_i, m_i = _forward_steps(acc, l_i, m_i, q, k_diagonal, v_diagonal, KDesc, VDesc, b, kv_h, full_end,
                                   end, rows, m_start, offs_n, d_ok, dv_ok, col_end, mask_bh, stride_ml, stride_ms,
                                   stride_kn, stride_vn, L, S, scale_log2, k0, k1, bh64, threshold, MASK_KIND,
                                   IS_CAUSAL, True, HAS_DROPOUT, CHECK_D, CHECK_DV, DOT_PRECISION, BLOCK_N, BLOCK_D,
                                   BLOCK_DV, TMA, K_HEADS_INNER, V_HEADS_INNER)

    # l == 0 exactly when no key takes part in the row: output 0, lse = +inf (its backward p is then 0).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out_scale = 1.0 / l_safe
    if HAS_DROPOUT:
        out_scale = out_scale * inv_keep
    out = acc * out_scale[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))  # base 2, as the scores
    o_ptrs = (Out + b64 * stride_ob + h64 * stride_oh + m_start.to(tl.int64) * stride_om
              + offs_m[:, None] * stride_om + offs_dv[None, :])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok & dv_ok[None, :])
    lse_ptrs = Lse + bh64 * L + m_start + offs_m
    tl.store(lse_ptrs, lse, mask=(m_start + offs_m) < L)


# ---------------------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _backward_delta_kernel(Out, GradOut, Delta, stride_ob, stride_oh, stride_om, stride_gb, stride_gh,
                           stride_gm, H, L, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                           BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] in float32: the rowsum(P * dP) of softmax's
    backward (dropout included, since O already carries the dropped and rescaled P).

    With exact float32 dots ("ieee") the sum is the diagonal of the dot dO O^T: the same fused multiply-adds in
    the same order as each dP = dO v^T of the other kernels, so a row whose weight is all on one key (O = v)
    gets dP - delta = 0 exactly, as softmax's backward gives, not the rounding of two differently ordered sums."""
    pid_m, pid_bh = _program_ids(tl.cdiv(L, BLOCK_M), False)
    b64 = (pid_bh // H).to(tl.int64)
    h64 = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    ok = (rows < L)[:, None] & (offs_dv < HEAD_DIM_V)[None, :]
    o = tl.load(Out + b64 * stride_ob + h64 * stride_oh + rows.to(tl.int64)[:,
                None] * stride_om + offs_dv[None, :],
                mask=ok, other=0.0).to(tl.float32)
    do = tl.load(GradOut + b64 * stride_gb + h64 * stride_gh + rows.to(tl.int64)[:, None] * stride_gm
                 + offs_dv[None, :], mask=ok, other=0.0).to(tl.float32)
    if DOT_PRECISION == "ieee":
        products = tl.dot(do, tl.trans(o), input_precision="ieee")  # (BLOCK_M, BLOCK_M)
        on_diagonal = tl.arange(0, BLOCK_M)[:, None] == tl.arange(0, BLOCK_M)[None, :]
        delta = tl.sum(tl.where(on_diagonal, products, 0.0), 1)
    else:
        delta = tl.sum(o * do, 1)
    tl.store(Delta + pid_bh.to(tl.int64) * L + rows, delta, mask=rows < L)


@triton.jit
def _backward_kv_steps(dk, dv, k, v, q_bh, do_bh, q_desc, do_desc, b, h, lse_bh, delta_bh, lo, hi, cols, col0,
                       offs_m, offs_d, offs_dv, d_ok, dv_ok, col_end, mask_bh, stride_ml, stride_ms, stride_qm,
                       stride_gm, L, S, scale_log2, k0, k1, z, threshold, inv_keep, MASK_KIND: tl.constexpr,
                       APPLY_CAUSAL: tl.constexpr, APPLY_COL_END: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                       CHECK_D: tl.constexpr, CHECK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, TMA: tl.constexpr,
                       Q_HEADS_INNER: tl.constexpr, DO_HEADS_INNER: tl.constexpr):
    """Accumulates dK, dV of the BLOCK_N keys `cols` (BLOCK_N, 1) over query blocks [lo, hi) of one head.
    Tiles are transposed, (keys, rows), so dK and dV accumulate without a transpose of the scores. With TMA
    the Q and dO tiles come from q_desc and do_desc at (b, h), rows past L reading 0."""
    lo64 = lo.to(tl.int64)
    qT_ptrs = q_bh + lo64 * stride_qm + offs_m[None, :] * stride_qm + offs_d[:, None]  # (BLOCK_D, BLOCK_M)
    do_ptrs = do_bh + lo64 * stride_gm + offs_m[:, None] * stride_gm + offs_dv[None, :]  # (BLOCK_M, BLOCK_DV)
    for start_m in range(lo, hi, BLOCK_M):
        row_ids = start_m + offs_m
        row_ok = row_ids < L
        rows = row_ids[None, :]  # (1, BLOCK_M)
        if TMA:
            qT = _descriptor_tile(q_desc, b, h, start_m, BLOCK_M, BLOCK_D, Q_HEADS_INNER).T  # (BLOCK_D, BLOCK_M)
        else:
            qT = _load_tile(qT_ptrs, d_ok[:, None], row_ok[None, :], CHECK_D, True)
        # Rows past L read lse = +inf, which makes their p exactly 0.
        lse_log2 = tl.load(lse_bh + row_ids, mask=row_ok, other=float("inf"))
        sT = dot(k, qT, None, DOT_PRECISION) * scale_log2  # (BLOCK_N, BLOCK_M)
        sT = _masked_scores(sT, rows, cols, start_m, col0, col_end, mask_bh, stride_ml, stride_ms, L, S,
                            MASK_KIND, APPLY_CAUSAL, APPLY_COL_END)
        # A masked score gives P = 0 and dS = 0 even in a row whose log-sum-exp is NaN (a NaN key it sees): the keys
        # no row sees keep zero gradients.
        pT = tl.where(sT == float("-inf"), 0.0, tl.math.exp2(sT - lse_log2[None, :]))
        if TMA:
            do = _descriptor_tile(do_desc, b, h, start_m, BLOCK_M, BLOCK_DV, DO_HEADS_INNER)  # (BLOCK_M, BLOCK_DV)
        else:
            do = _load_tile(do_ptrs, row_ok[:, None], dv_ok[None, :], True, CHECK_DV)
        dpT = dot(v, tl.trans(do), None, DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        if HAS_DROPOUT:
            keep = tl.trans(dropout_keep(k0, k1, z, start_m, col0, BLOCK_M, k.shape[0], threshold))  # (keys, rows)
            # A product, not a select: a dropped weight of a NaN row stays 0 * NaN = NaN in dV, as in the
            # reference and the C++ kernels (only keys a mask hides get P = 0 above).
            p_dropped = pT * tl.where(keep, inv_keep, 0.0)
            dpT = tl.where(keep, dpT * inv_keep, 0.0)
        else:
            p_dropped = pT
        dv = dot(p_dropped.to(do.dtype), do, dv, DOT_PRECISION)
        delta = tl.load(delta_bh + row_ids, mask=row_ok, other=0.0)
        dsT = tl.where(pT == 0.0, 0.0, pT * (dpT - delta[None, :]))
        dk = dot(dsT.to(qT.dtype), tl.trans(qT), dk, DOT_PRECISION)
        qT_ptrs += BLOCK_M * stride_qm
        do_ptrs += BLOCK_M * stride_gm
    return dk, dv


@triton.jit(do_not_specialize=["L", "S"])
def _backward_kv_kernel(Q, K, V, GradOut, QDesc, GradOutDesc, Lse, Delta, GradK, GradV, Mask, KeyLengths, Seed,
                        stride_qb,
                        stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                        stride_vn, stride_gb, stride_gh, stride_gm, stride_dkb, stride_dkh, stride_dkn,
                        stride_dvb, stride_dvh, stride_dvn, stride_mb, stride_mh, stride_ml, stride_ms, H,
                        GROUP, HEADS_PER_PROGRAM, L, S, scale, scale_log2, threshold, inv_keep,
                        HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DV: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                        HAS_KEY_LENGTHS: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr, Q_HEADS_INNER: tl.constexpr,
                        DO_HEADS_INNER: tl.constexpr):
    # A program owns BLOCK_N keys of one kv head and HEADS_PER_PROGRAM of its query heads: the whole group
    # (dK, dV final), or fewer where the group is split for parallelism (partial dK, dV per head slice).
    SLICES = H // HEADS_PER_PROGRAM
    pid_n, pid_slice = _program_ids(tl.cdiv(S, BLOCK_N), False)
    b = pid_slice // SLICES
    b64 = b.to(tl.int64)
    slice64 = (pid_slice % SLICES).to(tl.int64)
    first_h64 = slice64 * HEADS_PER_PROGRAM
    kv_h64 = first_h64 // GROUP
    n_start = pid_n * BLOCK_N
    n_start64 = n_start.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    cols = n_start + offs_n[:, None]  # (BLOCK_N, 1)
    col_in_s = cols < S
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V
    CHECK_D: tl.constexpr = BLOCK_D != HEAD_DIM
    CHECK_DV: tl.constexpr = BLOCK_DV != HEAD_DIM_V

    col_end = _key_end(KeyLengths, b, S, HAS_KEY_LENGTHS)
    # Keys past key_lengths[b] read as 0: whatever the caller left there (NaN * 0 is NaN) must not reach dK.
    col_ok = cols < col_end
    k_ptrs = (K + b64 * stride_kb + kv_h64 * stride_kh + n_start64 * stride_kn + offs_n[:, None] * stride_kn
              + offs_d[None, :])
    k = _load_tile(k_ptrs, col_ok, d_ok[None, :], True, CHECK_D)  # (BLOCK_N, BLOCK_D)
    v_ptrs = (V + b64 * stride_vb + kv_h64 * stride_vh + n_start64 * stride_vn + offs_n[:, None] * stride_vn
              + offs_dv[None, :])
    v = _load_tile(v_ptrs, col_ok, dv_ok[None, :], True, CHECK_DV)  # (BLOCK_N, BLOCK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    k0, k1 = _dropout_key(Seed, HAS_DROPOUT)

    if IS_CAUSAL:
        # Rows below n_start see none of these keys; from full_start on, every row sees all of them.
        start = n_start // BLOCK_M * BLOCK_M
        full_start = tl.cdiv(n_start + BLOCK_N - 1, BLOCK_M) * BLOCK_M
    else:
        start = n_start * 0
        full_start = n_start * 0
    # Keys past key_lengths[b] take part in no row: an empty range leaves dK = dV = 0.
    no_row = n_start >= col_end
    start = tl.where(no_row, L, start)
    full_start = tl.where(no_row, L, tl.minimum(full_start, L))
    for g in range(0, HEADS_PER_PROGRAM):
        h64 = first_h64 + g
        bh64 = b64 * H + h64
        q_bh = Q + b64 * stride_qb + h64 * stride_qh
        do_bh = GradOut + b64 * stride_gb + h64 * stride_gh
        mask_bh = Mask + b64 * stride_mb + h64 * stride_mh
        h = h64.to(tl.int32)  # a descriptor coordinate
        if IS_CAUSAL:
            dk, dv = _backward_kv_steps(dk, dv, k, v, q_bh, do_bh, QDesc, GradOutDesc, b, h, Lse + bh64 * L,
                                        Delta + bh64 * L, start, full_start, cols, n_start, offs_m, offs_d, offs_dv,
                                        d_ok, dv_ok, col_end, mask_bh, stride_ml, stride_ms, stride_qm, stride_gm,
                                        L, S, scale_log2, k0, k1, bh64, threshold, inv_keep, MASK_KIND, True,
                                        HAS_KEY_LENGTHS, HAS_DROPOUT, CHECK_D, CHECK_DV, DOT_PRECISION, BLOCK_M,
                                        BLOCK_D, BLOCK_DV, TMA, Q_HEADS_INNER, DO_HEADS_INNER)
        dk, dv = _backward_kv_steps(dk, dv, k, v, q_bh, do_bh, QDesc, GradOutDesc, b, h, Lse + bh64 * L,
                                    Delta + bh64 * L, full_start, L, cols, n_start, offs_m, offs_d, offs_dv, d_ok,
                                    dv_ok, col_end, mask_bh, stride_ml, stride_ms, stride_qm, stride_gm, L, S,
                                    scale_log2, k0, k1, bh64, threshold, inv_keep, MASK_KIND, False,
                                    HAS_KEY_LENGTHS, HAS_DROPOUT, CHECK_D, CHECK_DV, DOT_PRECISION, BLOCK_M,
                                    BLOCK_D, BLOCK_DV, TMA, Q_HEADS_INNER, DO_HEADS_INNER)

    dk_ptrs = (GradK + b64 * stride_dkb + slice64 * stride_dkh + n_start64 * stride_dkn
               + offs_n[:, None] * stride_dkn + offs_d[None, :])
    tl.store(dk_ptrs, (dk * scale).to(GradK.dtype.element_ty), mask=col_in_s & d_ok[None, :])
    dv_ptrs = (GradV + b64 * stride_dvb + slice64 * stride_dvh + n_start64 * stride_dvn
               + offs_n[:, None] * stride_dvn + offs_dv[None, :])
    tl.store(dv_ptrs, dv.to(GradV.dtype.element_ty), mask=col_in_s & dv_ok[None, :])


@triton.jit
def _backward_q_steps(dq, q, do, lse_log2, delta, k_ptrs, v_ptrs, k_desc, v_desc, b, kv_h, lo, hi, rows, row0,
                      offs_n, d_ok, dv_ok, col_end, mask_bh, stride_ml, stride_ms, stride_kn, stride_vn, L, S,
                      scale_log2, k0, k1, z, threshold, inv_keep, MASK_KIND: tl.constexpr,
                      APPLY_CAUSAL: tl.constexpr, BOUNDARY: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                      CHECK_D: tl.constexpr, CHECK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, TMA: tl.constexpr,
                      K_HEADS_INNER: tl.constexpr, V_HEADS_INNER: tl.constexpr):
    """Accumulates dQ of BLOCK_M rows over key blocks [lo, hi); k_ptrs (BLOCK_D, BLOCK_N) and v_ptrs
    (BLOCK_DV, BLOCK_N) point at key lo, both transposed; with TMA the tiles come from k_desc and v_desc at
    (b, kv_h), keys past S reading 0 and keys past col_end zeroed."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n[None, :]  # (1, BLOCK_N)
        col_ok = cols < col_end
        if TMA:
            kT = _descriptor_tile(k_desc, b, kv_h, start_n, BLOCK_N, BLOCK_D, K_HEADS_INNER).T  # (BLOCK_D, BLOCK_N)
            vT = _descriptor_tile(v_desc, b, kv_h, start_n, BLOCK_N, BLOCK_DV, V_HEADS_INNER).T  # (BLOCK_DV, BLOCK_N)
            if BOUNDARY:  # keys past key_lengths: whatever the caller left there must not reach dP or dQ
                kT = tl.where(col_ok, kT, 0.0)
                vT = tl.where(col_ok, vT, 0.0)
        else:
            kT = _load_tile(k_ptrs, d_ok[:, None], col_ok, CHECK_D, BOUNDARY)  # (BLOCK_D, BLOCK_N)
            vT = _load_tile(v_ptrs, dv_ok[:, None], col_ok, CHECK_DV, BOUNDARY)  # (BLOCK_DV, BLOCK_N)
        s = dot(q, kT, None, DOT_PRECISION) * scale_log2  # (BLOCK_M, BLOCK_N)
        s = _masked_scores(s, rows, cols, row0, start_n, col_end, mask_bh, stride_ml, stride_ms, L, S,
                           MASK_KIND, APPLY_CAUSAL, BOUNDARY)
        p = tl.math.exp2(s - lse_log2[:, None])
        dp = dot(do, vT, None, DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        if HAS_DROPOUT:
            dp = tl.where(dropout_keep(k0, k1, z, row0, start_n, q.shape[0], BLOCK_N, threshold), dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        dq = dot(ds.to(kT.dtype), tl.trans(kT), dq, DOT_PRECISION)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return dq


@triton.jit(do_not_specialize=["L", "S"])
def _backward_q_kernel(Q, K, V, GradOut, KDesc, VDesc, Lse, Delta, GradQ, Mask, KeyLengths, Seed, stride_qb,
                       stride_qh,
                       stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_gb,
                       stride_gh, stride_gm, stride_dqb, stride_dqh, stride_dqm, stride_mb, stride_mh,
                       stride_ml, stride_ms, H, GROUP, L, S, scale, scale_log2, threshold, inv_keep,
                       HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DV: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                       HAS_KEY_LENGTHS: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr, K_HEADS_INNER: tl.constexpr,
                       V_HEADS_INNER: tl.constexpr):
    b, h64, kv_h64, bh64, m_start = _query_block_program(L, H, GROUP, IS_CAUSAL, BLOCK_M)
    kv_h = kv_h64.to(tl.int32)  # a descriptor coordinate
    b64 = b.to(tl.int64)
    m_start64 = m_start.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ids = m_start + offs_m
    row_ok = row_ids < L
    rows = row_ids[:, None]  # (BLOCK_M, 1)
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V
    CHECK_D: tl.constexpr = BLOCK_D != HEAD_DIM
    CHECK_DV: tl.constexpr = BLOCK_DV != HEAD_DIM_V

    q = _load_tile(Q + b64 * stride_qb + h64 * stride_qh + m_start64 * stride_qm + offs_m[:, None] * stride_qm
                   + offs_d[None, :], row_ok[:, None], d_ok[None, :], True, CHECK_D)  # (BLOCK_M, BLOCK_D)
    do = _load_tile(GradOut + b64 * stride_gb + h64 * stride_gh + m_start64 * stride_gm
                    + offs_m[:, None] * stride_gm + offs_dv[None, :], row_ok[:, None], dv_ok[None, :], True,
                    CHECK_DV)
    lse_log2 = tl.load(Lse + bh64 * L + row_ids, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + bh64 * L + row_ids, mask=row_ok, other=0.0)
    kT_base = K + b64 * stride_kb + kv_h64 * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None]
    vT_base = V + b64 * stride_vb + kv_h64 * stride_vh + offs_n[None, :] * stride_vn + offs_dv[:, None]
    mask_bh = Mask + b64 * stride_mb + h64 * stride_mh
    k0, k1 = _dropout_key(Seed, HAS_DROPOUT)

    col_end = _key_end(KeyLengths, b, S, HAS_KEY_LENGTHS)
    full_end, end = _key_blocks(m_start, col_end, IS_CAUSAL, BLOCK_M, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _backward_q_steps(dq, q, do, lse_log2, delta, kT_base, vT_base, KDesc, VDesc, b, kv_h, 0, full_end, rows,
                           m_start, offs_n, d_ok, dv_ok, col_end, mask_bh, stride_ml, stride_ms, stride_kn,
                           stride_vn, L, S, scale_log2, k0, k1, bh64, threshold, inv_keep, MASK_KIND, False, False,
                           HAS_DROPOUT, CHECK_D, CHECK_DV, DOT_PRECISION, BLOCK_N, BLOCK_D, BLOCK_DV, TMA,
                           K_HEADS_INNER, V_HEADS_INNER)
    kT_diagonal = kT_base + full_end.to(tl.int64) * stride_kn
    vT_diagonal = vT_base + full_end.to(tl.int64) * stride_vn
    dq = _backward_q_steps(dq, q, do, lse_log2, delta, kT_diagonal, vT_diagonal, KDesc, VDesc, b, kv_h, full_end,
                           end, rows, m_start, offs_n, d_ok, dv_ok, col_end, mask_bh, stride_ml, stride_ms,
                           stride_kn, stride_vn, L, S, scale_log2, k0, k1, bh64, threshold, inv_keep, MASK_KIND,
                           IS_CAUSAL, True, HAS_DROPOUT, CHECK_D, CHECK_DV, DOT_PRECISION, BLOCK_N, BLOCK_D,
                           BLOCK_DV, TMA, K_HEADS_INNER, V_HEADS_INNER)
    dq_ptrs = (GradQ + b64 * stride_dqb + h64 * stride_dqh + m_start64 * stride_dqm
               + offs_m[:, None] * stride_dqm + offs_d[None, :])
    tl.store(dq_ptrs, (dq * scale).to(GradQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------------------------------------------
# Launchers


def _tile_shared_bytes(resident, streamed):
    """Shared memory estimate of an attention kernel whose `resident` block stays while num_stages
    `streamed` blocks are pipelined past it.

    16-bit: element size x (E + Ev padded) x rows of those tiles, plus SHARED_MEMORY_MARGIN for the scratch
    this leaves out (on sm_90 the tiles alone match the compiled size). Float32 with TF32 dots also keeps
    num_stages - 1 pipelined mask tiles in shared memory (4 bytes a score when additive), which do not shrink
    with the head dim. Float32 with exact dots runs the fallback, whatever the estimate
    (_listed_configs_usable)."""
    def estimate(config, args):
        element = args["Q"].element_size()
        block_rows, block_stream = config.kwargs[resident], config.kwargs[streamed]
        rows = block_rows + max(config.num_stages, 1) * block_stream
        tiles = element * (args["BLOCK_D"] + args["BLOCK_DV"]) * rows + SHARED_MEMORY_MARGIN
        if element != 4:
            return tiles
        buffers = max(config.num_stages - 1, 1)
        mask_bytes = {MASK_NONE: 0, MASK_BOOL: 1, MASK_ADDITIVE: element}[args["MASK_KIND"]]
        return tiles + config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] * mask_bytes * buffers

    return estimate


def _listed_configs_usable(descriptors):
    """The `usable` predicate of an attention kernel's listed configs. Exact float32 dots ("ieee") run none of
    them, only the fallback's small tiles: without tensor cores each dot unrolls into fused multiply-adds in
    registers. With a mask, dropout, key lengths and causal, the larger listed configs compile to 32 registers
    and 30-64 KB of spill stores a thread at head dim 64, and all but dK/dV 16x64 do at 128; the fallbacks
    spill at most 48 bytes at 64 and 2.4 KB at 128 (ptxas, sm_90 and sm_80, benchmarks/RESULTS.md). TMA
    configs need tensor descriptors (needs_descriptors)."""
    has_descriptors = needs_descriptors(*descriptors)

    def usable(config, args):
        return args["DOT_PRECISION"] != "ieee" and has_descriptors(config, args)

    return usable


def _tuned(kernel, configs, fallback, resident, streamed, descriptors):
    """The kernel's TunedKernel. Its key adds the layout flags of its tensor descriptors (`descriptors`) to
    AUTOTUNE_KEY: the tiles that pay differ between heads-inner and (B, H, N, D) memory. The estimate includes
    its margin (_tile_shared_bytes), so the budget is the device's whole limit."""
    key = AUTOTUNE_KEY + [heads_inner for _, _, heads_inner in descriptors.values()]
    return TunedKernel(kernel, configs, key, _tile_shared_bytes(resident, streamed),
                       min_work=AUTOTUNE_MIN_WORK, probe="Q", fallback=fallback,
                       usable=_listed_configs_usable(descriptors), size_class=_sequence_class)


_FORWARD = _tuned(_forward_kernel, FORWARD_CONFIGS, FORWARD_FALLBACK, "BLOCK_M", "BLOCK_N", FORWARD_DESCRIPTORS)
_BACKWARD_KV = _tuned(_backward_kv_kernel, BACKWARD_KV_CONFIGS, BACKWARD_KV_FALLBACK, "BLOCK_N", "BLOCK_M",
                      BACKWARD_KV_DESCRIPTORS)
_BACKWARD_Q = _tuned(_backward_q_kernel, BACKWARD_Q_CONFIGS, BACKWARD_Q_FALLBACK, "BLOCK_M", "BLOCK_N",
                     BACKWARD_Q_DESCRIPTORS)
# The kernels with config lists, by the name the benchmark table gives their tiles.
TUNED_KERNELS = {"fwd": _FORWARD, "dk/dv": _BACKWARD_KV, "dq": _BACKWARD_Q}
_DELTA = ReplayedLaunches(_backward_delta_kernel)
DELTA_BLOCK_M = 16 if triton_interpreting() else 64
# At most this many elements per delta tile: 64 rows x 256 float32 O and dO spill 392 bytes with 4 warps.
DELTA_TILE_ELEMENTS = 64 * 128


def _head_block(d):
    return max(16, next_power_of_2(d))


class _Common:
    """Arguments every attention kernel shares, derived from q, k, v, mask, key_lengths, dropout, causal."""

    def __init__(self, q, k, v, mask, key_lengths, dropout_p, is_causal, scale, seed):
        B, H, L, E = q.shape
        Hk, S, Ev = k.shape[1], k.shape[2], v.shape[-1]  # checked by the op (op_checks)
        self.B, self.H, self.Hk, self.L, self.S, self.E, self.Ev = B, H, Hk, L, S, E, Ev
        if mask is None:
            self.mask, self.mask_strides, mask_kind = q, (0, 0, 0, 0), MASK_NONE
        elif mask.dtype == torch.bool:
            self.mask, mask_kind = mask.view(torch.uint8), MASK_BOOL  # same strides, loadable bytes
            self.mask_strides = mask.stride()
        else:
            self.mask, self.mask_strides, mask_kind = mask, mask.stride(), MASK_ADDITIVE
        # The kernels read key_lengths[b] at offset b: a strided or expanded view would read other elements.
        self.key_lengths = key_lengths.contiguous() if key_lengths is not None else q
        has_dropout = dropout_p > 0.0
        self.seed = seed
        self.scalars = (H, H // Hk, L, S)
        self.dropout = (dropout_threshold(dropout_p), dropout_keep_scale(dropout_p))
        self.scale = scale
        self.scale_log2 = scale * 1.4426950408889634  # log2(e): scores enter exp2 directly
        self.work = B * H * L * S
        self.constexprs = dict(HEAD_DIM=E, HEAD_DIM_V=Ev, BLOCK_D=_head_block(E), BLOCK_DV=_head_block(Ev),
                               IS_CAUSAL=bool(is_causal), MASK_KIND=mask_kind,
                               HAS_KEY_LENGTHS=key_lengths is not None, HAS_DROPOUT=has_dropout,
                               DOT_PRECISION=dot_precision(q.dtype))


def attention_forward(q, k, v, mask, key_lengths, dropout_p, is_causal, scale, seed):
    """Forward of tfm_kernels::triton_attention_forward (contract: csrc/ops.cpp).

    q (B, Hq, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev); returns out (B, Hq, L, Ev) stored as (B, L, Hq, Ev)
    in q's dtype and lse (B, Hq, L) float32 (+inf where no key takes part)."""
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    c = _Common(q, k, v, mask, key_lengths, dropout_p, is_causal, scale, seed)
    out = empty_heads_inner(q, c.B, c.H, c.L, c.Ev)  # (B, H, L, Ev), stored (B, L, H, Ev)
    lse = q.new_empty(c.B, c.H, c.L, dtype=torch.float32)
    grid = lambda meta: (cdiv(c.L, meta["BLOCK_M"]) * c.B * c.H,)
    kv_descriptors, kv_layouts = _descriptors(_FORWARD, c.work, k, v)
    args = (q, k, v, *kv_descriptors, out, lse, c.mask, c.key_lengths, seed, *q.stride()[:3], *k.stride()[:3],
            *v.stride()[:3], *out.stride()[:3], *c.mask_strides, *c.scalars, c.scale_log2, *c.dropout)
    with device_guard(q):
        _FORWARD.launch(grid, c.work, args, {**c.constexprs, **_layout_flags(FORWARD_DESCRIPTORS, kv_layouts)})
    return out, lse


def _descriptors(kernel, work, *tensors):
    """(tensor descriptors, heads_inner flags) over (B, H, N, D) tensors for `kernel`'s TMA configs, each over
    (B, H, N, D) memory or, heads inside rows (the layout of projections and of our outputs), over (B, N, H, D)
    memory. Where this launch runs no TMA config, or the device or a layout allows neither: the tensors
    themselves as placeholders (the TMA configs are then not run)."""
    if kernel.may_read_descriptors(work) and tensor_descriptors_supported(tensors[0].device):
        found = []
        for t in tensors:
            likelier = t.stride(1) < t.stride(2)  # the head stride inside the row stride: heads inside rows
            for heads_inner in (likelier, not likelier):
                view = t.transpose(1, 2) if heads_inner else t
                d = descriptor(view, view.shape, view.stride())
                if d is not None:
                    found.append((d, heads_inner))
                    break
        if len(found) == len(tensors):
            return tuple(d for d, _ in found), tuple(inner for _, inner in found)
    return tensors, (False,) * len(tensors)


def _layout_flags(descriptors, layouts):
    """The launch constexprs that say each descriptor's layout, in the order of `descriptors`."""
    return {flag: inner for (_, _, flag), inner in zip(descriptors.values(), layouts)}


def attention_backward(grad_out, q, k, v, out, lse, mask, key_lengths, dropout_p, is_causal, scale, seed):
    """Backward of tfm_kernels::triton_attention_backward (contract: csrc/ops.cpp).

    Returns dq, dk, dv shaped like q, k, v, stored as (B, N, H, D) (transposed views)."""
    grad_out, q, k, v, out = (last_dim_contiguous(t) for t in (grad_out, q, k, v, out))
    lse = lse.contiguous()
    c = _Common(q, k, v, mask, key_lengths, dropout_p, is_causal, scale, seed)
    dq = empty_heads_inner(q, c.B, c.H, c.L, c.E)  # (B, H, L, E), stored (B, L, H, E)
    heads_per_program = _heads_per_kv_program(c, q.device)
    slices = c.H // heads_per_program
    partial = slices != c.Hk  # the dK/dV programs split each query group: float32 partial sums per slice
    grad_kv_dtype = torch.float32 if partial else k.dtype
    dk = empty_heads_inner(k, c.B, slices, c.S, c.E, grad_kv_dtype)  # (B, slices, S, E)
    dv = empty_heads_inner(v, c.B, slices, c.S, c.Ev, grad_kv_dtype)  # (B, slices, S, Ev)
    delta = torch.empty_like(lse)  # (B, H, L) float32
    block_dv = c.constexprs["BLOCK_DV"]
    with device_guard(q):
        delta_rows = min(DELTA_BLOCK_M, DELTA_TILE_ELEMENTS // block_dv)
        _DELTA.launch((cdiv(c.L, delta_rows) * c.B * c.H,),
                      (out, grad_out, delta, *out.stride()[:3], *grad_out.stride()[:3], c.H, c.L),
                      dict(HEAD_DIM_V=c.Ev, BLOCK_DV=block_dv, BLOCK_M=delta_rows,
                           DOT_PRECISION=c.constexprs["DOT_PRECISION"]))
        inputs, row_stats = (q, k, v, grad_out), (lse, delta)
        strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3])
        H, group, L, S = c.scalars
        tail = (c.scale, c.scale_log2, *c.dropout)
        kv_grid = lambda meta: (cdiv(c.S, meta["BLOCK_N"]) * c.B * slices,)
        q_descriptors, q_layouts = _descriptors(_BACKWARD_KV, c.work, q, grad_out)
        _BACKWARD_KV.launch(kv_grid, c.work, (*inputs, *q_descriptors, *row_stats, dk, dv, c.mask, c.key_lengths,
                            seed, *strides, *dk.stride()[:3], *dv.stride()[:3], *c.mask_strides, H, group,
                            heads_per_program, L, S, *tail),
                            {**c.constexprs, **_layout_flags(BACKWARD_KV_DESCRIPTORS, q_layouts)})
        q_grid = lambda meta: (cdiv(c.L, meta["BLOCK_M"]) * c.B * c.H,)
        kv_descriptors, kv_layouts = _descriptors(_BACKWARD_Q, c.work, k, v)
        _BACKWARD_Q.launch(q_grid, c.work, (*inputs, *kv_descriptors, *row_stats, dq, c.mask, c.key_lengths, seed,
                           *strides, *dq.stride()[:3], *c.mask_strides, *c.scalars, *tail),
                           {**c.constexprs, **_layout_flags(BACKWARD_Q_DESCRIPTORS, kv_layouts)})
    if partial:
        dk, dv = (_sum_slices(t, c.Hk, k.dtype) for t in (dk, dv))
    return dq, dk, dv


def _sum_slices(partial, kv_heads, dtype):
    """(B, slices, S, D) float32 partial gradients, stored (B, S, slices, D) -> (B, Hk, S, D) in `dtype`,
    stored (B, S, Hk, D). Slices of one kv head are adjacent: the sum runs over a (Hk, slices / Hk) view."""
    B, slices, S, D = partial.shape
    stored = partial.transpose(1, 2)  # (B, S, slices, D), contiguous
    summed = stored.view(B, S, kv_heads, slices // kv_heads, D).sum(3)  # (B, S, Hk, D)
    return summed.to(dtype).transpose(1, 2)  # (B, Hk, S, D)


def _heads_per_kv_program(c, device):
    """Query heads per dK/dV program: the whole group, unless B * Hk * (S / 128) programs would leave
    multiprocessors idle; then one (each query head's partial dK, dV, summed afterwards)."""
    group = c.H // c.Hk
    if group > 1 and c.B * c.Hk * cdiv(c.S, 128) < _multiprocessor_count(device):
        return 1
    return group


def _multiprocessor_count(device):
    """Streaming multiprocessors of a CUDA device; 0 on the CPU, where the interpreter gains nothing from
    more programs."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count
