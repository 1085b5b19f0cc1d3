"""fused_linear, gated_linear, mlp and the MLP modules on every backend against the float64 oracle (tolerance
rule): outputs and the gradients of x, weight and bias; odd sizes, strided inputs, every activation and dtype,
dropout (shared Philox mask), opcheck on every operator, torch.compile, state_dict compatibility, bad input.
On the CPU the Triton kernels run under TRITON_INTERPRET=1 (fp32/fp16, small shapes); `gpu` tests repeat the
checks on CUDA with bf16 and 16384-token shapes."""

import copy
import functools
import itertools
import math
import os
import re
import subprocess
import sys
import types
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from autograd_probe import (
    LOSSES,
    DispatchedOps,
    DropGradient,
    assert_refuses_derivatives_it_lacks,
    assert_unchanged_by_saved_tensors_hooks,
    gradient_penalty_derivatives,
    operator_node,
)
from tolerance import assert_within_tolerance, poisoned_memory
from torch.nn.utils import prune
from torch.utils._python_dispatch import TorchDispatchMode

import tfm_kernels
from tfm_kernels import backends, reference, rng
from tfm_kernels.nn import FusedMLP, GatedMLP
from tfm_kernels.triton.precision import round_to_tf32

ACTIVATIONS = ["gelu", "gelu_tanh", "relu", "silu", None]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton interpreter runs kernels on CPU tensors
CPU_BACKENDS = ["cpu", "triton"]
GPU_BACKENDS = ["cuda", "triton"]


def require(backend, x, weight):
    """Skips only where the environment lacks the backend (no build, no GPU), never a feature it should
    run."""
    reasons = backends.mlp_not_supported_reasons(backend, x, weight)  # reads device and dtype only
    environment = backends.missing_environment(reasons)
    if environment:
        pytest.skip("; ".join(environment))


def dtypes_for(backend):
    # bfloat16 tl.dot is wrong in triton's CPU interpreter; bf16 Triton runs in the gpu tests.
    return [torch.float32, torch.float16] + ([] if backend == "triton" else [torch.bfloat16])


def call(kind, backend, x, weight, bias, activation, dropout_p):
    if kind == "gated":
        return tfm_kernels.gated_linear(x, weight, activation, dropout_p, bias=bias, backend=backend)
    return tfm_kernels.fused_linear(x, weight, bias, activation, dropout_p, backend=backend)


def check_against_oracle(kind, backend, x, weight, bias=None, activation="gelu", dropout_p=0.0):
    """Output and grad x, weight, bias of `backend` against the float64 oracle, torch in x's dtype as
    baseline. Every call draws its dropout seed after the same manual_seed, so all three use one mask."""
    require(backend, x, weight)
    leaves = [t for t in (x, weight, bias) if t is not None]
    seed = int(torch.randint(0, 2**31, ()))

    def run(run_backend, dtype):
        cast = [t.detach().to(dtype).requires_grad_() for t in leaves]
        cx, cw, cb = cast[0], cast[1], (cast[2] if bias is not None else None)
        torch.manual_seed(seed)
        out = call(kind, run_backend, cx, cw, cb, activation, dropout_p)
        return out, cast

    with poisoned_memory(x.device):
        out, inputs = run(backend, x.dtype)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, inputs, grad_out)
    results = {"out": (out,)}
    for name, dtype in (("baseline", x.dtype), ("oracle", torch.float64)):
        o, cast = run("torch", dtype)
        results[name] = (o, *torch.autograd.grad(o, cast, grad_out.to(dtype)))
    names = ("out", "grad_x", "grad_weight", "grad_bias")[: 1 + len(leaves)]
    for name, result, base, ref in zip(names, (out, *grads), results["baseline"], results["oracle"]):
        assert result.dtype == x.dtype, f"{name}: dtype {result.dtype} != {x.dtype}"
        assert_within_tolerance(f"{backend} {kind} {activation} {name}", result, base, ref)
    return out


def rand(*shape, dtype=torch.float32, device="cpu", scale=1.0):
    return torch.randn(*shape, dtype=dtype, device=device) * scale


def linear_inputs(batch_shape, in_features, out_features, dtype, device="cpu", bias=True):
    x = rand(*batch_shape, in_features, dtype=dtype, device=device)
    weight = rand(out_features, in_features, dtype=dtype, device=device, scale=max(in_features, 1) ** -0.5)
    b = rand(out_features, dtype=dtype, device=device) if bias else None
    return x, weight, b


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("kind", ["linear", "gated"])
def test_activations_dtypes(backend, activation, kind):
    for dtype in dtypes_for(backend):
        x, weight, bias = linear_inputs((1, 7), 33, 100, dtype)
        check_against_oracle(kind, backend, x, weight, bias, activation)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("kind", ["linear", "gated"])
def test_nan_inputs_as_in_torch(backend, activation, kind):
    """A NaN in x gives NaN in the output and every gradient exactly where the float64 oracle has it (relu keeps
    NaN and passes its gradient there, as torch.relu does); the rest within the rule."""
    for dtype in dtypes_for(backend):
        x, weight, bias = linear_inputs((5,), 33, 40, dtype)
        x[1, 3] = float("nan")
        check_against_oracle(kind, backend, x, weight, bias, activation)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "gated"])
def test_gelu_tanh_negative_tail(backend, kind):
    """Pre-activations z in tanh-GELU's negative tail, (-4, -2.5), where 1 + tanh(u) cancels, and (gated) an up
    projection of 100 that scales the gate's error: within the rule (computed from 1 + tanh, the kernels lost
    about twice torch's accuracy there)."""
    torch.manual_seed(0)
    x = torch.cat([torch.rand(256, 1) * 1.5 - 4.0, torch.ones(256, 1)], dim=1)  # (256, 2): rows [z, 1]
    weight = torch.tensor([[1.0, 0.0], [0.0, 100.0]] if kind == "gated" else [[1.0, 0.0]])  # g = z, u = 100
    check_against_oracle(kind, backend, x, weight, activation="gelu_tanh")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "gated"])
def test_gelu_tanh_gradient_at_huge_pre_activations(backend, kind):
    """|z| >= 1.85e19, where z * z overflows float32 and tanh-GELU's slope is 0: the gradient is grad (z > 0) or
    0 (z < 0), as the float64 oracle has it, not 0 * inf = NaN (torch's float32 backward gives NaN there). The
    gate's weight 1e20 makes the pre-activations huge while every gradient stays finite. An infinite z gives
    NaN, as the oracle's inf * 0 does."""
    torch.manual_seed(0)
    a = torch.tensor([1.0, -1.0, 0.2, -0.2, 1e-7, -1e-7, 2e-19, -2e-19, 1.5e-20, -5e-21])  # z = 1e20 a
    x = torch.stack([a, torch.ones_like(a)], dim=1)  # (10, 2): rows [a, 1]
    weight = torch.tensor([[1e20, 0.0], [0.0, 1.0]] if kind == "gated" else [[1e20, 0.0]])  # g = z, u = 1
    check_against_oracle(kind, backend, x, weight, activation="gelu_tanh")
    x_infinite = torch.tensor([[float("inf"), 1.0], [-float("inf"), 1.0], [0.5, 1.0]])  # z = +-inf: NaN, as the oracle
    check_against_oracle(kind, backend, x_infinite, weight, activation="gelu_tanh")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gated_relu_gradient_is_zero_below_an_infinite_up(backend):
    """relu's backward selects 0 where the gate is <= 0, as torch's does, even where the gradient reaching it,
    dh * u, is infinite: no inf * 0 = NaN in grad x or the gate's weight row."""
    x = torch.tensor([[0.5, -1.0, 0.25], [1.0, -float("inf"), 0.5]])  # token 1: g = -inf, u = +inf
    weight = torch.tensor([[1.0, 1.0, 0.0], [0.5, -1.0, 1.0]])  # (2 F, K), F = 1: [gate; up]
    check_against_oracle("gated", backend, x, weight, activation="relu")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [((1,), 1, 1), ((5,), 1, 3), ((2, 3), 17, 64), ((97,), 40, 257), ((), 8, 6),
                                   ((2, 1, 3), 65, 31), ((3,), 300, 20)], ids=str)
def test_odd_shapes(backend, shape):
    batch_shape, in_features, out_features = shape
    x, weight, bias = linear_inputs(batch_shape, in_features, out_features, torch.float32)
    out = check_against_oracle("linear", backend, x, weight, bias, "gelu")
    assert out.shape == (*batch_shape, out_features)
    gated_weight = rand(2 * out_features, in_features, scale=in_features**-0.5)
    out = check_against_oracle("gated", backend, x, gated_weight, None, "silu")
    assert out.shape == (*batch_shape, out_features)


def test_empty_inputs():
    """No tokens, or in_features = 0 (the output is act(bias)): the public functions answer these in torch ops
    whatever the backend, with torch's shapes and gradients (test_empty_operator_inputs calls the operators
    themselves)."""
    for batch_shape, in_features in (((0, 3), 8), ((4,), 0)):
        x, weight, bias = linear_inputs(batch_shape, in_features, 5, torch.float32)
        check_against_oracle("linear", "cpu", x, weight, bias, "gelu")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_without_bias(backend):
    x, weight, _ = linear_inputs((3, 5), 24, 40, torch.float16, bias=False)
    check_against_oracle("linear", backend, x, weight, None, "relu")
    check_against_oracle("linear", backend, x, weight, None, None)


def check_strided_inputs(backend, dtype=torch.float32, device="cpu"):
    """x a strided view (row stride != K; a single row with stride 1; a transposed view whose last dim is
    not contiguous; rows broadcast through stride 0), weight a slice of a wider matrix (row stride > K, start
    off 16-byte alignment), a strided bias."""
    def r(*shape, scale=1.0):
        return rand(*shape, dtype=dtype, device=device, scale=scale)

    x = r(6, 9, 3 * 40)[:, 1:8, 40:80]  # (6, 7, 40), row stride 120
    weight = r(70, 64, scale=0.15)[3:53, 5:45]  # (50, 40), row stride 64, offset 197 elements
    bias = r(100)[::2]  # (50,), stride 2
    check_against_oracle("linear", backend, x, weight, bias, "silu")
    check_against_oracle("linear", backend, r(40, 11).t(), weight, bias, "gelu")  # (11, 40), copied
    check_against_oracle("linear", backend, r(40, 1).t(), weight, bias, "relu")  # (1, 40), strides (1, 1)
    check_against_oracle("linear", backend, r(1, 40).expand(5, 40), weight, bias, "gelu_tanh")  # stride 0
    # one input feature: x (9, 1) and weight (50, 1), each the transpose of a row, last-dim stride != 1
    check_against_oracle("linear", backend, r(1, 9).t(), r(1, 50).t(), bias, "gelu")
    check_against_oracle("gated", backend, r(1, 9).t(), r(1, 100).t(), None, "silu")
    gated_weight = r(100, 90, scale=0.15)[:, 10:50]  # (100, 40), row stride 90
    check_against_oracle("gated", backend, x, gated_weight, r(100), "gelu_tanh")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_inputs(backend):
    check_strided_inputs(backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["torch"])
