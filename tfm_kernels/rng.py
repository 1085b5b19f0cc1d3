"""The dropout random-number scheme shared by every backend.

Each dropout mask element (z, i, j) -- z a flat batch*head index (0 for MLPs), i a row, j a column -- draws
the first 32-bit word of Philox-4x32-10 with counter (j, i, lo32(z), hi32(z)) and key (lo32(seed),
hi32(seed)). The element is kept iff (word >> 8) >= floor(p * 2**24). The C++ (csrc/common/philox.h) and
Triton (tfm_kernels/triton/philox.py) kernels compute the same bits, so every backend draws the same mask for
the same seed. A fresh seed per call comes from torch's generator, so runs repeat under torch.manual_seed.
"""

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
DROPOUT_BITS = 24
_MASK32 = 0xFFFFFFFF


def draw_seed(device) -> torch.Tensor:
    """A fresh int64 seed of shape (), drawn from torch's default generator on `device`."""
    return torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64, device=device)


def seed_for(dropout_p: float, device) -> torch.Tensor:
    """The seed operand of an operator call: a fresh seed when dropout_p > 0, else a zero placeholder that the
    kernels never read (so calls without dropout leave torch's generator untouched)."""
    return draw_seed(device) if dropout_p > 0.0 else torch.zeros((), dtype=torch.int64, device=device)


def dropout_threshold(p: float) -> int:
    """The 24-bit integer threshold under which a word's top bits drop the element."""
    return int(p * (1 << DROPOUT_BITS))


def philox_first_word(c0, c1, c2, c3, k0: int, k1: int) -> torch.Tensor:
    """First output word of Philox-4x32-10, elementwise over int64 tensors holding uint32 values.

    32x32-bit products fit 64 bits; int64 wraps, and `>> 32 & mask` reads back the unsigned high word."""
    k0 = torch.as_tensor(k0, dtype=torch.int64)
    k1 = torch.as_tensor(k1, dtype=torch.int64)
    for _ in range(PHILOX_ROUNDS):
        p0 = c0 * PHILOX_M0
        p1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = ((p1 >> 32) & _MASK32) ^ c1 ^ k0, p1 & _MASK32, ((p0 >> 32) & _MASK32) ^ c3 ^ k1, p0 & _MASK32
        k0 = (k0 + PHILOX_W0) & _MASK32
        k1 = (k1 + PHILOX_W1) & _MASK32
    return c0


def dropout_keep_mask(seed, num_z: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Boolean keep-mask (num_z, rows, cols) that every backend draws for `seed` (int or int64 tensor).

    Attention uses z = b * Hq + h, rows = L, cols = S; an MLP uses num_z = 1, rows = tokens, cols = features.
    Materialises the whole mask: a test and reference helper, never a fast path."""
    seed = int(seed)
    device = device if device is not None else "cpu"
    z = torch.arange(num_z, dtype=torch.int64, device=device).view(-1, 1, 1)
    i = torch.arange(rows, dtype=torch.int64, device=device).view(1, -1, 1)
    j = torch.arange(cols, dtype=torch.int64, device=device).view(1, 1, -1)
    shape = (num_z, rows, cols)
    word = philox_first_word(j.expand(shape), i.expand(shape), (z & _MASK32).expand(shape),
                             ((z >> 32) & _MASK32).expand(shape), seed & _MASK32, (seed >> 32) & _MASK32)
    return (word >> (32 - DROPOUT_BITS)) >= dropout_threshold(p)
