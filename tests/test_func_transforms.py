"""torch.func over the operators. Reverse mode (grad, vjp, jacrev, per-sample gradients as vmap over grad) runs
the kernels and gives what torch.autograd gives through them; forward mode (jvp, jacfwd, hessian) runs the
torch backend under "auto", and an explicit kernel backend says why it cannot."""

import pytest
import torch
from test_attention import require, sdpa
from test_attention_ops import qkv
from test_mlp import linear_inputs, rand
from test_mlp import require as require_mlp
from torch.func import grad, jacrev, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

import tfm_kernels
from tfm_kernels import backends

CPU_BACKENDS = ["cpu", "triton"]
GPU_BACKENDS = ["cuda", "triton"]


def autograd_grads(loss, inputs):
    leaves = [t.detach().requires_grad_() for t in inputs]
    return torch.autograd.grad(loss(*leaves), leaves)


def assert_all_close(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


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
    per_sample = vmap(grad(loss, argnums=(0, 1, 2)))(q, k, v)
    expected = [autograd_grads(loss, (q[b], k[b], v[b])) for b in range(q.shape[0])]
    assert_all_close(per_sample, [torch.stack(g) for g in zip(*expected)])


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
def test_attention_second_derivative_raises(backend):
    """Differentiating a transform's gradient (jacrev over grad) raises instead of treating the gradient as a
    constant: the kernels give first derivatives only."""
    q, k, v = qkv(1, 1, 1, 3, 4, 4, 4)
    require(backend, q, k, v)
    with pytest.raises(RuntimeError, match=r"the backward of tfm_kernels::\w*attention_forward cannot be "
                                           r"differentiated"):
        jacrev(grad(lambda q: sdpa(backend, q, k, v).square().sum()))(q)


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
    per_sample = vmap(grad(loss, argnums=(1, 2)), in_dims=(0, None, None))(x, weight, bias)
    expected = [autograd_grads(lambda w, b, x=x_i: loss(x, w, b), (weight, bias)) for x_i in x]
    assert_all_close(per_sample, [torch.stack(g) for g in zip(*expected)])


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
