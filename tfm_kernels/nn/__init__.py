"""Drop-in nn modules built on the fused operators."""

from .attention import MultiheadAttention
from .mlp import FusedMLP, GatedMLP
from .patch import PatchReport, patch, unpatch
from .transformer import (
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

__all__ = ["FusedMLP", "GatedMLP", "MultiheadAttention", "Transformer", "TransformerDecoder", "TransformerDecoderLayer",
           "TransformerEncoder", "TransformerEncoderLayer", "PatchReport", "patch", "unpatch"]
