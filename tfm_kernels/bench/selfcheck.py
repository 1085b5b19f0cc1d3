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

from .. import backends, reference, rng
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
    """The first failure among paired tensors (output, then each gradient): a dtype other than torch's (the
    baseline), a shape other than the oracle's or an error beyond the tolerance; or None. Pairs whose oracle is
    None (an input the op does not take) are skipped; a gradient the oracle has and ours lacks fails."""
    for name, result, base, exact in zip(names, ours, baseline, oracle):
        if exact is None:
            continue
        if result is None:
            return f"{name}: no gradient where the oracle has one"
        if result.dtype != base.dtype:
            return f"{name}: dtype {result.dtype} where torch gives {base.dtype}"
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


DROPOUT_SEED = 0  # set before each call, so that every backend and the oracle draw the same dropout mask
# (is_causal, dropout_p, (L, S)) of the attention checks.
ATTENTION_CHECKS = ((False, 0.0, (37, 53)), (True, 0.0, (37, 37)), (False, 0.2, (37, 53)))


def attention_checks(device, dtype) -> list[Check]:
    """Our attention on each backend (ATTENTION_CHECKS), B=2, H=3, D=32. With dropout, torch's SDPA draws
    another mask, so the reference in the inputs' dtype is the baseline, drawing the seed as our call does."""
    checks = []
    for causal, dropout_p, (length, keys) in ATTENTION_CHECKS:
        kind = "causal" if causal else "full"
        kind += f" dropout {dropout_p:g}" if dropout_p else ""
        case = f"b2 h3 l{length} s{keys} d32 {kind} {str(dtype).removeprefix('torch.')}"
        q = randn(2, 3, length, 32, dtype=dtype, device=device)  # (B, H, L, D)
        k, v = (randn(2, 3, keys, 32, dtype=dtype, device=device) for _ in range(2))  # (B, H, S, D)

        def oracle(q, k, v, causal=causal, dropout_p=dropout_p):
            torch.manual_seed(DROPOUT_SEED)
            seed = rng.seed_for(dropout_p, q.device)
            return reference.attention(q, k, v, dropout_p=dropout_p, is_causal=causal, seed=seed)[0]

        def torch_sdpa(q, k, v, causal=causal):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        for backend in ATTENTION_BACKENDS:

            def ours(q, k, v, causal=causal, dropout_p=dropout_p, backend=backend):
                torch.manual_seed(DROPOUT_SEED)
                return scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, backend=backend)

            baseline = oracle if dropout_p else torch_sdpa
            checks.append(
                _run_check("attention", backend, case, ours, baseline, oracle, [q, k, v], ["out", "dq", "dk", "dv"])
            )
    return checks


# (operator, activation, gated, dropout_p): every activation at least once, dropout once, biases everywhere.
MLP_CHECKS = (
    ("fused_linear", "relu", False, 0.0),
    ("fused_linear", "gelu_tanh", False, 0.25),
    ("gated_linear", None, True, 0.0),
    ("mlp", "gelu", False, 0.0),
    ("mlp", "silu", True, 0.0),
)


def _mlp_inputs(gated, device, dtype):
    """x (3, 7, 33) (a leading batch shape); w1 (100, 33), or (200, 33) packed [gate; up] when gated; b1; w2
    (33, 100); b2."""
    shape = configs.MLPShape("check", 3 * 7, 33, 100, None, gated, dtype)
    x, *weights = mlp_cases.mlp_weights(shape, device, False, biases=True)
    return (x.view(3, 7, shape.d_model), *weights)


def _ours(module, op, activation, gated, dropout_p, backend) -> Callable:
    """Our operator `op` of `module` on `backend`, as fn(x, w1, b1, w2, b2)."""

    def run(x, w1, b1, w2, b2):
        torch.manual_seed(DROPOUT_SEED)
        if op == "fused_linear":
            return module.fused_linear(x, w1, b1, activation, dropout_p, backend=backend)
        if op == "gated_linear":
            return module.gated_linear(x, w1, activation, dropout_p, bias=b1, backend=backend)
        return module.mlp(x, w1, b1, w2, b2, activation, dropout_p, gated=gated, backend=backend)

    return run


def _reference(op, activation, gated, dropout_p) -> Callable:
    """The same operator in tfm_kernels.reference's plain torch ops (the oracle in float64, torch's baseline in
    the inputs' dtype), drawing its dropout seed as our operators do."""

    def run(x, w1, b1, w2, b2):
        torch.manual_seed(DROPOUT_SEED)
        seed = rng.seed_for(dropout_p, x.device)
        x2 = x.reshape(-1, x.shape[-1])  # (M, d_model): the dropout mask's rows are the flattened tokens
        linear = reference.gated_linear if gated else reference.linear
        out = linear(x2, w1, b1, activation, dropout_p, seed)  # (M, d_ff)
        if op == "mlp":
            out = F.linear(out, w2, b2)  # (M, d_model)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    return run


def mlp_checks(device, dtype) -> list[Check]:
    """fused_linear, gated_linear and mlp (MLP_CHECKS) on each backend; x (3, 7, 33), d_ff 100."""
    try:  # the module: the package re-exports its function mlp under the same name
        module = importlib.import_module("tfm_kernels.mlp")
    except ImportError as error:
        return [Check("mlp", "all", "-", "n/a", f"tfm_kernels.mlp is not available ({error})")]
    checks = []
    for op, activation, gated, dropout_p in MLP_CHECKS:
        inputs = _mlp_inputs(gated, device, dtype)
        name = f"{op}{' gated' if gated and op == 'mlp' else ''} {activation or 'identity'}"
        name += f" dropout {dropout_p:g}" if dropout_p else ""
        case = f"x {tuple(inputs[0].shape)} d_ff 100, biases, {str(dtype).removeprefix('torch.')}"
        names = ["out", "dx", "dw1", "db1", "dw2", "db2"]
        oracle = _reference(op, activation, gated, dropout_p)
        for backend in MLP_BACKENDS:
            ours = _ours(module, op, activation, gated, dropout_p, backend)
            checks.append(_run_check(name, backend, case, ours, oracle, oracle, inputs, names))
    return checks


def self_check(device="cpu", dtype=torch.float32) -> list[Check]:
    """Every operator on every backend, forward and backward, against the float64 oracle."""
    device = torch.device(device)
    return attention_checks(device, dtype) + mlp_checks(device, dtype)
