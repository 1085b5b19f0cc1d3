"""Drop-in nn modules built on the fused operators."""

from .mlp import FusedMLP, GatedMLP

__all__ = ["FusedMLP", "GatedMLP"]
