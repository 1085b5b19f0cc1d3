"""Readable eager oracles. Tests compare every kernel with these (in float64 on the CPU, or float32 upcast on a
GPU) and the "torch" backend runs them; fast paths never call them."""

import math

import torch

from .rng import dropout_keep_mask, dropout_keep_scale


def softmax_of_rows(scores):
    """softmax over the last dim, 0 in rows whose every score is -inf (torch's softmax gives NaN there, and the
    NaN would reach the gradients through its backward). torch's softmax rather than exp / sum composed: its
    first and second derivatives round less."""
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    return torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)


def attention(q, k, v, mask=None, key_lengths=None, dropout_p=0.0, is_causal=False, scale=None, seed=None,
              keep_mask=None, upcast=False, query_offset=0):
    """Attention in plain torch ops, differentiable, computed in the inputs' dtype, or with `upcast` in float32
    for float16/bfloat16 inputs (as torch's SDPA keeps its scores in float32); the output in the inputs' dtype.
    The tolerance rule's baseline is the computation without upcast (FlashAttention's tests use it so).

    q (B, Hq, L, D), k (B, Hk, S, D), v (B, Hk, S, Dv) with Hq % Hk == 0 (grouped-query attention repeats
    each key/value head over Hq // Hk query heads); mask broadcastable to (B, Hq, L, S), bool (True = takes
    part) or floating (added to the scaled scores); key_lengths (B,): keys j >= key_lengths[b] take no part;
    is_causal: key j takes part in row i only if j <= i. Dropout keeps `keep_mask` (B, Hq, L, S) if given,
    else the mask every backend draws from `seed` (tfm_kernels.rng). Rows where no key takes part give 0.
    query_offset: q holds rows query_offset .. query_offset + L - 1 of a longer problem (its causal rows and
    dropout mask rows); mask then holds the same rows.
    Returns (out (B, Hq, L, Dv), lse (B, Hq, L)); lse is log2 of the sum of exp of the row's scaled scores, as the
    operators return it, and +inf for rows where no key takes part.
    """
    B, Hq, L, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    out_dtype = q.dtype
    if upcast and out_dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    k = k.repeat_interleave(Hq // Hk, dim=1)  # (B, Hq, S, D)
    v = v.repeat_interleave(Hq // Hk, dim=1)  # (B, Hq, S, Dv)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, Hq, L, S)
    takes_part = torch.ones(L, S, dtype=torch.bool, device=q.device)
    if is_causal:
        takes_part = takes_part.tril(diagonal=query_offset)
    if key_lengths is not None:
        in_length = torch.arange(S, device=q.device) < key_lengths.view(B, 1, 1, 1).to(q.device)  # (B, 1, 1, S)
        takes_part = takes_part & in_length
    if mask is not None:
        if mask.dtype == torch.bool:
            takes_part = takes_part & mask
        else:
            scores = scores + mask.to(scores.dtype)
    scores = scores.masked_fill(~takes_part, float("-inf"))
    lse = torch.logsumexp(scores.detach(), dim=-1)  # (B, Hq, L); -inf where no key takes part
    lse = torch.where(lse == float("-inf"), float("inf"), lse / math.log(2))
    probs = softmax_of_rows(scores)
    if dropout_p > 0.0:
        if keep_mask is None:
            keep_mask = dropout_keep_mask(seed, B * Hq, L, S, dropout_p, device=q.device,
                                          first_row=query_offset).view(B, Hq, L, S)
        probs = probs * keep_mask.to(probs.dtype) * dropout_keep_scale(dropout_p)
    return (probs @ v).to(out_dtype), lse


def activation(z, name):
    """act(z) for an MLP activation name: "gelu" (erf), "gelu_tanh", "relu", "silu" or None (identity)."""
    if name is None:
        return z
    if name == "gelu":
        return torch.nn.functional.gelu(z)
    if name == "gelu_tanh":
        return torch.nn.functional.gelu(z, approximate="tanh")
    if name == "relu":
        return torch.relu(z)
    if name == "silu":
        return torch.nn.functional.silu(z)
    raise ValueError(f"activation must be one of 'gelu', 'gelu_tanh', 'relu', 'silu', None; got {name!r}")


def _mlp_dropout(h, dropout_p, seed, keep_mask):
    """Dropout of an (M, N) activation with the shared counter-based mask (z = 0, row = token,
    col = feature)."""
    if dropout_p == 0.0:
        return h
    if keep_mask is None:
        rows, cols = h.shape
        keep_mask = dropout_keep_mask(seed, 1, rows, cols, dropout_p, device=h.device)[0]  # (M, N)
    return h * keep_mask.to(h.dtype) * dropout_keep_scale(dropout_p)


def linear(x, weight, bias=None, activation_name=None, dropout_p=0.0, seed=None, keep_mask=None):
    """dropout(act(x @ weight^T + bias)) in plain torch ops, differentiable, in the inputs' dtype.

    x (M, K), weight (N, K), bias (N,) or None; the dropout keep-mask is `keep_mask` (M, N) if given, else the
    mask every backend draws from `seed`. Returns (M, N)."""
    z = torch.nn.functional.linear(x, weight, bias)
    return _mlp_dropout(activation(z, activation_name), dropout_p, seed, keep_mask)


def gated_linear(x, weight, bias=None, activation_name="silu", dropout_p=0.0, seed=None, keep_mask=None):
    """dropout(act(x Wg^T + bg) * (x Wu^T + bu)) with weight (2F, K) = [Wg; Wu] and bias (2F,) = [bg; bu]
    or None. x (M, K). Returns (M, F)."""
    gate, up = torch.nn.functional.linear(x, weight, bias).chunk(2, dim=-1)  # (M, F) each
    return _mlp_dropout(activation(gate, activation_name) * up, dropout_p, seed, keep_mask)
