"""Memory-layout helpers shared by the operators' Python entry points and the Triton launchers."""

import torch


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its last dim has stride 1 (the only layout the kernels require); a view with that stride
    1 when the last dim has size 1 (whose stride is never used, and which contiguous() leaves as it is, e.g. the
    transpose of a (1, n) matrix); else a copy."""
    if t.stride(-1) == 1:
        return t
    if t.shape[-1] == 1:
        return t.squeeze(-1).unsqueeze(-1)
    return t.contiguous()


def empty_heads_inner(like: torch.Tensor, B: int, H: int, N: int, D: int, dtype=None) -> torch.Tensor:
    """An uninitialised (B, H, N, D) tensor stored (B, N, H, D), the layout of the attention operators' outputs.
    Allocated with those strides rather than as a transposed view: an operator output that is a view cannot be
    modified in place (out += residual) under autograd."""
    return like.new_empty_strided((B, H, N, D), (N * H * D, D, H * D, 1), dtype=dtype or like.dtype)
