"""tfm_kernels: fused attention and MLP kernels (Triton, CUDA C++, C++ CPU) as PyTorch operators, drop-in
modules, and a Transformer built on them."""

from . import ops
from .attention import scaled_dot_product_attention
from .mlp import fused_linear, gated_linear, mlp
from .nn.patch import patch, unpatch
from .ops import build_info

__version__ = "0.1.0"

__all__ = ["scaled_dot_product_attention", "fused_linear", "gated_linear", "mlp", "patch", "unpatch", "build_info",
           "ops", "__version__"]
