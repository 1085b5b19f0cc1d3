"""MLP cases: tfm_kernels.mlp (each backend) against the same MLP in eager PyTorch and under torch.compile."""

import functools
import importlib

import torch
import torch.nn.functional as F

from .. import backends, reference
from . import configs
from .suite import Case, Provider, Unavailable, raise_recompile_limit, timed_step, untimed_reason
from .timing import randn

OUR_BACKENDS = {"cuda": ("cuda", "triton"), "cpu": ("cpu", "triton")}
COMPILE_RECOMPILE_LIMIT = 64


def eager_mlp(x, w1, b1, w2, b2, activation="gelu", gated=False):
    """The MLP block in plain torch ops (tfm_kernels.reference, no dropout): the eager peer and the function
    torch.compile compiles. x (..., d_model); w1 (d_ff, d_model), or (2*d_ff, d_model) packed [gate; up] when
    gated; w2 (d_model, d_ff); biases or None."""
    if gated:
        hidden = reference.gated_linear(x, w1, b1, activation)  # (..., d_ff)
    else:
        hidden = reference.linear(x, w1, b1, activation)  # (..., d_ff)
    return F.linear(hidden, w2, b2)


def mlp_weights(shape: configs.MLPShape, device, requires_grad, dtype=None, biases=None):
    """(x, w1, b1, w2, b2) for `shape`, scaled like nn.Linear's init so activations stay O(1). Gated: w1 is
    the packed (2*d_ff, d_model) gate+up weight. biases: whether b1 and b2 are there (None: unless gated, as in
    LLaMA-style MLPs), else they are None."""
    dtype = shape.dtype if dtype is None else dtype
    biases = not shape.gated if biases is None else biases
    up_rows = 2 * shape.d_ff if shape.gated else shape.d_ff

    def make(*size, fan_in=1):
        return randn(*size, dtype=dtype, device=device, scale=fan_in**-0.5, requires_grad=requires_grad)

    x = make(shape.tokens, shape.d_model)  # (M, d_model)
    w1 = make(up_rows, shape.d_model, fan_in=shape.d_model)  # (d_ff or 2*d_ff, d_model)
    w2 = make(shape.d_model, shape.d_ff, fan_in=shape.d_ff)  # (d_model, d_ff)
    if not biases:
        return x, w1, None, w2, None
    return x, w1, make(up_rows, fan_in=shape.d_model), w2, make(shape.d_model, fan_in=shape.d_ff)


def _our_mlp_module():
    try:  # the module: the package re-exports its function mlp under the same name
        return importlib.import_module("tfm_kernels.mlp")
    except ImportError as error:
        raise Unavailable(f"tfm_kernels.mlp is not available ({error})") from None


def ours(shape, mode, device, backend) -> Provider:
    def prepare():
        our_mlp = _our_mlp_module().mlp
        probe_x = torch.empty(shape.tokens, shape.d_model, dtype=shape.dtype, device=device)  # (M, K)
        probe_w = torch.empty(shape.d_ff, shape.d_model, dtype=shape.dtype, device=device)  # (N, K)
        reasons = backends.mlp_not_supported_reasons(backend, probe_x, probe_w)
        if reasons:
            raise Unavailable("; ".join(reasons))

        def forward(x, w1, b1, w2, b2):
            return our_mlp(x, w1, b1, w2, b2, shape.activation, gated=shape.gated, backend=backend)

        return timed_step(forward, lambda grad: mlp_weights(shape, device, grad), mode, device)

    return Provider(f"ours-{backend}", True, prepare, untimed=untimed_reason(backend, device),
                    triton_module="mlp" if backend == "triton" else "")


@functools.cache
def _compiled_mlp():
    raise_recompile_limit(COMPILE_RECOMPILE_LIMIT)
    return torch.compile(eager_mlp, dynamic=False)


def torch_mlp(shape, mode, device, compiled) -> Provider:
    def prepare():
        run = _compiled_mlp() if compiled else eager_mlp

        def forward(x, w1, b1, w2, b2):
            return run(x, w1, b1, w2, b2, shape.activation, shape.gated)

        return timed_step(forward, lambda grad: mlp_weights(shape, device, grad), mode, device)

    return Provider("torch.compile" if compiled else "torch eager", False, prepare, compiles=compiled)


def mlp_cases(shapes, modes, device, with_compile=True) -> list[Case]:
    """Cases for every MLP shape and mode: our backends, eager torch and (with_compile) torch.compile."""
    device = torch.device(device)
    cases = []
    for shape in shapes:
        for mode in modes:
            providers = [ours(shape, mode, device, b) for b in OUR_BACKENDS[device.type]]
            providers.append(torch_mlp(shape, mode, device, compiled=False))
            if with_compile:
                providers.append(torch_mlp(shape, mode, device, compiled=True))
            cases.append(Case.of_shape("mlp", shape, mode, device, providers))
    return cases
