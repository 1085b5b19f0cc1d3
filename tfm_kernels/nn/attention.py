"""MultiheadAttention: a drop-in subclass of torch.nn.MultiheadAttention whose attention runs on the fused
kernels (tfm_kernels.scaled_dot_product_attention).

Kept from torch: the constructor, the parameters and their state_dict keys, the forward signature, the return
values and the mask semantics (True in a bool mask means "masked out"; float masks are added to the scaled
scores). Changed: attention runs the fused kernel for every argument combination; the padding mask reaches the
kernel as an (N, 1, 1, S) broadcast instead of an (N*H, L, S) copy; torch's inference fast path
(`torch._native_multi_head_attention`) is never taken. Attention weights (need_weights=True, torch's default)
come from a slower explicit softmax in torch ops; pass need_weights=False when they are not used.
"""

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .. import attention as _attention
from ..backends import check_backend
from ..reference import softmax_of_rows
from .torchscript import refuse_torchscript


def _split_heads(x, num_heads, batch_first):
    """(N, L, H*D) if batch_first else (L, N, H*D), last dim contiguous -> (N, H, L, D), a view."""
    x = x.unflatten(-1, (num_heads, -1))  # (N, L, H, D) or (L, N, H, D)
    return x.permute(0, 2, 1, 3) if batch_first else x.permute(1, 2, 0, 3)  # (N, H, L, D)


def _check_dropout(dropout):
    """torch's MultiheadAttention takes any dropout and applies it only with need_weights=False through SDPA, so a
    negative one ran without dropout on the need_weights=True path and failed naming dropout_p on the other."""
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout must be a float in [0, 1]; got {dropout!r}")


def _check_mask_dtype(name, mask):
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or floating-point tensor; got {mask.dtype}")


