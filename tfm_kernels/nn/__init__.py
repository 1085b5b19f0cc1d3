"""Drop-in nn modules on the fused kernels: MultiheadAttention and the Transformer layers (torch.nn's
constructors, parameters and state_dict keys)."""

from .attention import MultiheadAttention
