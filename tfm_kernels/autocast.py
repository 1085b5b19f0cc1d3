"""Autocast for the public functions, as torch has it for scaled_dot_product_attention and linear: where autocast
is on for the inputs' device type, their floating-point tensors (float64 excepted) are cast to the autocast
dtype, and the kernels then run with autocast off, since they choose their own accumulation types. The
operators themselves have no autocast rule; the modules get autocast through these functions."""

import contextlib

import torch

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
