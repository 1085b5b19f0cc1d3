"""scaled_dot_product_attention: validation, normalisation to (B, H, L, D), and dispatch to a backend."""

import math

import torch
import torch.nn.functional as F

from . import backends, ops, reference
from .autocast import autocast_inputs, autocast_off
from .layout import last_dim_contiguous
from .op_checks import as_float, check_flags, check_input_tensor
from .rng import seed_for


def _forward_op(backend):
    """The differentiable forward operator of a kernel backend (tfm_kernels.ops)."""
    if backend == "triton":
        return ops.DIFFERENTIABLE_FORWARD["triton_attention_forward"]
    return ops.DIFFERENTIABLE_FORWARD["attention_forward"]  # C++: dispatches to the CPU or CUDA kernel by device


def _check_inputs(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, key_lengths):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if isinstance(t, torch.Tensor) and t.is_nested:
            raise TypeError(f"{name} must be a dense tensor; got a nested tensor (pad it, and pass key_lengths or "
                            f"attn_mask for the padding)")
        check_input_tensor(name, t)
        if t.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dimensions (..., seq, head_dim); got shape {tuple(t.shape)}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key and value must share a dtype; got {query.dtype}, {key.dtype}, {value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(f"query, key and value must be on one device; got {query.device}, {key.device}, "
                         f"{value.device}")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"key and value must have the same sequence length; got key {tuple(key.shape)} and value "
                         f"{tuple(value.shape)}")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query and key must have the same head dim; got {query.shape[-1]} and {key.shape[-1]}")
    if attn_mask is not None:
        if is_causal:
            raise ValueError("is_causal=True cannot be combined with attn_mask; pass one or the other")
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None; got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and attn_mask.dtype not in (query.dtype, torch.float32):
            raise TypeError(f"attn_mask must be bool, float32 or the query dtype {query.dtype}; got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask must be on {query.device}; got {attn_mask.device}")
    check_flags(is_causal=is_causal, enable_gqa=enable_gqa)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1); got {dropout_p!r}")
    if key_lengths is not None:
        if not isinstance(key_lengths, torch.Tensor) or key_lengths.dtype not in (torch.int32, torch.int64):
            given = getattr(key_lengths, "dtype", type(key_lengths).__name__)
            raise TypeError(f"key_lengths must be an int32 or int64 tensor; got {given}")
        if key_lengths.device != query.device:
            raise ValueError(f"key_lengths must be on {query.device}; got {key_lengths.device}")


def _broadcast_shapes(what, *shapes):
    try:
        return torch.broadcast_shapes(*shapes)
    except RuntimeError:
        raise ValueError(f"the {what} dims of query, key and value must broadcast; got "
                         f"{', '.join(str(tuple(s)) for s in shapes)}") from None


