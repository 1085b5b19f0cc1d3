"""The operators called directly (torch.ops.tfm_kernels.*), as a user or a compiler may call them: every bad
argument gets the same error from the C++ operators, the Triton operators and their fake kernels (meta
tensors), naming the operator and the argument, instead of a kernel reading past a tensor's end or a fake
kernel making up a result."""

import math

import pytest
import torch

from tfm_kernels import ops

OPS = torch.ops.tfm_kernels
needs_extension = pytest.mark.skipif(not ops.C_FILE_EXISTS, reason="tfm_kernels._C is not built")

# How an operator is reached: its real kernel on CPU tensors (the Triton one under the interpreter), or its
# fake kernel, which the dispatcher runs for meta tensors.
IMPLEMENTATIONS = {
    "cpp": ("", "cpu"),
    "triton": ("triton_", "cpu"),
    "cpp-fake": ("", "meta"),
    "triton-fake": ("triton_", "meta"),
}


def implementation(name, kind):
    prefix, device = IMPLEMENTATIONS[name]
    if not prefix and not ops.C_FILE_EXISTS:
        pytest.skip("tfm_kernels._C is not built")
    return getattr(OPS, f"{prefix}{kind}"), f"{prefix}{kind}", device


def seed(device="cpu", dtype=torch.int64, shape=()):
    return torch.zeros(shape, dtype=dtype, device=device)


def with_changes(args, device, changes):
    """The values of `args` (name -> valid value) with `changes` applied (a callable change receives the valid
    value), tensors moved to `device`."""
    for name, change in changes.items():
        args[name] = change(args[name]) if callable(change) else change
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args.values()]


# ---------------------------------------------------------------------------------------------------------
# Attention: (q, k, v, mask, key_lengths, dropout_p, is_causal, scale, seed).


def attention_args(device, **changes):
    """Valid attention_forward arguments (B=2, Hq=4, Hk=2, L=5, S=7, E=Ev=8) with `changes` applied."""
    args = {"q": torch.randn(2, 4, 5, 8), "k": torch.randn(2, 2, 7, 8), "v": torch.randn(2, 2, 7, 8), "mask": None,
            "key_lengths": None, "dropout_p": 0.0, "is_causal": False, "scale": 1.0, "seed": seed()}
    return with_changes(args, device, changes)


ATTENTION_ERRORS = {
    "q_rank": ({"q": lambda q: q[0]}, r"q must be 4-D \(B, Hq, L, E\)"),
    "dtype": ({"q": torch.Tensor.double, "k": torch.Tensor.double, "v": torch.Tensor.double},
              r"q must be float32, float16 or bfloat16; got"),
    "kv_dtype": ({"k": torch.Tensor.half}, r"k and v must have q's dtype"),
    "batch": ({"k": lambda k: k[:1], "v": lambda v: v[:1]}, r"k and v must have q's batch size 2; got 1 and 1"),
    "v_length": ({"v": lambda v: v[:, :, :6]}, r"v must have k's heads and length \(2, 7\); got \(2, 6\)"),
    "head_dim": ({"k": lambda k: k[..., :4]}, r"k must have q's head dim 8; got 4"),
    "heads": ({"q": lambda q: q[:, :3]}, r"the kv heads must divide the query heads; got Hq=3, Hk=2"),
    "mask_shape": ({"mask": torch.ones(2, 4, 5, dtype=torch.bool)},
                   r"mask must have shape \(B, Hq, L, S\) = \(2, 4, 5, 7\)"),
    "mask_dtype": ({"mask": torch.ones(2, 4, 5, 7, dtype=torch.int32)}, r"mask must be bool, float32 or q's dtype"),
    "key_lengths_shape": ({"key_lengths": torch.ones(3, dtype=torch.int32)}, r"key_lengths must have shape \(2,\)"),
    "key_lengths_dtype": ({"key_lengths": torch.ones(2)}, r"key_lengths must be int32 or int64"),
    "dropout_one": ({"dropout_p": 1.0}, r"dropout_p must be in \[0, 1\); got 1"),
    "dropout_negative": ({"dropout_p": -0.5}, r"dropout_p must be in \[0, 1\); got -0.5"),
    "dropout_nan": ({"dropout_p": math.nan}, r"dropout_p must be in \[0, 1\); got nan"),
    "seed_shape": ({"dropout_p": 0.5, "seed": seed(shape=(2,))}, r"seed must be an int64 tensor with one element"),
    "seed_dtype": ({"dropout_p": 0.5, "seed": seed(dtype=torch.float32)},
                   r"seed must be an int64 tensor with one element"),
}


