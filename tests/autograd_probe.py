"""Probes of what autograd hands an operator's backward: an identity that drops its gradient, and a record of
the operators a region dispatches (those autograd itself calls included, such as the zero-filling of a
gradient it materialises)."""

import collections

import torch
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