@pytest.mark.parametrize("kind", ["linear", "gated"])
def test_dropout_matches_shared_mask(backend, kind):
    """Output equals act(...) * keep * keep_scale with rng.dropout_keep_mask for the drawn seed; the kernels'
    gradients against the oracle on the same mask (the torch backend is that oracle)."""
    x, weight, bias = linear_inputs((3, 7), 20, 36, torch.float32)
    if backend != "torch":
        check_against_oracle(kind, backend, x, weight, bias, "gelu", dropout_p=0.3)
    p = 0.25
    torch.manual_seed(1234)
    seed = rng.draw_seed("cpu")
    torch.manual_seed(1234)
    out = call(kind, backend, x, weight, bias, "relu", p)
    out2 = call(kind, backend, x, weight, bias, "relu", p)
    rows, features = 21, out.shape[-1]
    keep = rng.dropout_keep_mask(seed, 1, rows, features, p)[0].view(3, 7, features)
    no_dropout = call(kind, "torch", x, weight, bias, "relu", 0.0)
    expected = no_dropout * keep * rng.dropout_keep_scale(p)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(out, out2), "a second call must draw a fresh seed"


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_dropout_keeps_the_mean_for_p_near_1(backend):
    """Kept elements are scaled by the inverse of the keep probability the 16-bit threshold gives, so dropout
    keeps the mean for every p < 1. At p = 1 - 1e-5 the threshold keeps 2**-16 of the elements, 1.53 times
    1 - p: scaling them by 1 / (1 - p) would make the mean 1.53."""
    p = 1 - 1e-5
    ones = torch.ones(4096, 1)
    require(backend, ones, ones)
    torch.manual_seed(0)
    out = tfm_kernels.fused_linear(ones, ones, None, None, p, backend=backend)  # (4096, 4096): keep * scale
    # The mean of 2**24 elements, each 2**16 with probability 2**-16 and else 0: standard deviation 2**-4.
    assert abs(out.double().mean().item() - 1.0) < 5 * 2**-4


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_determinism_and_keep_rate(backend):
    x, weight, bias = linear_inputs((64,), 16, 96 if backend == "triton" else 512, torch.float32)
    x = x.abs() + 1.0
    weight, bias = weight.abs(), bias.abs()  # every pre-activation > 0: relu keeps it, so zeros are dropped
    require(backend, x, weight)
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        outs.append(tfm_kernels.fused_linear(x, weight, bias, "relu", 0.4, backend=backend))
    assert torch.equal(outs[0], outs[1]), "the same torch seed must give the same dropout mask"
    keep_rate = (outs[0] != 0).double().mean().item()
    n = outs[0].numel()
    assert abs(keep_rate - 0.6) < 5 * (0.24 / n) ** 0.5, f"keep rate {keep_rate:.4f} for p=0.4 over {n} draws"


def check_mlp_block(backend, gated, activation, dropout_p, dtype=torch.float32, device="cpu", tokens=(2, 5),
                    d_model=24, d_ff=40):
    """mlp() = linear2(dropout(act(linear1(x)))): output and the gradients of x, w1, b1, w2, b2."""
    x = rand(*tokens, d_model, dtype=dtype, device=device)
    w1 = rand(2 * d_ff if gated else d_ff, d_model, dtype=dtype, device=device, scale=d_model**-0.5)
    b1 = rand(w1.shape[0], dtype=dtype, device=device)
    w2 = rand(d_model, d_ff, dtype=dtype, device=device, scale=d_ff**-0.5)
    b2 = rand(d_model, dtype=dtype, device=device)
    require(backend, x, w1)
    leaves = (x, w1, b1, w2, b2)

    def run(run_backend, run_dtype):
        cast = [t.detach().to(run_dtype).requires_grad_() for t in leaves]
        torch.manual_seed(99)
        out = tfm_kernels.mlp(*cast, activation, dropout_p, gated=gated, backend=run_backend)
        return out, cast

    out, inputs = run(backend, dtype)
    grad_out = torch.randn_like(out)
    results = [(out, *torch.autograd.grad(out, inputs, grad_out))]
    for run_dtype in (dtype, torch.float64):
        reference, cast = run("torch", run_dtype)
        results.append((reference, *torch.autograd.grad(reference, cast, grad_out.to(run_dtype))))
    for name, result, base, ref in zip(("out", "x", "w1", "b1", "w2", "b2"), *results):
        assert_within_tolerance(f"{backend} mlp {activation} {name}", result, base, ref)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("gated", [False, True])
def test_mlp_block(backend, gated):
    check_mlp_block(backend, gated, "silu" if gated else "gelu", 0.2)
    if not gated:  # the block operator's fused-epilogue case on CUDA: GELU-tanh, no dropout, d_ff % 8 == 0
        check_mlp_block(backend, gated, "gelu_tanh", 0.0)


def saved_storage_bytes(forward):
    """The bytes of the distinct storages forward() saves for backward (saved_tensors_hooks), and the output."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return sum(storages.values()), out


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_block_saves_no_more_than_torch(activation, dropout_p):
    """mlp() on the block operator saves what torch's linear1, activation, dropout, linear2 saves, or less: for
    relu one (M, d_ff) activation (torch's relu saves its result, which linear2 saves too), not the
    pre-activation beside it; for gelu its input and output. The gradients stay within the rule, where a NaN in x
    reaches relu's input too."""
    M, d_model, d_ff = 64, 16, 256  # (M, d_ff) float32: 64 KiB, the rest (x, weights) 36 KiB
    x = rand(M, d_model).requires_grad_()
    w1, w2 = rand(d_ff, d_model).requires_grad_(), rand(d_model, d_ff).requires_grad_()
    b1, b2 = rand(d_ff).requires_grad_(), rand(d_model).requires_grad_()
    require("cpu", x, w1)

    def torch_block():
        hidden = F.dropout(reference.activation(F.linear(x, w1, b1), activation), dropout_p)
        return F.linear(hidden, w2, b2)

    ours, out = saved_storage_bytes(lambda: tfm_kernels.mlp(x, w1, b1, w2, b2, activation, dropout_p, backend="cpu"))
    out.backward(torch.randn_like(out))
    theirs, _ = saved_storage_bytes(torch_block)
    activations = M * d_ff * 4
    seed = 8  # the block's int64 dropout seed
    assert ours <= theirs + seed, (ours, theirs)
    assert ours == (x.numel() + w1.numel() + w2.numel()) * 4 + (1 if activation == "relu" else 2) * activations + seed
    check_mlp_block("cpu", False, activation, dropout_p)
    with mock.patch(f"{__name__}.rand", functools.partial(rand_with_nan, rand)):
        check_mlp_block("cpu", False, activation, dropout_p)


def rand_with_nan(rand, *shape, **kwargs):
    """rand(*shape) with a NaN in its first element, for 3-D (x) tensors."""
    t = rand(*shape, **kwargs)
    if len(shape) == 3:
        t.view(-1)[0] = float("nan")
    return t


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "gated", "block"])
def test_backward_gets_no_filled_gradients(backend, kind):
    """The saved pre-activations ([gate, up], the block's hidden) never have a gradient: autograd would fill an
    (M, N) zero tensor for each at every backward unless the operator says not to. Where a later function drops
    the output's gradient, the backward gets None and returns none."""
    x, weight, bias = linear_inputs((2, 3), 8, 12, torch.float32)
    require(backend, x, weight)
    w2 = rand(8, 6 if kind == "gated" else 12).requires_grad_()
    x, weight, bias = (t.requires_grad_() for t in (x, weight, bias))

    def forward():
        if kind == "block":
            return tfm_kernels.mlp(x, weight, bias, w2, None, dropout_p=0.2, backend=backend)
        return call(kind, backend, x, weight, bias, "silu", 0.2)

    with DispatchedOps() as dispatched:
        out = forward()
        torch.autograd.grad(out, (x, weight, bias), torch.randn_like(out))
    assert dispatched.counts["aten.zeros"] == 0, dispatched.counts
    grads = torch.autograd.grad(DropGradient.apply(forward()).sum() + x.sum(), (x, weight), allow_unused=True)
    assert torch.equal(grads[0], torch.ones_like(x)) and grads[1] is None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "gated", "block"])
def test_plain_eager_calls_run_the_kernels_past_the_operators(backend, kind):
    """A plain eager call runs the kernels through an autograd.Function, past the operators' dispatch (ops.KERNELS);
    a call under a dispatch mode runs the operators and their registered autograd: the same outputs and
    gradients bit for bit. (The triton backend's block is two linear operators.)"""
    prefix = "triton_" if backend == "triton" else ""
    forward_name = f"{prefix}mlp_{'linear' if kind == 'block' and prefix else kind}_forward"
    x, weight, bias = (t.requires_grad_() for t in linear_inputs((2, 3), 8, 12, torch.float32))
    require(backend, x, weight)
    w2 = rand(8, 6 if kind == "gated" else 12).requires_grad_()

    def run():
        torch.manual_seed(3)
        if kind == "block":
            out = tfm_kernels.mlp(x, weight, bias, w2, None, dropout_p=0.2, backend=backend)
        else:
            out = call(kind, backend, x, weight, bias, "silu", 0.2)
        return out, torch.autograd.grad(out.square().sum(), (x, weight, bias))

    plain, plain_grads = run()
    assert operator_node(plain) == f"{forward_name}_eagerBackward"
    with DispatchedOps() as dispatched:
        through_operators, operator_grads = run()
    forwards = dispatched.counts[f"tfm_kernels.{forward_name}"]
    assert forwards >= 1 and dispatched.counts[f"tfm_kernels.{forward_name.replace('forward', 'backward')}"] == forwards
    assert operator_node(through_operators) == f"GeneratedBackwardFor_tfm_kernels_{forward_name}_defaultBackward"
    assert all(torch.equal(a, b) for a, b in zip((plain, *plain_grads), (through_operators, *operator_grads)))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tensors_the_dispatcher_acts_on_take_the_operators(backend):
    """A negative view (which the dispatcher resolves), autograd.grad's is_grads_batched batching (without
    create_graph) and a call inside inference mode under enable_grad give what ordinary tensors give."""
    x, weight, bias = (t.requires_grad_() for t in linear_inputs((2, 3), 8, 12, torch.float32))
    require(backend, x, weight)
    negated = torch._neg_view(x.detach().neg())  # x's values behind the negative bit
    assert torch.equal(call("linear", backend, negated, weight, bias, "gelu", 0.0),
                       call("linear", backend, x, weight, bias, "gelu", 0.0))
    out = call("linear", backend, x, weight, bias, "gelu", 0.0)
    probes = torch.randn(3, *out.shape)
    batched = torch.autograd.grad(out, (x, weight, bias), probes, is_grads_batched=True, retain_graph=True)
    for i, probe in enumerate(probes):
        one = torch.autograd.grad(out, (x, weight, bias), probe, retain_graph=True)
        assert all(torch.equal(b[i], g) for b, g in zip(batched, one))
    with torch.inference_mode(), torch.enable_grad():
        assert not call("linear", backend, x, weight, bias, "gelu", 0.0).requires_grad


