"""The benchmark suite: `python -m tfm_kernels bench` (cli.main), the shared timing helper (timing), named
shape configs (configs), cases per topic (attention, mlp, model), the CPU self-check (selfcheck) and the
report (report)."""

from .cli import main

__all__ = ["main"]
