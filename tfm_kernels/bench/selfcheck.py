"""The correctness self-check of `python -m tfm_kernels bench`: every operator on every backend that can run
here, forward and backward, against the float64 oracle under DESIGN.md's tolerance rule
(tfm_kernels.tolerance).

Sizes are odd on purpose (37, 53, 33, 100) so that tile edges are exercised. A backend that cannot run here
(no GPU, no build, Triton without TRITON_INTERPRET=1 on CPU) is listed as n/a with the reason."""

import importlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .. import backends, reference
from ..attention import scaled_dot_product_attention
from ..tolerance import tolerance_failure
from . import configs
from . import mlp as mlp_cases
from .timing import randn

# Our kernels; the "torch" backends are the oracles themselves.
ATTENTION_BACKENDS = tuple(b for b in backends.ATTENTION_BACKENDS if b != "torch")
MLP_BACKENDS = tuple(b for b in backends.MLP_BACKENDS if b != "torch")


@dataclass
class Check:
    """One operator on one backend: status "pass", "FAIL" or "n/a"; detail: the failure or the reason."""

    op: str
    backend: str
    case: str
    status: str
    detail: str = ""


def _compare(names, ours, baseline, oracle) -> str | None:
    """The first tolerance failure among paired tensors (output, then each gradient), or None. Pairs whose
    oracle is None (an input the op does not take) are skipped; a gradient the oracle has and ours
    lacks fails."""
    for name, result, base, exact in zip(names, ours, baseline, oracle):
        if exact is None:
            continue
        if result is None:
            return f"{name}: no gradient where the oracle has one"
        failure = tolerance_failure(name, result, base, exact)
        if failure:
            return failure
    return None


def _forward_and_grads(fn, inputs, grad_output=None):
    """fn's output and the gradient of each input (None where the input is None or unused), for one
    grad_output (drawn when not given)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves)
    if grad_output is None:
        grad_output = randn(*out.shape, dtype=torch.float64, device=out.device)
    differentiable = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, differentiable, grad_output.to(out.dtype), allow_unused=True))
    return [out, *(next(grads) if t is not None else None for t in leaves)], grad_output


def _run_check(op, backend, case, ours_fn, baseline_fn, oracle_fn, inputs, names) -> Check:
    """ours_fn against oracle_fn (float64 copies of inputs), with baseline_fn (torch, inputs' dtype) setting
    the allowed error."""
    try:
        exact, grad_output = _forward_and_grads(
            oracle_fn, [t.double() if t is not None else None for t in inputs]
        )
        baseline, _ = _forward_and_grads(baseline_fn, inputs, grad_output)
        ours, _ = _forward_and_grads(ours_fn, inputs, grad_output)
    except NotImplementedError as why:  # n/a where this machine lacks the backend; a refused case is a failure
        reason = str(why).splitlines()[0]
        return Check(op, backend, case, "n/a" if backends.missing_environment([reason]) else "FAIL", reason)
    except Exception as error:  # noqa: BLE001 - a crashing kernel is a failed check, reported, not raised
        return Check(op, backend, case, "FAIL", f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
    failure = _compare(names, ours, baseline, exact)
    compared = [n for n, t in zip(names, exact) if t is not None]
    return Check(
        op, backend, case, "FAIL" if failure else "pass", failure or f"{', '.join(compared)} within tolerance"
    )


def attention_checks(device, dtype) -> list[Check]:
    """Our attention on each backend: full attention with L != S and causal attention, B=2, H=3, D=32."""
    checks = []
    for causal, (length, keys) in ((False, (37, 53)), (True, (37, 37))):
        kind = "causal" if causal else "full"
        case = f"b2 h3 l{length} s{keys} d32 {kind} {str(dtype).removeprefix('torch.')}"
        q = randn(2, 3, length, 32, dtype=dtype, device=device)  # (B, H, L, D)
        k, v = (randn(2, 3, keys, 32, dtype=dtype, device=device) for _ in range(2))  # (B, H, S, D)

        def oracle(q, k, v, causal=causal):
            return reference.attention(q, k, v, is_causal=causal)[0]

        def torch_sdpa(q, k, v, causal=causal):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        for backend in ATTENTION_BACKENDS:

            def ours(q, k, v, causal=causal, backend=backend):
                return scaled_dot_product_attention(q, k, v, is_causal=causal, backend=backend)

            checks.append(
                _run_check(
                    "attention", backend, case, ours, torch_sdpa, oracle, [q, k, v], ["out", "dq", "dk", "dv"]
                )
            )
    return checks


def _mlp_ops(module) -> list[tuple[str, configs.MLPShape, Callable, Callable]]:
    """(op name, shape, our function(backend) -> fn(x, w1, b1, w2, b2), eager fn(x, w1, b1, w2, b2))."""
    shape = configs.MLPShape("check", 3 * 7, 33, 100, "gelu", False, torch.float32)
    gated = configs.MLPShape("check", 3 * 7, 33, 100, "silu", True, torch.float32)
    return [
        (
            "fused_linear gelu",
            shape,
            lambda b: lambda x, w1, b1, w2, b2: module.fused_linear(x, w1, b1, "gelu", backend=b),
            lambda x, w1, b1, w2, b2: reference.linear(x, w1, b1, "gelu"),
        ),
        (
            "gated_linear silu",
            gated,
            lambda b: lambda x, w1, b1, w2, b2: module.gated_linear(x, w1, "silu", backend=b),
            lambda x, w1, b1, w2, b2: reference.gated_linear(x, w1, None, "silu"),
        ),
        (
            "mlp gelu",
            shape,
            lambda b: lambda x, w1, b1, w2, b2: module.mlp(x, w1, b1, w2, b2, "gelu", backend=b),
            lambda x, w1, b1, w2, b2: mlp_cases.eager_mlp(x, w1, b1, w2, b2, "gelu"),
        ),
        (
            "mlp swiglu",
            gated,
            lambda b: lambda x, w1, b1, w2, b2: module.mlp(x, w1, b1, w2, b2, "silu", gated=True, backend=b),
            lambda x, w1, b1, w2, b2: mlp_cases.eager_mlp(x, w1, b1, w2, b2, "silu", gated=True),
        ),
    ]


def mlp_checks(device, dtype) -> list[Check]:
    """fused_linear, gated_linear and mlp on each backend; x (3, 7, 33), d_ff 100."""
    try:  # the module: the package re-exports its function mlp under the same name
        module = importlib.import_module("tfm_kernels.mlp")
    except ImportError as error:
        return [Check("mlp", "all", "-", "n/a", f"tfm_kernels.mlp is not available ({error})")]
    checks = []
    for op, shape, ours_for, eager in _mlp_ops(module):
        x, w1, b1, w2, b2 = mlp_cases.mlp_weights(shape, device, False, dtype)
        x = x.view(3, 7, shape.d_model)  # (3, 7, 33): a leading batch shape
        case = f"x {tuple(x.shape)} d_ff {shape.d_ff} {str(dtype).removeprefix('torch.')}"
        names = ["out", "dx", "dw1", "db1", "dw2", "db2"]
        for backend in MLP_BACKENDS:
            checks.append(
                _run_check(op, backend, case, ours_for(backend), eager, eager, [x, w1, b1, w2, b2], names)
            )
    return checks


def self_check(device="cpu", dtype=torch.float32) -> list[Check]:
    """Every operator on every backend, forward and backward, against the float64 oracle."""
    device = torch.device(device)
    return attention_checks(device, dtype) + mlp_checks(device, dtype)