class MultiheadAttention(nn.MultiheadAttention):
    """torch.nn.MultiheadAttention on the fused attention kernels.

    Constructor: torch's (embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim,
    batch_first, device, dtype), plus `backend` ("auto", "cuda", "triton", "cpu" or "torch", as in
    tfm_kernels.scaled_dot_product_attention), also settable as the attribute `backend`. Parameters and
    state_dict keys are torch's: either module loads the other's state_dict.

    forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
            average_attn_weights=True, is_causal=False) -> (attn_output, attn_weights or None)
        query (L, N, E), or (N, L, E) with batch_first, or (L, E) unbatched; key (S, N, kdim) and value
        (S, N, vdim) likewise. key_padding_mask (N, S), or (S,) unbatched; attn_mask (L, S) or
        (N*num_heads, L, S), or (num_heads, L, S) unbatched. Masks are bool (True = masked out) or floating
        (added to the scaled scores); both together are merged by broadcasting, at most
        (N, num_heads or 1, L, S).
        is_causal is torch's hint: it needs attn_mask, and without key_padding_mask and need_weights the
        kernel runs causal attention instead of reading attn_mask. Dropout only in training mode.
        attn_output has query's layout and dtype. attn_weights (need_weights=True): (N, L, S) averaged over
        heads, or (N, num_heads, L, S) with average_attn_weights=False ((L, S) or (num_heads, L, S)
        unbatched), in the query dtype.

    need_weights=True (torch's default) is the slower path: like torch, it computes the weights with an
    explicit softmax in torch ops, (N, H, L, S) in memory, and the output as weights @ v, with torch's
    operations (seq-first inputs give torch's weights and output bit for bit); the fused kernel runs for
    need_weights=False (as the Transformer layers call it).

    A query row in which every key is masked attends to nothing: attention output 0 (so attn_output is the
    out-projection bias), weights 0 and finite gradients, on both paths. torch gives NaN there with
    need_weights=True, and NaN or 0 with need_weights=False depending on its version and kernel.
    """

    backend = "auto"  # class default, so that modules converted in place by tfm_kernels.patch have one
    __prepare_scriptable__ = refuse_torchscript

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *, backend="auto"):
        if embed_dim > 0 and num_heads > 0 and embed_dim % num_heads:
            raise ValueError(f"embed_dim must be divisible by num_heads; got embed_dim={embed_dim} and "
                             f"num_heads={num_heads}")
        check_backend(backend)
        _check_dropout(dropout)
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)
        self.backend = backend

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if query.is_nested or key.is_nested or value.is_nested:
            raise ValueError("MultiheadAttention takes no nested tensors; pass a padded tensor and "
                             "key_padding_mask")
        check_backend(self.backend)
        if self.training:  # a module converted by tfm_kernels.patch did not run our constructor
            _check_dropout(self.dropout)
        batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal=True is a hint that attn_mask is causal and needs it (as in torch); "
                               "nn.Transformer.generate_square_subsequent_mask(L) makes one")
        # torch's rule for the hint: attn_mask gives way to causal attention only where nothing is merged into
        # it and no weights are returned; otherwise attn_mask is authoritative.
        run_causal = is_causal and key_padding_mask is None and not need_weights
        if run_causal:
            attn_mask = None
        batch_first = self.batch_first if batched else True  # unbatched inputs become batch-first, N = 1

        q, k, v = self._in_projection(query, key, value)  # the inputs' layouts, last dim embed_dim
        if not batched:
            q, k, v = q[None], k[None], v[None]  # (1, L, E), (1, S, E), (1, S, E)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask[None]  # (1, S)
        H = self.num_heads
        q = _split_heads(q, H, batch_first)  # (N, H, L, D)
        k = _split_heads(k, H, batch_first)  # (N, H, S, D)
        v = _split_heads(v, H, batch_first)  # (N, H, S, D)
        N, _, L, D = q.shape
        S = k.shape[2]
        k, v = self._extra_keys(k, v)  # (N, H, S', D), S' = S + the added keys
        mask = self._kernel_mask(attn_mask, key_padding_mask, N, L, S, k.shape[2] - S, q.dtype)
        dropout_p = self.dropout if self.training else 0.0

        # The slower explicit path: weights (N, H, L, S') in torch ops, as torch does; also for dropout 1 (torch's
        # zeroes every weight), which the kernels do not take.
        if need_weights or dropout_p >= 1.0:
            weights = self._attention_weights(q, k, mask)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = weights @ v  # (N, H, L, D)
            weights = weights if need_weights else None
        else:
            weights = None
            out = _attention.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                          is_causal=run_causal, backend=self.backend)
        if batch_first:
            out = out.transpose(1, 2).reshape(N, L, H * D)  # (N, L, E), a view of the kernel's (N, L, H, D)
        else:
            out = out.permute(2, 0, 1, 3).reshape(L, N, H * D)  # (L, N, E)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out[0]  # (L, E)
        if weights is not None:
            if average_attn_weights:
                weights = weights.mean(dim=1)  # (N, L, S')
            if not batched:
                weights = weights[0]  # (L, S') or (H, L, S')
        return out, weights

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask):
        """torch's shape rules, with errors that name the argument; returns whether the input is batched."""
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 2-D (L, E) unbatched or 3-D batched; got shape "
                             f"{tuple(query.shape)}")
        batched = query.dim() == 3
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"query must have embed_dim={self.embed_dim} features; got shape "
                             f"{tuple(query.shape)}")
        for name, t, dim_name, dim in (("key", key, "kdim", self.kdim), ("value", value, "vdim", self.vdim)):
            if t.dim() != query.dim():
                raise ValueError(f"{name} must be {query.dim()}-D like query; got shape {tuple(t.shape)}")
            if t.shape[-1] != dim:
                raise ValueError(f"{name} must have {dim_name}={dim} features; got shape {tuple(t.shape)}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"key and value must agree in sequence and batch dims; got shapes "
                             f"{tuple(key.shape)} and {tuple(value.shape)}")
        if batched:
            batch_dim = 0 if self.batch_first else 1
            N, L, S = query.shape[batch_dim], query.shape[1 - batch_dim], key.shape[1 - batch_dim]
            if key.shape[batch_dim] != N:
                raise ValueError(f"query and key must have the same batch size (batch_first="
                                 f"{self.batch_first}); got shapes {tuple(query.shape)} and "
                                 f"{tuple(key.shape)}")
        else:
            N, L, S = 1, query.shape[0], key.shape[0]
        for name, t in (("key", key), ("value", value), ("key_padding_mask", key_padding_mask),
                        ("attn_mask", attn_mask)):
            if t is not None and t.device != query.device:
                raise ValueError(f"{name} must be on query's device {query.device}; got {t.device}")
        _check_mask_dtype("key_padding_mask", key_padding_mask)
        _check_mask_dtype("attn_mask", attn_mask)
        if key_padding_mask is not None:
            expected = (N, S) if batched else (S,)
            if tuple(key_padding_mask.shape) != expected:
                raise ValueError(f"key_padding_mask must have shape {expected} (batch, source length); got "
                                 f"{tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            heads = N * self.num_heads
            if tuple(attn_mask.shape) not in ((L, S), (heads, L, S)):
                raise ValueError(f"attn_mask must have shape {(L, S)} or {(heads, L, S)} (batch * num_heads, "
                                 f"target length, source length); got {tuple(attn_mask.shape)}")
        return batched

    def _in_projection(self, query, key, value):
        """q, k, v projected to embed_dim each, in their input layouts. Self-attention (query is key is value)
        runs one GEMM on the packed weight; encoder-decoder attention (key is value) runs two."""
        E = self.embed_dim
        bias = self.in_proj_bias  # (3 E,) or None

        def bias_rows(first, last):  # rows first * E .. last * E of the packed bias
            return None if bias is None else bias[first * E:last * E]

        if not self._qkv_same_embed_dim:
            return (F.linear(query, self.q_proj_weight, bias_rows(0, 1)),
                    F.linear(key, self.k_proj_weight, bias_rows(1, 2)),
                    F.linear(value, self.v_proj_weight, bias_rows(2, 3)))
        w = self.in_proj_weight
        if query is key and key is value:
            # unbind's backward stacks the three gradients in one pass (indexing's would zero-fill three)
            return F.linear(query, w, bias).unflatten(-1, (3, E)).unbind(-2)  # views of (..., 3, E)
        q = F.linear(query, w[:E], bias_rows(0, 1))
        if key is value:
            k, v = F.linear(key, w[E:], bias_rows(1, 3)).unflatten(-1, (2, E)).unbind(-2)  # views of (..., 2, E)
            return q, k, v
        return q, F.linear(key, w[E:2 * E], bias_rows(1, 2)), F.linear(value, w[2 * E:], bias_rows(2, 3))

    def _extra_keys(self, k, v):
        """Appends the learned bias key/value (add_bias_kv), then a zero key/value (add_zero_attn), as
        torch does."""
        N, H, _, D = k.shape
        if self.bias_k is not None:
            # in k's dtype: under autocast k is in the autocast dtype, and cat would promote it to the bias's
            bias_k, bias_v = (b.view(1, H, 1, D).expand(N, H, 1, D).to(k.dtype) for b in (self.bias_k, self.bias_v))
            k = torch.cat([k, bias_k], dim=2)  # (N, H, S + 1, D)
            v = torch.cat([v, bias_v], dim=2)  # (N, H, S + 1, D)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, H, 1, D)], dim=2)  # (N, H, S' + 1, D)
            v = torch.cat([v, v.new_zeros(N, H, 1, D)], dim=2)  # (N, H, S' + 1, D)
        return k, v

    def _kernel_mask(self, attn_mask, key_padding_mask, N, L, S, added_keys, dtype):
        """The masks merged into one in the kernel's convention, broadcastable to (N, H, L, S + added_keys).

        Both bool (or one given, bool): bool where True means "takes part". Otherwise float, the sum of the
        masks with bool ones turned into -inf (as torch turns them into the query dtype). The added keys
        (bias and zero attention) are never masked."""
        masks = []
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                masks.append(attn_mask.view(1, 1, L, S))  # (1, 1, L, S)
            else:
                masks.append(attn_mask.view(N, self.num_heads, L, S))  # (N, H, L, S)
        if key_padding_mask is not None:
            masks.append(key_padding_mask.view(N, 1, 1, S))  # (N, 1, 1, S)
        if not masks:
            return None
        if all(m.dtype == torch.bool for m in masks):
            # broadcast, at most (N, H, L, S); negated in place where the merge made a new tensor, so that the
            # merge holds one such tensor rather than two
            merged = ~masks[0] if len(masks) == 1 else functools.reduce(torch.logical_or, masks).logical_not_()
            return F.pad(merged, (0, added_keys), value=True) if added_keys else merged
        # The kernel reads float32 or the query dtype; other float masks are cast to the query dtype.
        float_dtypes = [m.dtype if m.dtype in (torch.float32, dtype) else dtype
                        for m in masks if m.dtype != torch.bool]
        mask_dtype = functools.reduce(torch.promote_types, float_dtypes)
        as_float = [torch.zeros_like(m, dtype=mask_dtype).masked_fill_(m, float("-inf"))
                    if m.dtype == torch.bool else m.to(mask_dtype) for m in masks]
        merged = functools.reduce(torch.add, as_float)  # broadcast, at most (N, H, L, S)
        return F.pad(merged, (0, added_keys), value=0.0) if added_keys else merged

    def _attention_weights(self, q, k, mask):
        """softmax(q k^T / sqrt(D) + mask) in torch ops: (N, H, L, S'); rows where no key takes part are 0."""
        q = q * q.shape[-1] ** -0.5
        if mask is not None and mask.dtype == q.dtype:
            # the float mask added inside the product, so that the sum is rounded once (torch's baddbmm)
            N, H, L, D = q.shape
            S = k.shape[2]
            scores = torch.baddbmm(mask.expand(N, H, L, S).reshape(N * H, L, S), q.reshape(N * H, L, D),
                                   k.reshape(N * H, S, D).transpose(1, 2)).view(N, H, L, S)
        else:
            scores = q @ k.transpose(-2, -1)  # (N, H, L, S')
            if mask is None:
                return torch.softmax(scores, dim=-1)
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, float("-inf"))
            else:
                scores = scores + mask  # a float32 mask on lower-precision scores promotes them
        return softmax_of_rows(scores).to(q.dtype)
