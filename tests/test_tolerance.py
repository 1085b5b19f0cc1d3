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


def test_torchs_non_finite_elements_loosen_nothing():
    """Where torch's own result overflows or is NaN (and the oracle is finite), the kernel is held to the
    bound of torch's finite elements, not to an infinite one."""
    assert "exceeds" in failure([5.0, -7.0], [1.0, 2.0], baseline=[NAN, 2.0])
    assert "exceeds" in failure([5.0, -7.0], [1.0, 2.0], baseline=[INF, 2.0])
    assert failure([1.0, 2.0], [1.0, 2.0], baseline=[INF, 2.0]) is None


def test_result_in_another_dtype_than_torchs_fails():
    oracle = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert "dtype torch.float32 != torch's torch.float16" in tolerance_failure("t", oracle.float(), oracle.half(),
                                                                               oracle)


def test_float32_noise_is_a_few_units_in_the_last_place():
    """A float32 error of 1e-5 at magnitude 1 where torch's is 0 is 80 units in the last place: a failure."""
    assert "exceeds" in failure([1.0 + 1e-5, 2.0], [1.0, 2.0])
    assert failure([1.0 + 4e-7, 2.0], [1.0, 2.0]) is None
