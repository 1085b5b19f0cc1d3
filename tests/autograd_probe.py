"""Probes of autograd around an operator: an identity that drops its gradient, a record of the operators a region
dispatches (those autograd itself calls included, such as the zero-filling of a gradient it materialises), the
autograd node behind an output, the first and second derivatives of a gradient penalty, and a check that
saved-tensors hooks change nothing, and a check that an operator refuses the derivatives it does not have."""

import collections
import re

import pytest
import torch
from torch.autograd import forward_ad
from torch.utils._python_dispatch import TorchDispatchMode


class DropGradient(torch.autograd.Function):
    """x -> a copy of x, whose backward returns no gradient: the operator before it gets None."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


class DispatchedOps(TorchDispatchMode):
    """Counts, by name (e.g. "aten.zeros"), the operators dispatched while active, not those they call."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def operator_node(out):
    """The name of the autograd node that made `out`, past the views and reshapes of an operator's output."""
    node = out.grad_fn
    while type(node).__name__.startswith(("ReshapeAlias", "View", "Unsafe")):
        node = node.next_functions[0][0]
    return type(node).__name__


# Losses of an output for gradient_penalty_derivatives: the square's gradient depends on the output; the sum's is
# a constant, so that only the saved inputs tie the gradient to the graph.
LOSSES = {"square": lambda out: out.pow(2).sum() / 2, "sum": torch.sum}


def gradient_penalty_derivatives(forward, inputs, weights, loss):
    """The gradients g_i of loss(forward(*inputs)) by the inputs, recorded (create_graph), then the gradients
    by the inputs of the penalty sum_i <g_i, weights_i>: second derivatives, reaching the inputs directly and,
    when loss is not linear, through the output's gradient (zeros where the penalty does not depend on an input).
    Returns (*g, *second)."""
    first = torch.autograd.grad(loss(forward(*inputs)), inputs, create_graph=True)
    penalty = sum((g * w).sum() for g, w in zip(first, weights))
    return (*first, *torch.autograd.grad(penalty, inputs, allow_unused=True, materialize_grads=True))


def assert_unchanged_by_saved_tensors_hooks(compute):
    """compute() under identity saved-tensors hooks gives what it gives without them, bit for bit, and the
    tensors it saves go through the hooks."""
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.shape) or t, lambda t: t):
        hooked = compute()
    assert packed
    assert all(torch.equal(a, b) for a, b in zip(hooked, compute()))


def assert_refuses_derivatives_it_lacks(op, args):
    """op(*args) (an operator or its overload) with a forward-mode tangent on its first floating-point tensor
    raises instead of returning a zero tangent, under forward_ad and torch.func.jvp; a backward operator's outputs,
    differentiated in turn, raise instead of treating its inputs as constants."""
    op = getattr(op, "default", op)
    name = re.escape(op.name())
    position = next(i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point())
    primal = args[position].detach()
    tangent = torch.randn_like(primal)

    def call(t):
        return op(*args[:position], t, *args[position + 1:])

    with pytest.raises(NotImplementedError, match=f"{name} has no forward-mode derivative"):
        with forward_ad.dual_level():
            call(forward_ad.make_dual(primal, tangent))
    with pytest.raises(NotImplementedError, match=f"{name} has no forward-mode derivative"):
        torch.func.jvp(call, (primal,), (tangent,))
    if op.name().endswith("_backward"):
        inputs = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                  for a in args]
        outputs = [o for o in op(*inputs) if o.numel()]
        with pytest.raises(RuntimeError, match=f"{name} has no derivative of its own"):
            torch.autograd.grad(sum(o.sum() for o in outputs), [a for a in inputs if isinstance(a, torch.Tensor)
                                                               and a.requires_grad])