def _broadcast(query, key, value, enable_gqa):
    """query, key and value with their leading dims broadcast as torch's SDPA broadcasts them (a matmul's
    batch dims, aligned from the right), through zero strides: (*batch, Hq, L, E), (*batch, Hk, S, E),
    (*batch, Hk, S, Ev) with Hk dividing Hq. With enable_gqa each of key's and value's head counts must divide
    the query's; otherwise the heads broadcast like the batch. The kernels' grouped heads (Hk < Hq) serve both:
    key and value keep their heads when they have as many (1 where they broadcast, a divisor with enable_gqa),
    and take the query's where they differ."""
    if query.shape[:-2] == key.shape[:-2] == value.shape[:-2]:
        return query, key, value
    rank = max(query.dim(), key.dim(), value.dim())  # at least 3: 2-D inputs alone take the early return
    query, key, value = (t.reshape((1,) * (rank - t.dim()) + t.shape) for t in (query, key, value))
    hq, hk, hv = (t.shape[-3] for t in (query, key, value))
    if enable_gqa:
        if not (hk > 0 and hq % hk == 0 and hv > 0 and hq % hv == 0):
            raise ValueError(f"with enable_gqa=True the key and value heads must each divide the query heads; got "
                             f"{hq}, {hk} and {hv}")
        batch, heads = _broadcast_shapes("batch", *(t.shape[:-3] for t in (query, key, value))), hq
    else:
        *batch, heads = _broadcast_shapes("batch and head", *(t.shape[:-2] for t in (query, key, value)))
    kv_heads = hk if hk == hv else heads

    def spread(t, h):  # (..., h_t, N, D) -> (*batch, h, N, D)
        if 1 < t.shape[-3] < h:  # enable_gqa with key and value heads that differ: each repeated to the query's
            t = t.repeat_interleave(h // t.shape[-3], dim=-3)
        return t.expand(*batch, h, *t.shape[-2:])

    return spread(query, heads), spread(key, kv_heads), spread(value, kv_heads)


def _merges_as_view(t, first, last) -> bool:
    """Whether dims first .. last - 1 of t merge into one dim without a copy."""
    dims = [d for d in range(first, last) if t.shape[d] != 1]
    return t.numel() == 0 or all(t.stride(a) == t.stride(b) * t.shape[b] for a, b in zip(dims, dims[1:]))


def _to_4d(tensors, keep_batch):
    """(*batch, H_t, N, D) tensors with the same batch dims -> (B, H, N, D) each, views wherever the strides
    allow. The leading dims split into a batch group and a head group (each tensor's heads and the batch dims
    after the cut): the cut nearest the heads at which every tensor's groups merge as views, so that broadcast
    (zero-stride) and sliced dims are not copied. Dropout's keep-mask and grouped heads come out the same for
    every cut (the kernels index (b, h) as b * H + h, and a kv head serves query heads h // (Hq / Hk)).
    keep_batch: B must be the product of the batch dims (key_lengths is per batch element). Where no cut
    merges every tensor as views, the tensors are copied at that cut."""
    if tensors[0].dim() == 4:
        return tensors
    if tensors[0].dim() == 2:
        return [t[None, None] for t in tensors]  # (1, 1, N, D)
    batch_rank = tensors[0].dim() - 3
    cuts = [batch_rank] if keep_batch else range(batch_rank, -1, -1)
    cut = next((c for c in cuts if all(_merges_as_view(t, 0, c) and _merges_as_view(t, c, t.dim() - 2)
                                       for t in tensors)), batch_rank)
    return [t.reshape(math.prod(t.shape[:cut]), math.prod(t.shape[cut:-2]), *t.shape[-2:]) for t in tensors]


def _broadcast_mask(attn_mask, query_shape, S):
    """attn_mask broadcast to the scores' shape (..., Hq, L, S) through zero strides, never copied. Leading
    size-1 dims beyond the scores' rank are dropped, as torch 2.14 allows."""
    target = (*query_shape[:-1], S)
    while attn_mask.dim() > len(target) and attn_mask.shape[0] == 1:
        attn_mask = attn_mask[0]
    try:
        if attn_mask.dim() > len(target) or torch.broadcast_shapes(attn_mask.shape, target) != target:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"attn_mask must broadcast to {target}; got {tuple(attn_mask.shape)}") from None
    return attn_mask.expand(target)


