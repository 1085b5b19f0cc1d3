"""torch.func over the operators. Reverse mode (grad, vjp, jacrev, per-sample gradients as vmap over grad) runs
the kernels and gives what torch.autograd gives through them; vmap folds the vmapped dim into one kernel call
where that gives the per-element results (tfm_kernels/batching.py); forward mode (jvp, jacfwd, hessian) runs the
torch backend under "auto", and an explicit kernel backend says why it cannot."""

import functools

import pytest
import torch
from autograd_probe import DispatchedOps
from test_attention import require, sdpa
from test_attention_ops import qkv
from test_mlp import linear_inputs, rand
from test_mlp import require as require_mlp
from tolerance import assert_within_tolerance
from torch.func import grad, jacrev, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

import tfm_kernels
from tfm_kernels import backends, batching, ops
from tfm_kernels.tolerance import RELATIVE_NOISE, max_error

CPU_BACKENDS = ["cpu", "triton"]
GPU_BACKENDS = ["cuda", "triton"]


def autograd_grads(loss, inputs):
    leaves = [t.detach().requires_grad_() for t in inputs]
    return torch.autograd.grad(loss(*leaves), leaves)


def assert_all_close(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def kernel_calls(fn, *args):
    """fn(*args), and how many times it ran each tfm_kernels operator, by name without the namespace."""
    with DispatchedOps() as dispatched:
        result = fn(*args)
    prefix = "tfm_kernels."
    return result, {name[len(prefix):]: n for name, n in dispatched.counts.items() if name.startswith(prefix)}


def per_element(fn, in_dims, *args):
    """What vmap(fn, in_dims)(*args) should give: fn once per element, stacked."""
    size = next(a.shape[d] for a, d in zip(args, in_dims) if d is not None)
    calls = [fn(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims))) for i in range(size)]
    return torch.stack(calls)


def attention_loss(backend):
    def loss(q, k, v):  # (..., Hq, L, E), (..., Hk, S, E), (..., Hk, S, Ev)
        return sdpa(backend, q, k, v, is_causal=True, enable_gqa=True).square().sum()

    return loss


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_attention_grad_and_vjp_equal_autograd(backend):
    q, k, v = qkv(2, 4, 2, 5, 7, 8, 6)
    require(backend, q, k, v)
    loss = attention_loss(backend)
    expected = autograd_grads(loss, (q, k, v))
    assert_all_close(grad(loss, argnums=(0, 1, 2))(q, k, v), expected)
    out, pullback = vjp(lambda q, k, v: loss(q, k, v), q, k, v)
    assert_all_close(pullback(torch.ones_like(out)), expected)


