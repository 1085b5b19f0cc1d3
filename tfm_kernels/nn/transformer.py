"""Transformer layers and containers on the fused kernels: drop-in subclasses of torch.nn's
TransformerEncoderLayer, TransformerDecoderLayer, TransformerEncoder, TransformerDecoder and Transformer.

Each keeps torch's constructor (plus a keyword-only `backend`), submodules and state_dict keys, and draws its
initial weights exactly as torch's does (torch's constructor runs, then its attention modules become ours in
place), so that under one seed both hold the same weights. Attention runs in
tfm_kernels.nn.MultiheadAttention; the feed-forward block linear2(dropout(activation(linear1(x)))) runs in the
fused MLP (tfm_kernels.mlp.mlp) for the activations it fuses, unless a hook or a replaced submodule asks for
the submodules to be called (feed_forward). Torch's inference fast paths
(`torch._transformer_encoder_layer_fwd`, nested tensors in TransformerEncoder) are never taken, so the kernels
run in training and inference alike; where torch's encoder would run on nested tensors, ours writes the 0 that
path leaves at padded positions (before the final norm), so that its outputs, and in nn.Transformer what
cross-attention reads from them, equal torch's. is_causal=True without a mask raises in inference too, where
torch's fast path ignores the hint. Our encoder layer inside torch's TransformerEncoder takes the nested tensor
that encoder hands its layers in inference. The layers run their blocks through torch's `_sa_block`,
`_mha_block` and `_ff_block`, so that overriding one works as in torch.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.transformer import _detect_is_causal_mask, _get_seq_len

from ..backends import check_backend
from ..mlp import mlp
from .mlp import fused_activation_name, linears_as_modules, runs_as_its_class
from .torchscript import refuse_torchscript


def feed_forward(layer, x):
    """layer.linear2(layer.dropout(layer.activation(layer.linear1(x)))), the feed-forward of torch's layers.

    Runs in the fused MLP when that computes exactly this: layer.activation one it fuses
    (fused_activation_name), and linear1, linear2 and dropout exactly nn.Linear and nn.Dropout without hooks.
    Anything else (a hook, spectral_norm, a quantized or LoRA Linear, nn.Identity as dropout) calls the
    submodules in plain torch ops. The dropout after linear2 belongs to the caller. The fused dropout draws
    from tfm_kernels.rng, not from torch's dropout."""
    name = fused_activation_name(layer.activation)
    dropout_p = layer.dropout.p if layer.dropout.training else 0.0
    fusable = (name is not None and not linears_as_modules(layer.linear1, layer.linear2)
               and runs_as_its_class(layer.dropout, (nn.Dropout,))
               and dropout_p < 1.0)  # torch's dropout of 1 zeroes the block; the fused one takes [0, 1)
    if not fusable:
        return layer.linear2(layer.dropout(layer.activation(layer.linear1(x))))
    return mlp(x, layer.linear1.weight, layer.linear1.bias, layer.linear2.weight, layer.linear2.bias, name, dropout_p,
               backend=layer.backend)


def _check_layer_args(d_model, nhead, backend):
    if d_model > 0 and nhead > 0 and d_model % nhead:
        raise ValueError(f"d_model must be divisible by nhead; got d_model={d_model} and nhead={nhead}")
    check_backend(backend)


def _convert_subtree(root, backend):
    """Every torch.nn Transformer module and MultiheadAttention under `root` becomes ours in place."""
    from .patch import patch  # patch maps torch's classes to the classes of this module

    patch(root, backend=backend)


class _FusedLayer:
    """What both layers share: torch's constructor, after which their attention modules become ours, and the
    self-attention block. Mixed in before torch's layer class."""

    backend = "auto"
    __prepare_scriptable__ = refuse_torchscript

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation=F.relu,
                 layer_norm_eps=1e-5, batch_first=False, norm_first=False, bias=True, device=None, dtype=None,
                 *, backend="auto"):
        _check_layer_args(d_model, nhead, backend)
        super().__init__(d_model, nhead, dim_feedforward=dim_feedforward, dropout=dropout,
                         activation=activation, layer_norm_eps=layer_norm_eps, batch_first=batch_first,
                         norm_first=norm_first, bias=bias, device=device, dtype=dtype)
        _convert_subtree(self, backend)
        self.backend = backend

    # The blocks, as torch's layers name them, so that a subclass or an instance that overrides one (to capture
    # attention weights, to change the feed-forward) has it called, as in torch.
    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal=False):
        out = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                             need_weights=False, is_causal=is_causal)[0]
        return self.dropout1(out)


