"""`python -m tfm_kernels bench`: the benchmark tables against PyTorch.

With a GPU: the attention and MLP tables against torch's kernels, with ratios to the best peer, within a
time budget (--budget; compiled peers are measured last) (--full adds the sequence sweep, FlexAttention
everywhere, torch's math backend, nn.MultiheadAttention and whole models, with no budget).
Without one: a correctness self-check of every operator that can run here, then a CPU timing table against
torch's CPU implementations. The Markdown table goes to stdout, last; progress to stderr; a JSON record of
the run is appended to --json (default benchmarks/results/bench.jsonl of the package's checkout; none for an
installed package)."""

import argparse
import json
import math
import os
import re
import signal
import sys
import time
from pathlib import Path

import torch

from . import configs, report
from .attention import attention_cases, mha_cases
from .interpreter import use_triton_interpreter_without_gpu
from .mlp import mlp_cases
from .model import model_cases
from .selfcheck import self_check
from .suite import NOT_RUN, run_cases

SUITES = ("attention", "mlp", "mha", "model")
DEFAULT_LM_PRESET = "gpt2-small"  # the model suite's language model on a GPU
# The default GPU run stays under 3 minutes: measurements start within this budget (a compile begun near its
# end may run on for tens of seconds); what is left shows as "not run" rows.
GPU_BUDGET_S = 140.0


PROG = "python -m tfm_kernels bench"


class BadInput(SystemExit):
    """Input found wrong after the arguments were parsed (a shape name, a record): main prints it as argparse
    prints its errors, `prog: error: message`, and the process exits with argparse's status 2."""

    def __init__(self, message):
        super().__init__(2)
        self.message = message

    def __str__(self):
        return self.message


