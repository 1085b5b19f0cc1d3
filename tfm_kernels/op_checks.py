"""Argument checks of the operators in Python, the twins of the C++ operators' checks
(csrc/common/attention_checks.h, csrc/common/mlp_checks.h), with the same messages: "<op>: <argument> must be
<expected>; got <given>".

The Triton operators run them before launching (their kernels would otherwise read past a tensor's end for a
batch or bias of the wrong size), and every operator's fake kernel runs them, so that a call traced by
torch.compile, or one that reaches the fake kernel through a meta tensor, fails as the real kernel would
instead of returning a tensor of a made-up shape. The public functions (attention.py, mlp.py) validate their
own arguments first and reach the kernels past these checks (ops.KERNELS); as_float converts their float
arguments as torch's functions take them.
"""

import numbers
from typing import NamedTuple

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # float64: the "torch" backend
TRITON_MAX_HEAD_DIM = 256  # the Triton attention kernels hold a (block, head dim) tile in registers
ACTIVATIONS = ("none", "gelu", "gelu_tanh", "relu", "silu")


def as_float(name, x) -> float:
    """A float argument as torch's SDPA and dropout take it: a Python or NumPy real number, or a one-element
    real tensor; TypeError naming `name` otherwise."""
    if not (isinstance(x, numbers.Real) or (isinstance(x, torch.Tensor) and x.numel() == 1 and not x.is_complex())):
        raise TypeError(f"{name} must be a real number; got {type(x).__name__}")
    return float(x)


def check_input_tensor(name, t):
    """TypeError naming `name` unless t is a dense (strided) tensor of one of INPUT_DTYPES, the dtypes of the
    public functions' inputs."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor; got layout {t.layout}")
    if t.dtype not in INPUT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64; got {t.dtype}")


def check_flags(**flags):
    """TypeError naming the first flag that is not a bool (a string such as "no" would count as True)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool; got {type(value).__name__}")


def _fail(op, message):
    raise RuntimeError(f"{op}: {message}")


def _shape(t):
    return list(t.shape)  # printed as the C++ checks print sizes: [2, 3]


def _check_same_device(op, name, t, owner_name, owner):
    if t.device != owner.device:
        _fail(op, f"{name} must be on {owner_name}'s device {owner.device}; got {t.device}")


def _check_dropout(op, dropout_p, seed, owner_name, owner):
    """dropout_p and the seed its keep-mask is drawn from. The seed must be on the inputs' device even where no
    dropout reads it: a meta seed beside real inputs would send the call to the fake kernel."""
    if not 0.0 <= dropout_p < 1.0:
        _fail(op, f"dropout_p must be in [0, 1); got {dropout_p}")
    if dropout_p > 0.0 and (seed.dtype != torch.int64 or seed.numel() != 1):
        _fail(op, f"seed must be an int64 tensor with one element; got {seed.dtype} of shape {_shape(seed)}")
    _check_same_device(op, "seed", seed, owner_name, owner)


# ---------------------------------------------------------------------------------------------------------
# Attention: q (B, Hq, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev), mask (B, Hq, L, S), key_lengths (B,).


class AttentionSizes(NamedTuple):
    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int


def _check_attention_args(op, q, k, v, mask, key_lengths, dropout_p, seed) -> AttentionSizes:
    for name, t, dims in (("q", q, "(B, Hq, L, E)"), ("k", k, "(B, Hk, S, E)"), ("v", v, "(B, Hk, S, Ev)")):
        if t.dim() != 4:
            _fail(op, f"{name} must be 4-D {dims}; got shape {_shape(t)}")
    if q.dtype not in KERNEL_DTYPES:
        _fail(op, f"q must be float32, float16 or bfloat16; got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        _fail(op, f"k and v must have q's dtype {q.dtype}; got {k.dtype} and {v.dtype}")
    if k.device != q.device or v.device != q.device:
        _fail(op, f"k and v must be on q's device {q.device}; got {k.device} and {v.device}")
    sizes = AttentionSizes(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3])
    if k.shape[0] != sizes.batch or v.shape[0] != sizes.batch:
        _fail(op, f"k and v must have q's batch size {sizes.batch}; got {k.shape[0]} and {v.shape[0]}")
    if v.shape[1:3] != k.shape[1:3]:
        _fail(op, f"v must have k's heads and length ({sizes.kv_heads}, {sizes.kv_len}); got "
                  f"({v.shape[1]}, {v.shape[2]})")
    if k.shape[3] != sizes.head_dim:
        _fail(op, f"k must have q's head dim {sizes.head_dim}; got {k.shape[3]}")
    if sizes.kv_heads <= 0 or sizes.q_heads % sizes.kv_heads:
        _fail(op, f"the kv heads must divide the query heads; got Hq={sizes.q_heads}, Hk={sizes.kv_heads}")
    if mask is not None:
        expected = (sizes.batch, sizes.q_heads, sizes.q_len, sizes.kv_len)
        if tuple(mask.shape) != expected:
            _fail(op, f"mask must have shape (B, Hq, L, S) = {expected} (zero strides for broadcast dims); got "
                      f"{_shape(mask)}")
        if mask.dtype not in (torch.bool, torch.float32, q.dtype):
            _fail(op, f"mask must be bool, float32 or q's dtype {q.dtype}; got {mask.dtype}")
        _check_same_device(op, "mask", mask, "q", q)
    if key_lengths is not None:
        if tuple(key_lengths.shape) != (sizes.batch,):
            _fail(op, f"key_lengths must have shape ({sizes.batch},); got {_shape(key_lengths)}")
        if key_lengths.dtype not in (torch.int32, torch.int64):
            _fail(op, f"key_lengths must be int32 or int64; got {key_lengths.dtype}")
        _check_same_device(op, "key_lengths", key_lengths, "q", q)
    _check_dropout(op, dropout_p, seed, "q", q)
    return sizes