@pytest.mark.parametrize("case", list(ATTENTION_ERRORS))
@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_attention_forward_errors(name, case):
    op, op_name, device = implementation(name, "attention_forward")
    changes, message = ATTENTION_ERRORS[case]
    with pytest.raises(RuntimeError, match=f"{op_name}: {message}"):
        op(*attention_args(device, **changes))


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_attention_backward_errors(name):
    op, op_name, device = implementation(name, "attention_backward")
    q, k, v, mask, key_lengths, dropout_p, is_causal, scale, seed_ = attention_args(device)
    out, lse = (torch.randn(2, 4, 5, 8, device=device), torch.randn(2, 4, 5, device=device))
    tail = (mask, key_lengths, dropout_p, is_causal, scale, seed_)
    with pytest.raises(RuntimeError, match=rf"{op_name}: grad_out must have shape \(B, Hq, L, Ev\) = \[2, 4, 5, 8\]"):
        op(out[..., :4], q, k, v, out, lse, *tail)
    with pytest.raises(RuntimeError, match=rf"{op_name}: out must have q's dtype"):
        op(out, q, k, v, out.half(), lse, *tail)
    with pytest.raises(RuntimeError, match=rf"{op_name}: lse must be float32; got"):
        op(out, q, k, v, out, lse.half(), *tail)
    with pytest.raises(RuntimeError, match=rf"{op_name}: k and v must have q's batch size 2; got 1 and 1"):
        op(out, q, k[:1], v[:1], out, lse, *tail)


def test_triton_attention_head_dims_past_its_limit():
    args = attention_args("cpu", q=torch.randn(1, 1, 4, 300), k=torch.randn(1, 1, 4, 300), v=torch.randn(1, 1, 4, 300))
    with pytest.raises(RuntimeError, match=r"triton_attention_forward: the head dims must be at most 256; got E=300"):
        OPS.triton_attention_forward(*args)


@pytest.mark.parametrize("prefix", ["", "triton_"])
def test_a_meta_seed_beside_real_inputs_is_refused(prefix):
    """A meta tensor sends the call to the fake kernel, which would return uninitialised CPU tensors."""
    if not prefix and not ops.C_FILE_EXISTS:
        pytest.skip("tfm_kernels._C is not built")
    args = attention_args("cpu")
    args[-1] = seed("meta")
    with pytest.raises(RuntimeError, match=rf"{prefix}attention_forward: seed must be on q's device cpu; got meta"):
        getattr(OPS, f"{prefix}attention_forward")(*args)
    x, weight = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(RuntimeError, match=rf"{prefix}mlp_linear_forward: seed must be on x's device cpu; got meta"):
        getattr(OPS, f"{prefix}mlp_linear_forward")(x, weight, None, "relu", 0.5, seed("meta"))


@pytest.mark.parametrize("prefix", ["", "triton_"])
def test_a_mask_that_requires_grad_is_refused_not_left_without_gradient(prefix):
    if not prefix and not ops.C_FILE_EXISTS:
        pytest.skip("tfm_kernels._C is not built")
    q, k, v, *rest = attention_args("cpu", mask=torch.randn(2, 4, 5, 7).requires_grad_())
    with pytest.raises(RuntimeError, match="mask requires grad, and the attention operators compute no gradient"):
        getattr(OPS, f"{prefix}attention_forward")(q.requires_grad_(), k, v, *rest)


# ---------------------------------------------------------------------------------------------------------
# MLP: forward (x, weight, bias, activation, dropout_p, seed); backward (grad_out, x, weight, saved, activation,
# dropout_p, seed).


def mlp_args(device, **changes):
    """Valid forward arguments: x (4, 8), weight (6, 8) (gated: F = 3), bias (6,), with `changes` applied."""
    args = {"x": torch.randn(4, 8), "weight": torch.randn(6, 8), "bias": torch.randn(6), "activation": "gelu",
            "dropout_p": 0.0, "seed": seed()}
    return with_changes(args, device, changes)


