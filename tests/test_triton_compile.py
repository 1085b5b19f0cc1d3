"""The Triton kernels compiled for GPU targets without a GPU (benchmarks/compile_triton.py): every config the
launcher would run on sm_90, sm_80 or sm_86 (99 KiB per block, as sm_89) compiles and fits that target's shared
memory.

The launchers choose configs by a shared-memory estimate (tfm_kernels/triton/attention.py, mlp.py) less a
margin; a config that passes the estimate but compiles to more than the device has would raise OutOfResources
on the GPU. The cases are those whose compiled kernels or estimates came closest to each target's limit among
the dtypes, head dims and features measured (benchmarks/RESULTS.md), TF32 dots among them, the only path that
traces their operand rounding (the interpreter leaves it out). One more test reads the float32 backward's
compiled dots (tests/fma_chain_probe.py). The compiler runs in a subprocess, since this test session runs
Triton under the interpreter (tests/conftest.py)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]
SCRIPT = ROOT / "benchmarks" / "compile_triton.py"
EVERY_FEATURE = ["--mask", "additive", "--causal", "--key-lengths", "--dropout"]
CASES = {
    # float32 without TF32 runs the fallbacks (no tensor cores); at the largest head dim on 99 KiB, dK/dV 16x32
    # takes 100352 of 101376 bytes, the forward 32x32 69632
    "sm86-fp32-d256-attention": ["--arch", "86", "--dtype", "fp32", "--head-dim", "256", *EVERY_FEATURE],
    # TF32 attention at d128 on sm_80: forward and dQ 64x32 estimated at the whole 166912 bytes, compiled to
    # 81920 and 114688
    "sm80-tf32-d128-attention": ["--arch", "80", "--dtype", "fp32", "--tf32", "--head-dim", "128", *EVERY_FEATURE],
    # attention dK/dV at the largest head dim, where the margin covers layout-conversion scratch
    "sm90-bf16-d256-attention": ["--arch", "90", "--dtype", "bf16", "--head-dim", "256", *EVERY_FEATURE],
    # float32 with TF32 dots, operands rounded to TF32 in registers first (precision.dot): GEMM 128x128x32 and
    # 64x64x64, 180224 of 232448 bytes (triton 3.8). On sm_80 float32 gated now runs the fallback (32768
    # bytes), where 128x128x32 (163840 of 166912) ran past its estimate of 196608
    "sm90-tf32-gated-mlp": ["--mlp", "--arch", "90", "--dtype", "fp32", "--tf32", "--activation", "gelu_tanh",
                            "--gated", "--dropout", "--bias"],
    # the gated GEMM, two weight tiles per stage, TMA barriers beyond the estimate
    "sm90-bf16-gated-mlp": ["--mlp", "--arch", "90", "--dtype", "bf16", "--activation", "gelu_tanh", "--gated",
                            "--dropout", "--bias"],
    # TF32 attention on 99 KiB, where its mask tiles outweigh the small head dim's tiles: d16 forward 64x64
    # (61440 of 101376 bytes); d32 dK/dV 32x128 (65792) and dQ 64x32 (36864). Forward 128x64 at d16, which
    # the estimate without mask tiles admitted, compiles to 106496
    "sm86-tf32-d16-forward": ["--arch", "86", "--dtype", "fp32", "--tf32", "--head-dim", "16", "--kernel",
                              "forward", *EVERY_FEATURE],
    "sm86-tf32-d32-backward": ["--arch", "86", "--dtype", "fp32", "--tf32", "--head-dim", "32", "--kernel", "dk_dv",
                               "--kernel", "dq", *EVERY_FEATURE],
    # float32 gated on 99 KiB: no listed config's estimate fits, the fallback 64x64x32 runs (24576 bytes);
    # without it 128x128x32 in 4 stages ran, 147456 bytes: OutOfResources on an RTX 30xx/40xx, A10, L4
    "sm86-fp32-gated-mlp": ["--mlp", "--arch", "86", "--dtype", "fp32", "--activation", "gelu_tanh", "--gated",
                            "--dropout", "--bias"],
    # 16-bit gated on 99 KiB: 128x128x32 and 64x64x64 in 4 stages, 73728 of 101376 bytes
    "sm86-bf16-gated-mlp": ["--mlp", "--arch", "86", "--dtype", "bf16", "--activation", "gelu_tanh", "--gated",
                            "--dropout", "--bias"],
}


def compiler_env():
    """This process's environment without the interpreter switch, the checkout first on the import path."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.mark.slow
@pytest.mark.parametrize("argv", CASES.values(), ids=CASES.keys())
def test_every_config_the_launcher_runs_fits_the_target(argv):
    result = subprocess.run([sys.executable, str(SCRIPT), "--admitted", *argv], env=compiler_env(), capture_output=True,
                            text=True, timeout=1200)
    report = result.stdout + result.stderr
    assert " runs " in result.stdout, report  # configs were compiled, not all pruned or skipped
    assert result.returncode == 0, report


@pytest.mark.slow
def test_float32_delta_pass_sums_as_the_dp_product():
    """With exact float32 dots the delta pass sums rowsum(dO * O) as the dq and dk/dv kernels sum each dP: one
    chain of fused multiply-adds over the value head dim (64, beside the score's 32) from 0 per element. A row
    whose weight is all on one key then gets dP - delta = 0 exactly, as torch's softmax backward does. Only the
    chains' lengths and starts are compared: that each runs over k in order is Triton's lowering of such a dot.
    The dq and dk/dv assertions guard the premise (their dP chains); the delta one fails with a plain row sum."""
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "fma_chain_probe.py")], env=compiler_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    chains = {kernel: {int(length): count for length, count in lengths.items()}
              for kernel, lengths in json.loads(result.stdout).items()}
    assert set(chains["delta"]) == {64}, chains
    assert 64 in chains["dq"] and 64 in chains["dk_dv"], chains
