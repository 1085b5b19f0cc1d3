"""Fused MLP building blocks: linear + bias + activation + dropout, gated linears (SwiGLU, GeGLU) and the
whole feed-forward block. Validation, flattening to (tokens, features) and dispatch to a backend; the kernels
live in csrc/ (C++ CPU, CUDA with cuBLASLt) and tfm_kernels/triton/mlp.py, registered as operators in
ops.py.

Backends (all: float16, bfloat16, float32; every activation; dropout; gated; any leading shape and strides):
  "cuda"    cuBLASLt GEMMs with fused epilogues (bias; GELU-tanh with the pre-activation as aux output; bias
            gradient in the weight-gradient GEMM; in mlp(), GELU-tanh' and the bias gradient in the GEMM that
            produces the hidden gradient) plus CUDA kernels for the other activations, gating and dropout.
            CUDA tensors, extension built with CUDA.
  "triton"  one tiled GEMM kernel with bias/activation/gate/dropout epilogues and a fused bias-gradient
            reduction. CUDA tensors (CPU tensors under TRITON_INTERPRET=1, float16/float32 only).
  "cpu"     at::matmul plus fused C++ elementwise passes. CPU tensors, extension built.
mlp() without gating runs as one block operator on "cpu" and "cuda" (tfm_kernels::mlp_block_forward), and as
two fused linears elsewhere.
  "torch"   plain torch ops (also float64), autograd by torch; the reference the others are tested against.
Every kernel backend saves the pre-activation (M, N) in x's dtype for backward, as eager PyTorch does.
"""

import math

from . import backends, ops, reference
from .autocast import autocast_inputs, autocast_off
from .layout import last_dim_contiguous
from .op_checks import as_float, check_flags, check_input_tensor
from .rng import seed_for

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", None)


def _linear_ops(backend):
    """(fused linear, gated linear): the differentiable forward operators of a kernel backend (tfm_kernels.ops)."""
    prefix = "triton_" if backend == "triton" else ""  # "": C++, dispatches to the CPU or CUDA kernel by device
    return (ops.DIFFERENTIABLE_FORWARD[f"{prefix}mlp_linear_forward"],
            ops.DIFFERENTIABLE_FORWARD[f"{prefix}mlp_gated_forward"])


def _check_tensor(name, t, like=None):
    check_input_tensor(name, t)
    if like is not None:
        if t.dtype != like.dtype:
            raise TypeError(f"{name} must have x's dtype {like.dtype}; got {t.dtype}")
        if t.device != like.device:
            raise ValueError(f"{name} must be on x's device {like.device}; got {t.device}")


def _check_common(x, activation, dropout_p) -> float:
    """Checks x, activation and dropout_p; returns dropout_p as a float."""
    _check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension (..., in_features); got shape {tuple(x.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}; got {activation!r}")
    p = as_float("dropout_p", dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1); got {dropout_p!r}")
    return p


def _check_weight(name, weight, x, rows=None):
    """weight (N, K) in nn.Linear layout with K == x.shape[-1] (and N == rows if given)."""
    _check_tensor(name, weight, x)
    in_features = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != in_features or (rows is not None and weight.shape[0] != rows):
        expected = f"({rows if rows is not None else 'out_features'}, {in_features})"
        raise ValueError(f"{name} must have shape {expected} (nn.Linear layout, in_features = x.shape[-1]); "
                         f"got {tuple(weight.shape)}")


def _check_bias(name, bias, x, features):
    if bias is None:
        return
    _check_tensor(name, bias, x)
    if bias.shape != (features,):
        raise ValueError(f"{name} must have shape ({features},) or be None; got {tuple(bias.shape)}")



def _resolve(backend, x2, weight):
    """The backend to run: the automatic choice, or the requested one if it supports the inputs."""
    if backend == "auto":
        return backends.choose_mlp(x2, weight)
    reasons = backends.mlp_not_supported_reasons(backend, x2, weight)
    if reasons:
        raise NotImplementedError(f"backend={backend!r} cannot run these inputs: " + "; ".join(reasons))
    return backend


def _flatten(x):
    """(..., K) -> (M, K) with stride(-1) == 1: a view wherever the strides allow. The stride is fixed after the
    reshape: a reshape may give a size-1 last dim any stride (fake tensors under torch.compile do)."""
    return last_dim_contiguous(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]))  # (M, K)