def check_attention_forward(op, q, k, v, mask, key_lengths, dropout_p, is_causal, scale, seed) -> AttentionSizes:
    """Returns the sizes."""
    return _check_attention_args(op, q, k, v, mask, key_lengths, dropout_p, seed)


def check_triton_head_dims(op, sizes: AttentionSizes):
    if max(sizes.head_dim, sizes.value_dim) > TRITON_MAX_HEAD_DIM:
        _fail(op, f"the head dims must be at most {TRITON_MAX_HEAD_DIM}; got E={sizes.head_dim}, "
                  f"Ev={sizes.value_dim}")


def check_attention_backward(op, grad_out, q, k, v, out, lse, mask, key_lengths, dropout_p, is_causal, scale,
                             seed) -> AttentionSizes:
    """The forward's arguments, then grad_out and out (B, Hq, L, Ev) in q's dtype, lse (B, Hq, L) float32.
    Returns the sizes."""
    sizes = _check_attention_args(op, q, k, v, mask, key_lengths, dropout_p, seed)
    out_shape = (sizes.batch, sizes.q_heads, sizes.q_len, sizes.value_dim)
    for name, t in (("grad_out", grad_out), ("out", out)):
        if tuple(t.shape) != out_shape:
            _fail(op, f"{name} must have shape (B, Hq, L, Ev) = {list(out_shape)}; got {_shape(t)}")
        if t.dtype != q.dtype:
            _fail(op, f"{name} must have q's dtype {q.dtype}; got {t.dtype}")
        _check_same_device(op, name, t, "q", q)
    lse_shape = out_shape[:3]
    if tuple(lse.shape) != lse_shape:
        _fail(op, f"lse must have shape (B, Hq, L) = {lse_shape}; got {_shape(lse)}")
    if lse.dtype != torch.float32:
        _fail(op, f"lse must be float32; got {lse.dtype}")
    _check_same_device(op, "lse", lse, "q", q)
    return sizes


# ---------------------------------------------------------------------------------------------------------
# MLP: x (M, K), weight (N, K) in nn.Linear's layout, bias (N,); gated weights (2F, K), gate rows first.


def _check_activation(op, activation):
    if activation not in ACTIVATIONS:
        _fail(op, f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation}")


def _check_input(op, name, x, dims):
    """Input `name` (rows, cols), its dims named by `dims` ("(M, K)"): 2-D with stride(-1) == 1, a kernel dtype."""
    if x.dtype not in KERNEL_DTYPES:
        _fail(op, f"{name} must be float16, bfloat16 or float32; got {x.dtype}")
    if x.dim() != 2 or x.stride(1) != 1:
        _fail(op, f"{name} must be 2-D {dims} with stride(-1) == 1; got shape {_shape(x)} strides "
                  f"{list(x.stride())}")


def _check_weight(op, name, weight, rows_dim, cols_dim, in_features, x):
    """Weight `name` (rows_dim, cols_dim), cols_dim = in_features, with stride(-1) == 1, in x's dtype and on its
    device; rows_dim and cols_dim are the letters the message uses ("N", "K")."""
    if weight.dim() != 2 or weight.shape[1] != in_features or weight.stride(1) != 1:
        _fail(op, f"{name} must be ({rows_dim}, {cols_dim}) with {cols_dim} = {in_features} and stride(-1) == 1; "
                  f"got shape {_shape(weight)} strides {list(weight.stride())}")
    if weight.dtype != x.dtype:
        _fail(op, f"{name} must have x's dtype {x.dtype}; got {weight.dtype}")
    _check_same_device(op, name, weight, "x", x)


