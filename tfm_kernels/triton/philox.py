"""The dropout RNG of tfm_kernels (tfm_kernels/rng.py) in Triton: Philox-4x32-10, 8 keep decisions per call.

Element (z, i, j) of a dropout mask reads 16 bits of the Philox output for counter (j // 8, i, lo32(z),
hi32(z)) and key (lo32(seed), hi32(seed)): word (j // 2) % 4, low half for even j, high half for odd j; it is
kept iff those bits >= threshold = floor(p * 2**16) (rng.dropout_threshold). The bits equal
rng.dropout_keep_mask and csrc/common/philox.h exactly; tests/test_attention_ops.py checks them.
"""

import triton
import triton.language as tl

# The kernels' constants are constexpr functions with their values written out, not constexpr globals: Triton
# compares every global a kernel reads with its value at compile time on each launch (0.5-1.7 us apiece on the
# hosts measured, benchmarks/RESULTS.md), while a function's source is part of the compiled kernel's cache
# key. The values equal rng.py's (tests/test_rng.py checks them), so the three implementations cannot drift
# apart.


@triton.constexpr_function
def philox_m0():
    return 0xD2511F53


@triton.constexpr_function
def philox_m1():
    return 0xCD9E8D57


@triton.constexpr_function
def philox_w0():
    return 0x9E3779B9


@triton.constexpr_function
def philox_w1():
    return 0xBB67AE85


@triton.constexpr_function
def philox_rounds():
    return 10


@triton.constexpr_function
def dropout_bits():
    """Bits of one keep decision."""
    return 16


@triton.constexpr_function
def columns_per_draw():
    """Keep decisions per Philox call (128 output bits)."""
    return 8


@triton.constexpr_function
def low16():
    return 0xFFFF


@triton.constexpr_function
def low32():
    return 0xFFFFFFFF


@triton.jit
def philox_key(seed_ptr):
    """The Philox key (lo32(seed), hi32(seed)) as two uint32 scalars, from an int64 seed in memory."""
    seed = tl.load(seed_ptr).to(tl.int64)
    k0 = (seed & low32()).to(tl.uint32)
    k1 = ((seed >> 32) & low32()).to(tl.uint32)
    return k0, k1


@triton.jit
def philox(c0, c1, c2, c3, k0, k1):
    """The four 32-bit output words of Philox-4x32-10, uint32 counters c0..c3 (one shape), key (k0, k1)."""
    for _ in tl.static_range(philox_rounds()):
        hi0 = tl.umulhi(c0, philox_m0())
        lo0 = c0 * philox_m0()
        hi1 = tl.umulhi(c2, philox_m1())
        lo1 = c2 * philox_m1()
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = k0 + philox_w0()
        k1 = k1 + philox_w1()
    return c0, c1, c2, c3


@triton.jit
def dropout_keep(k0, k1, z, row0, col0, ROWS: tl.constexpr, COLS: tl.constexpr, threshold):
    """Keep-mask tile of dropout, (ROWS, COLS): True where element (z, row0 + r, col0 + c) is kept.

    z: int64 scalar (batch * heads index, 0 for MLPs); col0: a multiple of 8 (tiles start at multiples of their
    block size); COLS: a multiple of 8; threshold: floor(p * 2**16). One Philox call per 8 columns of a row: the
    (ROWS, COLS / 8) calls' 16-bit halves are interleaved into columns by nested joins: flattened, index
    [g, a, b, c] is column 8g + 4a + 2b + c and holds half c of word 2a + b, i.e. column 8g + o reads half o % 2 of
    word o // 2, as rng.dropout_keep_mask."""
    rows = row0 + tl.arange(0, ROWS)[:, None]  # (ROWS, 1)
    groups = col0 // columns_per_draw() + tl.arange(0, COLS // columns_per_draw())[None, :]  # (1, COLS / 8)
    rows, groups = tl.broadcast(rows, groups)
    c2 = tl.zeros_like(groups).to(tl.uint32) + (z & low32()).to(tl.uint32)
    c3 = tl.zeros_like(groups).to(tl.uint32) + ((z >> 32) & low32()).to(tl.uint32)
    w0, w1, w2, w3 = philox(groups.to(tl.uint32), rows.to(tl.uint32), c2, c3, k0, k1)
    mask, shift = low16(), dropout_bits()
    low = tl.join(tl.join(w0 & mask, w2 & mask), tl.join(w1 & mask, w3 & mask))  # (ROWS, COLS / 8, 2, 2)
    high = tl.join(tl.join(w0 >> shift, w2 >> shift), tl.join(w1 >> shift, w3 >> shift))
    halves = tl.reshape(tl.join(low, high), (ROWS, COLS))  # (ROWS, COLS / 8, 2, 2, 2) flattened
    return halves.to(tl.int32) >= threshold