def check_second_derivatives(backend, kind, activation, dropout_p, with_bias, loss, dtype=torch.float32,
                             device="cpu", tokens=(2, 3), d_model=8, d_ff=12):
    """A gradient penalty: the gradients of <dL/d(inputs), w> by x, the weights and the biases against the
    float64 oracle (tolerance rule). The kernels give the first derivatives; differentiating those recomputes
    the reference's backward. loss: of the output; with a plain sum the output's gradient is a constant, so
    that only the saved inputs tie the gradient to the graph."""
    x, weight, bias = linear_inputs(tokens, d_model, d_ff, torch.float32, device)
    require(backend, x.to(dtype), weight.to(dtype))
    w2 = rand(d_model, d_ff // 2 if kind == "gated" else d_ff, device=device, scale=d_ff**-0.5)
    b2 = rand(d_model, device=device)
    if not with_bias:
        bias = b2 = None
    leaves = [t for t in (x, weight, bias) + ((w2, b2) if kind == "block" else ()) if t is not None]
    weights = [rand(*t.shape, device=device) for t in leaves]
    torch_seed = int(torch.randint(0, 2**31, ()))

    def forward(run_backend, *inputs):
        x, weight, *rest = inputs
        if kind == "block":
            bias, w2, b2 = rest if with_bias else (None, rest[0], None)
            return tfm_kernels.mlp(x, weight, bias, w2, b2, activation, dropout_p, backend=run_backend)
        return call(kind, run_backend, x, weight, rest[0] if with_bias else None, activation, dropout_p)

    def run(run_backend, run_dtype):
        inputs = [t.detach().to(run_dtype).requires_grad_() for t in leaves]
        torch.manual_seed(torch_seed)
        return gradient_penalty_derivatives(functools.partial(forward, run_backend), inputs,
                                            [w.to(run_dtype) for w in weights], loss)

    results = zip(run(backend, dtype), run("torch", dtype), run("torch", torch.float64))
    for i, (result, base, ref) in enumerate(results):
        order = "gradient" if i < len(leaves) else "penalty gradient"
        assert_within_tolerance(f"{backend} {kind} {activation} {order} {i % len(leaves)}", result, base, ref)


SECOND_ORDER_CASES = [("linear", "gelu", 0.0, True), ("linear", "silu", 0.3, False), ("linear", None, 0.0, True),
                      ("gated", "gelu_tanh", 0.2, True), ("gated", "silu", 0.0, False),
                      ("block", "gelu", 0.2, True), ("block", "relu", 0.0, False)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind, activation, dropout_p, with_bias", SECOND_ORDER_CASES)
@pytest.mark.parametrize("loss", list(LOSSES))
def test_second_derivatives(backend, kind, activation, dropout_p, with_bias, loss):
    check_second_derivatives(backend, kind, activation, dropout_p, with_bias, LOSSES[loss])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "gated", "block"])
def test_second_derivatives_through_batched_grads(backend, kind):
    """Second derivatives where autograd.grad's is_grads_batched runs the backward under its own batching
    (which drops an autograd.Function's graph), against the float64 oracle (tolerance rule)."""
    x, weight, bias = linear_inputs((2, 3), 8, 12, torch.float32)
    require(backend, x, weight)
    w2 = rand(8, 6 if kind == "gated" else 12)
    leaves = [x, weight, bias] + ([w2] if kind == "block" else [])
    probes = rand(3, 2, 3, 8 if kind == "block" else 6 if kind == "gated" else 12)

    def run(run_backend, dtype):
        inputs = [t.detach().to(dtype).requires_grad_() for t in leaves]
        if kind == "block":
            out = tfm_kernels.mlp(*inputs[:3], inputs[3], None, backend=run_backend)
        else:
            out = call(kind, run_backend, *inputs, "silu", 0.0)
        grads = torch.autograd.grad(out, inputs, probes.to(dtype), is_grads_batched=True, create_graph=True)
        return (*grads, *torch.autograd.grad(sum(g.square().sum() for g in grads), inputs))

    results = zip(run(backend, torch.float32), run("torch", torch.float32), run("torch", torch.float64))
    for i, (result, base, ref) in enumerate(results):
        assert_within_tolerance(f"{backend} {kind} batched derivative {i}", result, base, ref)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "block"])
def test_second_derivatives_under_saved_tensors_hooks(backend, kind):
    """Under save_on_cpu, whose default hooks the torch.func transforms of the second derivatives refuse and so
    set aside while they run: the same first and second derivatives as without hooks, bit for bit; the
    forward's tensors go through the hooks."""
    x, weight, bias = linear_inputs((2, 3), 8, 12, torch.float32)
    require(backend, x, weight)
    w2 = rand(8, 12)
    leaves = [x, weight, bias] + ([w2] if kind == "block" else [])
    weights = [rand(*t.shape) for t in leaves]

    def derivatives():
        def forward(x, weight, bias, *second):
            if kind == "block":
                return tfm_kernels.mlp(x, weight, bias, second[0], None, backend=backend)
            return tfm_kernels.fused_linear(x, weight, bias, "gelu", backend=backend)

        inputs = [t.detach().requires_grad_() for t in leaves]
        return gradient_penalty_derivatives(forward, inputs, weights, LOSSES["square"])

    assert_unchanged_by_saved_tensors_hooks(derivatives)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inference_mode_bias(backend):
    """A bias made under torch.inference_mode (which has no version counter) beside an x that requires grad, as
    torch's linear takes it: the output and gradient of a plain bias of the same values."""
    x, weight, bias = linear_inputs((2, 3), 8, 12, torch.float32)
    require(backend, x, weight)
    with torch.inference_mode():
        inference_bias = bias.clone()
    results = []
    for b in (inference_bias, bias):
        leaf = x.detach().requires_grad_()
        out = tfm_kernels.fused_linear(leaf, weight, b, "gelu", backend=backend)
        results.append((out, *torch.autograd.grad(out.square().sum(), leaf)))
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "gated", "block"])
def test_first_derivatives_do_not_run_the_reference(backend, kind):
    """The reference's backward runs only when a gradient is differentiated: not in a plain backward, nor under
    create_graph until then."""
    x, weight, bias = (t.requires_grad_() for t in linear_inputs((2, 3), 8, 12, torch.float32))
    require(backend, x, weight)
    w2 = rand(8, 6 if kind == "gated" else 12).requires_grad_()

    def loss():
        if kind == "block":
            return tfm_kernels.mlp(x, weight, bias, w2, None, backend=backend).square().sum()
        return call(kind, backend, x, weight, bias, "gelu", 0.0).square().sum()

    oracle = reference.gated_linear if kind == "gated" else reference.linear
    with mock.patch.object(reference, oracle.__name__, wraps=oracle) as reference_forward:
        loss().backward()
        (grad_x,) = torch.autograd.grad(loss(), x, create_graph=True)
        assert reference_forward.call_count == 0
        grad_x.square().sum().backward()
        assert reference_forward.call_count > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "gated", "block"])
def test_bias_updated_in_place_before_backward(backend, kind):
    """The first derivatives do not read the biases, which are not saved (torch's linear never saves its
    bias): updating one in place between forward and backward is no error, as with torch, and the gradients
    are those without the update, bit for bit. The second derivatives, which read the biases, then refuse."""
    x, weight, bias = (t.requires_grad_() for t in linear_inputs((2, 3), 8, 12, torch.float32))
    require(backend, x, weight)
    w2 = rand(8, 6 if kind == "gated" else 12).requires_grad_()
    b2 = rand(8).requires_grad_()
    leaves = [x, weight, bias] + ([w2, b2] if kind == "block" else [])

    def forward(run_backend, x, weight, bias, *second):
        if kind == "block":
            return tfm_kernels.mlp(x, weight, bias, *second, backend=run_backend)
        return call(kind, run_backend, x, weight, bias, "gelu", 0.0)

    expected = torch.autograd.grad(forward(backend, *leaves).square().sum(), leaves)
    for position in range(2, len(leaves), 2):  # every bias
        fresh = [t.detach().clone().requires_grad_() for t in leaves]
        out = forward(backend, *fresh)
        with torch.no_grad():
            fresh[position].add_(1.0)
        grads = torch.autograd.grad(out.square().sum(), fresh, create_graph=True)
        assert all(torch.equal(got, want) for got, want in zip(grads, expected))
        with pytest.raises(RuntimeError, match=r"(bias|b1|b2) of tfm_kernels::\w+_forward \(a bias given to "
                                               r"fused_linear, gated_linear or mlp\) was modified by an inplace"):
            torch.autograd.grad(grads[0].square().sum(), fresh)


def _op_samples(prefix):
    x = rand(9, 12)
    weight = rand(10, 12)
    bias = rand(10)
    seed = torch.tensor(123456789, dtype=torch.int64)
    ops = torch.ops.tfm_kernels
    linear_fwd = getattr(ops, f"{prefix}mlp_linear_forward")
    linear_bwd = getattr(ops, f"{prefix}mlp_linear_backward")
    gated_fwd = getattr(ops, f"{prefix}mlp_gated_forward")
    gated_bwd = getattr(ops, f"{prefix}mlp_gated_backward")
    samples = []
    for activation, dropout_p, with_bias in (("gelu", 0.0, True), ("none", 0.3, False), ("silu", 0.2, True)):
        b = bias if with_bias else None
        leaves = (x.clone().requires_grad_(), weight.clone().requires_grad_())
        samples.append((linear_fwd, (*leaves, b, activation, dropout_p, seed)))
        out, preact = linear_fwd(x, weight, b, activation, dropout_p, seed)
        needs = (True, False, with_bias)  # a frozen weight: its gradient not computed, a (0,) tensor back
        for mask in ((), needs):
            samples.append((linear_bwd, (torch.randn_like(out), x, weight, preact, activation, dropout_p, seed, *mask)))
        samples.append((gated_fwd, (*leaves, b, activation, dropout_p, seed)))
        out, gate_up = gated_fwd(x, weight, b, activation, dropout_p, seed)
        for mask in ((), needs[::-1]):
            samples.append((gated_bwd, (torch.randn_like(out), x, weight, gate_up, activation, dropout_p, seed, *mask)))
        if prefix == "":  # the block operators are C++ only
            w2, b2 = rand(7, 10), (rand(7) if with_bias else None)
            block_args = (x, weight, b, w2, b2, activation, dropout_p, seed)
            samples.append((ops.mlp_block_forward, (*leaves, b, w2.clone().requires_grad_(), b2, activation,
                                                    dropout_p, seed)))
            out, preact, hidden = ops.mlp_block_forward(*block_args)
            for mask in ((), (False, True, with_bias, False, with_bias), (False,) * 3 + (True, with_bias)):
                samples.append((ops.mlp_block_backward, (torch.randn_like(out), x, weight, preact, hidden, w2,
                                                         activation, dropout_p, seed, *mask)))
    return samples


