"""Cases, providers and the loop that measures them into table rows.

A Case is one problem (a named shape and a mode); its providers are the implementations timed on it, ours and
the peers, in the same run. A provider that cannot run here raises `Unavailable(reason)` from `prepare` and
becomes an "n/a (reason)" row: nothing is silently dropped. An unexpected exception in one of our providers
becomes an "error" row (and a non-zero exit of the CLI); a peer's exception is its unavailability.

Whether a provider can run here and whether its time means anything here are separate questions: one that
runs but whose speed means nothing (Triton's CPU interpreter) says why in `untimed`. The table gives it an
"n/a" row with that reason without building it; the pytest-benchmark cases still run its step, so CPU CI
catches a step that fails.
"""

import gc
import importlib
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .. import backends
from . import timing

MODES = ("fwd", "bwd", "fwd+bwd")


class Unavailable(Exception):
    """A provider cannot run on this machine, torch build or shape; the message says why."""


INTERPRETED = "the Triton interpreter on CPU checks correctness; its speed means nothing"


def untimed_reason(backend: str, device: torch.device) -> str:
    """Why our `backend`'s time on `device` means nothing ("" where it means something): Triton kernels on
    CPU tensors run in the interpreter, a Python emulation thousands of times slower than any kernel."""
    return INTERPRETED if backend == "triton" and device.type == "cpu" else ""


@dataclass
class Provider:
    """name: shown in the table; ours: our implementation (else a peer); prepare(): builds inputs and returns
    the zero-argument callable that is timed, or raises Unavailable; compiles: its first call runs
    torch.compile (tens of seconds), so a time-budgeted run measures it after everything else; untimed: why
    its time means nothing here although it runs ("" when it is timed); triton_module: where given, the
    tfm_kernels.triton module (e.g. "attention") whose TUNED_KERNELS it launches: its row then names the
    configs they ran (its "tiles")."""

    name: str
    ours: bool
    prepare: Callable[[], Callable[[], Any]]
    compiles: bool = False
    untimed: str = ""
    triton_module: str = ""


@dataclass
class Case:
    """One problem. work: FLOPs per call (unit "TFLOP/s") or tokens per call (unit "tokens/s")."""

    suite: str
    config: str
    shape: dict
    mode: str
    work: float
    unit: str
    device: torch.device
    providers: list[Provider] = field(default_factory=list)

    @classmethod
    def of_shape(cls, suite: str, shape, mode: str, device, providers) -> "Case":
        """A TFLOP/s case for a configs shape (its label, as_dict() and flops(mode))."""
        return cls(suite, shape.label, shape.as_dict(), mode, shape.flops(mode), "TFLOP/s", device, providers)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:160]


def throughput(work: float, unit: str, milliseconds: float) -> float:
    """TFLOP/s or tokens/s of `work` done in `milliseconds`."""
    per_second = work / (milliseconds * 1e-3)
    return per_second / 1e12 if unit == "TFLOP/s" else per_second


NOT_RUN = "not run: the benchmark was stopped (time limit or interrupt) before this case"
OVER_BUDGET = "not run: the run's time budget was spent (--budget 0 lifts it)"


def _empty_row(case: Case, provider: Provider) -> dict:
    return {
        "suite": case.suite,
        "config": case.config,
        "shape": case.shape,
        "mode": case.mode,
        "provider": provider.name,
        "ours": provider.ours,
        "unit": case.unit,
        "status": "ok",
        "reason": "",
        "median_ms": None,
        "p20_ms": None,
        "p80_ms": None,
        "value": None,
        "peak_mib": None,
        "host_ms": None,
        "ratio": None,
        "tiles": "",
    }


def _tuned_kernels(triton_module: str) -> dict:
    """TUNED_KERNELS of tfm_kernels.triton.<triton_module>; {} for "" and where Triton is not installed (the
    provider then says so itself). Imported only where a provider of our Triton kernels is measured, so that
    nothing else imports Triton."""
    if not triton_module or not backends.triton_available():
        return {}
    return importlib.import_module(f"tfm_kernels.triton.{triton_module}").TUNED_KERNELS


def tiles_label(kernels: dict) -> str:
    """"fwd 128x64 w8 s3 tma; dq 128x64 w8 s2": the configs each of `kernels` (short name -> TunedKernel)
    launched since its launches were last forgotten; kernels that launched nothing are left out ("" for no
    kernels, without importing Triton)."""
    if not kernels:
        return ""
    from ..triton.tuning import config_label

    parts = [f"{name} {', '.join(sorted(config_label(c) for c in kernel.launched))}"
             for name, kernel in kernels.items() if kernel.launched]
    return "; ".join(parts)


