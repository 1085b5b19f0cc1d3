"""The dropout RNG scheme of tfm_kernels.rng, which every backend reproduces bit for bit (the kernels are
checked against rng.dropout_keep_mask in test_attention_ops.py, test_attention_cpu.py and test_mlp.py)."""

import pytest
import torch

from tfm_kernels import rng

# Random123's published known answers for Philox-4x32-10: (counter, key, output words).
PHILOX_KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", PHILOX_KNOWN_ANSWERS)
def test_philox_known_answers(counter, key, expected):
    words = rng.philox(*(torch.tensor(c, dtype=torch.int64) for c in counter), *key)
    assert tuple(int(w) for w in words) == expected


def scalar_philox(counter, key):
    """Philox-4x32-10 on Python ints, written from its definition: the oracle of the tensor version."""
    (c0, c1, c2, c3), (k0, k1) = counter, key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c3 ^ k1, p0 & 0xFFFFFFFF
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


@pytest.mark.parametrize("seed", [0, 12345, -(2**62) + 17, 2**63 - 1])
def test_keep_mask_reads_16_bit_halves_of_one_draw_per_8_columns(seed):
    """Element (z, i, j) reads half j % 2 of word (j // 2) % 4 of the draw at counter (j // 8, i, z)."""
    num_z, rows, cols, p = 2, 3, 21, 0.3
    mask = rng.dropout_keep_mask(seed, num_z, rows, cols, p)
    key = (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)
    threshold = int(p * 2**16)
    for z in range(num_z):
        for i in range(rows):
            for j in range(cols):
                word = scalar_philox((j // 8, i, z, 0), key)[(j // 2) % 4]
                half = (word >> (16 * (j % 2))) & 0xFFFF
                assert bool(mask[z, i, j]) == (half >= threshold), (z, i, j)


def test_keep_mask_of_a_column_does_not_depend_on_the_width():
    """A column's decision depends on (z, i, j) only: a wider mask starts with the narrower one."""
    assert torch.equal(rng.dropout_keep_mask(7, 2, 5, 13, 0.5), rng.dropout_keep_mask(7, 2, 5, 40, 0.5)[..., :13])


def test_keep_mask_rows_from_a_first_row():
    """Rows first_row .. first_row + rows - 1 alone are those rows of the whole mask."""
    whole = rng.dropout_keep_mask(11, 3, 17, 24, 0.4)
    assert torch.equal(rng.dropout_keep_mask(11, 3, 5, 24, 0.4, first_row=9), whole[:, 9:14])


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
def test_keep_rate(p):
    keep = rng.dropout_keep_mask(2024, 4, 256, 256, p)
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) < 4 * (p * (1 - p) / keep.numel()) ** 0.5 + 2**-16


def test_triton_kernels_constants_are_rngs():
    """The Triton kernels write rng's constants out (tfm_kernels/triton/philox.py says why); they must equal them."""
    philox = pytest.importorskip("tfm_kernels.triton.philox")
    kernels = (philox.philox_m0(), philox.philox_m1(), philox.philox_w0(), philox.philox_w1(),
               philox.philox_rounds(), philox.dropout_bits(), philox.columns_per_draw())
    assert kernels == (rng.PHILOX_M0, rng.PHILOX_M1, rng.PHILOX_W0, rng.PHILOX_W1, rng.PHILOX_ROUNDS,
                       rng.DROPOUT_BITS, rng.COLUMNS_PER_DRAW)
    assert philox.low16() == (1 << rng.DROPOUT_BITS) - 1
