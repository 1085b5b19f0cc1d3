"""The dropout random-number scheme shared by every backend.

A dropout mask element (z, i, j) -- z a flat batch*head index (0 for MLPs), i a row, j a column -- reads 16
bits of Philox-4x32-10 with counter (j // 8, i, lo32(z), hi32(z)) and key (lo32(seed), hi32(seed)): one
Philox call gives the 8 columns 8g..8g+7 of a row, column j taking word (j // 2) % 4, its low half for even j
and its high half for odd j. The element is kept iff that 16-bit number >= floor(p * 2**16), so p is applied
rounded down to a multiple of 2**-16, and kept elements are scaled by the inverse of that keep probability.
Reading 8 decisions from each 128-bit output (rather than one per call) is what keeps dropout cheap next to the
attention kernels' tensor-core work: a Philox call costs about a hundred integer instructions. The C++
(csrc/common/philox.h) and Triton (tfm_kernels/triton/philox.py) kernels compute the same bits, so every
backend draws the same mask for the same seed. A fresh seed per call comes from torch's generator, so runs
repeat under torch.manual_seed.
"""

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
DROPOUT_BITS = 16  # bits of one keep decision
COLUMNS_PER_DRAW = 8  # keep decisions per Philox call: 128 bits / DROPOUT_BITS
_MASK16 = 0xFFFF
_MASK32 = 0xFFFFFFFF


def draw_seed(device) -> torch.Tensor:
    """A fresh int64 seed of shape (), drawn from torch's default generator on `device`."""
    return torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64, device=device)


def seed_for(dropout_p: float, device) -> torch.Tensor:
    """The seed operand of an operator call: a fresh seed when dropout_p > 0, else a placeholder that the
    kernels never read (so calls without dropout leave torch's generator untouched), left uninitialised: filling
    it would cost a kernel launch."""
    return draw_seed(device) if dropout_p > 0.0 else torch.empty((), dtype=torch.int64, device=device)


def dropout_threshold(p: float) -> int:
    """The 16-bit integer threshold under which a decision's bits drop the element."""
    return int(p * (1 << DROPOUT_BITS))


def dropout_keep_scale(p: float) -> float:
    """The multiplier of a kept element: 2**16 / (2**16 - threshold), the inverse of the keep probability that
    the threshold gives, so that dropout leaves every expectation unchanged. It is 1 / (1 - p) for p rounded
    down to a multiple of 2**-16: the two differ by under 2**-16 / (1 - p) relative, which matters only for p
    within a few 2**-16 of 1 (there 1 / (1 - p) would scale the few kept elements by far too much)."""
    return (1 << DROPOUT_BITS) / ((1 << DROPOUT_BITS) - dropout_threshold(p))


def philox(c0, c1, c2, c3, k0: int, k1: int) -> tuple[torch.Tensor, ...]:
    """The four output words of Philox-4x32-10, elementwise over int64 tensors holding uint32 values.

    32x32-bit products fit 64 bits; int64 wraps, and `>> 32 & mask` reads back the unsigned high word."""
    k0 = torch.as_tensor(k0, dtype=torch.int64)
    k1 = torch.as_tensor(k1, dtype=torch.int64)
    for _ in range(PHILOX_ROUNDS):
        p0 = c0 * PHILOX_M0
        p1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = ((p1 >> 32) & _MASK32) ^ c1 ^ k0, p1 & _MASK32, ((p0 >> 32) & _MASK32) ^ c3 ^ k1, p0 & _MASK32
        k0 = (k0 + PHILOX_W0) & _MASK32
        k1 = (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def dropout_keep_mask(seed, num_z: int, rows: int, cols: int, p: float, device=None,
                      first_row: int = 0) -> torch.Tensor:
    """Boolean keep-mask (num_z, rows, cols) that every backend draws for `seed` (int or int64 tensor): rows
    first_row .. first_row + rows - 1 of the mask.

    Attention uses z = b * Hq + h, rows = L, cols = S; an MLP uses num_z = 1, rows = tokens, cols = features.
    Materialises the whole mask: a test and reference helper, never a fast path. The seed stays a tensor, so
    the mask is drawn on `device` without a host sync, and on the meta device as a shape."""
    device = device if device is not None else "cpu"
    seed = torch.as_tensor(seed, dtype=torch.int64, device=device)
    groups = -(-cols // COLUMNS_PER_DRAW)
    z = torch.arange(num_z, dtype=torch.int64, device=device).view(-1, 1, 1)
    i = torch.arange(first_row, first_row + rows, dtype=torch.int64, device=device).view(1, -1, 1)
    g = torch.arange(groups, dtype=torch.int64, device=device).view(1, 1, -1)
    shape = (num_z, rows, groups)
    words = philox(g.expand(shape), i.expand(shape), (z & _MASK32).expand(shape), ((z >> 32) & _MASK32).expand(shape),
                   seed & _MASK32, (seed >> 32) & _MASK32)
    # Column 8g + 2w + h reads half h (0: low, 1: high) of word w.
    halves = torch.stack([torch.stack([w & _MASK16, w >> DROPOUT_BITS], dim=-1) for w in words], dim=-2)
    decisions = halves.reshape(num_z, rows, groups * COLUMNS_PER_DRAW)[..., :cols]  # (num_z, rows, cols)
    return decisions >= dropout_threshold(p)