def _check_bias(op, name, bias, size, x):
    if bias is None:
        return
    if tuple(bias.shape) != (size,):
        _fail(op, f"{name} must be ({size},); got {_shape(bias)}")
    if bias.dtype != x.dtype:
        _fail(op, f"{name} must have x's dtype {x.dtype}; got {bias.dtype}")
    _check_same_device(op, name, bias, "x", x)


def _check_gated_weight(op, weight):
    if weight.shape[0] % 2:
        _fail(op, f"weight must have an even number of rows (2F: gate then up); got {_shape(weight)}")


def _check_tensor(op, name, t, x, rows, cols):
    """A backward op's `name` (grad_out, or what the forward saved): (rows, cols), x's dtype and device."""
    if tuple(t.shape) != (rows, cols):
        _fail(op, f"{name} must be ({rows}, {cols}); got {_shape(t)}")
    if t.dtype != x.dtype:
        _fail(op, f"{name} must have x's dtype {x.dtype}; got {t.dtype}")
    _check_same_device(op, name, t, "x", x)


def _check_mlp_forward(op, x, weight, bias, activation, dropout_p, seed, gated):
    _check_input(op, "x", x, "(M, K)")
    _check_weight(op, "weight", weight, "N", "K", x.shape[1], x)
    if gated:
        _check_gated_weight(op, weight)
    _check_bias(op, "bias", bias, weight.shape[0], x)
    _check_activation(op, activation)
    _check_dropout(op, dropout_p, seed, "x", x)


def _check_mlp_backward(op, grad_out, x, weight, saved, activation, dropout_p, seed, gated):
    """saved: the forward's preact (linear; read unless the activation is none) or gate_up (gated)."""
    _check_input(op, "x", x, "(M, K)")
    _check_weight(op, "weight", weight, "N", "K", x.shape[1], x)
    _check_activation(op, activation)
    M, N = x.shape[0], weight.shape[0]
    if gated:
        _check_gated_weight(op, weight)
        _check_tensor(op, "grad_out", grad_out, x, M, N // 2)
        _check_tensor(op, "gate_up", saved, x, M, N)
    else:
        _check_tensor(op, "grad_out", grad_out, x, M, N)
        if activation != "none":
            _check_tensor(op, "preact", saved, x, M, N)
    _check_dropout(op, dropout_p, seed, "x", x)


def check_mlp_linear_forward(op, x, weight, bias, activation, dropout_p, seed):
    _check_mlp_forward(op, x, weight, bias, activation, dropout_p, seed, gated=False)


def check_mlp_gated_forward(op, x, weight, bias, activation, dropout_p, seed):
    _check_mlp_forward(op, x, weight, bias, activation, dropout_p, seed, gated=True)


def check_mlp_linear_backward(op, grad_out, x, weight, preact, activation, dropout_p, seed, *needs):
    """needs: the operator's needs_* flags, which every value of its bool type is valid for."""
    _check_mlp_backward(op, grad_out, x, weight, preact, activation, dropout_p, seed, gated=False)


def check_mlp_gated_backward(op, grad_out, x, weight, gate_up, activation, dropout_p, seed, *needs):
    _check_mlp_backward(op, grad_out, x, weight, gate_up, activation, dropout_p, seed, gated=True)


def check_mlp_block_forward(op, x, w1, b1, w2, b2, activation, dropout_p, seed):
    """x (M, K), w1 (F, K), b1 (F,), w2 (N, F), b2 (N,), each named as the caller passed it."""
    _check_input(op, "x", x, "(M, K)")
    _check_weight(op, "w1", w1, "F", "K", x.shape[1], x)
    _check_bias(op, "b1", b1, w1.shape[0], x)
    _check_weight(op, "w2", w2, "N", "F", w1.shape[0], x)
    _check_bias(op, "b2", b2, w2.shape[0], x)
    _check_activation(op, activation)
    _check_dropout(op, dropout_p, seed, "x", x)


def check_mlp_block_backward(op, grad_out, x, w1, preact, hidden, w2, activation, dropout_p, seed, *needs):
    """The forward's arguments, then grad_out (M, N) and what the forward saved: preact (M, F) (read unless the
    activation is none) and hidden (M, F), the down projection's input; needs: the needs_* flags."""
    check_mlp_block_forward(op, x, w1, None, w2, None, activation, dropout_p, seed)
    M, F, N = x.shape[0], w1.shape[0], w2.shape[0]
    _check_tensor(op, "grad_out", grad_out, x, M, N)
    if activation != "none":
        _check_tensor(op, "preact", preact, x, M, F)
    _check_input(op, "hidden", hidden, "(M, F)")
    _check_tensor(op, "hidden", hidden, x, M, F)
