"""Attention benchmarks: our backends against torch SDPA (flash, efficient, cudnn), compiled FlexAttention and
nn.MultiheadAttention.

    python benchmarks/bench_attention.py [--full] [--plot DIR] [...]   # the table (tfm_kernels.bench options)
    pytest benchmarks/bench_attention.py --benchmark-only                # pytest-benchmark, core cases
"""

import sys

import pytest

from tfm_kernels.bench import attention, cli, configs
from tfm_kernels.bench.suite import labelled_providers

ON_GPU = attention.torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
SHAPES = configs.attention_shapes() if ON_GPU else configs.CPU_QUICK_ATTENTION_SHAPES
MHA_SHAPES = configs.MHA_SHAPES if ON_GPU else configs.CPU_MHA_SHAPES
FLEX = "headline" if ON_GPU else "none"
CASES = attention.attention_cases(SHAPES, ("fwd", "bwd"), DEVICE, with_flex=FLEX)
MHA_CASES = attention.mha_cases(MHA_SHAPES, ("fwd", "fwd+bwd"), DEVICE)


def _params(cases):
    return [pytest.param(provider, id=label) for label, provider in labelled_providers(cases)]


@pytest.mark.parametrize("provider", _params(CASES))
def test_attention(time_provider, provider):
    time_provider(provider)


@pytest.mark.parametrize("provider", _params(MHA_CASES))
def test_multihead_attention(time_provider, provider):
    time_provider(provider)


if __name__ == "__main__":
    arguments = sys.argv[1:]
    sys.exit(cli.main(arguments if "--suite" in arguments else ["--suite", "attention,mha", *arguments]))
