"""Autocast for the public functions, as torch has it for scaled_dot_product_attention and linear: where autocast
is on for the inputs' device type, their floating-point tensors (float64 excepted) are cast to the autocast
dtype, and the kernels then run with autocast off, since they choose their own accumulation types. The modules
get autocast through these functions. The forward operators have the same rule as their Autocast kernels, so
that a program recording them (torch.export, torch.jit.trace) and run under autocast casts as torch's own
operators in it do; the backward operators, like torch's, have none."""

import contextlib

import torch

from . import ops
from .backends import AUTO_ORDER

# The device types the package's kernels run on (those with a backend order of their own). On any other, the
# functions run torch's own operators, which follow autocast themselves. (A fixed set rather than
# torch.amp.is_autocast_available, which torch 2.11's torch.compile cannot trace.)
KERNEL_DEVICE_TYPES = tuple(AUTO_ORDER)


def _autocast_device_type(t):
    """The device type of tensor t where the package's kernels may run on it, else None (not a tensor, meta,
    ...)."""
    if not isinstance(t, torch.Tensor) or t.device.type not in KERNEL_DEVICE_TYPES:
        return None
    return t.device.type


def autocast_inputs(*tensors):
    """`tensors`, each floating-point one (float64 excepted) in the autocast dtype where autocast is on for the
    first one's device type; None, integer and bool tensors as given."""
    device_type = _autocast_device_type(tensors[0])
    if device_type is None or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


def autocast_off(t):
    """A context that turns autocast off for tensor t's device type where it is on (else it does nothing)."""
    device_type = _autocast_device_type(t)
    if device_type is not None and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


# The operators autocast applies to: the forward ops of every backend (tfm_kernels/ops.py).
FORWARD_OPERATORS = ("attention_forward", "triton_attention_forward", "mlp_linear_forward", "mlp_gated_forward",
                     "mlp_block_forward", "triton_mlp_linear_forward", "triton_mlp_gated_forward")


def _operator_autocast(op, device_type):
    """op's kernel for the Autocast key of `device_type`: autocast_inputs, then op with autocast off."""

    def kernel(*args):
        args = autocast_inputs(*args)
        with torch.autocast(device_type, enabled=False):
            return op(*args)

    return kernel


_AUTOCAST_LIBRARY = torch.library.Library("tfm_kernels", "IMPL")
for _name in FORWARD_OPERATORS:
    if ops._C is not None or _name.startswith("triton_"):
        for _device_type in KERNEL_DEVICE_TYPES:
            _AUTOCAST_LIBRARY.impl(_name, _operator_autocast(getattr(torch.ops.tfm_kernels, _name), _device_type),
                                   f"Autocast{_device_type.upper()}")