def check_attention_per_sample_gradients(backend, q, k, v):
    """vmap over grad: each batch element's gradients, as a loop of autograd calls over the elements gives."""
    require(backend, q, k, v)
    loss = attention_loss(backend)
    per_sample, calls = kernel_calls(vmap(grad(loss, argnums=(0, 1, 2))), q, k, v)
    expected = [autograd_grads(loss, (q[b], k[b], v[b])) for b in range(q.shape[0])]
    assert_all_close(per_sample, [torch.stack(g) for g in zip(*expected)])
    assert sorted(calls.values()) == [1, 1], calls  # the forward and the backward, each once for all elements


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_attention_per_sample_gradients(backend):
    check_attention_per_sample_gradients(backend, *qkv(3, 4, 2, 5, 7, 8, 6))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_attention_per_sample_gradients(backend):
    check_attention_per_sample_gradients(backend, *qkv(3, 4, 2, 130, 70, 64, 64, torch.bfloat16, "cuda"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_attention_jacrev_equals_autograd_rows(backend):
    q, k, v = qkv(1, 1, 1, 3, 4, 4, 2)
    require(backend, q, k, v)
    jacobian = jacrev(lambda q: sdpa(backend, q, k, v))(q)  # (1, 1, 3, 2, 1, 1, 3, 4)
    leaf = q.clone().requires_grad_()
    out = sdpa(backend, leaf, k, v)
    rows = [torch.autograd.grad(out.flatten()[i], leaf, retain_graph=True)[0] for i in range(out.numel())]
    torch.testing.assert_close(jacobian.reshape(out.numel(), -1), torch.stack(rows).reshape(out.numel(), -1))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_second_derivatives_under_transforms(backend):
    """jacrev over grad (a Hessian), vmap over grad over grad (per-sample gradients of a gradient penalty) and a
    third derivative, through attention and a fused linear against the float64 oracle (tolerance rule):
    differentiating the kernels' gradients recomputes the reference's backward."""
    q, k, v = qkv(3, 1, 1, 3, 4, 4, 4)
    x, weight, bias = linear_inputs((3, 2), 4, 5, torch.float32)
    require(backend, q, k, v)
    require_mlp(backend, x, weight)

    def transforms(run_backend, dtype):
        q_, k_, v_, x_, w_, b_ = (t.to(dtype) for t in (q, k, v, x, weight, bias))

        def attention_loss(q):  # q (Hq, L, E): one sample
            return sdpa(run_backend, q, k_[0], v_[0], is_causal=True).square().sum()

        def linear_loss(x):  # x (2, 4): one sample
            return tfm_kernels.fused_linear(x, w_, b_, "gelu", backend=run_backend).square().sum()

        def penalty(loss):
            return lambda t: grad(loss)(t).square().sum()

        def third(loss):
            return grad(lambda t: grad(penalty(loss))(t).sum())

        return (jacrev(grad(attention_loss))(q_[0]), vmap(grad(penalty(attention_loss)))(q_),
                third(attention_loss)(q_[0]), jacrev(grad(linear_loss))(x_[0]), vmap(grad(penalty(linear_loss)))(x_),
                third(linear_loss)(x_[0]))

    names = ("attention hessian", "attention per-sample penalty gradient", "attention third derivative",
             "linear hessian", "linear per-sample penalty gradient", "linear third derivative")
    results = zip(transforms(backend, torch.float32), transforms("torch", torch.float32),
                  transforms("torch", torch.float64))
    for name, (result, base, ref) in zip(names, results):
        assert_within_tolerance(f"{backend} {name}", result, base, ref)


def test_attention_forward_mode_runs_torch_backend():
    """jvp under "auto" runs the torch backend, whose tangent matches torch's math SDPA; inside a dual level an
    explicit kernel backend raises with the reason instead of returning a zero tangent."""
    q, k, v = qkv(2, 2, 2, 5, 7, 8, 8)
    tangent = torch.randn_like(q)

    def chosen(q):
        assert backends.choose(q, k, v) == "torch"
        return sdpa("auto", q, k, v, is_causal=True)

    out, out_tangent = jvp(chosen, (q,), (tangent,))
    with sdpa_kernel(SDPBackend.MATH):
        expected = jvp(lambda q: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), (q,),
                       (tangent,))
    torch.testing.assert_close((out, out_tangent), expected)
    for backend in CPU_BACKENDS:
        require(backend, q, k, v)
        with pytest.raises(NotImplementedError, match=r"forward-mode AD is on .* only the torch backend"):
            jvp(lambda q, backend=backend: sdpa(backend, q, k, v), (q,), (tangent,))
    assert backends.choose(q, k, v) != "torch"  # outside the dual level the kernels run again


MLP_CALLS = {
    "linear": lambda x, w, b, backend: tfm_kernels.fused_linear(x, w, b, "gelu", backend=backend),
    "gated": lambda x, w, b, backend: tfm_kernels.gated_linear(x, w, "silu", bias=b, backend=backend),
    "block": lambda x, w, b, backend: tfm_kernels.mlp(x, w, b, w[:, :8].t().contiguous() * 0.5, None,
                                                      backend=backend),
}


def check_mlp_grad_and_per_sample_gradients(backend, kind, x, weight, bias):
    """grad over (x, weight, bias) equals autograd; vmap over grad gives each example's parameter gradients
    (the per-sample gradients of differentially private training), as a loop of autograd calls does."""
    require_mlp(backend, x, weight)

    def loss(x, weight, bias):
        return MLP_CALLS[kind](x, weight, bias, backend).square().sum()

    assert_all_close(grad(loss, argnums=(0, 1, 2))(x, weight, bias), autograd_grads(loss, (x, weight, bias)))
    per_sample, calls = kernel_calls(vmap(grad(loss, argnums=(1, 2)), in_dims=(0, None, None)), x, weight, bias)
    expected = [autograd_grads(lambda w, b, x=x_i: loss(x, w, b), (weight, bias)) for x_i in x]
    assert_all_close(per_sample, [torch.stack(g) for g in zip(*expected)])
    # The forwards fold the examples into their rows; each example needs its own weight gradient, so the backwards
    # run once per example (the triton block is two linear operators).
    forwards = [n for name, n in calls.items() if name.endswith("_forward")]
    backwards = [n for name, n in calls.items() if name.endswith("_backward")]
    assert len(forwards) == len(backwards) == 1, calls
    assert backwards[0] == forwards[0] * x.shape[0], calls


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", list(MLP_CALLS))
def test_mlp_grad_and_per_sample_gradients(backend, kind):
    check_mlp_grad_and_per_sample_gradients(backend, kind, *linear_inputs((3, 4), 8, 12, torch.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("kind", list(MLP_CALLS))
def test_gpu_mlp_grad_and_per_sample_gradients(backend, kind):
    check_mlp_grad_and_per_sample_gradients(backend, kind,
                                            *linear_inputs((3, 40), 64, 96, torch.bfloat16, "cuda"))


def test_mlp_hessian_runs_torch_backend():
    x, weight, bias = linear_inputs((3,), 8, 6, torch.float32)
    hessian = torch.func.hessian(lambda x: tfm_kernels.fused_linear(x, weight, bias, "gelu").sum())(x)
    expected = torch.func.hessian(lambda x: torch.nn.functional.gelu(x @ weight.t() + bias).sum())(x)
    torch.testing.assert_close(hessian, expected)
    for backend in CPU_BACKENDS:
        require_mlp(backend, x, weight)
        with pytest.raises(NotImplementedError, match=r"forward-mode AD is on"):
            jvp(lambda x, backend=backend: tfm_kernels.fused_linear(x, weight, bias, backend=backend), (x,),
                (rand(3, 8),))


# ---------------------------------------------------------------------------------------------------------
# vmap (tfm_kernels/batching.py)

def attention_vmap_cases():
    """name -> (fn, in_dims, args): n = 3 elements of (B, H, L, S) = (2, 4, 5, 7), 2 key/value heads."""
    q, k, v = (t.unflatten(0, (3, 2)) for t in qkv(6, 4, 2, 5, 7, 8, 6))  # (3, 2, H, N, D)
    shared_mask = torch.rand(5, 7) > 0.3  # (L, S): one for every element
    own_masks = torch.rand(3, 2, 1, 5, 7) > 0.3  # (n, B, 1, L, S): per element, broadcast over the heads
    additive = torch.randn(3, 1, 4, 1, 7)  # (n, 1, H, 1, S)
    lengths = torch.tensor([7, 3])

    def attend(**kwargs):
        return lambda q, k, v, mask=None, *, backend: sdpa(backend, q, k, v, attn_mask=mask, enable_gqa=True, **kwargs)

    return {
        "causal": (attend(is_causal=True), (0, 0, 0), (q, k, v)),
        "shared keys and values": (attend(), (0, None, None), (q, k[0], v[0])),
        "shared query of batch 1": (attend(), (None, 0, 0), (q[0, :1], k[:, :1], v[:, :1])),  # a zero batch stride
        "vmapped along dim 1": (attend(), (1, 1, 1), tuple(t.transpose(0, 1) for t in (q, k, v))),
        "shared mask": (attend(), (0, 0, 0, None), (q, k, v, shared_mask)),
        "mask per element": (attend(), (0, 0, 0, 0), (q, k, v, own_masks)),
        "additive mask per element": (attend(), (0, 0, 0, 0), (q, k, v, additive)),
        "key lengths": (attend(key_lengths=lengths), (0, 0, 0), (q, k, v)),
    }


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(attention_vmap_cases()))
def test_attention_vmap_is_one_kernel_call(backend, case):
    """vmap folds its dim into the kernels' batch: one call, and what a call per element gives, shared operands
    repeated for the folded batch."""
    fn, in_dims, args = attention_vmap_cases()[case]
    require(backend, *args[:3])
    attention = functools.partial(fn, backend=backend)
    out, calls = kernel_calls(vmap(attention, in_dims), *args)
    torch.testing.assert_close(out, per_element(attention, in_dims, *args))
    assert list(calls.values()) == [1], calls


def test_folding_copies_no_broadcast_dim():
    """The folded (n * B, ...) operand keeps a broadcast (zero-stride) dim broadcast; a shared operand with
    batch 1 is not copied at all."""
    own = (torch.rand(3, 2, 1, 5, 7) > 0.5).expand(3, 2, 4, 5, 7)  # (n, B, H, L, S), heads broadcast
    folded = batching._fold(own, 0, 3)
    assert folded.shape == (6, 4, 5, 7) and folded.stride()[1] == 0
    assert torch.equal(folded, own.reshape(6, 4, 5, 7))
    shared = batching._fold(own[0], None, 3)  # one (B, H, L, S) for all 3 elements
    assert shared.stride()[1] == 0 and torch.equal(shared, own[0].repeat(3, 1, 1, 1))
    single = own[0, :1]  # (1, H, L, S)
    assert batching._fold(single, None, 3).data_ptr() == single.data_ptr()


def test_attention_vmap_chunks_a_folded_batch_past_the_cuda_grid_limit():
    """The C++ operator folds at most the CUDA kernels' grid limit of batch entries into one call, on every device
    it serves: 40000 elements of batch 2 (one key each, so out = v) run as two calls."""
    n = 40000
    q, k, v = torch.randn(n, 2, 1, 1, 4), torch.randn(n, 2, 1, 1, 4), torch.randn(n, 2, 1, 1, 4)
    require("cpu", q[0], k[0], v[0])
    out, calls = kernel_calls(vmap(lambda q, k, v: sdpa("cpu", q, k, v)), q, k, v)
    assert 2 * n > ops.CUDA_MAX_GRID_YZ and calls == {"attention_forward": 2}
    torch.testing.assert_close(out, v)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_attention_gradient_of_vmap(backend):
    """grad over vmap, the transforms the other way round: one forward and one backward call."""
    q, k, v = (t.unflatten(0, (3, 1)) for t in qkv(3, 2, 2, 5, 7, 8, 8))
    require(backend, q, k, v)

    def loss(q):
        return vmap(lambda q, k, v: sdpa(backend, q, k, v, is_causal=True))(q, k, v).square().sum()

    gradient, calls = kernel_calls(grad(loss), q)
    torch.testing.assert_close(gradient, autograd_grads(loss, (q,))[0])
    assert sorted(calls.values()) == [1, 1], calls


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autograd_over_vmap(backend):
    """torch.autograd through a vmapped call (vmap alone runs the operators and their registered autograd) gives
    the per-element loop's gradients, and the folded outputs take in-place updates (a residual added) as the
    per-element ones do."""
    q, k, v = (t.unflatten(0, (3, 1)) for t in qkv(3, 2, 2, 5, 7, 8, 8))
    x, weight, bias = linear_inputs((3, 4), 8, 6, torch.float32)
    require(backend, q, k, v)
    residual = torch.randn(3, 4, 6)

    def attention(q, k, v):
        return sdpa(backend, q, k, v, is_causal=True)

    def linear(x, weight, bias, residual):
        out = tfm_kernels.fused_linear(x, weight, bias, "gelu", backend=backend)
        out += residual
        return out

    cases = ((attention, (q, k, v), (0, 0, 0)), (linear, (x, weight, bias, residual), (0, None, None, 0)))
    for fn, inputs, in_dims in cases:
        leaves = [t.detach().requires_grad_() for t in inputs]
        mapped = torch.autograd.grad(vmap(fn, in_dims)(*leaves).square().sum(), leaves)
        looped = torch.autograd.grad(per_element(fn, in_dims, *leaves).square().sum(), leaves)
        assert_all_close(mapped, looped)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_encoder_layer_vmap_with_merged_masks(backend):
    """A Transformer layer under vmap, given a shared float causal mask and a vmapped bool padding mask (merged
    into one float mask): the per-element loop's output."""
    layer = tfm_kernels.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, backend=backend)
    x = torch.randn(3, 2, 4, 8)  # 3 elements of (N, S, E)
    require(backend, x, x, x)
    padding = torch.rand(3, 2, 4) > 0.6
    padding[..., 0] = False  # every row keeps a key
    causal = torch.nn.Transformer.generate_square_subsequent_mask(4)

    def encode(x, padding):
        return layer(x, src_mask=causal, src_key_padding_mask=padding)

    torch.testing.assert_close(vmap(encode)(x, padding), per_element(encode, (0, 0), x, padding))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_attention_vmap_dropout_runs_per_element(backend):
    """A dropout mask depends on the batch index, so vmap with dropout runs a call per element. Under
    randomness="same" each element draws the mask a plain call draws after the same torch.manual_seed; under
    "different" equal elements get different masks."""
    q, k, v = (t.expand(3, *t.shape) for t in qkv(1, 2, 2, 5, 7, 8, 8))  # three equal elements

    def attention(q, k, v):
        return sdpa(backend, q, k, v, dropout_p=0.5)

    require(backend, q[0], k[0], v[0])
    torch.manual_seed(0)
    same, calls = kernel_calls(vmap(attention, randomness="same"), q, k, v)
    assert list(calls.values()) == [3], calls
    torch.manual_seed(0)
    plain = attention(q[0], k[0], v[0])
    for element in same:
        torch.testing.assert_close(element, plain)
    different = vmap(attention, randomness="different")(q, k, v)
    assert not torch.equal(different[0], different[1]) and not torch.equal(different[1], different[2])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", list(MLP_CALLS))
def test_mlp_vmap_folds_the_rows(backend, kind):
    """Shared weights: the examples fold into the rows, one forward call. Weights vmapped too (an ensemble):
    a call per element."""
    x, weight, bias = linear_inputs((3, 2, 5), 8, 12, torch.float32)
    require_mlp(backend, x, weight)
    mlp = functools.partial(MLP_CALLS[kind], backend=backend)
    out, calls = kernel_calls(vmap(mlp, in_dims=(0, None, None)), x, weight, bias)
    torch.testing.assert_close(out, per_element(mlp, (0, None, None), x, weight, bias))
    assert set(calls.values()) == {1 if backend == "cpu" or kind != "block" else 2}, calls
    weights, biases = weight.expand(3, *weight.shape) * torch.rand(3, 1, 1), bias.expand(3, *bias.shape)
    out, calls = kernel_calls(vmap(mlp), x, weights, biases)
    torch.testing.assert_close(out, per_element(mlp, (0, 0, 0), x, weights, biases))
    assert set(calls.values()) == {3 if backend == "cpu" or kind != "block" else 6}, calls


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_compiled_vmap_keeps_the_vmapped_size_symbolic(kind):
    """torch.compile(dynamic=True) of a vmapped MLP or attention call: new vmap sizes reuse the graph (the vmap
    rule makes one call, with no Python loop over the size: attention's chunking past the CUDA grid limit only
    runs on concrete sizes), as for torch's linear. Before torch 2.14 dynamo runs the operators under a transform
    eagerly (ops._COMPILED_TRANSFORMS_CALL_THE_OP: a graph break), so there only the results are compared."""
    if kind == "mlp":
        weight = rand(6, 8)
        vmapped = vmap(lambda x: tfm_kernels.fused_linear(x, weight, None, backend="cpu"))
    else:
        vmapped = vmap(lambda x: sdpa("cpu", x, x, x, is_causal=True))
    traced = ops._COMPILED_TRANSFORMS_CALL_THE_OP
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # counts of earlier tests' compilations
    compiled = torch.compile(vmapped, dynamic=True, backend="aot_eager", fullgraph=traced)
    for n in (3, 4, 6, 9):
        x = rand(n, 2, 5, 8)
        torch.testing.assert_close(compiled(x), vmapped(x))
    if traced:
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2  # torch's linear: 2 (size 3, then any)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_vmap_over_zero_elements(backend):
    """vmap over a dim of size 0 gives empty outputs and gradients of the shapes torch ops give (torch's SDPA
    refuses it)."""
    q = torch.randn(0, 1, 2, 5, 8)
    x, weight, _ = linear_inputs((0, 4), 8, 6, torch.float32)
    require(backend, q, q, q)
    cases = [(lambda q: sdpa(backend, q, q, q), lambda q: torch.softmax(q @ q.transpose(-2, -1), dim=-1) @ q, q),
             (lambda x: tfm_kernels.fused_linear(x, weight, None, None, backend=backend), lambda x: x @ weight.t(), x)]
    for ours, torchs, inputs in cases:
        for transform in (vmap, lambda fn: vmap(grad(lambda t: fn(t).sum()))):
            got, expected = transform(ours)(inputs), transform(torchs)(inputs)
            assert got.shape == expected.shape and got.dtype == expected.dtype


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mlp_vmap_dropout_runs_per_element(backend):
    """A dropout mask depends on the row, so vmap with dropout runs a call per element: under randomness="same"
    each element draws the mask a plain call draws after the same torch.manual_seed; under "different" equal
    elements get different masks."""
    x, weight, bias = linear_inputs((2, 5), 8, 12, torch.float32)
    require_mlp(backend, x, weight)
    x = x.expand(3, *x.shape)  # three equal elements

    def linear(x):
        return tfm_kernels.fused_linear(x, weight, bias, "gelu", dropout_p=0.5, backend=backend)

    torch.manual_seed(0)
    same, calls = kernel_calls(vmap(linear, randomness="same"), x)
    assert list(calls.values()) == [3], calls
    torch.manual_seed(0)
    plain = linear(x[0])
    for element in same:
        torch.testing.assert_close(element, plain)
    different = vmap(linear, randomness="different")(x)
    assert not torch.equal(different[0], different[1])


TRANSFORMS = {
    "vmap": vmap,
    "grad": lambda fn: grad(lambda t: fn(t).square().sum()),
    "vmap over grad": lambda fn: vmap(grad(lambda t: fn(t).square().sum())),
    "grad over grad": lambda fn: grad(lambda t: grad(lambda t: fn(t).sin().sum())(t).square().sum()),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_compiled_transforms_equal_eager(backend, transform):
    """torch.compile over vmap (dynamo traces the transform; the operators' vmap rules serve it), grad,
    per-sample gradients and second derivatives gives what eager gives, for attention and fused_linear: on torch
    2.14 in one graph (the operators' Autograd kernel records the call under the transform), the second
    derivatives as accurate as eager's against float64 torch (compiled, their elementwise work is fused and
    reordered: 1.5e-05 apart from eager at a magnitude of 16, both about 4e-05 from float64). Before torch 2.14
    the operators break the graph under a transform and dynamo runs it eagerly (tfm_kernels/ops.py): traced
    there, an outer grad would take the inner gradients as constants (zeros), which this test catches on torch
    2.11."""
    q = torch.randn(3, 1, 2, 5, 8)
    x, weight, bias = linear_inputs((3, 4), 8, 6, torch.float32)
    require(backend, q, q, q)

    def attention(q):
        return sdpa(backend, q, q * 2, q, is_causal=True)

    def attention_oracle(q):
        return torch.nn.functional.scaled_dot_product_attention(q, q * 2, q, is_causal=True)

    def linear(x):
        return tfm_kernels.fused_linear(x, weight, bias, "gelu", backend=backend)

    def linear_oracle(x):
        return torch.nn.functional.gelu(torch.nn.functional.linear(x, weight.double(), bias.double()))

    for fn, oracle_fn, inputs in ((attention, attention_oracle, q), (linear, linear_oracle, x)):
        transformed = TRANSFORMS[transform](fn)
        torch._dynamo.reset()
        compiled = torch.compile(transformed, fullgraph=ops._COMPILED_TRANSFORMS_CALL_THE_OP)(inputs)
        eager = transformed(inputs)
        if transform != "grad over grad":
            torch.testing.assert_close(compiled, eager)
            continue
        oracle = TRANSFORMS[transform](oracle_fn)(inputs.double())
        assert compiled.shape == eager.shape == oracle.shape and compiled.dtype == eager.dtype
        noise = RELATIVE_NOISE * max(1.0, oracle.abs().max().item())
        assert max_error(compiled, oracle) <= 2 * max_error(eager, oracle) + noise, (
            max_error(compiled, oracle), max_error(eager, oracle))


class _Attention(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.backend = backend

    def forward(self, q, k, v):
        return sdpa(self.backend, q, k, v, is_causal=True, enable_gqa=True)


@pytest.mark.parametrize("record", ["export", "trace"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_transforms_over_a_recorded_program_equal_autograd(backend, record):
    """A program recorded by torch.export or torch.jit.trace calls the operators themselves, which reached
    torch's registered autograd under grad and functorch refused it ("must override the setup_context"); the
    operators' Autograd kernel now records such a call itself. grad, vjp, jacrev, grad over grad and per-sample
    gradients through the program give what autograd gives through it."""
    q, k, v = qkv(2, 4, 2, 5, 7, 8, 6)
    require(backend, q, k, v)

    def recorded(*inputs):  # the batch is specialised to the inputs'
        if record == "export":
            return torch.export.export(_Attention(backend), inputs).module()
        return torch.jit.trace(_Attention(backend), inputs, check_trace=False)

    program = recorded(q, k, v)

    def loss(q, k, v):
        return program(q, k, v).square().sum()

    expected = autograd_grads(loss, (q, k, v))
    assert_all_close(grad(loss, argnums=(0, 1, 2))(q, k, v), expected)
    _, pullback = vjp(lambda q, k, v: program(q, k, v), q, k, v)
    assert_all_close(pullback(2 * program(q, k, v)), expected)
    assert_all_close([jacrev(loss)(q, k, v)], expected[:1])
    leaf = q.detach().requires_grad_()
    first = torch.autograd.grad(loss(leaf, k, v), leaf, create_graph=True)[0]
    assert_all_close([grad(lambda q: grad(loss)(q, k, v).sin().sum())(q)],
                     torch.autograd.grad(first.sin().sum(), leaf))
    one = recorded(q[:1], k[:1], v[:1])

    def element_loss(q, k, v):  # one batch element, (Hq, L, E), (Hk, S, E), (Hk, S, Ev)
        return one(q[None], k[None], v[None]).square().sum()

    per_sample = vmap(grad(element_loss))(q, k, v)
    expected = [autograd_grads(element_loss, (q[i], k[i], v[i]))[0] for i in range(q.shape[0])]
    assert_all_close([per_sample], [torch.stack(expected)])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_per_sample_gradients_of_an_exported_mlp_equal_autograd(backend):
    x, weight, bias = linear_inputs((4,), 8, 10, torch.float32)
    require_mlp(backend, x, weight)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.bias = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(bias.clone())

        def forward(self, x):
            return tfm_kernels.fused_linear(x, self.weight, self.bias, activation="gelu", backend=backend)

    program = torch.export.export(Layer(), (x[:1],)).module()
    params = dict(program.named_parameters())

    def loss(params, x):  # x (8,)
        return torch.func.functional_call(program, params, (x[None],)).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
        expected = torch.autograd.grad(loss(leaves, x[i]), list(leaves.values()))
        assert_all_close([per_sample[n][i] for n in leaves], expected)
