"""Triton kernels. Imported lazily by tfm_kernels.ops, so importing tfm_kernels does not import triton."""
