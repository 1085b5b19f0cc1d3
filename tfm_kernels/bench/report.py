"""Benchmark output: the Markdown table, the JSON record of a run, and the plots."""

import datetime
import json
import math
import os
import platform
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import torch

RESULTS_FOLDER = Path("benchmarks") / "results"
PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the folder holding tfm_kernels/: a checkout's top level


def default_record() -> str:
    """Where a run's record goes by default: benchmarks/results/bench.jsonl of the package's checkout, or
    nowhere ("") for an installed package, whose runs would otherwise write into whatever folder they start in."""
    if not (PACKAGE_PARENT / "benchmarks" / "RESULTS.md").is_file():
        return ""
    return str(PACKAGE_PARENT / RESULTS_FOLDER / "bench.jsonl")


def _git(*args) -> str | None:
    """The output of `git args` run in PACKAGE_PARENT, or None if git is missing or fails."""
    try:
        result = subprocess.run(["git", "--no-optional-locks", *args], cwd=PACKAGE_PARENT, capture_output=True,
                                text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _commit() -> str:
    """The commit of the package's own checkout, with "-dirty" when tracked files other than the recorded
    results (benchmarks/results/, which every run appends to) have changes; "unknown" when git is missing or the
    package is not at the top level of a checkout (an install inside another project's checkout: git would find
    that project's commit)."""
    if shutil.which("git") is None:
        return "unknown"
    top_and_head = (_git("rev-parse", "--show-toplevel", "HEAD") or "").splitlines()
    if len(top_and_head) != 2 or Path(top_and_head[0]).resolve() != PACKAGE_PARENT:
        return "unknown"
    changes = _git("status", "--porcelain", "--untracked-files=no", "--", ".", f":(exclude){RESULTS_FOLDER}")
    return top_and_head[1] + ("-dirty" if changes else "")


def environment(device) -> dict:
    """Card, software versions, commit and date: what a result needs to be comparable."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from .. import __version__, build_info

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "tfm_kernels": __version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "build": build_info(),
        "device_type": device.type,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            card=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        env.update(
            card=f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            threads=torch.get_num_threads(),
        )
    return env


def _format_value(row) -> str:
    if row["status"] != "ok":
        return row["status"]
    if row["unit"] == "tokens/s":
        return f"{row['value'] / 1e3:,.1f}k"
    return f"{row['value']:.3g}" if row["value"] < 10 else f"{row['value']:.1f}"


# The fields of a row that the table and the plots read (suite._empty_row writes them all; host_ms and tiles are
# optional: older records lack them).
ROW_FIELDS = ("suite", "config", "shape", "mode", "provider", "ours", "unit", "status", "reason", "median_ms",
              "p20_ms", "p80_ms", "value", "peak_mib", "ratio")


def markdown_table(rows: list[dict]) -> str:
    """One Markdown table per suite: config, mode, provider (ours in bold), throughput, ms (median [p20,
    p80]), host ms (the CPU's time to issue one call, on CUDA; at or above the median the call is CPU-bound),
    peak MiB, ratio to the best peer on the same case, and a note: why a provider has no number, or the tile
    configs our Triton kernels ran."""
    by_suite = defaultdict(list)
    for row in rows:
        by_suite[row["suite"]].append(row)
    blocks = []
    for suite, suite_rows in by_suite.items():
        unit = suite_rows[0]["unit"]
        columns = ["config", "mode", "provider", unit, "ms median [p20, p80]", "host ms", "peak MiB",
                   "vs best peer", "note"]
        header = "| " + " | ".join(columns) + " |"
        lines = [f"### {suite}", "", header,
                 "|---|---|---|---:|---:|---:|---:|---:|---|"]
        for row in suite_rows:
            ok = row["status"] == "ok"
            ms = f"{row['median_ms']:.3f} [{row['p20_ms']:.3f}, {row['p80_ms']:.3f}]" if ok else ""
            host = f"{row['host_ms']:.3f}" if row.get("host_ms") is not None else "-"  # older records lack it
            peak = f"{row['peak_mib']:.0f}" if row["peak_mib"] is not None else "-"
            ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-"
            provider = f"**{row['provider']}**" if row["ours"] else row["provider"]
            note = (row["reason"] or row.get("tiles", "")).replace("|", "/")  # older records lack tiles
            cells = [row["config"], row["mode"], provider, _format_value(row), ms, host, peak, ratio, note]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [""] + ratio_summary(suite_rows)
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def ratio_summary(rows: list[dict]) -> list[str]:
    """One line per provider of ours: geometric mean, min and max of its ratio to the best peer, per mode."""
    ratios = defaultdict(list)
    for row in rows:
        if row["ours"] and row["ratio"] is not None:
            ratios[(row["provider"], row["mode"])].append(row["ratio"])
    lines = []
    for (provider, mode), values in ratios.items():
        geomean = math.exp(sum(math.log(v) for v in values) / len(values))
        lines.append(f"- {provider} {mode}: {geomean:.2f}x the best peer (geometric mean of {len(values)} "
                     f"cases; min {min(values):.2f}x, max {max(values):.2f}x)")
    return lines


def append_record(path, env: dict, rows: list[dict], checks=None) -> Path:
    """Appends one JSON line {environment, rows, checks} to `path` (JSON Lines: one run per line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**env, "rows": [{k: v for k, v in r.items() if k != "traceback"} for r in rows]}
    if checks is not None:
        record["checks"] = [vars(c) for c in checks]
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    return path


def matplotlib_missing() -> str | None:
    """Why plots cannot be drawn here, or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return (
            "--plot needs matplotlib, which is not installed (pip install matplotlib, or tfm_kernels[plot])"
        )
    return None


def plot_attention(rows: list[dict], directory, card: str) -> list[Path]:
    """One PNG per (head dim, causal, mode): TFLOP/s against sequence length, one line per provider (rows
    without dropout; the dropout rows are a single training shape, shown in the table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = defaultdict(lambda: defaultdict(list))  # (head_dim, causal, mode) -> provider -> [(seq, value)]
    tokens = defaultdict(set)  # (head_dim, causal, mode) -> {batch * seq}
    for row in rows:
        if row["suite"] == "attention" and row["status"] == "ok" and not row["shape"].get("dropout"):
            shape = row["shape"]
            panel = (shape["head_dim"], shape["causal"], row["mode"])
            panels[panel][row["provider"]].append((shape["seq"], row["value"]))
            tokens[panel].add(shape.get("batch", 1) * shape["seq"])
    directory = Path(directory)
    if panels:  # no empty folder when there is nothing to draw
        directory.mkdir(parents=True, exist_ok=True)
    written = []
    for (head_dim, causal, mode), providers in sorted(panels.items()):
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for provider, points in sorted(providers.items()):
            points.sort()
            axes.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="o",
                linewidth=2.5 if provider.startswith("ours") else 1.5,
                label=provider,
            )
        axes.set_xscale("log", base=2)
        seqs = sorted({seq for points in providers.values() for seq, _ in points})
        axes.set_xticks(seqs, [str(s) for s in seqs])
        batch_tokens = tokens[(head_dim, causal, mode)]
        fixed = f" (B*S = {batch_tokens.pop()} tokens)" if len(batch_tokens) == 1 else ""
        axes.set_xlabel(f"sequence length{fixed}")
        axes.set_ylabel("TFLOP/s")
        kind = "causal" if causal else "full"
        axes.set_title(f"attention {mode}, d{head_dim}, {kind} ({card})")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8)
        path = directory / f"attention_d{head_dim}_{kind}_{mode.replace('+', '_')}.png"
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    return written