def check_backward_flags(backend, kind, device, activation="gelu", dropout_p=0.2, d_ff=10, dtype=torch.float32):
    """A backward operator told that a gradient is not needed (autograd's needs_input_grad: a frozen weight, an
    input without grad) returns an empty (0,) tensor for it, and for the others the values of the full call,
    bit for bit; every combination of flags. One exception: where the GPU backends sum a frozen weight's bias
    gradient apart from the weight gradient's GEMM (in torch or our column-sum kernel, not in the GEMM's
    epilogue), another order of the same sum, that gradient is held to the tolerance rule against the oracle."""
    if backend == "triton" and kind == "block":
        pytest.skip("the Triton backend has no block operator (it runs the block as two linears)")
    prefix = "triton_" if backend == "triton" else ""
    x, weight, bias = linear_inputs((9,), 12, d_ff, dtype, device=device)
    require(backend, x, weight)
    ops = torch.ops.tfm_kernels
    seed = torch.tensor(7, dtype=torch.int64, device=device)
    if kind == "gated":
        weight = torch.cat([weight, rand(d_ff, 12, dtype=dtype, device=device, scale=12 ** -0.5)])
        bias = rand(2 * d_ff, dtype=dtype, device=device)
    tensors = (x, weight, bias, rand(7, d_ff, dtype=dtype, device=device),
               rand(7, dtype=dtype, device=device))[:5 if kind == "block" else 3]
    if kind == "block":
        out, *saved = ops.mlp_block_forward(*tensors, activation, dropout_p, seed)
        saved.append(tensors[3])  # preact, hidden, w2
        backward_op = ops.mlp_block_backward
    else:
        out, *saved = getattr(ops, f"{prefix}mlp_{kind}_forward")(*tensors, activation, dropout_p, seed)
        backward_op = getattr(ops, f"{prefix}mlp_{kind}_backward")
    grad_out = torch.randn_like(out)

    def backward(*needs):
        return backward_op(grad_out, x, weight, *saved, activation, dropout_p, seed, *needs)

    def reference_gradients(dtype):
        leaves = [t.to(dtype).requires_grad_() for t in tensors]
        name = _reference_activation_name(activation)
        if kind == "block":
            result = reference.linear(reference.linear(*leaves[:3], name, dropout_p, seed), *leaves[3:])
        else:
            result = (reference.gated_linear if kind == "gated" else reference.linear)(*leaves, name, dropout_p, seed)
        return torch.autograd.grad(result, leaves, grad_out.to(dtype))

    full = backward()
    rule = functools.cache(lambda: (reference_gradients(dtype), reference_gradients(torch.float64)))
    for needs in itertools.product((False, True), repeat=len(tensors)):
        for i, (need, got, want) in enumerate(zip(needs, backward(*needs), full, strict=True)):
            if backend != "cpu" and i in (2, 4) and need and not needs[i - 1]:  # a bias without its weight
                baseline, oracle = rule()
                assert_within_tolerance(f"{kind} gradient {i}, needs {needs}", got, baseline[i], oracle[i])
            else:
                torch.testing.assert_close(got, want if need else want.new_empty(0), rtol=0, atol=0,
                                           msg=labelled(f"{kind} gradient {i}, needs {needs}"))


def _reference_activation_name(activation):
    return None if activation == "none" else activation


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "gated", "block"])
def test_backward_operators_compute_only_the_gradients_needed(backend, kind):
    check_backward_flags(backend, kind, "cpu")