class Progress:
    """A one-line progress bar on stderr: redrawn in place on a terminal, one line per step in a log."""

    WIDTH = 24

    def __init__(self, stream=None):
        self.stream = sys.stderr if stream is None else stream
        self.in_place = self.stream.isatty()

    def __call__(self, done, total, text):
        filled = self.WIDTH * done // max(total, 1)
        line = f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{total} {text}"
        if self.in_place:
            self.stream.write("\r\033[K" + line + ("\n" if done == total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true", help="fewer shapes and shorter timing (CI, a first look)"
    )
    size.add_argument(
        "--full",
        action="store_true",
        help="GPU: the whole sweep (s512..s16384, FlexAttention everywhere, math, MHA and models)",
    )
    parser.add_argument(
        "--suite",
        default=None,
        help=f"comma-separated subset of {','.join(SUITES)} (default: attention,mlp; --full: all)",
    )
    parser.add_argument(
        "--mlp-shapes",
        default=None,
        help="comma-separated MLP model names from tfm_kernels.bench.configs (default: all; with --quick on a GPU: "
        f"{configs.HEADLINE_MLP})",
    )
    parser.add_argument(
        "--lm-presets",
        default=None,
        help=f"tfm_kernels.models presets for the model suite's language-model rows, timed on a GPU only "
        f"(comma-separated; default {DEFAULT_LM_PRESET})",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="cpu: the CPU self-check and table even where a GPU exists",
    )
    parser.add_argument("--self-check", action="store_true", help="run the self-check on the GPU too")
    parser.add_argument(
        "--json",
        "--out",
        dest="json",
        default=report.default_record(),
        help="append the run's JSON record to this file (JSON Lines); '' for none (default: "
        "benchmarks/results/bench.jsonl of the package's checkout; none for an installed package)",
    )
    parser.add_argument(
        "--plot", default=None, metavar="DIR", help="write attention PNG plots here (matplotlib)"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"start no measurement after this long; compiled peers run last (default: {GPU_BUDGET_S:.0f} "
        "on a GPU without --full, else none; 0: none)",
    )
    parser.add_argument(
        "--replay",
        default=None,
        metavar="RECORD",
        help="measure nothing: print the table (and --plot) of a run in a JSON Lines record, e.g. one brought "
        "back from a GPU machine without matplotlib",
    )
    parser.add_argument(
        "--run",
        type=int,
        default=None,
        metavar="N",
        help="with --replay: which run of the record, counted from 0 (default -1: the last; -2 the one before)",
    )
    args = parser.parse_args(argv)
    if args.budget is not None and not 0 <= args.budget < math.inf:
        parser.error(f"--budget: expected seconds >= 0 (0: none); got {args.budget}")
    if args.replay == "":
        parser.error("--replay: expected the path of a JSON Lines record; got ''")
    if args.run is not None and not args.replay:
        parser.error("--run picks a run of a --replay record; got no --replay")
    if args.suite is not None:
        args.suite = tuple(name.strip() for name in args.suite.split(",") if name.strip())
        unknown = sorted(set(args.suite) - set(SUITES))
        if unknown or not args.suite:
            parser.error(f"--suite: expected names among {list(SUITES)}; got {unknown or 'none'}")
    if args.mlp_shapes is not None and args.suite is not None and "mlp" not in args.suite:
        parser.error(f"--mlp-shapes picks the shapes of the mlp suite, which --suite {','.join(args.suite)} leaves out")
    if args.plot and report.matplotlib_missing():
        parser.error(report.matplotlib_missing())
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to torch")
    # The outputs are checked before a run that may take minutes; their folders are made only when written.
    record = Path(args.json) if args.json and not args.replay else None
    for flag, folder in (("--json", record.parent if record else None),
                         ("--plot", Path(args.plot) if args.plot else None)):
        if folder is not None and not _can_write_in(folder):
            parser.error(f"{flag}: cannot write in {str(folder)!r}")
    if record and record.is_dir():
        parser.error(f"--json: expected a file to append the record to; got the directory {args.json!r}")
    if record and record.exists() and not os.access(record, os.W_OK):
        parser.error(f"--json: expected a file that can be appended to; {args.json!r} is not writable")
    return args


def _can_write_in(folder: Path) -> bool:
    """Whether files can be written in `folder` once it is made: it, or else its nearest existing ancestor
    (where the missing folders would be made), is a writable directory."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    return existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)


def _pick_mlp_shapes(shapes, names):
    if names is None:
        return shapes
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {s.model: s for s in shapes}
    missing = [n for n in wanted if n not in known]
    if missing or not wanted:
        raise BadInput(f"--mlp-shapes: unknown {missing or 'none'}; known: {sorted(known)}")
    return [known[n] for n in wanted]


def gpu_cases(args, suites, device):
    seq_lens = configs.SWEEP_SEQ_LENS if args.full else configs.CORE_SEQ_LENS
    models = configs.ATTENTION_MODELS
    if args.quick:
        seq_lens, models = (4096,), (configs.LLAMA_D128,)
    attention_modes = ("fwd", "bwd", "fwd+bwd") if args.full else ("fwd", "bwd")
    mlp_modes = ("fwd", "bwd", "fwd+bwd") if args.full else ("fwd", "fwd+bwd")
    mlp_names = configs.HEADLINE_MLP if args.quick and args.mlp_shapes is None else args.mlp_shapes
    cases = []
    if "attention" in suites:
        training = [] if args.quick else configs.TRAINING_ATTENTION_SHAPES
        cases += attention_cases(
            configs.attention_shapes(seq_lens, models) + training,
            attention_modes,
            device,
            with_flex="all" if args.full else "none" if args.quick else "headline",
            with_math=args.full,
        )
    if "mlp" in suites:
        cases += mlp_cases(_pick_mlp_shapes(configs.MLP_SHAPES, mlp_names), mlp_modes, device)
    if "mha" in suites:
        cases += mha_cases(configs.MHA_SHAPES, ("fwd", "fwd+bwd"), device)
    if "model" in suites:
        cases += model_cases(
            configs.ENCODER_SHAPES,
            ("fwd+bwd",),
            device,
            lm_presets=[p for p in (args.lm_presets or DEFAULT_LM_PRESET).split(",") if p],
        )
    return cases


def cpu_cases(args, suites, device):
    if args.lm_presets is not None:
        raise BadInput("--lm-presets: the language-model rows are timed on a GPU only; the CPU model table times "
                         "an encoder")
    attention_shapes = configs.CPU_QUICK_ATTENTION_SHAPES if args.quick else configs.CPU_ATTENTION_SHAPES
    mlp_shapes = configs.CPU_QUICK_MLP_SHAPES if args.quick else configs.CPU_MLP_SHAPES
    modes = ("fwd", "fwd+bwd")
    cases = []
    if "attention" in suites:
        cases += attention_cases(attention_shapes, modes, device, with_flex="none", with_math=True)
    if "mlp" in suites:
        cases += mlp_cases(_pick_mlp_shapes(mlp_shapes, args.mlp_shapes), modes, device, with_compile=False)
    if "mha" in suites:
        cases += mha_cases(configs.CPU_MHA_SHAPES, modes, device)
    if "model" in suites:
        cases += model_cases(configs.CPU_ENCODER_SHAPES, ("fwd+bwd",), device, with_compile=False)
    return cases


def print_checks(checks, stream=None):
    stream = sys.stdout if stream is None else stream
    print(
        "## Self-check: each operator against a float64 oracle; it passes if its error <= 2x torch's error "
        "in the same dtype (+ rounding noise)\n",
        file=stream,
    )
    for c in checks:
        print(f"{c.status:>4}  {c.op} [{c.backend}] {c.case}: {c.detail}", file=stream)
    passed = sum(c.status == "pass" for c in checks)
    failed = sum(c.status == "FAIL" for c in checks)
    print(
        f"\n{passed} passed, {failed} failed, {len(checks) - passed - failed} not available here", file=stream
    )
    if passed == 0 and failed == 0:
        print("ERROR: no operator could be checked here (see the reasons above)", file=stream)


RECORD_FIELDS = ("device_type", "card", "torch", "triton", "commit", "date", "rows")  # what --replay reads


def _title(env, seconds=None) -> str:
    kind = "GPU timing" if env["device_type"] == "cuda" else "CPU timing (this machine; not a GPU result)"
    took = f" ({seconds:.0f} s)" if seconds is not None else ""
    return (
        f"## {kind}: {env['card']}, torch {env['torch']}, triton {env['triton']}, "
        f"commit {env['commit'][:12]}{'-dirty' if env['commit'].endswith('-dirty') else ''}, {env['date']}{took}"
    )


def _load_run(record_path, index, plots) -> dict:
    """Run `index` (Python indexing) of the JSON Lines record at record_path, with every field the table (and
    the plots, where `plots`) read; a clear error naming --replay, the file, the line and what is wrong
    otherwise."""
    try:
        lines = [(number, line) for number, line in enumerate(Path(record_path).read_text().splitlines(), 1)
                 if line.strip()]
    except OSError as error:
        raise BadInput(f"--replay: cannot read {record_path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise BadInput(f"--replay: {record_path} is not a JSON Lines record (not UTF-8 text: {error})") from None
    if not -len(lines) <= index < len(lines):
        raise BadInput(f"--run {index}: {record_path} holds {len(lines)} run(s)")
    number, line = lines[index]
    where = f"--replay: {record_path} line {number} (run {index})"
    try:
        run = json.loads(line)
    except json.JSONDecodeError as error:
        raise BadInput(f"{where}: expected a JSON record of a run; got invalid JSON ({error})") from None
    if not isinstance(run, dict) or not isinstance(run.get("rows", []), list):
        raise BadInput(f"{where}: expected a JSON object with a list of rows; got {line[:80]!r}")
    missing = [field for field in RECORD_FIELDS if field not in run]
    missing += [f"rows[{i}].{field}" for i, row in enumerate(run.get("rows", []))
                for field in report.ROW_FIELDS if not isinstance(row, dict) or field not in row]
    if missing:
        raise BadInput(f"{where}: the record lacks {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    wrong = [f"{field} (expected text; got {run[field]!r})" for field in RECORD_FIELDS
             if field != "rows" and not isinstance(run[field], str)]
    wrong += [f"rows[{i}].{problem}" for i, row in enumerate(run["rows"]) for problem in _row_type_problems(row)]
    if plots and not wrong:
        wrong = [f"rows[{i}].{problem}" for i, row in enumerate(run["rows"]) for problem in _plot_problems(row)]
    if wrong:
        raise BadInput(f"{where}: the record has {', '.join(wrong[:8])}{' ...' if len(wrong) > 8 else ''}")
    return run


_ROW_TEXT_FIELDS = ("suite", "config", "mode", "provider", "unit", "status", "reason")
_ROW_NUMBER_FIELDS = ("median_ms", "p20_ms", "p80_ms", "value", "peak_mib", "ratio", "host_ms")  # or None
_ROW_OK_NUMBER_FIELDS = ("median_ms", "p20_ms", "p80_ms", "value")  # what an "ok" row's table cells print
_ATTENTION_PLOT_KEYS = {"head_dim", "causal", "seq"}  # what the plots read of an ok attention row's shape


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _plot_problems(row) -> list[str]:
    """What the plots cannot read of a replayed row (its type problems aside): an ok attention row without dropout
    is a point at shape.seq (a number > 0: the axis is logarithmic) of the panel (shape.head_dim an int,
    shape.causal a bool, mode a name that becomes part of the file name)."""
    shape = row["shape"]
    if row["suite"] != "attention" or row["status"] != "ok" or not isinstance(shape, dict) or shape.get("dropout"):
        return []
    if not _ATTENTION_PLOT_KEYS <= shape.keys():
        return [f"shape (expected {', '.join(sorted(_ATTENTION_PLOT_KEYS))} in an ok attention row; got {shape!r})"]
    problems = []
    if not isinstance(shape["head_dim"], int) or isinstance(shape["head_dim"], bool):
        problems.append(f"shape.head_dim (expected an int; got {shape['head_dim']!r})")
    if not isinstance(shape["causal"], bool):
        problems.append(f"shape.causal (expected true or false; got {shape['causal']!r})")
    if not (_is_number(shape["seq"]) and shape["seq"] > 0):
        problems.append(f"shape.seq (expected a number > 0; got {shape['seq']!r})")
    if not _is_number(shape.get("batch", 1)):
        problems.append(f"shape.batch (expected a number; got {shape['batch']!r})")
    if not re.fullmatch(r"[\w+]+", row["mode"]):
        problems.append(f"mode (expected a name such as fwd or fwd+bwd; got {row['mode']!r})")
    return problems


def _row_type_problems(row) -> list[str]:
    """What in a replayed row the table and plots cannot print: "field (expected ...; got ...)" each."""

    problems = [f"{field} (expected text; got {row[field]!r})" for field in _ROW_TEXT_FIELDS
                if not isinstance(row[field], str)]
    if not isinstance(row["ours"], bool):
        problems.append(f"ours (expected true or false; got {row['ours']!r})")
    if not isinstance(row["shape"], dict):
        problems.append(f"shape (expected an object; got {row['shape']!r})")
    problems += [f"{field} (expected a number or null; got {row[field]!r})" for field in _ROW_NUMBER_FIELDS
                 if row.get(field) is not None and not _is_number(row[field])]
    if not isinstance(row.get("tiles", ""), str):  # older records lack it
        problems.append(f"tiles (expected text; got {row['tiles']!r})")
    if row["status"] == "ok":
        problems += [f"{field} (expected a number in an ok row; got {row[field]!r})" for field in _ROW_OK_NUMBER_FIELDS
                     if not _is_number(row[field])]
    if _is_number(row["ratio"]) and not row["ratio"] > 0:  # the summary takes its logarithm
        problems.append(f"ratio (expected a number > 0 or null; got {row['ratio']!r})")
    return problems


def _save_record(path, env, rows, checks) -> bool:
    """Appends the run's record to `path`; False, with a one-line error, if it cannot be written."""
    try:
        written = report.append_record(path, env, rows, checks)
    except OSError as error:
        print(f"--json: cannot append the record to {path}: {error.strerror}", file=sys.stderr)
        return False
    print(f"record appended to {written}", file=sys.stderr)
    return True


def _plot(rows, plot_dir, card, source) -> bool:
    """Draws the attention plots of `rows` (those of `source`, named when there are none) into plot_dir; False,
    with a one-line error, if they cannot be written."""
    try:
        paths = report.plot_attention(rows, plot_dir, card)
    except OSError as error:
        print(f"--plot: cannot write in {plot_dir}: {error.strerror}", file=sys.stderr)
        return False
    for path in paths:
        print(f"plot written to {path}", file=sys.stderr)
    if not paths:
        print(f"--plot: {source} has no attention rows to plot; nothing written to {plot_dir}", file=sys.stderr)
    return True


def replay(record_path, index, plot_dir) -> int:
    """Prints the table of run `index` (Python indexing) recorded in record_path and draws its plots into
    plot_dir. Returns 1 if the plots could not be written, else 0."""
    run = _load_run(record_path, index, plots=bool(plot_dir))
    print(_title(run) + "\n")
    print(report.markdown_table(run["rows"]))
    plotted = not plot_dir or _plot(run["rows"], plot_dir, run["card"], f"run {index} of {record_path}")
    return 0 if plotted else 1


def main(argv=None) -> int:
    """Runs the benchmark (and, without a GPU, the self-check). Returns 1 if a check failed, the self-check
    could check no operator, one of our providers raised an error, the run stopped early or its record or plots
    could not be written, else 0."""
    try:
        return _main(parse_args(sys.argv[1:] if argv is None else argv))
    except BadInput as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        raise


def _main(args) -> int:
    if args.replay:
        return replay(args.replay, -1 if args.run is None else args.run, args.plot)
    on_gpu = args.device != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    use_triton_interpreter_without_gpu()  # so that the self-check runs the Triton kernels on CPU tensors
    suites = args.suite or (SUITES if args.full else ("attention", "mlp"))
    started = time.perf_counter()
    torch.manual_seed(0)
    cases = gpu_cases(args, suites, device) if on_gpu else cpu_cases(args, suites, device)  # names checked first

    # SIGTERM (`timeout`) as Ctrl-C: during the self-check it ends the command with "interrupted"; during the
    # timing it stops the run, and the table of what was measured still prints
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        checks = None
        if not on_gpu or args.self_check:
            checks = self_check(device, torch.float16 if on_gpu else torch.float32)
            print_checks(checks)
            print()
        warmup_ms, rep_ms = (10.0, 40.0) if args.quick else (25.0, 100.0)
        budget = args.budget if args.budget is not None else GPU_BUDGET_S if on_gpu and not args.full else 0.0
        rows = run_cases(cases, Progress(), warmup_ms, rep_ms, budget)
    finally:
        signal.signal(signal.SIGTERM, previous)
    stopped = any(r["reason"] == NOT_RUN for r in rows)
    env = report.environment(device)
    for row in rows:
        if row["status"] == "error":
            print(
                f"error in {row['provider']} on {row['config']} {row['mode']}:\n{row['traceback']}",
                file=sys.stderr,
            )

    stop_note = "\nSTOPPED before the end: see the rows marked not run.\n" if stopped else ""
    print(_title(env, time.perf_counter() - started) + "\n" + stop_note)
    print(report.markdown_table(rows))
    sys.stdout.flush()  # the table is out before the files are written: a failed write cannot lose it
    saved = not args.json or _save_record(args.json, env, rows, checks)
    plotted = not args.plot or _plot(rows, args.plot, env["card"], "this run")
    checked_nothing = checks is not None and not any(c.status == "pass" for c in checks)
    failed = checked_nothing or any(c.status == "FAIL" for c in checks or ()) or any(
        r["status"] == "error" for r in rows
    )
    return 1 if failed or stopped or not saved or not plotted else 0
