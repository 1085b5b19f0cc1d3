"""The CUDA MLP elementwise kernels (csrc/cuda/mlp/epilogue_kernels.cuh) run on the CPU: tests/cuda_emulation/
emulates the CUDA execution model (a thread per CUDA thread, a barrier for __syncthreads) and mlp_harness.cpp
launches the kernels through the header's own launch functions, so the instantiation, grid and block are those of
epilogue_kernels.cu. Checked against the float64 oracle (tfm_kernels.reference's activations, the shared Philox
dropout mask of tfm_kernels.rng) under the tolerance rule: the forward epilogue (bias, stored pre-activation, out
written over z), the backward epilogue, linear and gated, every activation and dtype, dropout bit for bit, row
strides, both grid-stride loops, and the column sum; out-of-bounds accesses under AddressSanitizer. Speed and the
real device code are left to the GPU tests (tests/test_mlp.py -m gpu)."""

import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from tfm_kernels import reference, rng
from tfm_kernels.tolerance import tolerance_failure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATION = os.path.join(ROOT, "tests", "cuda_emulation")
ACTIVATIONS = ["none", "gelu", "gelu_tanh", "relu", "silu"]
DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
BITS = {2: torch.int16, 4: torch.int32}  # element size -> the integer type its bits are compared as
POISON = -1  # the harness's output poison, 0xFF bytes, read as those integers
DROPOUT_P = 0.3
KEPT_MAGNITUDE = 1e-2  # a kept element this far from 0 in the oracle is far from 0 in the kernel too
# A __syncthreads that some threads never reach leaves the others waiting forever.
RUN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("needs g++ (C++20, _Float16) to build the CUDA emulation")
    binary = str(tmp_path_factory.mktemp("mlp_emulation") / "mlp_harness")
    command = [compiler, "-std=c++20", "-O1", "-pthread", "-w", f"-I{os.path.join(EMULATION, 'cuda_headers')}",
               f"-I{EMULATION}", f"-I{os.path.join(ROOT, 'csrc')}", os.path.join(EMULATION, "mlp_harness.cpp"),
               "-o", binary]
    sanitized = subprocess.run(command[:1] + ["-fsanitize=address", "-fno-omit-frame-pointer"] + command[1:],
                               capture_output=True, text=True)
    if sanitized.returncode != 0:  # no AddressSanitizer runtime: build without it
        subprocess.run(command, check=True, capture_output=True, text=True)
    return binary