class BackwardFlags(TorchDispatchMode):
    """Records the needs_* flags of every MLP backward operator dispatched while active."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "tfm_kernels" and func.__name__.split(".")[0].endswith("_backward"):
            # Trailing arguments equal to their defaults reach a dispatch mode left out.
            given = (*args, *(a.default_value for a in func._schema.arguments[len(args):]))
            self.calls.append(tuple(a for a in given if isinstance(a, bool)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "gated", "block"])
def test_frozen_weights_get_no_gradient_and_the_rest_within_the_rule(backend, kind):
    """Through autograd, frozen weights (requires_grad False) pass needs_weight=False to the backward operator
    (recorded as dispatched): they get no gradient, and the gradients of the other leaves keep the tolerance rule
    (the "torch" backend in float32 as baseline, in float64 as oracle)."""
    x, weight, bias = linear_inputs((2, 5), 12, 10, torch.float32)
    w2, b2 = rand(7, 10), rand(7)
    require(backend, x, weight)
    if kind == "gated":
        weight = torch.cat([weight, rand(10, 12, scale=12 ** -0.5)])
        bias = rand(20)

    tensors = (x, weight, bias, w2, b2) if kind == "block" else (x, weight, bias)

    def run(run_backend, dtype, frozen):
        leaves = [t.to(dtype).requires_grad_(i not in frozen) for i, t in enumerate(tensors)]
        if kind == "block":
            out = tfm_kernels.mlp(*leaves, activation="gelu", backend=run_backend)
        else:
            out = call(kind, run_backend, *leaves, "gelu", 0.0)
        trainable = [i for i, t in enumerate(leaves) if t.requires_grad]
        return dict(zip(trainable, torch.autograd.grad(out.square().sum(), [leaves[i] for i in trainable])))

    for frozen in ((1,), (1, 2), (0, 2), (0, 1)) + (((0, 3), (1, 2, 3, 4)) if kind == "block" else ()):
        with BackwardFlags() as flags:
            got = run(backend, torch.float32, frozen)
        needs = tuple(i not in frozen for i in range(len(tensors)))
        if kind == "block" and backend == "triton":  # two linears: the down projection's backward first
            assert flags.calls == [(any(needs[:3]), *needs[3:]), needs[:3]], frozen
        else:
            assert flags.calls == [needs], frozen
        baseline, oracle = run("torch", torch.float32, frozen), run("torch", torch.float64, frozen)
        assert got.keys() == oracle.keys()
        for i, gradient in got.items():
            assert_within_tolerance(f"frozen {frozen}: leaf {i}", gradient, baseline[i], oracle[i])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    require(backend, rand(2, 2), rand(2, 2))
    for op, args in _op_samples("triton_" if backend == "triton" else ""):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_operators_refuse_the_derivatives_they_lack(backend):
    require(backend, rand(2, 2), rand(2, 2))
    for op, args in _op_samples("triton_" if backend == "triton" else ""):
        assert_refuses_derivatives_it_lacks(op, args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("gated", [False, True])
def test_compile_fullgraph(backend, gated):
    d_model, d_ff = 16, 24
    x = rand(3, 4, d_model, scale=1.0)
    w1 = rand(2 * d_ff if gated else d_ff, d_model, scale=0.25)
    b1, w2, b2 = rand(w1.shape[0]), rand(d_model, d_ff, scale=0.2), rand(d_model)
    require(backend, x, w1)

    def block(*tensors):
        return tfm_kernels.mlp(*tensors, "gelu", 0.0, gated=gated, backend=backend)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (block, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
        out = fn(*leaves)
        results.append((out, *torch.autograd.grad(out.square().sum(), leaves)))
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "gated", "block"])
def test_compile_one_input_feature_read_with_a_stride(backend, kind):
    """x with one input feature, its last dim strided and a size-1 dim before it: a reshape may give that size-1
    last dim any stride (under torch.compile's fake tensors it kept 2), so the operators' inputs are fixed after
    flattening, as in eager."""
    x = rand(3, 1, 2)[..., ::2]  # (3, 1, 1), strides (2, 2, 2)
    weight = rand(4 if kind == "gated" else 2, 1)  # (F or 2 F, K = 1), F = 2
    w2 = rand(1, 2)  # the block's down projection, (d_model = 1, F)
    require(backend, x, weight)

    def fn(t):
        if kind == "block":
            return tfm_kernels.mlp(t, weight, None, w2, None, "gelu", backend=backend)
        return call(kind, backend, t, weight, None, "gelu", 0.0)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), fn(x.contiguous()), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_fused_mlp_loads_transformer_encoder_layer(backend):
    d_model, d_ff = 32, 80
    layer = torch.nn.TransformerEncoderLayer(d_model, 4, d_ff, dropout=0.1, activation="gelu",
                                             batch_first=True)
    module = FusedMLP(d_model, d_ff, activation=torch.nn.functional.gelu, dropout=0.1, backend=backend)
    assert module.activation == "gelu"
    feed_forward = {k: v for k, v in layer.state_dict().items() if k.startswith(("linear1.", "linear2."))}
    assert set(module.state_dict()) == set(feed_forward)
    module.load_state_dict(feed_forward)
    layer.eval()
    module.eval()
    x = rand(2, 9, d_model)
    require(backend, x, module.linear1.weight)
    expected = layer.linear2(layer.dropout(layer.activation(layer.linear1(x))))
    torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)
    module.train()
    torch.manual_seed(3)
    train_out = module(x)
    assert not torch.allclose(train_out, expected), "dropout must act in training mode"


def test_fused_mlp_takes_a_torch_layers_activation():
    """FusedMLP(activation=layer.activation) for what torch's layers hold: the functions, or nn.ReLU, nn.GELU
    (either approximation) and nn.SiLU modules; a module with a hook (which the fused kernels would not call),
    another callable or an unhashable object is refused with the activations it takes."""
    nn = torch.nn
    for activation, name in ((F.relu, "relu"), (F.gelu, "gelu"), (nn.ReLU(), "relu"), (nn.GELU(), "gelu"),
                             (nn.GELU(approximate="tanh"), "gelu_tanh"), (nn.SiLU(), "silu"), (None, None)):
        assert FusedMLP(8, 16, activation=activation).activation == name, activation
    hooked = nn.ReLU()
    hooked.register_forward_hook(lambda module, args, out: out)
    for activation in (hooked, torch.tanh, [F.relu]):
        with pytest.raises(ValueError, match="activation must be one of .* nn.GELU or nn.SiLU module without hooks"):
            FusedMLP(8, 16, activation=activation)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_gated_mlp_loads_separate_gate_and_up(backend):
    d_model, d_ff = 24, 40
    gate, up = torch.nn.Linear(d_model, d_ff), torch.nn.Linear(d_model, d_ff)
    down = torch.nn.Linear(d_ff, d_model)
    x = rand(3, 5, d_model)
    expected = down(torch.nn.functional.silu(gate(x)) * up(x))
    module = GatedMLP(d_model, d_ff, bias=True, backend=backend)
    require(backend, x, module.gate_up_proj.weight)
    state = {f"{name}.{p}": t for name, lin in (("gate_proj", gate), ("up_proj", up), ("down_proj", down))
             for p, t in lin.state_dict().items()}
    module.load_state_dict(state)
    torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)
    other = GatedMLP(d_model, d_ff, bias=True, backend=backend)
    other.load_gate_up(gate.weight, up.weight, gate.bias, up.bias)
    other.down_proj.load_state_dict(down.state_dict())
    torch.testing.assert_close(other(x), expected, rtol=1e-5, atol=1e-5)
    assert set(GatedMLP(d_model, d_ff).state_dict()) == {"gate_up_proj.weight", "down_proj.weight"}


@pytest.mark.parametrize("gate_rows, up_rows, columns", [(40, 24, 16), (32, 32, 1), (32, 32, 15)])
def test_gated_mlp_refuses_gate_and_up_of_other_shapes(gate_rows, up_rows, columns):
    """Gate and up halves that are not (d_ff, d_model) each raise, naming them, and leave the module as it was:
    uneven halves would fill gate_up_proj with the split in the wrong place, one column would broadcast into it."""
    module = GatedMLP(16, 32, bias=True)
    before = {key: t.clone() for key, t in module.state_dict().items()}
    gate, up, bias = torch.randn(gate_rows, columns), torch.randn(up_rows, columns), torch.zeros(32)
    with pytest.raises(ValueError, match=r"(gate|up)_weight must have shape \(32, 16\); got"):
        module.load_gate_up(gate, up, bias, bias)
    assert all(torch.equal(t, before[key]) for key, t in module.state_dict().items())
    llama_layout = {"gate_proj.weight": gate, "up_proj.weight": up, "gate_proj.bias": bias, "up_proj.bias": bias,
                    "down_proj.weight": torch.zeros(16, 32), "down_proj.bias": torch.zeros(16)}
    with pytest.raises(RuntimeError, match=r"size mismatch for gate_proj.weight and up_proj.weight: each must have "
                                           r"shape \(32, 16\)"):
        module.load_state_dict(llama_layout)
    without_bias = GatedMLP(16, 32, bias=False)
    weight = without_bias.gate_up_proj.weight.clone()
    with pytest.raises(ValueError, match="gate_bias and up_bias must both be given iff the module has biases"):
        without_bias.load_gate_up(torch.ones(32, 16), torch.ones(32, 16), bias, bias)
    with pytest.raises(TypeError, match=r"gate_weight must be a tensor of shape \(32, 16\); got None"):
        without_bias.load_gate_up(None, torch.ones(32, 16))
    assert torch.equal(without_bias.gate_up_proj.weight, weight)
    assert torch.equal(module.gate_up_proj.weight, before["gate_up_proj.weight"])  # torch loads down_proj


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_modules_under_autocast(backend):
    """Under bf16 autocast the modules compute in bf16 as torch's linears do, the parameters staying float32:
    the same result as a bf16 copy of the module on bf16 input."""
    x = rand(2, 5, 16)
    for module in (FusedMLP(16, 32, activation="gelu", dropout=0.0, backend=backend),
                   GatedMLP(16, 24, backend=backend)):
        first_weight = next(module.parameters())
        require(backend, x, first_weight)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x)
        assert out.dtype == torch.bfloat16 and first_weight.dtype == torch.float32
        bf16_copy = copy.deepcopy(module).bfloat16()
        torch.testing.assert_close(out, bf16_copy(x.bfloat16()), rtol=0, atol=0)


class _ScaledLinear(torch.nn.Linear):
    """A Linear with its own forward, as LoRA or quantized linears have."""

    def forward(self, x):
        return 1.5 * super().forward(x)


def _replace_first_linear(module):
    first = "linear1" if isinstance(module, FusedMLP) else "gate_up_proj"
    old = getattr(module, first)
    replacement = _ScaledLinear(old.in_features, old.out_features)
    replacement.load_state_dict(old.state_dict())
    setattr(module, first, replacement)


MODULE_LINEAR_CHANGES = {
    "forward_hook": lambda first, last: first.register_forward_hook(lambda m, args, out: 0.5 * out),
    "pre_hook": lambda first, last: last.register_forward_pre_hook(lambda m, args: (2.0 * args[0],)),
    "spectral_norm": lambda first, last: torch.nn.utils.spectral_norm(first),
    "prune": lambda first, last: prune.random_unstructured(first, "weight", amount=0.5),
}


@pytest.mark.parametrize("change", [*MODULE_LINEAR_CHANGES, "linear_subclass"])
@pytest.mark.parametrize("module_class", [FusedMLP, GatedMLP])
def test_modules_call_changed_linears(module_class, change):
    """FusedMLP and GatedMLP whose linears compute something else than nn.Linear (a hook, spectral_norm's or
    prune's pre-hook, a subclass) call them, as the Transformer layers' feed-forward does, instead of reading
    their weight and bias into the fused MLP (which ignored the hooks, and with prune failed in the second
    backward): outputs and gradients over two SGD steps equal the same modules run in torch ops."""
    torch.manual_seed(0)
    module = module_class(8, 12, activation="gelu", bias=True, dropout=0.0, backend="cpu")
    reference = copy.deepcopy(module)
    for m in (module, reference):
        torch.manual_seed(1)  # spectral_norm's and prune's random state alike in both
        if change == "linear_subclass":
            _replace_first_linear(m)
        else:
            linears = [c for c in m.children() if isinstance(c, torch.nn.Linear)]
            MODULE_LINEAR_CHANGES[change](linears[0], linears[-1])

    def torch_ops(x):
        if module_class is FusedMLP:
            return reference.linear2(F.gelu(reference.linear1(x)))
        gate, up = reference.gate_up_proj(x).chunk(2, dim=-1)
        return reference.down_proj(F.gelu(gate) * up)

    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (module, reference)]
    for _ in range(2):
        x = rand(3, 8)
        out, expected = module(x), torch_ops(x)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        for optimizer, y in zip(optimizers, (out, expected)):
            optimizer.zero_grad()
            y.square().sum().backward()
            optimizer.step()
        for (name, p), q in zip(module.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=labelled(f"grad {name}"))


def labelled(label):
    """An assert_close msg callable that prefixes torch's own report with `label`."""
    return lambda report: f"{label}: {report}"


def check_empty_operator_inputs(backend, device):
    """The operators themselves on M = 0, K = 0 and N = 0 (the public functions route empty inputs to the
    oracle, so only direct calls reach them): outputs and gradients as the oracle's, e.g. out = act(bias) and
    grad_bias = the column sums of dz for K = 0 (where dW's grid has no program). On cuda no empty GEMM may
    reach cuBLASLt (leading dimension 0) and k = 0 must still write zeros (poisoned memory shows a missed
    write as NaN). Triton has no block operator (its backend runs the block as two linears)."""
    prefix = "triton_" if backend == "triton" else ""
    ops = types.SimpleNamespace(**{name: getattr(torch.ops.tfm_kernels, prefix + name) for name in (
        "mlp_linear_forward", "mlp_linear_backward", "mlp_gated_forward", "mlp_gated_backward")})
    seed = torch.tensor(0, dtype=torch.int64, device=device)
    for M, K, N in ((0, 8, 16), (4, 0, 16), (4, 8, 0)):
        x, w, b = linear_inputs((M,), K, N, torch.float32, device)
        gated_w, gated_b = rand(2 * N, K, device=device), rand(2 * N, device=device)
        w2, b2 = rand(6, N, device=device), rand(6, device=device)
        require(backend, x, w)
        for activation in ("gelu_tanh", "none"):
            name = _reference_activation_name(activation)
            leaves = {kind: [t.clone().requires_grad_() for t in tensors]
                      for kind, tensors in (("linear", (x, w, b)), ("gated", (x, gated_w, gated_b)),
                                            ("block", (x, w, b, w2, b2)))}
            expected = {"linear": reference.linear(*leaves["linear"], name),
                        "gated": reference.gated_linear(*leaves["gated"], name),
                        "block": reference.linear(reference.linear(*leaves["block"][:3], name), *leaves["block"][3:])}
            grad_out = {kind: torch.randn_like(e) for kind, e in expected.items()}
            with poisoned_memory(device):
                out, preact = ops.mlp_linear_forward(x, w, b, activation, 0.0, seed)
                gated_out, gate_up = ops.mlp_gated_forward(x, gated_w, gated_b, activation, 0.0, seed)
                results = {
                    "linear": (out, *ops.mlp_linear_backward(grad_out["linear"], x, w, preact, activation, 0.0,
                                                             seed)),
                    "gated": (gated_out, *ops.mlp_gated_backward(grad_out["gated"], x, gated_w, gate_up, activation,
                                                                 0.0, seed)),
                }
                if backend != "triton":
                    block = torch.ops.tfm_kernels
                    block_out, block_preact, hidden = block.mlp_block_forward(x, w, b, w2, b2, activation, 0.0, seed)
                    results["block"] = (block_out, *block.mlp_block_backward(grad_out["block"], x, w, block_preact,
                                                                             hidden, w2, activation, 0.0, seed))
            for kind, result in results.items():
                wanted = (expected[kind], *torch.autograd.grad(expected[kind], leaves[kind], grad_out[kind]))
                names = ("out", "grad_x", "grad_w", "grad_b", "grad_w2", "grad_b2")
                for what, r, e in zip(names, result, wanted, strict=False):
                    torch.testing.assert_close(r, e.detach(), rtol=1e-4, atol=1e-4,
                                               msg=labelled(f"{kind} {activation} {what} M={M} K={K} N={N}"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_operator_inputs(backend):
    check_empty_operator_inputs(backend, "cpu")


@pytest.mark.parametrize("kind", ["linear", "gated"])
def test_triton_operators_read_strided_bias_grad_out_and_preact(kind):
    """The Triton operators called directly (the public functions pass contiguous tensors) with a strided bias,
    a transposed grad_out and a transposed pre-activation: the results of the same call on contiguous copies,
    bit for bit, as the C++ operators under the same schema give."""
    x, weight, _ = linear_inputs((9,), 12, 10, torch.float32)
    if kind == "gated":
        weight = torch.cat([weight, rand(10, 12, scale=12 ** -0.5)])
    forward, backward = (getattr(torch.ops.tfm_kernels, f"triton_mlp_{kind}_{step}")
                         for step in ("forward", "backward"))
    require("triton", x, weight)
    seed = torch.tensor(123, dtype=torch.int64)
    bias = rand(2 * weight.shape[0])[::2]
    strided_out, preact = forward(x, weight, bias, "gelu", 0.0, seed)
    out, _ = forward(x, weight, bias.contiguous(), "gelu", 0.0, seed)
    torch.testing.assert_close(strided_out, out, rtol=0, atol=0)
    grad_out = rand(out.shape[1], out.shape[0]).t()
    strided = backward(grad_out, x, weight, preact.t().contiguous().t(), "gelu", 0.0, seed)
    contiguous = backward(grad_out.contiguous(), x, weight, preact, "gelu", 0.0, seed)
    for name, a, b in zip(("grad_x", "grad_weight", "grad_bias"), strided, contiguous, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=labelled(name))


@pytest.mark.parametrize("backend", [*CPU_BACKENDS, "torch"])
def test_autocast_as_torch_linear(backend):
    """Under autocast, as torch's linear: float32 tensors (and mixed dtypes) are cast to the autocast dtype,
    the result comes in it, and gradients reach the float32 leaves; for fused_linear, gated_linear and mlp."""
    dtype = torch.float16 if backend == "triton" else torch.bfloat16  # the interpreter's bf16 dots are wrong
    x, weight, bias = (t.requires_grad_() for t in linear_inputs((2, 5), 24, 40, torch.float32))
    w2, b2 = rand(24, 20).requires_grad_(), rand(24).requires_grad_()
    require(backend, x.to(dtype), weight.to(dtype))
    calls = {
        "fused_linear": lambda *t: tfm_kernels.fused_linear(t[0], t[1], t[2], "gelu", backend=backend),
        "gated_linear": lambda *t: tfm_kernels.gated_linear(t[0], t[1], "silu", bias=t[2], backend=backend),
        "mlp": lambda *t: tfm_kernels.mlp(*t, "silu", gated=True, backend=backend),
    }
    for name, call in calls.items():
        tensors = (x, weight, bias, w2, b2)
        with torch.autocast("cpu", dtype=dtype):
            out = call(x.to(dtype), *tensors[1:])
        expected = call(*(t.to(dtype) for t in tensors))
        assert out.dtype == dtype, name
        assert torch.equal(out, expected), name
        out.sum().backward()
        assert x.grad is not None and x.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32, name
        x.grad = weight.grad = None


@pytest.mark.parametrize("dropout_p", [np.float32(0.25), torch.tensor(0.25)], ids=["numpy", "tensor"])
def test_dropout_p_is_taken_as_torchs_dropout_takes_it(dropout_p):
    """A NumPy scalar or a one-element tensor is a dropout probability, as for attention and torch's dropout."""
    x, weight, bias = linear_inputs((2, 3), 8, 5, torch.float32)
    outputs = []
    for p in (dropout_p, 0.25):
        torch.manual_seed(0)
        outputs.append(tfm_kernels.fused_linear(x, weight, bias, dropout_p=p, backend="torch"))
    assert torch.equal(*outputs)


def test_bad_inputs():
    x, weight, bias = linear_inputs((2, 3), 8, 5, torch.float32)
    linear = tfm_kernels.fused_linear
    cases = [
        (lambda: linear(x, rand(5, 7)), ValueError, r"weight must have shape \(out_features, 8\).*\(5, 7\)"),
        (lambda: linear(x, weight, rand(4)), ValueError, r"bias must have shape \(5,\).*got \(4,\)"),
        (lambda: linear(x, weight, activation="tanh"), ValueError, "activation must be one of.*'tanh'"),
        (lambda: linear(x, weight.double()), TypeError, "weight must have x's dtype torch.float32; got .*64"),
        (lambda: linear(x, weight.to("meta")), ValueError, "weight must be on x's device cpu; got meta"),
        (lambda: linear(x, weight, dropout_p=1.0), ValueError, r"dropout_p must be .*\[0, 1\); got 1.0"),
        (lambda: linear(x, weight, dropout_p=-0.1), ValueError, "dropout_p.*got -0.1"),
        (lambda: linear(x, weight, dropout_p="0.1"), TypeError, "dropout_p must be a real number; got str"),
        (lambda: linear(x.long(), weight), TypeError, "x must be float16, bfloat16, float32 or float64; got .*int64"),
        (lambda: linear(x, weight.to(torch.float8_e4m3fn)), TypeError,
         "weight must be float16, bfloat16, float32 or float64; got .*float8_e4m3fn"),
        (lambda: linear(x, weight.to_sparse()), TypeError, "weight must be a dense .strided. tensor; got layout"),
        (lambda: tfm_kernels.gated_linear(x, rand(5, 8)), ValueError, "even number of rows"),
        (lambda: tfm_kernels.mlp(x, rand(6, 8), None, rand(8, 5), None), ValueError,
         r"w2 must have shape \(d_out, 6\).*got \(8, 5\)"),
        (lambda: linear(x, weight, backend="cuda"), NotImplementedError, "backend='cuda' cannot run"),
        (lambda: linear(x, weight, backend="fast"), ValueError, "backend must be one of"),
        (lambda: FusedMLP(8, 16, activation="swish"), ValueError, "activation must be one of"),
        (lambda: GatedMLP(8, 16, dropout=1.5), ValueError, r"dropout must be a float in \[0, 1\); got 1.5"),
        # a string counted as True; the modules named a bad backend only at their first forward
        (lambda: tfm_kernels.mlp(x, rand(6, 8), None, rand(8, 6), None, gated="yes"), TypeError,
         "gated must be a bool; got str"),
        (lambda: FusedMLP(8, 16, backend="gpu"), ValueError, "backend must be one of .*; got 'gpu'"),
        (lambda: GatedMLP(8, 16, backend="gpu"), ValueError, "backend must be one of .*; got 'gpu'"),
    ]
    for fn, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            fn()


def check_operator_errors(cases):
    for fn, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            fn()


def check_backward_operator_errors(device):
    """The operators, called directly, fail with "<op>: " and the argument that is wrong: a backward's tensor
    that does not match the forward's, dropout_p outside [0, 1) or a seed that is not one int64 element (on
    every MLP operator), and a block argument by its own name, not as the inner linear operator's."""
    ops = torch.ops.tfm_kernels
    x, weight, _ = linear_inputs((4,), 8, 6, torch.float32, device=device)
    require("cpu" if device == "cpu" else "cuda", x, weight)
    gated_weight = rand(12, 8, device=device)
    seed = torch.zeros((), dtype=torch.int64, device=device)
    grad, preact, gate_up = rand(4, 6, device=device), rand(4, 6, device=device), rand(4, 12, device=device)
    check_operator_errors([
        (lambda: ops.mlp_linear_backward(grad.half(), x, weight, preact, "gelu", 0.0, seed),
         "mlp_linear_backward: grad_out must have x's dtype"),
        (lambda: ops.mlp_linear_backward(grad[:3], x, weight, preact, "gelu", 0.0, seed),
         r"mlp_linear_backward: grad_out must be \(4, 6\)"),
        (lambda: ops.mlp_linear_backward(grad, x, weight, preact[:, :5], "gelu", 0.0, seed),
         r"mlp_linear_backward: preact must be \(4, 6\); got \[4, 5\]"),
        (lambda: ops.mlp_linear_backward(grad, x, weight, preact.half(), "silu", 0.0, seed),
         "mlp_linear_backward: preact must have x's dtype"),
        (lambda: ops.mlp_gated_backward(grad, x, gated_weight[:11], gate_up, "silu", 0.0, seed),
         "mlp_gated_backward: weight must have an even number of rows"),
        (lambda: ops.mlp_gated_backward(grad, x, gated_weight, gate_up.half(), "silu", 0.0, seed),
         "mlp_gated_backward: gate_up must have x's dtype"),
        (lambda: ops.mlp_gated_backward(grad, x, gated_weight, gate_up[:, :10], "silu", 0.0, seed),
         r"mlp_gated_backward: gate_up must be \(4, 12\)"),
        (lambda: ops.mlp_linear_forward(x, weight[:, :7], None, "gelu", 0.0, seed),
         r"mlp_linear_forward: weight must be \(N, K\) with K = 8 and stride\(-1\) == 1; got shape \[6, 7\]"),
        (lambda: ops.mlp_linear_forward(x, weight[0, 0], None, "gelu", 0.0, seed),
         r"mlp_linear_forward: weight must be \(N, K\) with K = 8 and stride\(-1\) == 1; got shape \[\]"),
        (lambda: ops.mlp_linear_forward(x, weight, rand(5, device=device), "gelu", 0.0, seed),
         r"mlp_linear_forward: bias must be \(6,\); got \[5\]"),
        (lambda: ops.mlp_gated_forward(x, gated_weight[:11], None, "silu", 0.0, seed),
         "mlp_gated_forward: weight must have an even number of rows"),
        (lambda: ops.mlp_gated_forward(x, gated_weight, None, "swish", 0.0, seed),
         "mlp_gated_forward: activation must be one of none, gelu, gelu_tanh, relu, silu; got swish"),
    ])
    check_dropout_operator_errors(device)
    check_block_operator_errors(device)


def mlp_operator_calls(device):
    """{op name: call(dropout_p, seed)} with valid tensors, for all six MLP operators."""
    ops = torch.ops.tfm_kernels
    x, weight, bias = linear_inputs((4,), 8, 6, torch.float32, device=device)
    gated_weight, gated_bias = rand(12, 8, device=device), rand(12, device=device)
    w2, b2 = rand(5, 6, device=device), rand(5, device=device)
    grad, grad_block = rand(4, 6, device=device), rand(4, 5, device=device)
    preact, hidden, gate_up = rand(4, 6, device=device), rand(4, 6, device=device), rand(4, 12, device=device)
    return {
        "mlp_linear_forward": lambda p, seed: ops.mlp_linear_forward(x, weight, bias, "gelu", p, seed),
        "mlp_linear_backward": lambda p, seed: ops.mlp_linear_backward(grad, x, weight, preact, "gelu", p, seed),
        "mlp_gated_forward": lambda p, seed: ops.mlp_gated_forward(x, gated_weight, gated_bias, "silu", p, seed),
        "mlp_gated_backward": lambda p, seed: ops.mlp_gated_backward(grad, x, gated_weight, gate_up, "silu", p, seed),
        "mlp_block_forward": lambda p, seed: ops.mlp_block_forward(x, weight, bias, w2, b2, "relu", p, seed),
        "mlp_block_backward": lambda p, seed: ops.mlp_block_backward(grad_block, x, weight, preact, hidden, w2,
                                                                     "relu", p, seed),
    }


def check_dropout_operator_errors(device):
    """dropout_p outside [0, 1) (NaN, infinities, and 1, whose keep scale is inf) would silently mean no dropout
    or drop everything, and a seed of another dtype or size would be converted or fail without its name: every
    MLP operator refuses them, and reads the seed (of any dtype) only when dropout_p > 0."""
    seed = torch.zeros((), dtype=torch.int64, device=device)
    bad_p = {-0.5: "-0.5", math.nan: "nan", math.inf: "inf", -math.inf: "-inf", 1.0: "1", 1e30: "1e+30"}
    bad_seeds = {"Float of shape []": torch.zeros((), device=device),
                 "Bool of shape []": torch.zeros((), dtype=torch.bool, device=device),
                 "Int of shape []": torch.zeros((), dtype=torch.int32, device=device),
                 "Long of shape [2]": torch.zeros(2, dtype=torch.int64, device=device)}
    for op, call_op in mlp_operator_calls(device).items():
        cases = [(functools.partial(call_op, p, seed), re.escape(f"{op}: dropout_p must be in [0, 1); got {text}"))
                 for p, text in bad_p.items()]
        cases += [(functools.partial(call_op, 0.1, bad_seed),
                   re.escape(f"{op}: seed must be an int64 tensor with one element; got {text}"))
                  for text, bad_seed in bad_seeds.items()]
        check_operator_errors(cases)
        call_op(0.0, torch.zeros((), device=device))  # no dropout: the seed is never read
        call_op(0.1, seed)


def check_block_operator_errors(device):
    """The block operators name each of their own arguments (w1, b1, w2, b2, hidden), not the inner linear
    operator's x, weight and bias; x (4, 8), w1 (F=8, 8), w2 (N=5, 8)."""
    ops = torch.ops.tfm_kernels
    x, w1, b1 = linear_inputs((4,), 8, 8, torch.float32, device=device)
    w2, b2 = rand(5, 8, device=device), rand(5, device=device)
    grad, preact, hidden = rand(4, 5, device=device), rand(4, 8, device=device), rand(4, 8, device=device)
    seed = torch.zeros((), dtype=torch.int64, device=device)

    def forward(x=x, w1=w1, b1=b1, w2=w2, b2=b2, activation="gelu"):
        return ops.mlp_block_forward(x, w1, b1, w2, b2, activation, 0.0, seed)

    def backward(grad=grad, w1=w1, preact=preact, hidden=hidden, w2=w2, activation="gelu_tanh"):
        return ops.mlp_block_backward(grad, x, w1, preact, hidden, w2, activation, 0.0, seed)

    check_operator_errors([
        (lambda: forward(x=x.t()), r"mlp_block_forward: x must be 2-D \(M, K\) with stride\(-1\) == 1"),
        (lambda: forward(w1=w1[:, :7]), r"mlp_block_forward: w1 must be \(F, K\) with K = 8 .*got shape \[8, 7\]"),
        (lambda: forward(b1=b1[:7]), r"mlp_block_forward: b1 must be \(8,\); got \[7\]"),
        (lambda: forward(w2=w2[:, :7]),
         r"mlp_block_forward: w2 must be \(N, F\) with F = 8 and stride\(-1\) == 1; got shape \[5, 7\]"),
        (lambda: forward(w2=w2.half()), "mlp_block_forward: w2 must have x's dtype"),
        (lambda: forward(b2=b2[:4]), r"mlp_block_forward: b2 must be \(5,\); got \[4\]"),
        (lambda: forward(b2=b2.half()), "mlp_block_forward: b2 must have x's dtype"),
        (lambda: forward(activation="swish"), "mlp_block_forward: activation must be one of"),
        (lambda: backward(w1=w1[:, :7]), r"mlp_block_backward: w1 must be \(F, K\) with K = 8"),
        (lambda: backward(w2=w2[:, :7]), r"mlp_block_backward: w2 must be \(N, F\) with F = 8"),
        (lambda: backward(grad=grad[:, :4]), r"mlp_block_backward: grad_out must be \(4, 5\); got \[4, 4\]"),
        (lambda: backward(preact=preact[:3]), r"mlp_block_backward: preact must be \(4, 8\); got \[3, 8\]"),
        (lambda: backward(hidden=hidden[:, :7]), r"mlp_block_backward: hidden must be \(4, 8\); got \[4, 7\]"),
        (lambda: backward(hidden=hidden.t().contiguous().t()),
         r"mlp_block_backward: hidden must be 2-D \(M, F\) with stride\(-1\) == 1"),
        (lambda: backward(hidden=hidden.half()), "mlp_block_backward: hidden must have x's dtype"),
        (lambda: backward(activation="swish"), "mlp_block_backward: activation must be one of"),
    ])
    backward(preact=preact[:0], activation="none")  # preact is read only with an activation


def test_backward_operator_errors():
    check_backward_operator_errors("cpu")


@pytest.mark.parametrize("arch, capability, runs", [
    ("80", (8, 6), True), ("80", (9, 0), False), ("90a", (9, 0), True), ("90a", (9, 1), False),
    ("100f", (10, 3), True), ("100f", (10, 0), True), ("103f", (10, 0), False), ("100f", (12, 0), False),
])
def test_sass_runs_on_its_major_or_exactly_its_device_when_arch_specific(arch, capability, runs):
    assert backends._runs_on(arch, capability) == runs


@pytest.mark.parametrize("value, interpreting", [("1", True), ("true", True), ("ON", True), ("yes", True),
                                                 ("0", False), ("false", False), ("", False), ("2", False)])
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value, interpreting):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert backends.triton_interpreting() == interpreting


def test_auto_on_cpu_picks_the_measured_fastest():
    """On CPU tensors the C++ MLP operators match eager torch without dropout and beat the torch path with it
    (benchmarks/RESULTS.md, tfm_kernels/backends.py), so "auto" runs them."""
    x, weight, _ = linear_inputs((4,), 8, 8, torch.float32)
    require("cpu", x, weight)
    assert backends.choose_mlp(x, weight) == "cpu"


@pytest.mark.parametrize("capability, runs", [((8, 0), True), ((8, 6), True), ((9, 0), True), ((10, 0), False),
                                              ((7, 5), False)])
def test_cuda_backend_needs_code_for_the_device(monkeypatch, capability, runs):
    """A build for sm_80 and sm_90a (no PTX) runs on 8.x and on exactly 9.0: on other GPUs the cuda MLP backend
    says so, as the attention one does, and "auto" takes the next backend instead of failing in a kernel."""
    monkeypatch.setattr(backends.ops, "has_compiled_cuda", lambda: True)
    monkeypatch.setattr(backends.ops, "compiled_cuda_archs", lambda: ["80", "90a"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    on_gpu = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)  # what the check reads
    reasons = backends._mlp_cuda_reasons(on_gpu)
    assert reasons == ([] if runs else [f"tfm_kernels._C has CUDA code for archs ['80', '90a'], none of which runs "
                                        f"on compute capability {capability}"])


# ------------------------------------------------------------------------------------------------------ GPU

# (batch shape, in, out, dtypes): LLM shapes at 16384 tokens in half precision; an odd one in every dtype.
GPU_SHAPES = [((16384,), 1024, 4096, (torch.bfloat16, torch.float16)),
              ((4, 4096), 4096, 1024, (torch.bfloat16,)),
              ((3, 77), 200, 333, (torch.bfloat16, torch.float16, torch.float32))]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, (*s[0], s[1], s[2]))))
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu", None])
def test_gpu_linear(backend, shape, activation):
    batch_shape, in_features, out_features, dtypes = shape
    for dtype in dtypes:
        x, weight, bias = linear_inputs(batch_shape, in_features, out_features, dtype, device="cuda")
        check_against_oracle("linear", backend, x, weight, bias, activation)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_gpu_gated_and_dropout(backend, dtype, activation, dropout_p):
    x, weight, bias = linear_inputs((16384,), 1024, 2 * 2752, dtype, device="cuda", bias=False)
    check_against_oracle("gated", backend, x, weight, None, activation, dropout_p)
    x, weight, bias = linear_inputs((2, 999), 512, 2048, dtype, device="cuda")
    check_against_oracle("linear", backend, x, weight, bias, activation, dropout_p)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["linear", "gated"])
