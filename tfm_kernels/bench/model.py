"""Whole-model cases, in tokens/s: a TransformerEncoder of our layers against torch's nn layers, and the
language model of tfm_kernels.models against its torch-layer baseline (tfm_kernels.models.baseline), each
eager and under torch.compile."""

import torch
import torch.nn.functional as F

from . import configs
from .suite import Case, Provider, Unavailable, raise_recompile_limit, timed_step
from .timing import random_inputs

COMPILE_RECOMPILE_LIMIT = 16  # eager/compiled x ours/torch x grad modes of one module class


def _maybe_compiled(model, compiled):
    if not compiled:
        return model
    raise_recompile_limit(COMPILE_RECOMPILE_LIMIT)
    return torch.compile(model)


def _encoder(layers_module, shape: configs.EncoderShape, device):
    layer = layers_module.TransformerEncoderLayer(
        shape.d_model,
        shape.heads,
        shape.d_ff,
        dropout=0.0,
        activation="gelu",
        batch_first=True,
        device=device,
        dtype=shape.dtype,
    )
    return layers_module.TransformerEncoder(layer, shape.layers, enable_nested_tensor=False)


def encoder(shape: configs.EncoderShape, mode, device, which, compiled) -> Provider:
    def prepare():
        if which == "ours":
            try:
                from .. import nn as layers_module
            except ImportError as error:
                raise Unavailable(f"tfm_kernels.nn is not available ({error})") from None
        else:
            layers_module = torch.nn
        model = _encoder(layers_module, shape, device).train(mode != "fwd")
        run = _maybe_compiled(model, compiled)

        make = random_inputs((shape.batch, shape.seq, shape.d_model), dtype=shape.dtype, device=device)
        return timed_step(run, make, mode, device, params=list(model.parameters()))  # x: (B, S, d_model)

    owner = "ours tfm_kernels.nn" if which == "ours" else "torch nn"
    return Provider(f"{owner}{' compiled' if compiled else ''}", which == "ours", prepare, compiles=compiled)


def _language_models(preset: str):
    """(config, our model class, baseline model class) from tfm_kernels.models, or Unavailable saying what is
    missing. Contract: LMConfig.preset(name) is the config; TransformerLM(config) and the torch-layer
    baseline.TorchLM(config) (the same model from torch's nn layers) map token ids (B, S) int64 to logits
    (B, S, vocab)."""
    try:
        from ..models import LMConfig, TransformerLM
    except ImportError as error:
        raise Unavailable(f"tfm_kernels.models is not available ({error})") from None
    try:
        from ..models import baseline
    except ImportError as error:
        raise Unavailable(f"tfm_kernels.models.baseline is not available ({error})") from None
    if preset not in LMConfig.PRESETS:
        raise Unavailable(f"LMConfig has no preset {preset!r}; presets: {sorted(LMConfig.PRESETS)}")
    return LMConfig.preset(preset), TransformerLM, baseline.TorchLM


def language_model(preset, batch, seq, mode, device, which, compiled, dtype) -> Provider:
    def prepare():
        config, ours_class, baseline_class = _language_models(preset)
        model_class = ours_class if which == "ours" else baseline_class
        model = model_class(config).to(device=device, dtype=dtype).train(mode != "fwd")
        run = _maybe_compiled(model, compiled)
        vocab = config.vocab_size

        def loss(tokens, targets):
            logits = run(tokens)  # (B, S, vocab)
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

        def make(_requires_grad):
            tokens = torch.randint(0, vocab, (batch, seq + 1), device=device)
            return tokens[:, :-1], tokens[:, 1:]  # inputs and next-token targets, (B, S) each

        return timed_step(loss, make, mode, device, params=list(model.parameters()))

    owner = "ours tfm_kernels.models" if which == "ours" else "torch-layer baseline"
    return Provider(f"{owner}{' compiled' if compiled else ''}", which == "ours", prepare, compiles=compiled)


def _lm_sequence(preset, longest):
    """The language-model case's sequence length: `longest`, or the preset's context length where shorter."""
    try:
        from ..models import LMConfig
    except ImportError:
        return longest  # the case's providers say why they cannot run
    return min(longest, LMConfig.PRESETS.get(preset, {}).get("context_length", longest))


def model_cases(
    encoder_shapes,
    modes,
    device,
    lm_presets=(),
    lm_batch=8,
    lm_seq=1024,
    dtype=torch.bfloat16,
    with_compile=True,
) -> list[Case]:
    """Encoder cases for `encoder_shapes` and language-model cases for `lm_presets` at (lm_batch, lm_seq), or at a
    preset's context length where it is shorter than lm_seq."""
    device = torch.device(device)
    compile_options = (False, True) if with_compile else (False,)
    cases = []
    for shape in encoder_shapes:
        for mode in modes:
            providers = [
                encoder(shape, mode, device, which, c) for which in ("ours", "torch") for c in compile_options
            ]
            cases.append(
                Case(
                    "model", shape.label, shape.as_dict(), mode, shape.tokens(), "tokens/s", device, providers
                )
            )
    for preset in lm_presets:
        seq = _lm_sequence(preset, lm_seq)
        for mode in modes:
            providers = [
                language_model(preset, lm_batch, seq, mode, device, which, c, dtype)
                for which in ("ours", "torch")
                for c in compile_options
            ]
            shape = {
                "preset": preset,
                "batch": lm_batch,
                "seq": seq,
                "dtype": str(dtype).removeprefix("torch."),
            }
            cases.append(
                Case(
                    "model",
                    f"lm {preset} b{lm_batch} s{seq}",
                    shape,
                    mode,
                    lm_batch * seq,
                    "tokens/s",
                    device,
                    providers,
                )
            )
    return cases
