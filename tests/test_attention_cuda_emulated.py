"""The CUDA attention kernels (csrc/cuda/attention/) run on the CPU: tests/cuda_emulation/ emulates the CUDA
execution model (a thread per CUDA thread, barriers for __syncthreads and the warp-collective shuffles, ldmatrix
and mma.sync per the PTX fragment layouts, cp.async landing as late as its wait allows). Everything but the
inline-asm primitives of csrc/cuda/common/{memory,mma}.cuh is the kernels' own source, so this checks fragment
bookkeeping, masking, online softmax, dropout, GQA and strides, the pipeline's waits and barriers (reads racing
an in-flight copy are counted) and shared/global bounds (AddressSanitizer) against the float64 oracle without a
GPU. Speed, registers and the real asm are left to the GPU tests (tests/test_attention_cuda.py)."""

import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from tfm_kernels import reference
from tfm_kernels.tolerance import tolerance_failure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATION = os.path.join(ROOT, "tests", "cuda_emulation")
CSRC = os.path.join(ROOT, "csrc")
# The emulated primitives replace each header up to these lines; the rest of the header is used as it is.
KEPT_FROM = {"memory.cuh": "// The top of iteration", "mma.cuh": "// The A fragment of k-step"}
PRIMITIVES = {"memory.cuh": "memory_prims.h", "mma.cuh": "mma_prims.h"}
SEED = 0x1234_5678_9ABC_DEF0 - 2**63
pytestmark = pytest.mark.slow  # a std::thread per CUDA thread
# A collective (shuffle, mma, __syncthreads) that some threads never reach leaves the others waiting forever.
RUN_TIMEOUT_S = 600


def emulated_headers(directory):
    """Writes cuda/common/{memory,mma}.cuh: the emulated primitives, then the real header from its marker on."""
    common = os.path.join(directory, "cuda", "common")
    os.makedirs(common, exist_ok=True)
    for name, marker in KEPT_FROM.items():
        with open(os.path.join(CSRC, "cuda", "common", name)) as f:
            text = f.read()
        assert marker in text, f"csrc/cuda/common/{name} lost the line {marker!r} the emulation splits at"
        rest = text[text.index(marker):]
        with open(os.path.join(common, name), "w") as f:
            f.write(f'#pragma once\n#include "{PRIMITIVES[name]}"\nnamespace tfm_kernels::cuda {{\n{rest}')


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("needs g++ (C++20, _Float16) to build the CUDA emulation")
    build = tmp_path_factory.mktemp("cuda_emulation")
    emulated_headers(str(build))
    binary = str(build / "harness")
    command = [compiler, "-std=c++20", "-O1", "-pthread", "-w", f"-I{build}", f"-I{EMULATION}", f"-I{CSRC}",
               os.path.join(EMULATION, "harness.cpp"), "-o", binary]
    sanitized = subprocess.run(command[:1] + ["-fsanitize=address", "-fno-omit-frame-pointer"] + command[1:],
                               capture_output=True, text=True)
    if sanitized.returncode != 0:  # no AddressSanitizer runtime: build without it
        subprocess.run(command, check=True, capture_output=True, text=True)
    return binary


def to_bits(t):
    return t.contiguous().view(torch.int16).numpy().tobytes()


def from_bits(data, shape, dtype):
    count = int(np.prod(shape))
    return torch.from_numpy(np.frombuffer(data, dtype=np.int16, count=count).copy()).view(dtype).view(shape), count * 2