def measure_provider(case: Case, provider: Provider, warmup_ms: float, rep_ms: float) -> dict:
    """One table row: the provider's timing on the case, or why it has none."""
    row = _empty_row(case, provider)
    if provider.untimed:  # a number would mislead; the pytest cases run its step, the self-check checks it
        return {**row, "status": "n/a", "reason": provider.untimed}
    fn, kernels = None, {}
    try:
        kernels = _tuned_kernels(provider.triton_module)
        for kernel in kernels.values():
            kernel.forget_launches()  # the configs of this provider's calls, not of earlier cases
        fn = provider.prepare()
        result = timing.measure(fn, case.device, warmup_ms, rep_ms)
    except Unavailable as why:
        row.update(status="n/a", reason=str(why))
    except Exception as error:  # noqa: BLE001 - one provider's failure must not end the run
        # Our providers raise Unavailable for what they do not support; any other failure of ours is an error,
        # unless it names a missing environment. A peer that cannot run is n/a.
        reason = _first_line(error)
        missing = isinstance(error, NotImplementedError) and backends.missing_environment([reason])
        if provider.ours and not missing:
            row.update(status="error", reason=reason, traceback=traceback.format_exc(limit=6))
        else:
            row.update(status="n/a", reason=reason)
    else:
        row.update(
            median_ms=result.median_ms,
            p20_ms=result.p20_ms,
            p80_ms=result.p80_ms,
            value=throughput(case.work, case.unit, result.median_ms),
            peak_mib=None if result.peak_bytes is None else result.peak_bytes / 2**20,
            host_ms=result.host_ms,
            tiles=tiles_label(kernels),
        )
    del fn
    gc.collect()
    if case.device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def add_ratios(rows: list[dict]) -> list[dict]:
    """ratio = value / the best peer's value on the same case (peers included: the best peer gets 1.0). A case
    with a peer left unmeasured by a budget or a stop gets no ratios: its best peer is unknown."""
    best, unmeasured = {}, set()
    for row in rows:
        key = (row["suite"], row["config"], row["mode"])
        if not row["ours"] and row["reason"] in (OVER_BUDGET, NOT_RUN):
            unmeasured.add(key)
        elif row["status"] == "ok" and not row["ours"]:
            best[key] = max(best.get(key, 0.0), row["value"])
    for row in rows:
        key = (row["suite"], row["config"], row["mode"])
        peer = None if key in unmeasured else best.get(key)
        row["ratio"] = row["value"] / peer if row["status"] == "ok" and peer else None
    return rows


def run_cases(cases: list[Case], progress=None, warmup_ms: float = 25.0, rep_ms: float = 100.0,
              budget_s: float = 0.0) -> list[dict]:
    """Measures every provider of every case; the rows come back in case order.

    progress(done, total, text) is called before each measurement. budget_s > 0 bounds the run: providers
    are measured compile-free first, and those not started within the budget get an "n/a" row saying so.
    A KeyboardInterrupt (Ctrl-C, or SIGTERM where the CLI maps it so) stops the run the same way: the rows
    measured so far are kept and every remaining provider gets a row saying it was not run."""
    pending = [(case, provider) for case in cases for provider in case.providers]
    order = sorted(range(len(pending)), key=lambda i: pending[i][1].compiles)  # stable: case order otherwise
    rows = [None] * len(pending)
    started = time.perf_counter()
    try:
        for done, index in enumerate(order):
            case, provider = pending[index]
            if budget_s > 0 and time.perf_counter() - started > budget_s:
                rows[index] = {**_empty_row(case, provider), "status": "n/a", "reason": OVER_BUDGET}
                continue
            if progress is not None:
                progress(done, len(pending), f"{case.suite} {case.config} {case.mode} {provider.name}")
            rows[index] = measure_provider(case, provider, warmup_ms, rep_ms)
    except KeyboardInterrupt:
        pass
    not_run = {"status": "n/a", "reason": NOT_RUN}
    rows = [row or {**_empty_row(c, p), **not_run} for row, (c, p) in zip(rows, pending)]
    if progress is not None:
        progress(len(pending), len(pending), "done")
    return add_ratios(rows)


def raise_recompile_limit(limit: int) -> None:
    """Lets torch.compile keep `limit` specialisations of one function: a sweep compiles one per shape and
    grad mode, beyond dynamo's default of 8 (recompile_limit from torch 2.6, cache_size_limit before)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))


def _grad_leaves(inputs, params):
    return [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad] + list(params)


def timed_step(
    forward: Callable[..., torch.Tensor], make_inputs: Callable[[bool], tuple], mode: str, device, params=()
) -> Callable[[], Any]:
    """The callable timed for `mode`, over rotating input sets.

    forward(*inputs) -> one tensor; make_inputs(requires_grad) -> a fresh tuple of inputs; params: extra
    leaves (module parameters) whose gradients the backward modes compute too.
      fwd:     forward under no_grad (inference);
      bwd:     torch.autograd.grad of a forward made up front (retain_graph), so only the backward is timed;
      fwd+bwd: forward then autograd.grad, a training step without the optimizer.
    Gradients come from autograd.grad, never accumulated into .grad, so repeated calls do the same work."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    cache = timing.cache_bytes(device)
    if mode == "fwd":

        def infer(*inputs):
            with torch.no_grad():
                return forward(*inputs)

        return timing.rotating(lambda: make_inputs(False), infer, cache)

    def with_grad_output():
        inputs = make_inputs(True)
        with torch.no_grad():
            shape_of_output = forward(*inputs)
        grad_output = timing.randn(
            *shape_of_output.shape, dtype=shape_of_output.dtype, device=shape_of_output.device
        )
        return grad_output, inputs

    if mode == "bwd":

        def make_graph():
            grad_output, inputs = with_grad_output()
            return forward(*inputs), grad_output, inputs

        def backward(output, grad_output, inputs):
            return torch.autograd.grad(output, _grad_leaves(inputs, params), grad_output, retain_graph=True)

        return timing.rotating(make_graph, backward, cache)

    def train_step(grad_output, inputs):
        return torch.autograd.grad(forward(*inputs), _grad_leaves(inputs, params), grad_output)

    return timing.rotating(with_grad_output, train_step, cache)


def labelled_providers(cases: list[Case]) -> list[tuple[str, Provider]]:
    """(id, provider) for every provider of every case, the id naming config, mode and provider without
    spaces (pytest parameter ids)."""
    return [(f"{c.config}-{c.mode}-{p.name}".replace(" ", "_"), p) for c in cases for p in c.providers]