class TransformerEncoderLayer(_FusedLayer, nn.TransformerEncoderLayer):
    """torch.nn.TransformerEncoderLayer on the fused attention and MLP kernels.

    Constructor: torch's (d_model, nhead, dim_feedforward=2048, dropout=0.1, activation=F.relu ("relu", "gelu"
    or a callable), layer_norm_eps=1e-5, batch_first=False, norm_first=False, bias=True, device, dtype) plus
    `backend` for both the attention and the MLP. Submodules and state_dict keys are torch's (self_attn,
    linear1, dropout, linear2, norm1, norm2, dropout1, dropout2).

    forward(src, src_mask=None, src_key_padding_mask=None, is_causal=False) -> same shape as src:
    src (S, N, E), (N, S, E) with batch_first, or (S, E); masks as in MultiheadAttention (src_mask (S, S) or
    (N*nhead, S, S), src_key_padding_mask (N, S); bool True = masked out, or float added); is_causal is a hint
    that src_mask is causal, as in torch.
    """

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        if src.is_nested and self.self_attn.batch_first:
            return self._forward_nested(src, src_mask, is_causal)
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x

    def _ff_block(self, x):
        return self.dropout2(feed_forward(self, x))

    def _forward_nested(self, src, src_mask, is_causal):
        """torch's TransformerEncoder hands its layers the sequences as a nested tensor (batch-first, each of its
        own length) in inference with a padding mask, which it then leaves out: they run padded, the padding
        as key_padding_mask, and come back nested, as from torch's layer."""
        lengths = [t.shape[0] for t in src.unbind()]
        padded = src.to_padded_tensor(0.0)  # (N, L_max, E)
        positions = torch.arange(padded.shape[1], device=padded.device)  # (L_max,)
        padding = positions >= torch.tensor(lengths, device=padded.device)[:, None]  # (N, L_max), True: padding
        out = self.forward(padded, src_mask, padding, is_causal)  # (N, L_max, E)
        return torch.nested.as_nested_tensor([row[:length] for row, length in zip(out, lengths)])


class TransformerDecoderLayer(_FusedLayer, nn.TransformerDecoderLayer):
    """torch.nn.TransformerDecoderLayer on the fused attention and MLP kernels.

    Constructor: torch's (as TransformerEncoderLayer's) plus `backend`. Submodules and state_dict keys are
    torch's (self_attn, multihead_attn, linear1, dropout, linear2, norm1..3, dropout1..3).

    forward(tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
            memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False) -> same shape as tgt:
    tgt (T, N, E) and memory (S, N, E) (batch first with batch_first); tgt_mask (T, T), memory_mask (T, S)
    (or per batch*head); key padding masks (N, T) and (N, S); masks and causal hints as in MultiheadAttention.
    """

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False):
        x = tgt
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, is_causal=tgt_is_causal)
            x = x + self._mha_block(self.norm2(x), memory, memory_mask, memory_key_padding_mask,
                                    is_causal=memory_is_causal)
            x = x + self._ff_block(self.norm3(x))
        else:
            x = self.norm1(x + self._sa_block(x, tgt_mask, tgt_key_padding_mask, is_causal=tgt_is_causal))
            x = self.norm2(x + self._mha_block(x, memory, memory_mask, memory_key_padding_mask,
                                               is_causal=memory_is_causal))
            x = self.norm3(x + self._ff_block(x))
        return x

    def _mha_block(self, x, mem, attn_mask, key_padding_mask, is_causal=False):
        out = self.multihead_attn(x, mem, mem, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                  need_weights=False, is_causal=is_causal)[0]
        return self.dropout2(out)

    def _ff_block(self, x):
        return self.dropout3(feed_forward(self, x))


def _float_masks(src, mask, key_padding_mask):
    """(mask, key_padding_mask) as torch's TransformerEncoder hands them to its layers (and detects a causal
    mask on): in src's float dtype, -inf where a bool mask is True (masked out)."""
    return (F._canonical_mask(mask=mask, mask_name="mask", other_type=None, other_name="", target_type=src.dtype,
                              check_other=False),
            F._canonical_mask(mask=key_padding_mask, mask_name="src_key_padding_mask",
                              other_type=F._none_or_dtype(mask), other_name="mask", target_type=src.dtype))


