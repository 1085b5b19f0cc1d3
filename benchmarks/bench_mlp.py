"""MLP benchmarks: tfm_kernels.mlp (each backend) against eager PyTorch and torch.compile of the same MLP.

    python benchmarks/bench_mlp.py [--mlp-shapes "llama-7b swiglu"] [...]   # the table
    pytest benchmarks/bench_mlp.py --benchmark-only                          # pytest-benchmark
"""

import sys

import pytest
import torch

from tfm_kernels.bench import cli, configs, mlp
from tfm_kernels.bench.suite import labelled_providers

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
SHAPES = configs.MLP_SHAPES if ON_GPU else configs.CPU_QUICK_MLP_SHAPES
CASES = mlp.mlp_cases(SHAPES, ("fwd", "fwd+bwd"), DEVICE, with_compile=ON_GPU)


@pytest.mark.parametrize("provider", [pytest.param(p, id=label) for label, p in labelled_providers(CASES)])
def test_mlp(time_provider, provider):
    time_provider(provider)


if __name__ == "__main__":
    arguments = sys.argv[1:]
    sys.exit(cli.main(arguments if "--suite" in arguments else ["--suite", "mlp", *arguments]))
