"""TorchScript: the modules refuse torch.jit.script with a message that names what works instead."""


def refuse_torchscript(module):
    """Set as `__prepare_scriptable__`, which torch.jit.script calls on every module before compiling it."""
    cls = type(module)
    raise RuntimeError(
        f"torch.jit.script cannot compile {cls.__module__}.{cls.__qualname__}: its forward chooses a kernel backend "
        f"in Python. torch.jit.trace, torch.export and torch.compile take it; in a model patched by "
        f"tfm_kernels.patch, tfm_kernels.unpatch(model) puts PyTorch's scriptable modules back.")