class TransformerEncoder(nn.TransformerEncoder):
    """torch.nn.TransformerEncoder whose forward runs every layer as given, without torch's nested-tensor fast
    path. Constructor: torch's (encoder_layer, num_layers, norm=None, enable_nested_tensor=True,
    mask_check=True); torch.nn layers among the clones become ours in place (backend "auto").

    forward(src, mask=None, src_key_padding_mask=None, is_causal=None): as torch's; is_causal=None detects
    a causal `mask` (bool or float) as torch does, so the kernels run causal attention without reading it.
    Layers other than our TransformerEncoderLayer get both masks as torch's encoder gives them, in src's float
    dtype with -inf where masked out.
    """

    def __init__(self, encoder_layer, num_layers, norm=None, enable_nested_tensor=True, mask_check=True):
        super().__init__(encoder_layer, num_layers, norm=norm, enable_nested_tensor=enable_nested_tensor,
                         mask_check=mask_check)
        _convert_subtree(self, "auto")

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        float_masks = None  # both masks as torch's encoder hands them to its layers, made when first needed
        if is_causal is None and mask is not None:
            float_masks = _float_masks(src, mask, src_key_padding_mask)
            is_causal = _detect_is_causal_mask(float_masks[0], None, _get_seq_len(src, self._batch_first()))
        output = src
        for layer in self.layers:
            if type(layer) is TransformerEncoderLayer:  # ours reads the masks as given
                layer_masks = mask, src_key_padding_mask
            else:
                float_masks = float_masks or _float_masks(src, mask, src_key_padding_mask)
                layer_masks = float_masks
            output = layer(output, src_mask=layer_masks[0], is_causal=bool(is_causal),
                           src_key_padding_mask=layer_masks[1])
        padded = self._nested_padding(src, mask, src_key_padding_mask)
        if padded is not None:
            output = output.masked_fill((padded if self._batch_first() else padded.t())[..., None], 0.0)
        return output if self.norm is None else self.norm(output)

    def _nested_padding(self, src, mask, key_padding_mask):
        """(N, S), True at the padded positions, where torch's TransformerEncoder.forward would run this call on
        nested tensors (its inference fast path), whose padded positions come out 0; else None. The checks of
        that forward, with the padding mask left-aligned (torch's mask_check; a mask that is not would make
        torch's nested tensor drop the wrong tokens, which is not copied). Never while compiling, where torch's
        left-alignment check cannot run."""
        if (key_padding_mask is None or mask is not None or src.dim() != 3 or src.is_nested
                or not torch.backends.mha.get_fastpath_enabled() or not getattr(self, "use_nested_tensor", False)
                or self.layers[0].training or torch.compiler.is_compiling() or torch.is_autocast_enabled()
                or src.device.type not in ("cpu", "cuda")):
            return None
        if torch.is_grad_enabled() and (src.requires_grad or any(p.requires_grad for p in self.layers[0].parameters())):
            return None
        padded = _float_masks(src, None, key_padding_mask)[1] != 0  # as torch's nested tensor reads it
        return padded if torch._nested_tensor_from_mask_left_aligned(src, ~padded) else None

    def _batch_first(self):
        attention = getattr(self.layers[0], "self_attn", None)
        return getattr(attention, "batch_first", False)


class TransformerDecoder(nn.TransformerDecoder):
    """torch.nn.TransformerDecoder over our layers. Constructor and forward are torch's (decoder_layer,
    num_layers, norm=None); torch.nn layers among the clones become ours in place (backend "auto")."""

    def __init__(self, decoder_layer, num_layers, norm=None):
        super().__init__(decoder_layer, num_layers, norm=norm)
        _convert_subtree(self, "auto")


class Transformer(nn.Transformer):
    """torch.nn.Transformer on the fused kernels: torch's constructor (d_model=512, nhead=8,
    num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=2048, dropout=0.1, activation=F.relu,
    custom_encoder=None, custom_decoder=None, layer_norm_eps=1e-5, batch_first=False, norm_first=False,
    bias=True, device, dtype) plus `backend`; torch's forward, masks and state_dict keys. Every torch.nn
    Transformer module and MultiheadAttention inside, custom encoders and decoders included, becomes ours
    in place after torch's constructor has drawn the weights."""

    def __init__(self, d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=2048,
                 dropout=0.1, activation=F.relu, custom_encoder=None, custom_decoder=None,
                 layer_norm_eps=1e-5, batch_first=False, norm_first=False, bias=True, device=None, dtype=None,
                 *, backend="auto"):
        _check_layer_args(d_model, nhead, backend)
        super().__init__(d_model=d_model, nhead=nhead, num_encoder_layers=num_encoder_layers,
                         num_decoder_layers=num_decoder_layers, dim_feedforward=dim_feedforward,
                         dropout=dropout, activation=activation, custom_encoder=custom_encoder,
                         custom_decoder=custom_decoder, layer_norm_eps=layer_norm_eps,
                         batch_first=batch_first, norm_first=norm_first, bias=bias, device=device,
                         dtype=dtype)
        _convert_subtree(self, backend)