def run_emulated(harness, tmp_path, q, k, v, grad_out, key_lengths, dropout_p, is_causal, scale, packed, deferred,
                 fused_dq, mixed=False):
    B, Hq, L, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    header = np.array([D, q.dtype == torch.bfloat16, B, Hq, Hk, L, S, is_causal, deferred, packed,
                       key_lengths is not None, SEED, fused_dq, mixed], dtype=np.int64).tobytes()
    data = header + np.array([scale, dropout_p], dtype=np.float64).tobytes()
    if key_lengths is not None:
        data += key_lengths.clamp(0, S).to(torch.int32).numpy().tobytes()  # clamped as api.cpp does
    data += b"".join(to_bits(t) for t in (q, k, v, grad_out))
    (tmp_path / "in.bin").write_bytes(data)
    result = subprocess.run([harness, str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], capture_output=True,
                            text=True, env={**os.environ, "ASAN_OPTIONS": "detect_leaks=0"},
                            timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    raw = (tmp_path / "out.bin").read_bytes()
    tensors, offset = [], 0
    for shape in (q.shape, q.shape, k.shape, v.shape):
        t, size = from_bits(raw[offset:], shape, q.dtype)
        tensors.append(t)
        offset += size
    lse = torch.from_numpy(np.frombuffer(raw[offset:], dtype=np.float32, count=B * Hq * L).copy()).view(B, Hq, L)
    races = int(np.frombuffer(raw[offset + 4 * B * Hq * L:], dtype=np.int64, count=1)[0])
    return (*tensors, lse, races, result.stderr)


# (B, Hq, Hk, L, S, D, dtype, causal, key_lengths, dropout_p, packed (B, N, H, D) inputs and grad_out, deferred
# cp.async)
CASES = [
    (2, 4, 2, 70, 53, 64, torch.float16, True, [53, 0], 0.3, False, True),  # GQA, an empty batch, L > S
    (1, 2, 1, 75, 130, 128, torch.bfloat16, True, None, 0.0, True, True),  # MQA, packed layout, L < S
    (1, 2, 2, 250, 230, 32, torch.float16, False, [170], 0.25, False, False),  # ring stages reused, copies at issue
    (1, 2, 1, 40, 70, 256, torch.float16, True, [61], 0.2, False, True),  # 8-warp dk/dv with split head dim
    (1, 4, 2, 97, 113, 96, torch.float16, True, [101], 0.2, False, True),  # 4-warp dk/dv, 48-column dQ slices
    (1, 2, 2, 300, 300, 64, torch.bfloat16, True, None, 0.1, True, True),  # causal over 3 query blocks
]


def check_against_oracle(harness, tmp_path, case, fused_dq, nan_at=(), mixed=False, jump_at=None):
    """The emulated kernels' out, dq, dk, dv and lse against the float64 oracle; nan_at: (tensor name, index)
    pairs where q, k or v get a NaN, whose NaN the results must carry exactly where the oracle's do; jump_at: a
    key from which on every other query row's scores are about 16 higher (natural units)."""
    B, Hq, Hk, L, S, D, dtype, is_causal, lengths, dropout_p, packed, deferred = case
    torch.manual_seed(L * 1000 + S)
    q, k, v = (torch.randn(B, h, n, D, dtype=dtype) for h, n in ((Hq, L), (Hk, S), (Hk, S)))
    if jump_at is not None:
        lift = (16 * D**0.5) ** 0.5  # lift * lift * scale = 16
        q[:, :, ::2, 0] += lift
        k[:, :, jump_at:, 0] += lift
    for name, index in nan_at:
        {"q": q, "k": k, "v": v}[name][index] = float("nan")
    grad_out = torch.randn(B, Hq, L, D, dtype=dtype)
    key_lengths = None if lengths is None else torch.tensor(lengths)
    scale = D**-0.5
    out, dq, dk, dv, lse, races, log = run_emulated(harness, tmp_path, q, k, v, grad_out, key_lengths, dropout_p,
                                                   is_causal, scale, packed, deferred, fused_dq, mixed)
    assert races == 0, log

    def oracle(dtype_):
        inputs = [t.to(dtype_).requires_grad_() for t in (q, k, v)]
        o, lse_ = reference.attention(*inputs, None, key_lengths, dropout_p, is_causal, scale, SEED)
        return (o.detach(), *torch.autograd.grad(o, inputs, grad_out.to(dtype_))), lse_.detach()

    (baseline, _), (exact, exact_lse) = oracle(dtype), oracle(torch.float64)
    for name, result, base, ref in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), baseline, exact):
        failure = tolerance_failure(f"emulated cuda {name}", result, base, ref)
        assert failure is None, failure
    assert torch.equal(torch.isinf(lse), torch.isinf(exact_lse)) and (lse[torch.isinf(lse)] > 0).all()
    assert torch.equal(torch.isnan(lse), torch.isnan(exact_lse))
    finite = torch.isfinite(exact_lse)
    torch.testing.assert_close(lse[finite].double(), exact_lse[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backward", ["fused_dq", "deterministic"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}Hq{c[1]}Hk{c[2]}L{c[3]}S{c[4]}D{c[5]}")
def test_emulated_kernels_against_oracle(harness, tmp_path, case, backward):
    check_against_oracle(harness, tmp_path, case, backward == "fused_dq")


@pytest.mark.parametrize("case,backward", [(CASES[0], "fused_dq"), (CASES[1], "deterministic")],
                         ids=lambda c: c if isinstance(c, str) else f"B{c[0]}Hq{c[1]}Hk{c[2]}L{c[3]}S{c[4]}D{c[5]}")
def test_emulated_kernels_read_each_tensor_by_its_own_strides(harness, tmp_path, case, backward):
    """k and v, q and grad_out in different layouts, and the backward's out in a third: api.cpp passes every
    tensor's strides separately, and the kernels must not read one tensor by another's (each backward once,
    with head dims 64 and 128)."""
    check_against_oracle(harness, tmp_path, case, backward == "fused_dq", mixed=True)


JUMP_CASES = [((1, 2, 1, 70, 200, 64, torch.float16, False, None, 0.1, False, True), 130),
              ((1, 2, 2, 64, 150, 128, torch.bfloat16, False, [140], 0.0, True, True), 100)]


@pytest.mark.parametrize("case,jump_at", JUMP_CASES, ids=["D64", "D128"])
def test_emulated_forward_rescales_where_a_row_max_jumps(harness, tmp_path, case, jump_at):
    """Every other query row meets much larger scores at a late key block (23 in base 2, past the forward's
    kStaleMaxSlack of 8): the warps holding those rows rescale there, their other rows with them, while on the
    blocks before and after it they take the weights from a max that did not move (forward_kernel.cuh)."""
    check_against_oracle(harness, tmp_path, case, True, jump_at=jump_at)


# Every key these cases hold takes part in every row. Where a mask hides keys from a NaN row, the oracle's
# gradients are NaN for those keys too (its weights there are 0 / NaN), while the kernels skip them.
NAN_CASES = [CASES[0], (1, 2, 1, 75, 130, 128, torch.bfloat16, False, None, 0.0, True, True)]


@pytest.mark.parametrize("case", NAN_CASES, ids=lambda c: f"B{c[0]}Hq{c[1]}Hk{c[2]}L{c[3]}S{c[4]}D{c[5]}")
def test_emulated_kernels_carry_nan_as_the_oracle(harness, tmp_path, case):
    """A NaN in a query row makes that row's output, lse and gradients NaN, and a NaN in a key or a value
    reaches every row that sees it, as in the oracle: never the zeros of a row without keys."""
    check_against_oracle(harness, tmp_path, case, True,
                         nan_at=(("q", (0, 1, 5, 3)), ("k", (0, 0, 9, 2)), ("v", (0, 0, 20, 1))))


@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=lambda c: f"B{c[0]}Hq{c[1]}Hk{c[2]}L{c[3]}S{c[4]}D{c[5]}")
def test_emulated_kernels_ignore_what_lies_past_key_lengths(harness, tmp_path, case):
    """NaN in the keys and values past key_lengths (padding a caller never wrote) changes no bit of the output,
    the log-sum-exp or any gradient."""
    B, Hq, Hk, L, S, D, dtype, is_causal, lengths, dropout_p, packed, deferred = case
    torch.manual_seed(L * 1000 + S)
    q, k, v = (torch.randn(B, h, n, D, dtype=dtype) for h, n in ((Hq, L), (Hk, S), (Hk, S)))
    grad_out = torch.randn(B, Hq, L, D, dtype=dtype)
    k_nan, v_nan = k.clone(), v.clone()
    for b, length in enumerate(lengths):
        k_nan[b, :, length:] = float("nan")
        v_nan[b, :, length:] = float("nan")
    args = (torch.tensor(lengths), dropout_p, is_causal, D**-0.5, packed, deferred, True)
    clean = run_emulated(harness, tmp_path, q, k, v, grad_out, *args)
    padded = run_emulated(harness, tmp_path, q, k_nan, v_nan, grad_out, *args)
    for name, a, b in zip(("out", "dq", "dk", "dv", "lse"), clean[:5], padded[:5]):
        assert torch.equal(a, b), f"emulated cuda {name} changed with NaN past key_lengths"


