"""The dropout RNG of tfm_kernels (tfm_kernels/rng.py) in Triton: Philox-4x32-10, first output word only.

Element (z, i, j) of a dropout mask uses counter (j, i, lo32(z), hi32(z)) and key (lo32(seed), hi32(seed)),
and is kept iff (word >> 8) >= threshold, threshold = floor(p * 2**24) (rng.dropout_threshold). The bits
equal rng.dropout_keep_mask and csrc/common/philox.h exactly; tests/test_attention_ops.py checks them.
"""

import triton
import triton.language as tl

from .. import rng

# The constants come from rng.py, so the three implementations cannot drift apart.
PHILOX_M0 = tl.constexpr(rng.PHILOX_M0)
PHILOX_M1 = tl.constexpr(rng.PHILOX_M1)
PHILOX_W0 = tl.constexpr(rng.PHILOX_W0)
PHILOX_W1 = tl.constexpr(rng.PHILOX_W1)
PHILOX_ROUNDS = tl.constexpr(rng.PHILOX_ROUNDS)
DROPPED_LOW_BITS = tl.constexpr(32 - rng.DROPOUT_BITS)
LOW32 = tl.constexpr(0xFFFFFFFF)


@triton.jit
def philox_key(seed_ptr):
    """The Philox key (lo32(seed), hi32(seed)) as two uint32 scalars, from an int64 seed in memory."""
    seed = tl.load(seed_ptr).to(tl.int64)
    k0 = (seed & LOW32).to(tl.uint32)
    k1 = ((seed >> 32) & LOW32).to(tl.uint32)
    return k0, k1


@triton.jit
def philox_first_word(c0, c1, c2, c3, k0, k1):
    """First 32-bit output word of Philox-4x32-10, uint32 counters c0..c3 (one shape), key (k0, k1)."""
    for _ in tl.static_range(PHILOX_ROUNDS):
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = c0 * PHILOX_M0
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = c2 * PHILOX_M1
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0


@triton.jit
def dropout_keep(k0, k1, z, rows, cols, threshold):
    """Keep-mask tile of dropout: True where element (z, rows, cols) is kept.

    z: int64 scalar (batch * heads index); rows, cols: int32 tensors that broadcast against each other (e.g.
    (M, 1) and (1, N), in either orientation); threshold: floor(p * 2**24). Returns the broadcast shape."""
    rows, cols = tl.broadcast(rows, cols)
    c0 = cols.to(tl.uint32)
    c1 = rows.to(tl.uint32)
    c2 = tl.zeros_like(c0) + (z & LOW32).to(tl.uint32)
    c3 = tl.zeros_like(c0) + ((z >> 32) & LOW32).to(tl.uint32)
    word = philox_first_word(c0, c1, c2, c3, k0, k1)
    return (word >> DROPPED_LOW_BITS).to(tl.int32) >= threshold
