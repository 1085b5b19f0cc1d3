"""tfm_kernels.patch(model) and unpatch(model): put the fused kernels into an existing model, and take them
out again.

Patching converts modules in place: every torch.nn.MultiheadAttention, TransformerEncoderLayer,
TransformerDecoderLayer, TransformerEncoder, TransformerDecoder and Transformer inside the model becomes the
tfm_kernels.nn subclass of the same name by changing its class. The module stays the same object, so its
Parameters (shared, never copied), buffers, device, dtype, training mode, hooks and every reference to it are
kept, and the state_dict keys do not change. Subclasses of those torch classes other than ours are left alone
(their own forward may differ from torch's) and reported as skipped. unpatch turns ours back into torch's.
"""

from dataclasses import dataclass, field

from torch import nn

from . import attention, transformer

FUSED_CLASSES = {
    nn.MultiheadAttention: attention.MultiheadAttention,
    nn.TransformerEncoderLayer: transformer.TransformerEncoderLayer,
    nn.TransformerDecoderLayer: transformer.TransformerDecoderLayer,
    nn.TransformerEncoder: transformer.TransformerEncoder,
    nn.TransformerDecoder: transformer.TransformerDecoder,
    nn.Transformer: transformer.Transformer,
}
TORCH_CLASSES = {fused: torch_class for torch_class, fused in FUSED_CLASSES.items()}


def _class_name(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass
class PatchReport:
    """What patch() or unpatch() did. `swapped`: (qualified name, old class, new class) per converted module,
    "" naming the model itself; `skipped`: (qualified name, reason) per module left alone."""

    swapped: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def __str__(self):
        lines = [f"swapped {len(self.swapped)} module(s), skipped {len(self.skipped)}"]
        lines += [f"  {name or '(model)'}: {old} -> {new}" for name, old, new in self.swapped]
        lines += [f"  skipped {name or '(model)'}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def _swap(module, name, new_class, report):
    report.swapped.append((name, _class_name(type(module)), _class_name(new_class)))
    module.__class__ = new_class


def patch(model: nn.Module, *, backend: str = "auto") -> PatchReport:
    """Converts every torch.nn MultiheadAttention and Transformer module inside `model` (the model itself
    included) into the tfm_kernels.nn module of the same name, in place.

    Args:
        model: any nn.Module. Its modules keep their Parameters (shared, not copied), buffers, device, dtype,
            training mode and hooks; the state_dict is unchanged.
        backend: the attention / MLP backend of the converted modules ("auto", "cuda", "triton", "cpu",
            "torch"); modules that are ours already keep theirs.

    Returns:
        A PatchReport naming each converted module by its qualified name, and each skipped one (a subclass
        of a torch class, not of ours) with the reason. Modules of our classes and their subclasses run our
        kernels already and are in neither list.
    """
    attention.check_backend(backend)
    report = PatchReport()
    for name, module in model.named_modules():
        cls = type(module)
        if cls in FUSED_CLASSES:
            _swap(module, name, FUSED_CLASSES[cls], report)
            if hasattr(module, "backend"):
                module.backend = backend
        elif not isinstance(module, tuple(TORCH_CLASSES)) and isinstance(module, tuple(FUSED_CLASSES)):
            base = next(c for c in FUSED_CLASSES if isinstance(module, c))
            reason = f"{_class_name(cls)} subclasses {_class_name(base)}; its own forward is kept"
            report.skipped.append((name, reason))
    return report


def unpatch(model: nn.Module) -> PatchReport:
    """Turns every tfm_kernels.nn MultiheadAttention and Transformer module inside `model` back into torch's,
    in place (Parameters, hooks and mode kept). Returns a PatchReport of the converted modules."""
    report = PatchReport()
    for name, module in model.named_modules():
        cls = type(module)
        if cls in TORCH_CLASSES:
            _swap(module, name, TORCH_CLASSES[cls], report)
            module.__dict__.pop("backend", None)
    return report
