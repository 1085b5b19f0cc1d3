"""The tolerance rule itself (tfm_kernels.tolerance): errors against the float64 oracle, and NaN or infinity
only where the oracle has the same."""

import torch

from tfm_kernels.tolerance import tolerance_failure

NAN, INF = float("nan"), float("inf")


def failure(result, oracle, baseline=None):
    oracle = torch.tensor(oracle, dtype=torch.float64)
    result = torch.tensor(result, dtype=torch.float32)
    baseline = oracle.float() if baseline is None else torch.tensor(baseline, dtype=torch.float32)
    return tolerance_failure("t", result, baseline, oracle)


def test_error_bound_is_twice_torchs_plus_noise():
    assert failure([1.0, 2.0], [1.0, 2.0]) is None
    assert failure([1.001, 2.0], [1.0, 2.0], baseline=[1.0006, 2.0]) is None
    assert "exceeds 2 x torch's" in failure([1.002, 2.0], [1.0, 2.0], baseline=[1.0006, 2.0])


def test_nan_and_infinities_only_where_the_oracle_has_them():
    assert failure([NAN, INF, -INF, 1.0], [NAN, INF, -INF, 1.0]) is None
    for result, oracle in (([NAN, 1.0], [2.0, 1.0]), ([0.0, 1.0], [NAN, 1.0]), ([INF, 1.0], [-INF, 1.0]),
                           ([NAN, 1.0], [INF, 1.0])):
        assert "1 elements NaN or infinite" in failure(result, oracle, baseline=oracle), (result, oracle)
    # The finite elements beside them still follow the error bound.
    assert "exceeds" in failure([NAN, 1.5], [NAN, 1.0], baseline=[NAN, 1.0])