def _contiguous_bias(bias):
    return bias.contiguous() if bias is not None else None  # (N,): a copy of N elements at most


def _run(gated, x, weight, bias, activation, dropout_p, backend, out_features):
    x2 = _flatten(x)  # (M, K)
    weight = last_dim_contiguous(weight)
    bias = _contiguous_bias(bias)
    backend = _resolve(backend, x2, weight)
    seed = seed_for(float(dropout_p), x.device)
    out_shape = (*x.shape[:-1], out_features)
    if backend == "torch" or 0 in (x2.shape[0], x2.shape[1], out_features):  # empty: no kernel work
        oracle = reference.gated_linear if gated else reference.linear
        return oracle(x2, weight, bias, activation, float(dropout_p), seed).reshape(out_shape)
    linear_op, gated_op = _linear_ops(backend)
    op = gated_op if gated else linear_op
    out, _ = op(x2, weight, bias, activation or "none", float(dropout_p), seed)
    return out.reshape(out_shape)


def fused_linear(x, weight, bias=None, activation="gelu", dropout_p=0.0, *, backend="auto"):
    """dropout(act(x @ weight^T + bias)), with bias, activation and dropout fused into the GEMM's epilogue.

    Args:
        x: (..., K), float16, bfloat16 or float32 (float64 on the "torch" backend); any leading batch shape
            and strides (copied only when the last dimension is not contiguous).
        weight: (N, K) in nn.Linear layout, x's dtype and device.
        bias: (N,) or None.
        activation: "gelu" (exact, erf), "gelu_tanh" (tanh approximation), "relu", "silu" or None.
        dropout_p: dropout probability after the activation, in [0, 1); applied whenever > 0 (pass 0 in eval).
            The keep-mask is the counter-based one every backend shares (tfm_kernels.rng): z = 0, row = the
            flattened token index, column = the output feature; the seed comes from torch's generator, so runs
            repeat under torch.manual_seed.
        backend: "auto" (the first backend of tfm_kernels.backends.MLP_AUTO_ORDER that supports the inputs),
            "cuda" (cuBLASLt + CUDA kernels), "triton", "cpu" (C++ CPU kernels) or "torch" (plain torch ops). An
            explicit backend never falls back: it runs or raises NotImplementedError with the reasons.

    Returns:
        (..., N) in x's dtype. Differentiable with respect to x, weight and bias. Under autocast, as torch's
        linear: the tensors are cast to the autocast dtype first (tfm_kernels.autocast), and so is the result.
    """
    x, weight, bias = autocast_inputs(x, weight, bias)
    with autocast_off(x):
        dropout_p = _check_common(x, activation, dropout_p)
        _check_weight("weight", weight, x)
        _check_bias("bias", bias, x, weight.shape[0])
        return _run(False, x, weight, bias, activation, dropout_p, backend, weight.shape[0])


