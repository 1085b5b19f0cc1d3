"""tfm_kernels.patch(model) and unpatch(model): put the fused kernels into an existing model, and take them
out again.

Patching converts modules in place: every torch.nn.MultiheadAttention, TransformerEncoderLayer,
TransformerDecoderLayer, TransformerEncoder, TransformerDecoder and Transformer inside the model becomes the
tfm_kernels.nn subclass of the same name by changing its class. The module stays the same object, so its
Parameters (shared, never copied), buffers, device, dtype, training mode, hooks and every reference to it are
kept, and the state_dict keys do not change. A module with parametrizations (torch.nn.utils.parametrize, which
gives it a generated subclass) is converted with them. Left alone and reported as skipped: subclasses of those
torch classes other than ours (their own forward may differ from torch's), and modules whose forward is replaced
on the instance (by a hook or wrapper library: a new class would not reach it). unpatch turns ours back into
torch's.
"""

from dataclasses import dataclass, field

from torch import nn
from torch.nn.utils import parametrize

from ..backends import check_backend
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


def _check_model(model):
    if not isinstance(model, nn.Module):
        given = f"the class {model.__name__}" if isinstance(model, type) else type(model).__name__
        raise TypeError(f"model must be an nn.Module instance (a model or one of its modules); got {given}")


def _own_class(module):
    """The module's class; for a module with parametrizations, the class they were registered on (the base of
    the subclass torch.nn.utils.parametrize generates)."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


# The members of a class that type() makes itself.
_TYPE_MADE = ("__dict__", "__weakref__", "__qualname__")


def _swap(module, name, new_class, report):
    """module becomes a new_class, with its parametrizations if it has any: parametrize's generated class is
    made again on new_class (its properties compute the parametrized tensors)."""
    report.swapped.append((name, _class_name(_own_class(module)), _class_name(new_class)))
    if parametrize.is_parametrized(module):
        members = {key: value for key, value in vars(type(module)).items() if key not in _TYPE_MADE}
        new_class = type(f"Parametrized{new_class.__name__}", (new_class,), members)
    module.__class__ = new_class


_INSTANCE_FORWARD = "its forward is replaced on the instance (by a hook or wrapper library): a new class would not "


def patch(model: nn.Module, *, backend: str = "auto") -> PatchReport:
    """Converts every torch.nn MultiheadAttention and Transformer module inside `model` (the model itself
    included) into the tfm_kernels.nn module of the same name, in place.

    Args:
        model: any nn.Module. Its modules keep their Parameters (shared, not copied), buffers, device, dtype,
            training mode, hooks and parametrizations; the state_dict is unchanged.
        backend: the attention / MLP backend of the converted modules ("auto", "cuda", "triton", "cpu",
            "torch"); modules that are ours already keep theirs.

    Returns:
        A PatchReport naming each converted module by its qualified name, and each skipped one (a subclass
        of a torch class, not of ours, or a module whose forward is replaced on the instance) with the reason.
        Modules of our classes and their subclasses run our kernels already and are in neither list.
    """
    _check_model(model)
    check_backend(backend)
    report = PatchReport()
    for name, module in model.named_modules():
        cls = _own_class(module)
        if cls in FUSED_CLASSES:
            if "forward" in vars(module):
                report.skipped.append((name, _INSTANCE_FORWARD + "run the kernels"))
                continue
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
    in place (Parameters, hooks, parametrizations and mode kept). Returns a PatchReport of the converted
    modules, and of those left as they are: subclasses of ours, and modules whose forward is replaced on the
    instance."""
    _check_model(model)
    report = PatchReport()
    for name, module in model.named_modules():
        cls = _own_class(module)
        if cls in TORCH_CLASSES:
            if "forward" in vars(module):
                report.skipped.append((name, _INSTANCE_FORWARD + "stop the kernels"))
                continue
            _swap(module, name, TORCH_CLASSES[cls], report)
            module.__dict__.pop("backend", None)
        elif isinstance(module, tuple(TORCH_CLASSES)):
            base = next(c for c in TORCH_CLASSES if isinstance(module, c))
            report.skipped.append((name, f"{_class_name(cls)} subclasses {_class_name(base)}; left as it is"))
    return report
