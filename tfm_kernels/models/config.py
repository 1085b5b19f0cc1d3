"""Model configurations: dataclasses with named presets and validation.

`LMConfig` describes the decoder-only language model, `Seq2SeqConfig` the encoder-decoder Transformer of
"Attention Is All You Need". Both validate on construction and raise ValueError naming the field, what was
expected and what was given. `LMConfig.preset("tiny")` / `Seq2SeqConfig.preset("base", dropout=0.0)` build a
preset with optional overrides. The checks here (is_int, check_positive, check_real, check_bool, check_token_ids)
are shared by the models, training and generation.
"""

import dataclasses
import numbers
from dataclasses import dataclass

import torch

from .tokenizer import ByteTokenizer

ACTIVATIONS = ("gelu", "relu")


def is_int(value) -> bool:
    """Whether `value` is an int and not a bool (which Python counts as an int, but is never a count or an id)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value) -> bool:
    """Whether `value` is a real number and not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_token_ids(name, tokens):
    """Token ids (batch, length) of int64 or int32 (their values are not checked: that would wait for the GPU)."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be a (batch, length) int64 or int32 tensor; got "
                         f"{getattr(tokens, 'shape', type(tokens).__name__)} {getattr(tokens, 'dtype', '')}")


def check_positive(config, *names):
    for name in names:
        value = getattr(config, name)
        if not is_int(value) or value < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive int; got {value!r}")


def check_real(config, name, holds, expected):
    """Makes config.name a plain float (a numpy scalar would make a checkpoint that torch.load's weights_only
    mode refuses) if it is a real number, not a bool, for which `holds(value)`; else ValueError saying `expected`."""
    value = getattr(config, name)
    if not is_real(value) or not holds(float(value)):
        raise ValueError(f"{type(config).__name__}.{name} must be {expected}; got {value!r}")
    setattr(config, name, float(value))


def _check_probability(config, *names):
    for name in names:
        check_real(config, name, lambda value: 0.0 <= value < 1.0, "a float in [0, 1)")


def check_bool(config, *names):
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise ValueError(f"{type(config).__name__}.{name} must be a bool; got {value!r}")


def _check_heads(config):
    if config.d_model % config.n_heads:
        raise ValueError(
            f"{type(config).__name__}.d_model must be divisible by n_heads; got d_model="
            f"{config.d_model}, n_heads={config.n_heads}"
        )
    head_dim = config.d_model // config.n_heads
    if head_dim > 256:
        raise ValueError(
            f"{type(config).__name__}: head dim d_model / n_heads must be at most 256; got {head_dim}"
        )
    if config.activation not in ACTIVATIONS:
        raise ValueError(
            f"{type(config).__name__}.activation must be one of {ACTIVATIONS}; got {config.activation!r}"
        )


class _Presets:
    """Shared preset/serialisation helpers of the config dataclasses."""

    PRESETS = {}  # name -> field overrides, set by each config class

    @classmethod
    def preset(cls, name, **overrides):
        """The named preset with fields replaced by `overrides`."""
        if name not in cls.PRESETS:
            raise ValueError(f"{cls.__name__} preset must be one of {sorted(cls.PRESETS)}; got {name!r}")
        fields = {**cls.PRESETS[name], **overrides}
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{cls.__name__} has no fields {unknown}")
        return cls(**fields)

    def to_dict(self) -> dict:
        """Plain field values (what checkpoints store)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict):
        """The config of a to_dict() result, validated again (ValueError for anything but a mapping of its fields,
        e.g. a checkpoint's config written by another version, rather than a TypeError from the constructor)."""
        if not isinstance(values, dict):
            raise ValueError(f"{cls.__name__}.from_dict expects a dict of its fields; got {type(values).__name__}")
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{cls.__name__} has no fields {unknown}")
        return cls(**values)


@dataclass
class LMConfig(_Presets):
    """Decoder-only language model: token + learned position embeddings, `n_layers` pre-norm blocks of causal
    self-attention and a fused MLP (`d_ff` hidden units), a final LayerNorm and an output head tied to the
    token embedding. `context_length` is the longest sequence (prompt + generated tokens) it accepts."""

    vocab_size: int = ByteTokenizer.vocab_size
    context_length: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    dropout: float = 0.0
    activation: str = "gelu"
    bias: bool = True

    PRESETS = {
        "tiny": dict(context_length=64, d_model=64, n_layers=2, n_heads=4, d_ff=256, dropout=0.0),
        # GPT-2 small's shape (124M parameters with its 50257-token vocabulary; this byte vocabulary has 259).
        "gpt2-small": dict(context_length=1024, d_model=768, n_layers=12, n_heads=12, d_ff=3072, dropout=0.1),
    }

    def __post_init__(self):
        check_positive(self, "vocab_size", "context_length", "d_model", "n_layers", "n_heads", "d_ff")
        _check_probability(self, "dropout")
        check_bool(self, "bias")
        _check_heads(self)


@dataclass
class Seq2SeqConfig(_Presets):
    """Encoder-decoder Transformer: shared token embedding (scaled by sqrt(d_model)) for source, target and
    the output projection, sinusoidal positions, `n_encoder_layers` / `n_decoder_layers` layers, post-norm
    as in the paper (`norm_first=False`) or pre-norm. `max_length` bounds source and target lengths.
    `label_smoothing` and `warmup_steps` drive training (the paper's inverse-square-root schedule)."""

    vocab_size: int = ByteTokenizer.vocab_size
    max_length: int = 64
    d_model: int = 64
    n_heads: int = 4
    d_ff: int = 256
    n_encoder_layers: int = 2
    n_decoder_layers: int = 2
    dropout: float = 0.0
    label_smoothing: float = 0.1
    norm_first: bool = False
    activation: str = "relu"
    warmup_steps: int = 4000
    pad_id: int = ByteTokenizer.pad_id
    bos_id: int = ByteTokenizer.bos_id
    eos_id: int = ByteTokenizer.eos_id

    PRESETS = {
        "tiny": dict(max_length=64, d_model=64, n_heads=4, d_ff=256, n_encoder_layers=2, n_decoder_layers=2,
                     dropout=0.0, warmup_steps=100),
        # The paper's base model (Table 3): N=6, d_model 512, d_ff 2048, 8 heads, P_drop 0.1, eps_ls 0.1.
        "base": dict(max_length=512, d_model=512, n_heads=8, d_ff=2048, n_encoder_layers=6,
                     n_decoder_layers=6, dropout=0.1, label_smoothing=0.1, warmup_steps=4000),
    }

    def __post_init__(self):
        check_positive(
            self,
            "vocab_size",
            "max_length",
            "d_model",
            "n_heads",
            "d_ff",
            "n_encoder_layers",
            "n_decoder_layers",
            "warmup_steps",
        )
        _check_probability(self, "dropout", "label_smoothing")
        check_bool(self, "norm_first")
        _check_heads(self)
        ids = {"pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id}
        for name, value in ids.items():
            if not is_int(value) or not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"Seq2SeqConfig.{name} must be an int in [0, vocab_size={self.vocab_size}); got {value!r}"
                )
        if len(set(ids.values())) != 3:
            raise ValueError(f"Seq2SeqConfig pad_id, bos_id and eos_id must differ; got {ids}")