def gated_linear(x, weight, activation="silu", dropout_p=0.0, *, bias=None, backend="auto"):
    """dropout(act(x Wg^T + bg) * (x Wu^T + bu)) from a packed gate+up weight: SwiGLU ("silu"), GeGLU ("gelu",
    "gelu_tanh"), ReGLU ("relu"), bilinear (None).

    Args:
        x: (..., K), float16, bfloat16 or float32; any leading batch shape.
        weight: (2F, K): rows [0, F) are the gate projection Wg, rows [F, 2F) the up projection Wu
            (torch.cat([Wg, Wu]) of two nn.Linear weights).
        activation, dropout_p, backend: as in fused_linear (dropout after the product; column = feature
            in [0, F)).
        bias: (2F,) = [bg; bu] or None (keyword only).

    Returns:
        (..., F) in x's dtype. Differentiable with respect to x, weight and bias. Autocast as in fused_linear.
    """
    x, weight, bias = autocast_inputs(x, weight, bias)
    with autocast_off(x):
        dropout_p = _check_common(x, activation, dropout_p)
        _check_weight("weight", weight, x)
        if weight.shape[0] % 2:
            raise ValueError(f"weight must have an even number of rows (2F: gate then up); got "
                             f"{tuple(weight.shape)}")
        _check_bias("bias", bias, x, weight.shape[0])
        return _run(True, x, weight, bias, activation, dropout_p, backend, weight.shape[0] // 2)


def mlp(x, w1, b1, w2, b2, activation="gelu", dropout_p=0.0, *, gated=False, backend="auto"):
    """The feed-forward block linear2(dropout(act(linear1(x)))), as in nn.TransformerEncoderLayer (its second
    dropout, after linear2, belongs to the caller).

    Args:
        x: (..., d_model), float16, bfloat16 or float32; any leading batch shape.
        w1: (d_ff, d_model), or (2 d_ff, d_model) packed [gate; up] when gated;
        b1: (d_ff,) / (2 d_ff,) or None.
        w2: (d_out, d_ff); b2: (d_out,) or None.
        activation: as in fused_linear; gated=True makes the up-projection a gated_linear (SwiGLU: "silu").
        dropout_p: dropout after the activation (of the gated product when gated), in [0, 1).
        backend: as in fused_linear, for both projections.

    Returns:
        (..., d_out) in x's dtype. Differentiable with respect to x and every weight and bias. Autocast as in
        fused_linear.
    """
    x, w1, b1, w2, b2 = autocast_inputs(x, w1, b1, w2, b2)
    with autocast_off(x):
        dropout_p = _check_common(x, activation, dropout_p)
        check_flags(gated=gated)
        _check_weight("w1", w1, x)
        if gated and w1.shape[0] % 2:
            raise ValueError(f"w1 must have an even number of rows (2 d_ff: gate then up) when gated; got "
                             f"{tuple(w1.shape)}")
        d_ff = w1.shape[0] // 2 if gated else w1.shape[0]
        _check_bias("b1", b1, x, w1.shape[0])
        _check_tensor("w2", w2, x)
        if w2.dim() != 2 or w2.shape[1] != d_ff:
            raise ValueError(f"w2 must have shape (d_out, {d_ff}) (nn.Linear layout, in_features = d_ff); got "
                             f"{tuple(w2.shape)}")
        _check_bias("b2", b2, x, w2.shape[0])
        if gated:
            hidden = gated_linear(x, w1, activation, dropout_p, bias=b1, backend=backend)
            return fused_linear(hidden, w2, b2, None, backend=backend)
        x2 = _flatten(x)  # (M, K)
        w1, w2 = last_dim_contiguous(w1), last_dim_contiguous(w2)
        backend = _resolve(backend, x2, w1)
        if backend not in ("cpu", "cuda") or 0 in (*x2.shape, d_ff, w2.shape[0]):
            hidden = fused_linear(x, w1, b1, activation, dropout_p, backend=backend)
            return fused_linear(hidden, w2, b2, None, backend=backend)
        # The C++ backends run the block as one operator: its backward fuses act' into the hidden-gradient GEMM.
        seed = seed_for(float(dropout_p), x.device)
        b1, b2 = _contiguous_bias(b1), _contiguous_bias(b2)
        block = ops.DIFFERENTIABLE_FORWARD["mlp_block_forward"]
        out, _, _ = block(x2, w1, b1, w2, b2, activation or "none", float(dropout_p), seed)
        return out.reshape(*x.shape[:-1], w2.shape[0])