def test_gpu_triton_on_a_device_not_current(kind):
    """Triton launches on the current device, whatever device the arguments are on: the operators make the
    inputs' device current (cuda:0 current, inputs on cuda:1)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x, weight, bias = linear_inputs((3, 77), 200, 2 * 168, torch.bfloat16, device="cuda:1")
    with torch.cuda.device(0):
        check_against_oracle(kind, "triton", x, weight, bias, "silu", 0.1)


@pytest.mark.gpu
def test_gpu_triton_gated_up_half_past_2_31_elements():
    """The gated GEMM reads the up half of W^T at F * K elements past the gate half: 2^31 here (an 8 GiB
    bf16 weight), so that offset is 64-bit."""
    from tfm_kernels.triton import mlp as triton_mlp

    F, K = 1 << 16, 1 << 15
    x = torch.randn(16, K, dtype=torch.bfloat16, device="cuda") * K ** -0.5
    weight = torch.randn(2 * F, K, dtype=torch.bfloat16, device="cuda")
    _, gate_up = triton_mlp.gated_forward(x, weight, None, "none", 0.0, rng.seed_for(0.0, x.device))
    # The first and last columns of each half, against the float64 oracle of just those columns.
    edges = [0, F - 128, F, 2 * F - 128]
    columns = torch.cat([torch.arange(c, c + 128, device="cuda") for c in edges])
    w_columns = weight[columns]
    assert_within_tolerance("gate_up", gate_up[:, columns], x @ w_columns.t(),
                            x.double() @ w_columns.double().t())


@pytest.mark.gpu
def test_gpu_triton_gradients_of_rows_2_26_elements_apart():
    """x = h[:, 0] of a long sequence: rows 2^26 elements apart (a 8.6 GiB bf16 h), so the K loop of
    dW = dz^T @ x, which steps over the rows, moves 2^26 * BLOCK_K >= 2^31 elements a step: a 64-bit step."""
    rows, K, N, row_stride = 65, 16, 32, 1 << 26
    h = torch.empty((rows - 1) * row_stride + K, dtype=torch.bfloat16, device="cuda")
    x = h.as_strided((rows, K), (row_stride, 1))
    x.copy_(torch.randn(rows, K, device="cuda"))
    weight = rand(N, K, dtype=torch.bfloat16, device="cuda", scale=K ** -0.5)
    check_against_oracle("linear", "triton", x, weight, None, None)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu", "relu"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_gpu_mlp_block(backend, dtype, activation, dropout_p):
    """Whole feed-forward blocks at 16384 tokens (cuda: the DGELU_BGRAD fused backward for gelu_tanh without
    dropout) and at an odd width (d_ff % 8 != 0: the unfused path)."""
    check_mlp_block(backend, False, activation, dropout_p, dtype, "cuda", (4, 4096), 1024, 4096)
    check_mlp_block(backend, False, activation, dropout_p, dtype, "cuda", (3, 77), 96, 100)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_strided_inputs(backend, dtype):
    check_strided_inputs(backend, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_without_bias(backend):
    """No bias: on cuda the GELU_AUX epilogue without BIAS (gelu_tanh, N % 8 == 0), the plain GEMM (None) and the
    epilogue kernel without a bias to add (silu); the other gpu tests always pass one."""
    for dtype in (torch.bfloat16, torch.float32):
        x, weight, _ = linear_inputs((2, 300), 256, 512, dtype, device="cuda", bias=False)
        for activation in ("gelu_tanh", None, "silu"):
            check_against_oracle("linear", backend, x, weight, None, activation)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("kind, activation, dropout_p, with_bias", SECOND_ORDER_CASES)
def test_gpu_second_derivatives(backend, kind, activation, dropout_p, with_bias):
    check_second_derivatives(backend, kind, activation, dropout_p, with_bias, LOSSES["square"], torch.bfloat16, "cuda",
                             tokens=(4, 99), d_model=256, d_ff=512)


@pytest.mark.gpu
def test_gpu_backward_operator_errors():
    check_backward_operator_errors("cuda")


@pytest.mark.gpu
def test_gpu_operators_refuse_cpu_x():
    """CPU x and weight beside a CUDA seed reach the CUDA kernels (the dispatcher takes the CUDA key of any
    argument); they refuse x before their device guard, which would fail on a CPU device."""
    cuda_x, cuda_weight, _ = linear_inputs((4,), 8, 6, torch.float32, device="cuda")
    require("cuda", cuda_x, cuda_weight)
    calls = mlp_operator_calls("cpu")
    seed = torch.zeros((), dtype=torch.int64, device="cuda")
    for op in ("mlp_linear_forward", "mlp_linear_backward", "mlp_gated_forward", "mlp_gated_backward",
               "mlp_block_backward"):
        with pytest.raises(RuntimeError, match=f"{op}: x must be a CUDA tensor; got device cpu"):
            calls[op](0.1, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "gated", "block"])
def test_gpu_backward_operators_compute_only_the_gradients_needed(backend, kind):
    """As on the CPU; on cuda also the block's fused path (bfloat16 GELU-tanh without dropout, d_ff a multiple of
    8), whose up-projection bias gradient comes from the DGELU_BGRAD epilogue whatever the flags, and the
    float32 block with the same arguments, which takes the generic path."""
    check_backward_flags(backend, kind, "cuda")
    if kind == "block":
        for dtype in (torch.bfloat16, torch.float32):
            check_backward_flags(backend, kind, "cuda", activation="gelu_tanh", dropout_p=0.0, d_ff=16, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_empty_operator_inputs(backend):
    check_empty_operator_inputs(backend, "cuda")


def test_triton_under_the_new_tf32_api(tf32_by_new_api):
    """The Triton kernels read torch's float32 precision through fp32_precision, which stays readable when the
    legacy flag raises (tfm_kernels/triton/precision.py)."""
    x, weight, bias = linear_inputs((3, 7), 40, 24, torch.float32)
    check_against_oracle("linear", "triton", x, weight, bias, "gelu")
    check_against_oracle("gated", "triton", x, torch.cat([weight, weight.flip(0)]), None, "silu")


@pytest.mark.parametrize("setting, allowed", [
    ("pass", False),
    ("torch.backends.cuda.matmul.allow_tf32 = True", True),
    ("torch.set_float32_matmul_precision('high')", True),
    ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", True),
    ("torch.backends.fp32_precision = 'tf32'", True),
    ("torch.backends.fp32_precision = 'tf32'; torch.backends.cuda.matmul.fp32_precision = 'ieee'", False),
])
def test_tf32_allowed_follows_both_precision_apis(setting, allowed):
    """In a fresh process (these settings are global): the legacy and the new API, and the new API's
    inheritance from the generic setting."""
    code = f"import torch; {setting}; from tfm_kernels.triton.precision import tf32_allowed; print(tf32_allowed())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.stdout.strip() == str(allowed)


@triton.jit
def _round_to_tf32_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offsets = tl.arange(0, N)
    tl.store(out_ptr + offsets, round_to_tf32(tl.load(x_ptr + offsets)))


def nearest_tf32(x):
    """float32 x (finite) to the nearest TF32 value in float64 arithmetic, ties away from zero: the neighbours
    are x with its 13 low mantissa bits cleared and that plus one TF32 step (2^13 float32 units) in magnitude."""
    magnitude = x.abs().view(torch.int32).to(torch.int64)
    low = (magnitude & ~0x1FFF).to(torch.int32).view(torch.float32).double()
    high = ((magnitude & ~0x1FFF) + 0x2000).to(torch.int32).view(torch.float32).double()
    target = x.abs().double()
    nearest = torch.where(high - target <= target - low, high, low)
    return (nearest * torch.where(x < 0, -1.0, 1.0)).float()


def test_round_to_tf32_is_to_nearest_ties_away():
    """The rounding `precision.dot` applies to float32 operands of a TF32 dot (as torch's TF32 matmuls round),
    against float64 arithmetic; exact cases for ties, signs, infinities, NaN and overflow."""
    step, max_float = 2.0**-10, torch.finfo(torch.float32).max
    cases = torch.tensor([1 + step / 2, 1 + step / 2 - 2.0**-23, -(1 + step / 2), 1 + 1.5 * step, 0.0, -0.0,
                          float("inf"), -float("inf"), float("nan"), max_float, 1e-40], dtype=torch.float32)
    expected = torch.tensor([1 + step, 1.0, -(1 + step), 1 + 2 * step, 0.0, -0.0, float("inf"), -float("inf"),
                             float("nan"), float("inf"), nearest_tf32(torch.tensor([1e-40]))[0]])
    random = torch.randn(4096 - len(cases)) * torch.logspace(-30, 30, 4096 - len(cases))
    x = torch.cat([cases, random.float()]).to(DEVICE)
    out = torch.empty_like(x)
    _round_to_tf32_kernel[(1,)](x, out, N=x.numel())
    torch.testing.assert_close(out[:len(cases)].cpu(), expected.float(), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(out[len(cases):].cpu(), nearest_tf32(random.float()))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_backends_follow_the_new_tf32_setting(backend, tf32_by_new_api):
    """Under torch.backends.cuda.matmul.fp32_precision = "tf32", the API torch recommends (reading the legacy
    allow_tf32 flag then raises), the float32 GEMMs (cuda: plain, GELU_AUX, BGRADB, DGELU_BGRAD) run and match
    the oracle as torch's own TF32 matmul does."""
    x, weight, bias = linear_inputs((3, 77), 200, 336, torch.float32, device="cuda")
    for activation in ("gelu_tanh", "silu", None):
        check_against_oracle("linear", backend, x, weight, bias, activation)
    check_mlp_block(backend, False, "gelu_tanh", 0.0, torch.float32, "cuda", (2, 64), 128, 256)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_cuda_graph_replay(backend):
    """The kernels launch on the current stream and read the dropout seed on the device: a captured graph
    replays to the eager result."""
    x, w1, b1 = linear_inputs((512,), 256, 1024, torch.bfloat16, device="cuda")
    w2 = rand(256, 1024, dtype=torch.bfloat16, device="cuda", scale=1 / 32)
    b2 = rand(256, dtype=torch.bfloat16, device="cuda")
    require(backend, x, w1)
    expected = tfm_kernels.mlp(x, w1, b1, w2, b2, "gelu", backend=backend)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (and autotune) outside the capture
        tfm_kernels.mlp(x, w1, b1, w2, b2, "gelu", backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = tfm_kernels.mlp(x, w1, b1, w2, b2, "gelu", backend=backend)
    graph.replay()
    torch.testing.assert_close(captured, expected, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_dropout_mask_matches_cpu_scheme(backend):
    x, weight, bias = linear_inputs((300,), 64, 130, torch.float16, device="cuda")
    require(backend, x, weight)
    torch.manual_seed(5)
    seed = rng.draw_seed("cuda")
    torch.manual_seed(5)
    out = tfm_kernels.fused_linear(x, weight, bias, "relu", 0.3, backend=backend)
    keep = rng.dropout_keep_mask(seed, 1, 300, 130, 0.3, device="cuda")[0]
    reference = tfm_kernels.fused_linear(x, weight, bias, "relu", 0.0, backend="torch")
    dropped = (out == 0) & (reference != 0)
    assert not (dropped & keep).any(), "an element the shared mask keeps was dropped"
    assert not ((out != 0) & ~keep).any(), "an element the shared mask drops was kept"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_compile_fullgraph(backend):
    x, w1, b1 = linear_inputs((8, 128), 256, 1024, torch.bfloat16, device="cuda")
    w2 = rand(256, 1024, dtype=torch.bfloat16, device="cuda", scale=1 / 32)
    b2 = rand(256, dtype=torch.bfloat16, device="cuda")
    require(backend, x, w1)

    def block(*tensors):
        return tfm_kernels.mlp(*tensors, "gelu", 0.0, backend=backend)

    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(x, w1, b1, w2, b2), block(x, w1, b1, w2, b2), rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_flop_counter_counts_what_torch_counts_for_the_same_layers(backend):
    """FlopCounterMode counted 0 for the operators (no formula); now each counts its products as torch counts
    the linear layers it fuses, forward and backward, a frozen weight's product left out."""
    from torch.utils.flop_counter import FlopCounterMode

    def count(fn):
        with FlopCounterMode(display=False) as counter:
            fn().sum().backward()
        return counter.get_total_flops()

    x = torch.randn(5, 8, requires_grad=True)
    w1, b1, w2 = (torch.randn(*shape, requires_grad=True) for shape in ((12, 8), (12,), (6, 12)))
    gate_up = torch.randn(12, 8)  # frozen
    require(backend, x, w1)
    cases = {
        "fused_linear": (lambda: tfm_kernels.fused_linear(x, w1, b1, backend=backend),
                         lambda: F.gelu(F.linear(x, w1, b1))),
        "gated_linear": (lambda: tfm_kernels.gated_linear(x, gate_up, backend=backend),
                         lambda: F.silu(F.linear(x, gate_up[:6])) * F.linear(x, gate_up[6:])),
        "mlp": (lambda: tfm_kernels.mlp(x, w1, b1, w2, None, backend=backend),
                lambda: F.linear(F.gelu(F.linear(x, w1, b1)), w2)),
        "mlp, first layer frozen": (lambda: tfm_kernels.mlp(x, w1.detach(), None, w2, None, backend=backend),
                                    lambda: F.linear(F.gelu(F.linear(x, w1.detach())), w2)),
    }
    for name, (ours, theirs) in cases.items():
        assert count(ours) == count(theirs) > 0, name