def test_emulated_keys_no_row_sees_keep_zero_gradients_beside_a_nan_key(harness, tmp_path):
    """A NaN key makes the rows that see it NaN, their lse too. The keys no row sees (causal, L < S) get
    dK = dV = 0 though they share key blocks with those rows, as tests/test_attention.py checks of the other
    backends (the oracle's dV there is NaN, a difference the README allows)."""
    B, Hq, Hk, L, S, D = 1, 2, 1, 75, 130, 128  # MQA: both query heads see key head 0
    q, k, v = (torch.randn(B, h, n, D, dtype=torch.bfloat16) for h, n in ((Hq, L), (Hk, S), (Hk, S)))
    k[0, 0, 9, 2] = float("nan")  # rows 9 .. L - 1 of both heads see it
    grad_out = torch.randn(B, Hq, L, D, dtype=torch.bfloat16)
    out, dq, dk, dv, lse, races, log = run_emulated(harness, tmp_path, q, k, v, grad_out, None, 0.0, True, D**-0.5,
                                                   False, True, True)
    assert races == 0, log
    assert (dk[:, :, L:] == 0).all() and (dv[:, :, L:] == 0).all()
    nan_keys = torch.zeros(B, Hk, S, dtype=torch.bool)
    nan_keys[0, 0, :L] = True  # every key a NaN row sees
    assert torch.equal(dk.isnan().any(-1), nan_keys) and torch.equal(dv.isnan().any(-1), nan_keys)
