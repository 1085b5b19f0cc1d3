"""Whole-model benchmarks in tokens/s: a TransformerEncoder of our layers against torch's, and our language
model against its torch-layer baseline, eager and torch.compile.

    python benchmarks/bench_model.py [--lm-presets gpt2-small] [...]   # the table
    pytest benchmarks/bench_model.py --benchmark-only                   # pytest-benchmark
"""

import sys

import pytest
import torch

from tfm_kernels.bench import cli, configs, model
from tfm_kernels.bench.suite import labelled_providers

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
SHAPES = configs.ENCODER_SHAPES if ON_GPU else configs.CPU_ENCODER_SHAPES
CASES = model.model_cases(SHAPES, ("fwd+bwd",), DEVICE, with_compile=ON_GPU)


@pytest.mark.parametrize("provider", [pytest.param(p, id=label) for label, p in labelled_providers(CASES)])
def test_model(time_provider, provider):
    time_provider(provider)


if __name__ == "__main__":
    arguments = sys.argv[1:]
    sys.exit(cli.main(arguments if "--suite" in arguments else ["--suite", "model", *arguments]))
