"""FLOP counts of the operators for torch.utils.flop_counter.FlopCounterMode (which counts 0 for an operator
without a formula): the matrix products' 2 x m x n x k, as torch counts its SDPA and linear layers. Attention
counts every query row against every key (causal masking included, as torch's count does); elementwise work
(softmax, activations, dropout) counts nothing. The formulas receive the ops' arguments with tensors replaced by
their shapes.

The formulas register with torch.utils.flop_counter when it is imported: importing it imports triton, which
importing the package must not do (the Triton interpreter's setup comes first, tfm_kernels/bench/interpreter.py).
"""

import importlib.abc
import importlib.util
import sys

import torch

_FLOP_COUNTER = "torch.utils.flop_counter"


def attention_forward_flops(q, k, v, *args, **kwargs) -> int:
    """q (B, Hq, L, E), v (B, Hk, S, Ev): scores q k^T and weights @ v for every query head."""
    (B, Hq, L, E), S, Ev = q, k[2], v[3]
    return 2 * B * Hq * L * S * (E + Ev)


def attention_backward_flops(grad_out, q, k, v, *args, **kwargs) -> int:
    """The scores again, dP = dO v^T, dV = P^T dO, dQ = dS k and dK = dS^T q."""
    (B, Hq, L, E), S, Ev = q, k[2], v[3]
    return 2 * B * Hq * L * S * (3 * E + 2 * Ev)


def linear_forward_flops(x, weight, *args, **kwargs) -> int:
    """x (N, K) @ weight (M, K)^T: one product, the gated op's M covering gate and up."""
    return 2 * x[0] * weight[0] * weight[1]


def linear_backward_flops(grad_out, x, weight, saved, activation, dropout_p, seed, needs_x=True, needs_weight=True,
                          needs_bias=True, **kwargs) -> int:
    """dX = dZ weight and dW = dZ^T x, each only where it is asked for."""
    return 2 * x[0] * weight[0] * weight[1] * (int(needs_x) + int(needs_weight))


def block_forward_flops(x, w1, b1, w2, *args, **kwargs) -> int:
    """x (N, K) @ w1 (F, K)^T, then hidden (N, F) @ w2 (M, F)^T."""
    return 2 * x[0] * (w1[0] * w1[1] + w2[0] * w2[1])


def block_backward_flops(grad_out, x, w1, preact, hidden, w2, activation, dropout_p, seed, needs_x=True,
                         needs_w1=True, needs_b1=True, needs_w2=True, needs_b2=True, **kwargs) -> int:
    """dW2 = dY^T hidden; dHidden = dY w2 where anything of the first layer is asked for; then dX and dW1."""
    first, second = w1[0] * w1[1], w2[0] * w2[1]
    products = second * (int(needs_w2) + int(needs_x or needs_w1 or needs_b1))
    products += first * (int(needs_x) + int(needs_w1))
    return 2 * x[0] * products


_FORMULAS = {
    "attention_forward": attention_forward_flops,
    "attention_backward": attention_backward_flops,
    "mlp_linear_forward": linear_forward_flops,
    "mlp_gated_forward": linear_forward_flops,
    "mlp_linear_backward": linear_backward_flops,
    "mlp_gated_backward": linear_backward_flops,
    "mlp_block_forward": block_forward_flops,
    "mlp_block_backward": block_backward_flops,
}


_PENDING = []  # op names whose formulas wait for torch.utils.flop_counter's import


def _register_now(name):
    from torch.utils.flop_counter import register_flop_formula

    register_flop_formula(getattr(torch.ops.tfm_kernels, name))(_FORMULAS[name.removeprefix("triton_")])


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when torch.utils.flop_counter is first imported, it has the module run as usual and
    then registers the pending formulas; then it leaves sys.meta_path."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _FLOP_COUNTER:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        run_module = spec.loader.exec_module

        def run_and_register(module):
            run_module(module)
            while _PENDING:
                _register_now(_PENDING.pop(0))

        spec.loader.exec_module = run_and_register
        return spec


def register(name):
    """Registers op tfm_kernels::`name`'s formula (its name without the triton_ prefix names it), now if
    torch.utils.flop_counter is imported, else when it is."""
    if _FLOP_COUNTER in sys.modules:
        _register_now(name)
        return
    if not _PENDING:
        sys.meta_path.insert(0, _RegisterOnImport())
    _PENDING.append(name)