def run_harness(harness, tmp_path, args, header, tensors, dtype):
    """Runs the harness on an input file of `header` then the tensors' bytes; returns the output as a flat tensor
    of `dtype`."""
    data = header + b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in tensors)
    (tmp_path / "in.bin").write_bytes(data)
    result = subprocess.run([harness, *args, str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
                            capture_output=True, text=True, env={**os.environ, "ASAN_OPTIONS": "detect_leaks=0"},
                            timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.frombuffer(bytearray((tmp_path / "out.bin").read_bytes()), dtype=dtype)


def bits(t):
    return t.contiguous().view(BITS[t.element_size()])


def epilogue_oracle(z, bias, activation, gated, dropout_p, seed):
    """The forward epilogue in z's dtype: returns (pre-activation z + bias, dropout(act(z + bias)) or, gated,
    dropout(act(g) * u)). z (M, width), bias (width,) or None; differentiable in z."""
    preact = z if bias is None else z + bias
    if gated:
        gate, up = preact.chunk(2, dim=-1)  # (M, N) each
        h = reference.activation(gate, activation) * up
    else:
        h = reference.activation(preact, activation)
    if dropout_p > 0.0:
        keep = rng.dropout_keep_mask(seed, 1, h.shape[0], h.shape[1], dropout_p)[0]  # (M, N)
        h = h * keep.to(h.dtype) * rng.dropout_keep_scale(dropout_p)
    return preact, h


def check(name, result, baseline, oracle):
    failure = tolerance_failure(f"emulated cuda {name}", result, baseline, oracle)
    assert failure is None, failure


def check_epilogue(harness, tmp_path, dtype, activation, gated, rows, cols, bias=True, dropout_p=0.0, pad=(0, 0, 0),
                   row_block_limit=0, values_at=(), z_range=None):
    """Forward then backward epilogue of one configuration laid out as api.cpp lays it out: the pre-activation
    stored for an activation or a gate and given to the backward, else out written over z and no pre-activation
    for the backward. Row strides are padded by `pad` elements (z, out, grad_out); row_block_limit > 0 shrinks
    gridDim.y's limit so the row loop strides; values_at, (index (row, column), value) pairs, puts those values
    into z and the pre-activation; z_range, (low, high), draws z and the pre-activation uniformly from it rather
    than from a normal distribution."""
    activation_name = None if activation == "none" else activation
    width = 2 * cols if gated else cols
    store_preact = gated or activation != "none"
    out_aliases_z = not store_preact
    ld_z = width + pad[0]
    ld_out = ld_z if out_aliases_z else cols + pad[1]
    ld_grad_out = cols + pad[2]
    seed = int(rng.draw_seed("cpu"))
    z = torch.randn(rows, ld_z, dtype=dtype)
    b = torch.randn(width, dtype=dtype) if bias else None
    grad_out = torch.randn(rows, ld_grad_out, dtype=dtype)
    preact = torch.randn(rows, width, dtype=dtype)
    if z_range is not None:
        low, high = z_range
        z.uniform_(low, high)
        preact.uniform_(low, high)
    for index, value in values_at:
        z[index] = preact[index] = value
    header = np.array([gated, rows, cols, ld_z, ld_out, ld_grad_out, bias, store_preact, out_aliases_z, seed,
                       row_block_limit], dtype=np.int64).tobytes() + np.array([dropout_p]).tobytes()
    flat = run_harness(harness, tmp_path, ["epilogue", DTYPES[dtype], activation], header,
                       [z] + ([b] if bias else []) + [grad_out] + ([preact] if store_preact else []), dtype)
    z_after, out_buffer, dz = flat.split([rows * ld_z, rows * ld_out, rows * width])
    z_after, out_buffer, dz = z_after.view(rows, ld_z), out_buffer.view(rows, ld_out), dz.view(rows, width)
    out = out_buffer[:, :cols]

    def forward_oracle(dtype_, dropout_p_=dropout_p):
        return epilogue_oracle(z[:, :width].to(dtype_), None if b is None else b.to(dtype_), activation_name, gated,
                               dropout_p_, seed)

    def backward_oracle(dtype_):  # d(out)/d(pre-activation) applied to grad_out
        p = preact.to(dtype_).requires_grad_()
        _, h = epilogue_oracle(p, None, activation_name, gated, dropout_p, seed)
        return torch.autograd.grad(h, p, grad_out[:, :cols].to(dtype_))[0]

    # Forward: out and the stored pre-activation within the rule; every other element untouched.
    (stored, expected), (base_stored, base_out) = forward_oracle(torch.float64), forward_oracle(dtype)
    check("out", out, base_out, expected)
    if out_aliases_z:
        assert torch.equal(bits(z_after[:, cols:]), bits(z[:, cols:])), "z beyond out's columns was written"
    else:
        assert (bits(out_buffer[:, cols:]) == POISON).all(), "out's padding was written"
        assert torch.equal(bits(z_after[:, width:]), bits(z[:, width:])), "z's padding was written"
        if bias and store_preact:
            check("stored pre-activation", z_after[:, :width], base_stored, stored)
        else:
            assert torch.equal(bits(z_after), bits(z)), "z was written without a bias to store"

    check("dz", dz, backward_oracle(dtype), backward_oracle(torch.float64))

    # Dropout bit for bit: the shared mask's dropped elements are exactly 0 in out and dz, its kept ones are not.
    if dropout_p > 0.0:
        keep = rng.dropout_keep_mask(seed, 1, rows, cols, dropout_p)[0]  # (rows, cols)
        _, undropped = forward_oracle(torch.float64, 0.0)
        assert (out[~keep] == 0).all(), "an element the shared mask drops was kept"
        clearly_nonzero = undropped.abs() > KEPT_MAGNITUDE
        assert (out[keep & clearly_nonzero] != 0).all(), "an element the shared mask keeps was dropped"
        dropped = ~keep.repeat(1, 2) if gated else ~keep  # dz = [dg, du] when gated
        assert (dz[dropped] == 0).all(), "a gradient the shared mask drops was kept"


@pytest.mark.parametrize("gated", [False, True], ids=["linear", "gated"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPES.values())
def test_epilogues_against_oracle(harness, tmp_path, dtype, activation, gated):
    torch.manual_seed(ACTIVATIONS.index(activation) * 10 + gated)
    for bias in (True, False):
        for dropout_p in (0.0, DROPOUT_P):
            check_epilogue(harness, tmp_path, dtype, activation, gated, 7, 33, bias, dropout_p)
    # Odd width, padded row strides, and a row loop that strides (3 rows over 2 block rows).
    check_epilogue(harness, tmp_path, dtype, activation, gated, 3, 100, True, DROPOUT_P, pad=(5, 3, 7),
                   row_block_limit=2)


@pytest.mark.parametrize("gated", [False, True], ids=["linear", "gated"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nan_pre_activation_as_in_torch(harness, tmp_path, activation, gated):
    """A NaN pre-activation (in the gate, when gated) gives NaN where the oracle has it, in out and dz: relu
    keeps NaN and passes its gradient there, as torch.relu does."""
    torch.manual_seed(ACTIVATIONS.index(activation))
    check_epilogue(harness, tmp_path, torch.float32, activation, gated, 4, 33, values_at=[((1, 3), float("nan"))])


@pytest.mark.parametrize("gated", [False, True], ids=["linear", "gated"])
def test_gelu_tanh_negative_tail(harness, tmp_path, gated):
    """Pre-activations in tanh-GELU's negative tail, (-4, -2.5), where 1 + tanh(u) cancels: out and dz within
    the rule in float32."""
    torch.manual_seed(gated)
    check_epilogue(harness, tmp_path, torch.float32, "gelu_tanh", gated, 64, 33, bias=False, z_range=(-4.0, -2.5))


@pytest.mark.parametrize("gated", [False, True], ids=["linear", "gated"])
def test_gelu_tanh_gradient_at_huge_pre_activations(harness, tmp_path, gated):
    """|z| >= 1.85e19, where z * z overflows float32 and tanh-GELU's slope is 0: dz is grad_out (z > 0) or 0
    (z < 0), as the float64 oracle has it, not 0 * inf = NaN; an infinite z gives NaN, as the oracle does."""
    torch.manual_seed(gated)
    check_epilogue(harness, tmp_path, torch.float32, "gelu_tanh", gated, 4, 33, bias=False,
                   values_at=[((0, 1), 1e20), ((1, 2), -1e20), ((2, 3), 1e30), ((3, 4), -2e19),
                              ((0, 5), float("inf")), ((1, 6), -float("inf"))])


def test_gated_relu_gradient_is_zero_below_an_infinite_up(harness, tmp_path):
    """relu's backward selects 0 where the gate is <= 0, as torch's does, even where the gradient reaching it,
    dh * u, is infinite: no inf * 0 = NaN in the gate's dz."""
    torch.manual_seed(0)
    inf = float("inf")
    check_epilogue(harness, tmp_path, torch.float32, "relu", True, 4, 33, bias=False,
                   values_at=[((1, 3), -inf), ((1, 33 + 3), inf)])


@pytest.mark.parametrize("gated", [False, True], ids=["linear", "gated"])
def test_wide_rows_stride_over_columns(harness, tmp_path, gated):
    """More columns than 64 blocks of 256 threads cover: the column loop strides too."""
    torch.manual_seed(gated)
    check_epilogue(harness, tmp_path, torch.bfloat16, "gelu", gated, 2, 64 * 256 + 37, True, DROPOUT_P,
                   pad=(1, 2, 3), row_block_limit=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPES.values())
def test_column_sum_against_oracle(harness, tmp_path, dtype):
    torch.manual_seed(len(DTYPES[dtype]))
    for rows, cols in [(37, 70), (3, 100), (300, 33), (1, 1), (0, 5)]:
        x = torch.randn(rows, cols, dtype=dtype)
        header = np.array([rows, cols], dtype=np.int64).tobytes()
        out = run_harness(harness, tmp_path, ["column_sum", DTYPES[dtype]], header, [x], dtype)
        check(f"column sum {rows}x{cols}", out, x.sum(0), x.double().sum(0))