MLP_ERRORS = {
    "x_dtype": ({"x": torch.Tensor.double}, r"x must be float16, bfloat16 or float32; got"),
    "x_rank": ({"x": lambda x: x[None]}, r"x must be 2-D \(M, K\) with stride\(-1\) == 1"),
    "x_strides": ({"x": lambda x: x.t().contiguous().t()}, r"x must be 2-D \(M, K\) with stride\(-1\) == 1"),
    "weight_shape": ({"weight": lambda w: w[:, :4]}, r"weight must be \(N, K\) with K = 8 and stride\(-1\) == 1"),
    "weight_dtype": ({"weight": torch.Tensor.half}, r"weight must have x's dtype"),
    "bias_shape": ({"bias": lambda b: b[:4]}, r"bias must be \(6,\); got \[4\]"),
    "bias_dtype": ({"bias": torch.Tensor.half}, r"bias must have x's dtype"),
    "activation": ({"activation": "bogus"}, r"activation must be one of none, gelu, gelu_tanh, relu, silu; got bogus"),
    "dropout_big": ({"dropout_p": 1.5}, r"dropout_p must be in \[0, 1\); got 1.5"),
    "dropout_negative": ({"dropout_p": -0.5}, r"dropout_p must be in \[0, 1\); got -0.5"),
    "dropout_nan": ({"dropout_p": math.nan}, r"dropout_p must be in \[0, 1\); got nan"),
    "seed_shape": ({"dropout_p": 0.5, "seed": seed(shape=(2,))}, r"seed must be an int64 tensor with one element"),
    "seed_dtype": ({"dropout_p": 0.5, "seed": seed(dtype=torch.float32)},
                   r"seed must be an int64 tensor with one element"),
}


@pytest.mark.parametrize("case", list(MLP_ERRORS))
@pytest.mark.parametrize("kind", ["linear", "gated"])
@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_mlp_forward_errors(name, kind, case):
    op, op_name, device = implementation(name, f"mlp_{kind}_forward")
    changes, message = MLP_ERRORS[case]
    with pytest.raises(RuntimeError, match=f"{op_name}: {message}"):
        op(*mlp_args(device, **changes))


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_mlp_gated_weight_needs_an_even_number_of_rows(name):
    op, op_name, device = implementation(name, "mlp_gated_forward")
    with pytest.raises(RuntimeError, match=rf"{op_name}: weight must have an even number of rows"):
        op(*mlp_args(device, weight=lambda w: w[:5], bias=None))


@pytest.mark.parametrize("kind", ["linear", "gated"])
@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_mlp_backward_errors(name, kind):
    op, op_name, device = implementation(name, f"mlp_{kind}_backward")
    x, weight, _, activation, dropout_p, seed_ = mlp_args(device)
    width = 3 if kind == "gated" else 6  # of grad_out
    grad_out, saved = torch.randn(4, width, device=device), torch.randn(4, 6, device=device)
    saved_name = "gate_up" if kind == "gated" else "preact"
    with pytest.raises(RuntimeError, match=rf"{op_name}: grad_out must be \(4, {width}\); got \[3, {width}\]"):
        op(grad_out[:3], x, weight, saved, activation, dropout_p, seed_)
    with pytest.raises(RuntimeError, match=rf"{op_name}: {saved_name} must be \(4, 6\); got \[4, 5\]"):
        op(grad_out, x, weight, saved[:, :5], activation, dropout_p, seed_)
    with pytest.raises(RuntimeError, match=rf"{op_name}: {saved_name} must have x's dtype"):
        op(grad_out, x, weight, saved.half(), activation, dropout_p, seed_)
    with pytest.raises(RuntimeError, match=rf"{op_name}: dropout_p must be in \[0, 1\); got 2"):
        op(grad_out, x, weight, saved, activation, 2.0, seed_)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@needs_extension
def test_mlp_block_errors_name_the_argument(device):
    """mlp_block_forward(x, w1, b1, w2, b2, ...) names its second projection's weights as w2 and b2."""
    x, w1, b1, w2, b2 = (torch.randn(*shape, device=device) for shape in ((4, 8), (6, 8), (6,), (3, 6), (3,)))
    cases = [
        ((x, w1, b1, w2[:, :5], b2), r"w2 must be \(N, F\) with F = 6"),
        ((x, w1, b1, w2, b2[:2]), r"b2 must be \(3,\); got \[2\]"),
        ((x, w1, b1[:5], w2, b2), r"b1 must be \(6,\); got \[5\]"),
        ((x, w1[:, :7], b1, w2, b2), r"w1 must be \(F, K\) with K = 8"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=f"mlp_block_forward: {message}"):
            OPS.mlp_block_forward(*args, "gelu", 0.0, seed(device))
    grad_out, preact, hidden = (torch.randn(4, n, device=device) for n in (3, 6, 6))
    with pytest.raises(RuntimeError, match=r"mlp_block_backward: hidden must be \(4, 6\); got \[4, 5\]"):
        OPS.mlp_block_backward(grad_out, x, w1, preact, hidden[:, :5], w2, "gelu", 0.0, seed(device))
    with pytest.raises(RuntimeError, match=r"mlp_block_backward: w2 must be \(N, F\) with F = 6"):
        OPS.mlp_block_backward(grad_out, x, w1, preact, hidden, w2[:, :5], "gelu", 0.0, seed(device))