def _zero_attention(q, k, v):
    """Attention where the batch, the heads, a sequence or Ev is empty: zeros (B, Hq, L, Ev) computed as
    q (k^T v), whose autograd gives q, k and v their (zero or empty) gradients as torch does."""
    group = q.shape[1] // k.shape[1] if k.shape[1] else 1
    k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))  # (B, Hq, S, E), (B, Hq, S, Ev)
    return q @ (k.transpose(-2, -1) @ v)  # (B, Hq, L, E) @ (B, Hq, E, Ev)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, key_lengths=None, backend="auto"):
    """Fused scaled dot-product attention, a drop-in for torch.nn.functional.scaled_dot_product_attention.

    Args:
        query: (..., Hq, L, E); key: (..., Hk, S, E); value: (..., Hv, S, Ev). float16, bfloat16 or float32
            (float64 on the "torch" backend); the triton kernels take E, Ev up to 256. The leading dimensions
            broadcast as torch's do (a matmul's batch dims; size-1 dims are read through zero strides, never
            copied). With enable_gqa=True (grouped-query attention) Hk and Hv each divide Hq; only where Hk and Hv
            differ, each of them that is neither 1 nor Hq is repeated in memory to Hq heads. E = 0 gives every
            score 0 (as torch); Ev = 0 an empty output. Any strides; only a non-contiguous last dim is copied,
            and, with more than one batch dim, tensors whose batch and head dims merge into the kernels' two
            (batch, heads) dims at no common place without a copy (e.g. a 5-D mask broadcast over heads but not
            over the inner batch dim).
        attn_mask: None, or broadcastable to (..., Hq, L, S) (leading size-1 dims beyond that rank allowed):
            bool, where True means "takes part in attention", or floating (float32 or the query dtype), added to
            the scaled scores. Broadcast dims are read through zero strides, not expanded in memory (for 4-D and
            smaller inputs always). Only the "torch" backend computes the gradient of a mask that requires
            grad, so "auto" runs it for such a mask while grad mode is on.
        dropout_p: dropout probability on the attention weights, in [0, 1); applied whenever > 0 (as torch).
            The keep-mask comes from a counter-based RNG seeded from torch's generator (tfm_kernels.rng), so
            runs repeat under torch.manual_seed and every backend draws the same mask. A call draws exactly one
            seed, `tfm_kernels.rng.draw_seed(query.device)`, and nothing else from torch's generator: after
            `torch.manual_seed(s); out = scaled_dot_product_attention(...)`, the same `torch.manual_seed(s);
            seed = rng.draw_seed(query.device)` gives its seed, and `rng.dropout_keep_mask(seed, B * Hq, L, S,
            dropout_p)` its keep-mask (B the product of the batch dims). Under torch.compile with inductor the
            seed, like torch's own dropout, comes from inductor's generator (a different mask from eager's)
            unless torch._inductor.config.fallback_random is True.
        is_causal: key j takes part in query row i only if j <= i (top-left aligned, as torch when L != S).
            Not together with attn_mask.
        scale: multiplier of q @ k^T; default 1 / sqrt(E).
        enable_gqa: key and value heads that divide the query heads serve groups of query heads (grouped-query
            and multi-query attention).
        key_lengths: optional int32/int64 tensor (B,), B the product of the broadcast batch dims (1 for 3-D
            inputs): keys j >= key_lengths[b] take no part (right padding), without any mask tensor.
        backend: "auto" (the first supporting backend in tfm_kernels.backends.auto_order), "cuda" (CUDA C++),
            "triton", "cpu" (C++ CPU kernel) or "torch" (the eager reference path, float16/bfloat16 computed in
            float32 as torch's SDPA does). An explicit backend never falls back: it runs or raises
            NotImplementedError with the reasons. The cuda backward sums dQ with float32 atomics (its last bits may
            vary from run to run) unless torch.use_deterministic_algorithms(True) is set; the triton and cpu
            backends always repeat bit for bit.

    Returns:
        (..., Hq, L, Ev) in the query dtype; the kernel backends store it heads-inner, as torch's CUDA flash kernels
        do ((..., L, Hq, Ev) in memory, so that merging heads, out.transpose(-3, -2).reshape(..., L, Hq * Ev),
        copies nothing): merge the (Hq, L) dims with .reshape, not .view. A row in which no key takes part (all
        masked) gives output 0 and zero gradients (torch 2.14 gives 0 on CPU; where a torch kernel gives NaN, this
        still gives 0); a row with a NaN score gives NaN, as tfm_kernels.reference does. Under autocast, as torch:
        query, key, value and a floating attn_mask are cast to the autocast dtype first (tfm_kernels.autocast), and
        so is the output.
    """
    query, key, value, attn_mask = autocast_inputs(query, key, value, attn_mask)
    with autocast_off(query):
        return _attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, key_lengths,
                          backend)


def _attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, key_lengths, backend):
    """scaled_dot_product_attention past autocast."""
    dropout_p = as_float("dropout_p", dropout_p)
    scale = None if scale is None else as_float("scale", scale)
    _check_inputs(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, key_lengths)
    query, key, value = _broadcast(query, key, value, enable_gqa)
    out_shape = (*query.shape[:-1], value.shape[-1])
    tensors = [last_dim_contiguous(t) for t in (query, key, value)]
    if attn_mask is not None:
        tensors.append(_broadcast_mask(attn_mask, query.shape, key.shape[-2]))  # (..., Hq, L, S)
    if key_lengths is not None:
        batch = math.prod(query.shape[:-3])
        if key_lengths.shape != (batch,):
            raise ValueError(f"key_lengths must have shape ({batch},); got {tuple(key_lengths.shape)}")
    q, k, v, *masks = _to_4d(tensors, keep_batch=key_lengths is not None)
    mask = masks[0] if masks else None  # (B, Hq, L, S), zero strides where it broadcasts
    B, H, L, E = q.shape  # q (B, Hq, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev)
    S = k.shape[2]
    # With no head dim every score is 0, whatever the scale (torch: an empty sum).
    scale = 1.0 if E == 0 else 1.0 / math.sqrt(E) if scale is None else scale
    seed = seed_for(dropout_p, q.device)

    if backend == "auto":
        backend = backends.choose(q, k, v, mask, key_lengths, dropout_p, is_causal)
    else:
        reasons = backends.not_supported_reasons(backend, q, k, v, mask, key_lengths, dropout_p, is_causal)
        if reasons:
            raise NotImplementedError(f"backend={backend!r} cannot run these inputs: " + "; ".join(reasons))
    if 0 in (B, H, L, S, v.shape[-1]):
        return _zero_attention(q, k, v).reshape(out_shape)
    if E == 0:  # zero scores: the kernels take them from one zero column
        q, k = F.pad(q, (0, 1)), F.pad(k, (0, 1))
    if backend == "torch":
        out, _ = reference.attention(q, k, v, mask, key_lengths, dropout_p, is_causal, scale, seed, upcast=True)
    else:
        out, _ = _forward_op(backend)(q, k, v, mask, key_lengths, dropout_p, is_causal, scale, seed)
    return out.reshape(out_shape)
