"""The Triton kernels compiled for GPU targets without a GPU (benchmarks/compile_triton.py): every config the
launcher would run on sm_90 or sm_80 compiles and fits that target's shared memory.

The launchers choose configs by a shared-memory estimate (tfm_kernels/triton/attention.py, mlp.py) less a
margin; a config that passes the estimate but compiles to more than the device has would raise OutOfResources
on the GPU. The cases are those whose compiled kernels came closest to each target's limit in the sweep over
dtypes, head dims and features recorded in benchmarks/RESULTS.md, and one with TF32 dots, the only path that
traces their operand rounding (the interpreter leaves it out). The compiler runs in a subprocess, since
this test session runs Triton under the interpreter (tests/conftest.py)."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]
SCRIPT = ROOT / "benchmarks" / "compile_triton.py"
EVERY_FEATURE = ["--mask", "additive", "--causal", "--key-lengths", "--dropout"]
CASES = {
    # attention forward 128x128: 229376 of 232448 bytes
    "sm90-fp32-d64-forward": ["--arch", "90", "--dtype", "fp32", "--head-dim", "64", "--kernel", "forward",
                              *EVERY_FEATURE],
    # attention dK/dV 64x128 and dQ 128x64: 164352 and 163840 of 166912 bytes
    "sm80-fp32-d64-backward": ["--arch", "80", "--dtype", "fp32", "--head-dim", "64", "--kernel", "dk_dv",
                               "--kernel", "dq", *EVERY_FEATURE],
    # attention dK/dV at the largest head dim, where the margin covers layout-conversion scratch
    "sm90-bf16-d256-attention": ["--arch", "90", "--dtype", "bf16", "--head-dim", "256", *EVERY_FEATURE],
    # float32 with TF32 dots, operands rounded to TF32 in registers first (precision.dot): GEMM 128x128x32,
    # 163840 (triton 3.8; 147456 with 3.6) of 166912 bytes
    "sm80-tf32-gated-mlp": ["--mlp", "--arch", "80", "--dtype", "fp32", "--tf32", "--activation", "gelu_tanh",
                            "--gated", "--dropout", "--bias"],
    # the gated GEMM, two weight tiles per stage, TMA barriers beyond the estimate
    "sm90-bf16-gated-mlp": ["--mlp", "--arch", "90", "--dtype", "bf16", "--activation", "gelu_tanh", "--gated",
                            "--dropout", "--bias"],
}


@pytest.mark.slow
@pytest.mark.parametrize("argv", CASES.values(), ids=CASES.keys())
def test_every_config_the_launcher_runs_fits_the_target(argv):
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, str(SCRIPT), "--admitted", *argv], env=env, capture_output=True,
                            text=True, timeout=1200)
    report = result.stdout + result.stderr
    assert " runs " in result.stdout, report  # configs were compiled, not all pruned or skipped
    assert result.returncode == 0, report
