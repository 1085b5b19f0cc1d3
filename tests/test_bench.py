"""The benchmark suite on CPU: the timing helper against known durations, rotation of input buffers, the
mode steps' gradients, the rows and ratios, the self-check's ability to fail, and `python -m tfm_kernels bench
--quick` end to end (table and JSON record with the expected fields), and the parallel gpu-test runner and
the compute-sanitizer script of benchmarks/device_check.sh."""

import importlib
import importlib.machinery
import importlib.util
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
import triton.language as tl

from tfm_kernels import backends, ops
from tfm_kernels.bench import cli, configs, report, selfcheck, suite, timing

SLEEP_S = 0.005


def test_quantile_interpolates_and_orders():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert timing.quantile(values, 0.5) == 3.0
    assert timing.quantile(values, 0.0) == 1.0 and timing.quantile(values, 1.0) == 5.0
    assert timing.quantile(values, 0.2) == pytest.approx(1.8)  # 0.2 * 4 = 0.8 of the way from 1 to 2
    assert timing.quantile([7.0], 0.8) == 7.0
    with pytest.raises(ValueError, match="q must be in"):
        timing.quantile(values, 1.5)
    with pytest.raises(ValueError, match="at least one value"):
        timing.quantile([], 0.5)


def test_cpu_timer_measures_a_sleep():
    result = timing.cpu_timing(lambda: time.sleep(SLEEP_S), warmup_ms=10, rep_ms=60)
    assert SLEEP_S * 1e3 <= result.median_ms < SLEEP_S * 1e3 + 20  # a loaded machine oversleeps, never under
    assert result.p20_ms <= result.median_ms <= result.p80_ms
    assert result.calls >= timing.MIN_TIMED_CALLS and result.peak_bytes is None


def test_cpu_timer_warms_up_before_timing():
    calls = []

    def first_call_slow():
        calls.append(None)
        time.sleep(0.05 if len(calls) == 1 else 0.001)

    result = timing.cpu_timing(first_call_slow, warmup_ms=5, rep_ms=20)
    assert result.median_ms < 25  # the slow first call (compilation, say) is not in the median
    assert len(calls) == 1 + result.calls + (len(calls) - 1 - result.calls)


def test_measure_on_cpu_uses_host_timer():
    result = timing.measure(lambda: time.sleep(SLEEP_S), "cpu", warmup_ms=5, rep_ms=30)
    assert result.median_ms >= SLEEP_S * 1e3 and result.peak_bytes is None


def test_issue_time_is_the_host_time_of_one_call():
    calls = []

    def sleeper():
        calls.append(None)
        time.sleep(SLEEP_S)

    host_ms = timing.issue_ms(sleeper, "cpu", calls=3)
    assert len(calls) == 3 and SLEEP_S * 1e3 <= host_ms < SLEEP_S * 1e3 + 20
    assert timing.measure(sleeper, "cpu", warmup_ms=1, rep_ms=1).host_ms is None  # CPU: the median is host time


def test_rotation_count():
    assert timing.rotation_count(100, 0) == 1  # no cache to defeat (CPU)
    assert timing.rotation_count(2_000, 1_000) == 1  # one set already exceeds the cache
    assert timing.rotation_count(1_000, 10_000) == 20  # spans twice the cache
    assert timing.rotation_count(1, 10**9) == timing.MAX_ROTATION


def test_rotating_cycles_through_distinct_sets():
    made = []

    def make():
        made.append(torch.randn(4))
        return (made[-1],)

    step = timing.rotating(make, lambda t: t, cache=4 * 4 * 3)  # 16-byte sets, 48-byte cache -> 6 sets
    assert len(made) == len(step.sets) == 6
    seen = [step() for _ in range(12)]
    for i, t in enumerate(seen):
        assert t is made[i % 6]
    assert len({id(t) for t in made}) == 6


def test_randn_is_never_zero_and_keeps_dtype():
    t = timing.randn(64, 64, dtype=torch.float16, scale=0.5)
    assert t.dtype == torch.float16 and t.abs().sum() > 0 and t.std() > 0.3


def _linear(x, w):
    return x @ w.t()


def _make(requires_grad):
    return (timing.randn(5, 3, requires_grad=requires_grad), timing.randn(4, 3, requires_grad=requires_grad))


@pytest.mark.parametrize("mode", suite.MODES)
def test_timed_step_modes(mode):
    step = suite.timed_step(_linear, _make, mode, "cpu")
    result = step()
    if mode == "fwd":
        assert result.shape == (5, 4) and not result.requires_grad
        return
    grad_x, grad_w = result
    assert grad_x.shape == (5, 3) and grad_w.shape == (4, 3)
    again = step()  # the same set again: no accumulation, the same gradients
    assert torch.equal(again[0], grad_x) and torch.equal(again[1], grad_w)
    if mode == "bwd":
        output, grad_output, (x, w) = step.sets[0]
        assert torch.allclose(grad_x, grad_output @ w.detach())


def test_timed_step_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        suite.timed_step(_linear, _make, "backward", "cpu")


def test_flop_counts():
    shape = configs.AttentionShape("t", 2, 4, 128, 64, False, torch.bfloat16)
    assert shape.flops("fwd") == 4 * 2 * 4 * 128 * 128 * 64
    assert shape.flops("bwd") == 2.5 * shape.flops("fwd")
    causal = configs.AttentionShape("t", 2, 4, 128, 64, True, torch.bfloat16)
    assert causal.flops("fwd") == shape.flops("fwd") / 2
    mlp = configs.MLPShape("t", 16, 8, 32, "gelu", False, torch.float32)
    assert mlp.flops("fwd") == 2 * (2 * 16 * 32 * 8) and mlp.flops("fwd+bwd") == 3 * mlp.flops("fwd")
    gated = configs.MLPShape("t", 16, 8, 32, "silu", True, torch.float32)
    assert gated.flops("fwd") == 3 * (2 * 16 * 32 * 8)


def test_design_shapes_keep_the_token_and_width_budget():
    for shape in configs.attention_shapes(configs.SWEEP_SEQ_LENS):
        assert shape.batch * shape.seq == configs.TOKENS
        assert shape.heads * shape.head_dim == configs.MODEL_WIDTH
    headline = [s for s in configs.attention_shapes() if s.headline]
    assert {(s.head_dim, s.seq) for s in headline} == {(128, 4096)}


def _case(*providers, unit="TFLOP/s"):
    return suite.Case("attention", "c", {}, "fwd", 1e9, unit, torch.device("cpu"), list(providers))


def test_measure_provider_statuses():
    def unavailable():
        raise suite.Unavailable("no such backend here")

    def broken():
        raise RuntimeError("kernel exploded")

    def refused():
        raise NotImplementedError("the backward of this kernel is not written yet")

    def not_built():
        raise NotImplementedError("backend='cpu' cannot run these inputs: tfm_kernels._C is not built")

    def slow():
        return lambda: time.sleep(0.002)

    rows = suite.run_cases([_case(suite.Provider("ours-x", True, unavailable),
                                  suite.Provider("ours-y", True, broken),
                                  suite.Provider("ours-refused", True, refused),
                                  suite.Provider("ours-not-built", True, not_built),
                                  suite.Provider("peer-z", False, broken),
                                  suite.Provider("peer-refused", False, refused),
                                  suite.Provider("peer-ok", False, slow))], warmup_ms=2, rep_ms=10)
    by_name = {r["provider"]: r for r in rows}
    assert by_name["ours-x"]["status"] == "n/a" and "no such backend" in by_name["ours-x"]["reason"]
    assert by_name["ours-y"]["status"] == "error" and "kernel exploded" in by_name["ours-y"]["reason"]
    assert by_name["ours-refused"]["status"] == "error"  # ours say what they support when prepared
    assert by_name["ours-not-built"]["status"] == "n/a"
    assert by_name["peer-z"]["status"] == by_name["peer-refused"]["status"] == "n/a"  # unavailable, not our failure
    ok = by_name["peer-ok"]
    assert ok["status"] == "ok" and ok["ratio"] == 1.0
    assert ok["value"] == pytest.approx(1e9 / (ok["median_ms"] * 1e-3) / 1e12)


def test_a_stopped_run_keeps_its_rows_and_lists_the_rest():
    def stop():
        raise KeyboardInterrupt  # what the CLI raises on SIGTERM (a `timeout` cap)

    def quick():
        return lambda: None

    rows = suite.run_cases([_case(suite.Provider("a", False, quick), suite.Provider("b", True, stop),
                                  suite.Provider("c", True, quick))], warmup_ms=1, rep_ms=2)
    assert [r["status"] for r in rows] == ["ok", "n/a", "n/a"]
    assert rows[1]["reason"] == rows[2]["reason"] == suite.NOT_RUN


def _ratio_rows(config, *rows):
    return [{"suite": "s", "config": config, "mode": "fwd", "ours": ours, "status": status, "value": value,
             "reason": reason} for ours, status, value, reason in rows]


def test_ratios_are_against_the_best_peer():
    rows = _ratio_rows("c", (True, "ok", 300.0, None), (False, "ok", 200.0, None), (False, "ok", 100.0, None),
                       (True, "n/a", None, "unsupported"), (False, "n/a", None, "a peer that cannot run"))
    ratios = [r["ratio"] for r in suite.add_ratios(rows)]
    assert ratios == [1.5, 1.0, 0.5, None, None]


@pytest.mark.parametrize("reason", [suite.OVER_BUDGET, suite.NOT_RUN])
def test_a_case_with_an_unmeasured_peer_has_no_ratios(reason):
    """Where a budget or a stop left a peer (torch compiled, say) unmeasured, the best peer is unknown: ours is
    not compared with the slower peers that ran."""
    rows = _ratio_rows("cut", (True, "ok", 300.0, None), (False, "ok", 200.0, None), (False, "n/a", None, reason))
    rows += _ratio_rows("whole", (True, "ok", 300.0, None), (False, "ok", 200.0, None))
    assert [r["ratio"] for r in suite.add_ratios(rows)] == [None, None, None, 1.5, 1.0]


def test_ratio_summary_is_a_geometric_mean():
    rows = [{"ours": True, "provider": "ours-x", "mode": "fwd", "ratio": r} for r in (0.5, 2.0, 1.0)]
    rows.append({"ours": False, "provider": "peer", "mode": "fwd", "ratio": 1.0})
    (line,) = report.ratio_summary(rows)
    assert line.startswith("- ours-x fwd: 1.00x") and "of 3 cases; min 0.50x, max 2.00x" in line


def test_self_check_fails_a_wrong_kernel():
    x = timing.randn(6, 5)

    def oracle(t):
        return torch.tanh(t)

    right = selfcheck._run_check("tanh", "b", "c", oracle, oracle, oracle, [x], ["out", "dx"])
    assert right.status == "pass"
    wrong = selfcheck._run_check("tanh", "b", "c", lambda t: torch.tanh(t) * 1.001, oracle, oracle, [x],
                                 ["out", "dx"])
    assert wrong.status == "FAIL" and "out" in wrong.detail
    crashing = selfcheck._run_check("tanh", "b", "c", lambda t: t[99], oracle, oracle, [x], ["out", "dx"])
    assert crashing.status == "FAIL" and "IndexError" in crashing.detail
    wrong_dtype = selfcheck._run_check("tanh", "b", "c", lambda t: torch.tanh(t).double(), oracle, oracle, [x],
                                       ["out", "dx"])
    assert wrong_dtype.status == "FAIL"
    assert wrong_dtype.detail == "out: dtype torch.float64 where torch gives torch.float32"


MLP_MODULE = importlib.import_module("tfm_kernels.mlp")  # the module; tfm_kernels.mlp is also its function mlp
# name: (function of tfm_kernels.mlp, a wrong version of it, the self-check that must fail, how it fails)
MLP_FAULTS = {
    "relu off by one": ("fused_linear", lambda f: lambda x, w, b=None, act="gelu", p=0.0, **kw: (
        f(x, w, b, act, p, **kw) + (1.0 if act == "relu" else 0.0)), "fused_linear relu", "out: error"),
    "dropout ignored": ("fused_linear", lambda f: lambda x, w, b=None, act="gelu", p=0.0, **kw: (
        f(x, w, b, act, 0.0, **kw)), "fused_linear gelu_tanh dropout 0.25", "out: error"),
    "gated bias ignored": ("gated_linear", lambda f: lambda x, w, act="silu", p=0.0, bias=None, **kw: (
        f(x, w, act, p, **kw)), "gated_linear identity", "out: error"),
    "wrong dtype": ("fused_linear", lambda f: lambda *args, **kw: f(*args, **kw).double(), "fused_linear relu",
                    "out: dtype torch.float64 where torch gives torch.float32"),
}


@pytest.mark.parametrize("fault", MLP_FAULTS)
def test_self_check_fails_a_wrong_mlp_operator(fault, monkeypatch, capsys):
    """Each activation, dropout, the gated bias and the output dtype are checked: a fault in any of them makes
    the bench report FAIL and exit 1."""
    function, wrong, check, failure = MLP_FAULTS[fault]
    monkeypatch.setattr(MLP_MODULE, function, wrong(getattr(MLP_MODULE, function)))
    monkeypatch.setattr(selfcheck, "ATTENTION_BACKENDS", ())  # the MLP checks on the C++ backend suffice here
    monkeypatch.setattr(selfcheck, "MLP_BACKENDS", ("cpu",))
    monkeypatch.setattr(cli, "cpu_cases", lambda args, suites, device: [])
    assert cli.main(["--quick", "--device", "cpu", "--json", ""]) == 1
    out = capsys.readouterr().out
    assert re.search(rf"^FAIL  {re.escape(check)} \[cpu\] .*: {failure}", out, re.MULTILINE), out


def test_self_check_fails_an_attention_that_ignores_dropout(monkeypatch):
    original = selfcheck.scaled_dot_product_attention
    monkeypatch.setattr(selfcheck, "scaled_dot_product_attention",
                        lambda *args, dropout_p=0.0, **kw: original(*args, dropout_p=0.0, **kw))
    monkeypatch.setattr(selfcheck, "ATTENTION_BACKENDS", ("cpu",))
    checks = selfcheck.attention_checks(torch.device("cpu"), torch.float32)
    assert [c.status for c in checks] == ["pass", "pass", "FAIL"]
    assert "dropout 0.2" in checks[2].case and checks[2].detail.startswith("out: error")


def test_environment_without_git(monkeypatch):
    monkeypatch.setattr(report.shutil, "which", lambda name: None)
    env = report.environment("cpu")
    assert env["commit"] == "unknown"
    for key in ("card", "torch", "triton", "cuda", "date", "device_type"):
        assert key in env


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_commit_is_that_of_the_package_checkout_only(tmp_path, monkeypatch):
    """The record's commit is the HEAD of the checkout whose top level holds tfm_kernels/, "-dirty" when its
    tracked files other than benchmarks/results/ changed; a package installed inside another project's checkout
    has no commit of its own."""
    project = tmp_path.resolve()
    git = ["git", "-C", str(project), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (project / "tracked").write_text("a")
    record = project / report.RESULTS_FOLDER / "bench.jsonl"
    record.parent.mkdir(parents=True)
    record.write_text("{}\n")
    subprocess.run([*git, "add", "tracked", str(record)], check=True)
    subprocess.run([*git, "commit", "-qm", "first"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    site_packages = project / "venv" / "site-packages"
    site_packages.mkdir(parents=True)
    monkeypatch.setattr(report, "PACKAGE_PARENT", site_packages)
    assert report._commit() == "unknown"  # not the project's HEAD
    monkeypatch.setattr(report, "PACKAGE_PARENT", project)
    assert report._commit() == head  # untracked files (venv/) are not changes
    record.write_text("{}\n{}\n")
    assert report._commit() == head  # nor the results a run appends to
    (project / "tracked").write_text("b")
    assert report._commit() == head + "-dirty"
    env = {"device_type": "cpu", "card": "c", "torch": "t", "triton": "t", "commit": head + "-dirty", "date": "d"}
    assert f"commit {head[:12]}-dirty, d" in cli._title(env)


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys):
    why = "--plot needs matplotlib, which is not installed"
    monkeypatch.setattr(report, "matplotlib_missing", lambda: why)
    with pytest.raises(SystemExit):
        cli.parse_args(["--plot", "plots"])
    assert "needs matplotlib" in capsys.readouterr().err


def test_attention_cases_with_dropout_time_it(monkeypatch):
    """A training shape's dropout reaches our function and torch's: its rows are timed with dropout on, and a
    torch backend without dropout (the CPU flash kernel) is n/a rather than timed without it."""
    from tfm_kernels.bench import attention

    dropout_by_caller = {"ours": set(), "torch": set()}

    def recording(caller, function):
        def call(*args, **kwargs):
            dropout_by_caller[caller].add(kwargs.get("dropout_p"))
            return function(*args, **kwargs)

        return call

    monkeypatch.setattr(attention, "scaled_dot_product_attention",
                        recording("ours", attention.scaled_dot_product_attention))
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        recording("torch", attention.F.scaled_dot_product_attention))
    shape = configs.AttentionShape("t", 1, 2, 64, 16, True, torch.float32, dropout=0.1)
    assert shape.label.endswith("causal dropout 0.1") and shape.as_dict()["dropout"] == 0.1
    cases = attention.attention_cases([shape], ("fwd",), "cpu", with_flex="none", with_math=True)
    rows = {r["provider"]: r for r in suite.run_cases(cases, warmup_ms=2, rep_ms=10)}
    assert rows["ours-cpu"]["status"] == "ok" and rows["torch-math"]["status"] == "ok"
    assert rows["torch-flash"]["status"] == "n/a"
    # torch's reason, without the C++ source line each of its warnings ends with
    reason = rows["torch-flash"]["reason"]
    assert "do not support non-zero dropout" in reason and "Triggered internally" not in reason, reason
    assert dropout_by_caller == {"ours": {0.1}, "torch": {0.1}}


def test_plots_one_png_per_panel(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"suite": "attention", "status": "ok", "provider": p, "mode": "fwd", "value": v * s / 1024,
             "shape": {"head_dim": 64, "causal": False, "seq": s}}
            for p, v in (("ours-triton", 300), ("torch-flash", 250)) for s in (1024, 4096)]
    rows.append({**rows[0], "shape": {"head_dim": 64, "causal": True, "seq": 1024, "dropout": 0.1}})  # not plotted
    written = report.plot_attention(rows, tmp_path, "test card")
    assert [p.name for p in written] == ["attention_d64_full_fwd.png"] and written[0].stat().st_size > 0


def test_bench_quick_on_cpu(tmp_path, capsys):
    record = tmp_path / "bench.jsonl"
    code = cli.main(["--quick", "--device", "cpu", "--json", str(record)])
    out = capsys.readouterr().out
    assert "## Self-check" in out and "## CPU timing" in out
    assert "| config | mode | provider | TFLOP/s |" in out and "torch-flash" in out and "torch eager" in out
    assert out.index("## Self-check") < out.index("## CPU timing")  # the table comes last
    assert out.rstrip().splitlines()[-1].startswith(("|", "- ours"))
    lines = record.read_text().splitlines()
    assert len(lines) == 1
    run = json.loads(lines[0])
    for key in ("card", "torch", "triton", "cuda", "commit", "date", "rows", "checks"):
        assert key in run, key
    assert {"attention", "mlp"} <= {r["suite"] for r in run["rows"]}
    for row in run["rows"]:
        for key in ("provider", "shape", "mode", "value", "ratio", "status", "config", "unit"):
            assert key in row
        assert row["status"] in ("ok", "n/a"), row  # no provider of ours raised
    timed = [r for r in run["rows"] if r["status"] == "ok"]
    assert timed and all(r["value"] > 0 and r["median_ms"] > 0 for r in timed)
    failed = [c for c in run["checks"] if c["status"] == "FAIL"]
    assert not failed, failed
    # This machine has the extension and the Triton interpreter: only the cuda checks may be n/a.
    unchecked = [c for c in run["checks"] if c["status"] != "pass" and c["backend"] != "cuda"]
    assert not unchecked, unchecked
    assert code == 0


def test_self_check_that_checks_nothing_fails(monkeypatch, capsys):
    """A machine where no operator can be checked (no extension, no triton) has nothing working to time: the
    run says so and exits 1 instead of passing with a warning."""
    not_here = selfcheck.Check("attention", "cpu", "full", "n/a", "the compiled extension is not built")
    monkeypatch.setattr(cli, "self_check", lambda device, dtype: [not_here])
    monkeypatch.setattr(cli, "cpu_cases", lambda args, suites, device: [])
    assert cli.main(["--quick", "--device", "cpu", "--json", ""]) == 1
    assert "ERROR: no operator could be checked here" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_unwritable_output_paths_fail_before_measuring(tmp_path, flag, capsys):
    """--json and --plot are checked before a run that may take minutes: a path inside a file fails at once,
    naming the flag."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    target = str(a_file / ("x.jsonl" if flag == "--json" else "plots"))
    if flag == "--plot" and report.matplotlib_missing():
        pytest.skip(report.matplotlib_missing())
    with pytest.raises(SystemExit) as stop:
        cli.parse_args(["--device", "cpu", flag, target])
    assert stop.value.code == 2 and f"{flag}: cannot write in" in capsys.readouterr().err


def test_the_default_record_is_in_the_checkout_and_none_for_an_installed_package(tmp_path, monkeypatch):
    """A run from a checkout appends to its benchmarks/results/bench.jsonl wherever it starts; an installed
    package (no benchmarks/ beside it) writes no record unless --json names one."""
    expected = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "bench.jsonl"
    assert cli.parse_args(["--device", "cpu"]).json == str(expected)
    monkeypatch.setattr(report, "PACKAGE_PARENT", tmp_path / "site-packages")
    assert cli.parse_args(["--device", "cpu"]).json == ""


@pytest.mark.parametrize("target", ["directory", "read-only file"])
def test_a_json_path_that_cannot_be_appended_to_fails_before_measuring(tmp_path, target, capsys):
    path = tmp_path / "record"
    if target == "directory":
        path.mkdir()
    else:
        path.write_text("")
        path.chmod(0o444)
        if os.access(path, os.W_OK):
            pytest.skip("this user can write a read-only file (root)")
    with pytest.raises(SystemExit) as stop:
        cli.parse_args(["--device", "cpu", "--json", str(path)])
    expected = "got the directory" if target == "directory" else "is not writable"
    assert stop.value.code == 2 and re.search(f"--json: expected a file .*{expected}", capsys.readouterr().err)


def _one_quick_case(monkeypatch):
    """cli.main runs a single instant MLP case (a peer doing nothing) after a passing self-check."""
    passed = selfcheck.Check("mlp", "cpu", "c", "pass", "within tolerance")
    monkeypatch.setattr(cli, "self_check", lambda device, dtype: [passed])
    peer = suite.Provider("peer-ok", False, lambda: lambda: None)
    case = suite.Case("mlp", "c", {}, "fwd", 1e9, "TFLOP/s", torch.device("cpu"), [peer])
    monkeypatch.setattr(cli, "cpu_cases", lambda args, suites, device: [case])


@pytest.mark.parametrize("flag, writer, error", [
    ("--json", "append_record", "--json: cannot append the record to {path}: Permission denied"),
    ("--plot", "plot_attention", "--plot: cannot write in {path}: Permission denied"),
])
def test_an_output_that_cannot_be_written_loses_no_table(tmp_path, monkeypatch, capsys, flag, writer, error):
    """The table is printed before the record and plots are written; a failed write is a one-line error and
    exit 1."""
    if flag == "--plot" and report.matplotlib_missing():
        pytest.skip(report.matplotlib_missing())
    _one_quick_case(monkeypatch)

    def refuse(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(report, writer, refuse)
    path = tmp_path / "out"
    assert cli.main(["--quick", "--device", "cpu", "--json", "", flag, str(path)]) == 1
    captured = capsys.readouterr()
    assert "## CPU timing" in captured.out and "| peer-ok |" in captured.out
    assert captured.err.splitlines()[-1] == error.format(path=path)


def test_plot_with_nothing_to_draw_says_so_and_makes_no_folder(tmp_path, monkeypatch, capsys):
    if report.matplotlib_missing():
        pytest.skip(report.matplotlib_missing())
    _one_quick_case(monkeypatch)
    plots = tmp_path / "plots"
    assert cli.main(["--quick", "--device", "cpu", "--suite", "mlp", "--json", "", "--plot", str(plots)]) == 0
    assert not plots.exists()
    assert f"--plot: this run has no attention rows to plot; nothing written to {plots}" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--suite", "atention"], r"--suite: expected names among .*; got \['atention'\]"),
    (["--suite", ""], r"--suite: expected names among .*; got none"),
    (["--quick", "--full"], r"argument --full: not allowed with argument --quick"),
    (["--run", "0"], r"--run picks a run of a --replay record; got no --replay"),
    (["--replay", ""], r"--replay: expected the path of a JSON Lines record; got ''"),
    (["--budget", "-5"], r"--budget: expected seconds >= 0 \(0: none\); got -5.0"),
    (["--budget", "nan"], r"--budget: expected seconds >= 0 \(0: none\); got nan"),
    (["--suite", "attention", "--mlp-shapes", "nope"],
     r"--mlp-shapes picks the shapes of the mlp suite, which --suite attention leaves out"),
])
def test_bad_suites_are_refused_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.parse_args(["--device", "cpu", *argv])
    assert stop.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_unknown_mlp_shape_is_refused_before_the_self_check(tmp_path, monkeypatch, capsys):
    """An unknown name stops the run before the self-check, and leaves no empty results folder behind (the
    default --json's folder is made only when the record is written)."""
    monkeypatch.setattr(cli, "self_check", lambda device, dtype: pytest.fail("the self-check ran first"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"--mlp-shapes: unknown \['nope'\]") as stop:
        cli.main(["--quick", "--device", "cpu", "--mlp-shapes", "nope"])
    assert list(tmp_path.iterdir()) == []
    assert stop.value.code == 2  # as argparse's errors, and in its form
    assert capsys.readouterr().err.startswith("python -m tfm_kernels bench: error: --mlp-shapes: unknown ['nope']")


@pytest.mark.skipif(torch.cuda.is_available(), reason="without a GPU only")
def test_cli_without_a_gpu_runs_the_triton_kernels_in_the_interpreter():
    """The self-check of a CPU run checks the Triton kernels too, under the interpreter, whatever
    TRITON_INTERPRET the shell set."""
    program = ("import os\n"
               "from tfm_kernels.bench import cli\n"
               "cli.self_check = lambda device, dtype: print('TRITON_INTERPRET', os.environ['TRITON_INTERPRET'])"
               " or []\n"
               "cli.cpu_cases = lambda args, suites, device: []\n"
               "cli.main(['--quick', '--json', ''])\n")
    result = subprocess.run([sys.executable, "-c", program], env={**os.environ, "TRITON_INTERPRET": "0"},
                            cwd=pathlib.Path(__file__).parents[1], capture_output=True, text=True, timeout=300)
    assert "TRITON_INTERPRET 1" in result.stdout, result.stderr


@pytest.mark.parametrize("argv, message", [
    (["--mlp-shapes", ","], r"--mlp-shapes: unknown none"),
    (["--suite", "model", "--lm-presets", "tiny"], r"--lm-presets: the language-model rows are timed on a GPU only"),
])
def test_options_a_cpu_run_cannot_honour_are_refused(argv, message, monkeypatch):
    """An empty shape list, and language-model presets on the CPU (whose model table times an encoder), stop
    the run before the self-check rather than giving a table without what was asked."""
    monkeypatch.setattr(cli, "self_check", lambda device, dtype: pytest.fail("the self-check ran first"))
    with pytest.raises(SystemExit, match=message):
        cli.main(["--quick", "--device", "cpu", "--json", "", *argv])


def test_replay_picks_a_run_of_the_record(tmp_path, capsys):
    """--run N replays any run of a record (the table of a GPU session is often not its last line)."""
    record = tmp_path / "r.jsonl"
    for provider in ("first-run", "second-run"):
        row = {**suite._empty_row(_case(), suite.Provider(provider, True, None)), "value": 1.0, "median_ms": 1.0,
               "p20_ms": 1.0, "p80_ms": 1.0}
        report.append_record(record, report.environment("cpu"), suite.add_ratios([row]))
    assert cli.main(["--replay", str(record), "--run", "0"]) == 0
    out = capsys.readouterr().out
    assert "first-run" in out and "second-run" not in out
    with pytest.raises(SystemExit, match=r"--run 2: .* holds 2 run\(s\)"):
        cli.main(["--replay", str(record), "--run", "2"])
    with pytest.raises(SystemExit, match=r"--replay: cannot read .*missing.jsonl"):
        cli.main(["--replay", str(tmp_path / "missing.jsonl")])


@pytest.mark.parametrize("line, message", [
    ("not json", r"expected a JSON record of a run; got invalid JSON \(Expecting value: line 1 column 1"),
    ("[1, 2]", r"expected a JSON object with a list of rows; got '\[1, 2\]'"),
    ('{"rows": []}', r"the record lacks device_type, card, torch, triton, commit, date$"),
    ("no status", r"the record lacks rows\[0\]\.status$"),
])
def test_replay_of_a_malformed_record_names_what_is_wrong(tmp_path, line, message):
    record = tmp_path / "r.jsonl"
    report.append_record(record, report.environment("cpu"), [])  # a good run first: the bad one is line 3
    if line == "no status":
        row = {k: v for k, v in suite._empty_row(_case(), suite.Provider("p", True, None)).items() if k != "status"}
        line = json.dumps({**report.environment("cpu"), "rows": [row]})
    record.write_text(record.read_text() + "\n" + line + "\n")
    with pytest.raises(SystemExit, match=rf"^--replay: {re.escape(str(record))} line 3 \(run -1\): {message}"):
        cli.main(["--replay", str(record)])


@pytest.mark.parametrize("field, value, message", [
    ("median_ms", None, r"rows\[0\]\.median_ms \(expected a number in an ok row; got None\)"),
    ("ratio", "x", r"rows\[0\]\.ratio \(expected a number or null; got 'x'\)"),
    ("ratio", 0.0, r"rows\[0\]\.ratio \(expected a number > 0 or null; got 0\.0\)"),
    ("value", "fast", r"rows\[0\]\.value \(expected a number or null; got 'fast'\)"),
    ("unit", None, r"rows\[0\]\.unit \(expected text; got None\)"),
])
def test_replay_of_a_record_with_a_mistyped_field_names_it(tmp_path, field, value, message):
    """Fields present but of another type failed in the table's formatting with a traceback."""
    row = {**suite._empty_row(_case(), suite.Provider("p", True, None)), "status": "ok", "median_ms": 1.0,
           "p20_ms": 1.0, "p80_ms": 1.0, "value": 1.0, "ratio": 1.0}
    record = tmp_path / "r.jsonl"
    record.write_text(json.dumps({**report.environment("cpu"), "rows": [{**row, field: value}]}) + "\n")
    with pytest.raises(SystemExit, match=rf"^--replay: {re.escape(str(record))} line 1 \(run -1\): the record has "
                                         rf"{message}"):
        cli.main(["--replay", str(record)])


@pytest.mark.parametrize("change, message", [
    (lambda run: {**run, "commit": 5}, r"commit \(expected text; got 5\)"),
    (lambda run: {**run, "rows": [{**run["rows"][0], "shape": {}}]},
     r"rows\[0\]\.shape \(expected causal, head_dim, seq in an ok attention row; got \{\}\)"),
    (lambda run: {**run, "rows": [{**run["rows"][0], "shape": {"head_dim": 64, "causal": False, "seq": 0}}]},
     r"rows\[0\]\.shape\.seq \(expected a number > 0; got 0\)"),
    (lambda run: {**run, "rows": [{**run["rows"][0], "shape": {"head_dim": [64], "causal": "x", "seq": 8}}]},
     r"rows\[0\]\.shape\.head_dim \(expected an int; got \[64\]\), rows\[0\]\.shape\.causal \(expected true or "
     r"false; got 'x'\)"),
    (lambda run: {**run, "rows": [{**run["rows"][0], "mode": "a/b",
                                   "shape": {"head_dim": 64, "causal": False, "seq": 8}}]},
     r"rows\[0\]\.mode \(expected a name such as fwd or fwd\+bwd; got 'a/b'\)"),
], ids=["commit-a-number", "attention-shape-empty", "seq-zero", "head-dim-list-causal-text", "mode-a-path"])
def test_replay_of_a_record_with_a_field_the_title_or_plots_cannot_read_names_it(tmp_path, change, message):
    """A commit that is not text failed in the title's slicing, an ok attention row without its shape's keys in
    the plots (read only with --plot), each with a traceback."""
    row = {**suite._empty_row(_case(), suite.Provider("p", True, None)), "status": "ok", "median_ms": 1.0,
           "p20_ms": 1.0, "p80_ms": 1.0, "value": 1.0, "ratio": 1.0, "suite": "attention"}
    record = tmp_path / "r.jsonl"
    record.write_text(json.dumps(change({**report.environment("cpu"), "rows": [row]})) + "\n")
    with pytest.raises(SystemExit, match=rf"^--replay: {re.escape(str(record))} line 1 \(run -1\): the record has "
                                         rf"{message}"):
        cli.main(["--replay", str(record), "--plot", str(tmp_path / "plots")])


def test_replay_of_a_file_that_is_not_text_names_it(tmp_path):
    record = tmp_path / "r.jsonl"
    record.write_bytes(b"\xff\xfe\n")
    with pytest.raises(SystemExit, match=rf"^--replay: {re.escape(str(record))} is not a JSON Lines record \(not "
                                         rf"UTF-8"):
        cli.main(["--replay", str(record)])


def test_an_extension_missing_or_failing_to_import_is_named_so(tmp_path, monkeypatch):
    """A package without its compiled extension reports it as not built, with how to build it, rather than
    Python's guess of a circular import; one whose file is there but does not load says it fails to import, which
    the tests' skip rule (ENVIRONMENT_MARKERS: "not built") does not hide."""
    assert not ops.extension_file_exists(tmp_path)
    (tmp_path / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"not a shared object")
    assert ops.extension_file_exists(tmp_path)
    monkeypatch.setattr(ops, "_C", None)
    monkeypatch.setattr(ops, "C_IMPORT_ERROR", "why")
    for exists, state in ((False, "is not built"), (True, "fails to import")):
        monkeypatch.setattr(ops, "C_FILE_EXISTS", exists)
        assert backends._extension_reasons() == [f"the compiled extension tfm_kernels._C {state} (why)"]


def test_interpreted_triton_providers_run_but_are_not_timed():
    """On CPU our Triton providers build and run their step under the interpreter (what the pytest-benchmark
    cases with --benchmark-disable rely on), while the table gives them an n/a row saying why, unbuilt."""
    from tfm_kernels.bench import attention, mlp

    attention_shape = configs.AttentionShape("t", 1, 2, 32, 16, True, torch.float32)
    mlp_shape = configs.MLPShape("t", 16, 16, 32, "gelu", False, torch.float32)
    cases = (attention.attention_cases([attention_shape], ("fwd+bwd",), "cpu", with_flex="none")
             + mlp.mlp_cases([mlp_shape], ("fwd+bwd",), "cpu", with_compile=False))
    interpreted = [p for case in cases for p in case.providers if p.untimed]
    assert [(p.name, p.untimed) for p in interpreted] == [("ours-triton", suite.INTERPRETED)] * 2
    for provider in interpreted:
        grad_query_or_x, *_ = provider.prepare()()  # the step runs, for attention and for the MLP
        assert torch.isfinite(grad_query_or_x).all()
    rows = suite.run_cases(cases, warmup_ms=1, rep_ms=2)
    assert {(r["provider"], r["status"], r["reason"]) for r in rows if r["provider"] == "ours-triton"} == {
        ("ours-triton", "n/a", suite.INTERPRETED)}
    assert all(r["status"] == "ok" for r in rows if r["provider"] in ("torch-flash", "torch eager")), rows


def test_rows_of_our_triton_kernels_name_the_configs_they_ran():
    """The tiles of a row: each of our Triton kernels that its timed calls launched, with the config it ran
    (under the interpreter, the one config of each list), and nothing a case measured before launched."""
    import dataclasses

    from tfm_kernels.bench import attention, mlp
    from tfm_kernels.triton import attention as triton_attention
    from tfm_kernels.triton import mlp as triton_mlp
    from tfm_kernels.triton.tuning import config_label

    attention_shape = configs.AttentionShape("t", 1, 2, 32, 16, True, torch.float32)
    mlp_shape = configs.MLPShape("t", 16, 16, 32, "gelu", False, torch.float32)
    cases = (attention.attention_cases([attention_shape], ("fwd+bwd", "fwd"), "cpu", with_flex="none")
             + mlp.mlp_cases([mlp_shape], ("fwd",), "cpu", with_compile=False))
    for case in cases:  # timed here, to read their rows: the interpreter's times mean nothing
        case.providers = [dataclasses.replace(p, untimed="") for p in case.providers if p.name == "ours-triton"]
    rows = suite.run_cases(cases, warmup_ms=1, rep_ms=2)
    forward, dk_dv, dq = (config_label(k.configs[0]) for k in triton_attention.TUNED_KERNELS.values())
    gemm = config_label(triton_mlp.TUNED_KERNELS["gemm"].configs[0])
    assert [(r["mode"], r["status"], r["tiles"]) for r in rows] == [
        ("fwd+bwd", "ok", f"fwd {forward}; dk/dv {dk_dv}; dq {dq}"), ("fwd", "ok", f"fwd {forward}"),
        ("fwd", "ok", f"gemm {gemm}")]
    assert f"| fwd {forward} |" in report.markdown_table(rows)


def test_rows_without_triton_installed():
    """Triton is optional: without it every row still comes out (tiles "" and nothing imported for them), and a
    provider of our Triton kernels is n/a with its own reason, not an error."""
    probe = """
import sys
sys.modules["triton"] = None  # import triton now fails, as where it is not installed
import torch
from tfm_kernels.bench import suite

def no_triton():
    raise NotImplementedError("backend='triton' cannot run these inputs: triton is not installed")

case = suite.Case("attention", "c", {}, "fwd", 1e9, "TFLOP/s", torch.device("cpu"), [
    suite.Provider("peer", False, lambda: lambda: None),
    suite.Provider("ours-triton", True, no_triton, triton_module="attention")])
print([(r["provider"], r["status"], r["tiles"]) for r in suite.run_cases([case], warmup_ms=1, rep_ms=2)])
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            cwd=pathlib.Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[('peer', 'ok', ''), ('ours-triton', 'n/a', '')]"


def test_interpreter_setup_comes_before_any_triton_import():
    """tests/ and benchmarks/ conftests import the setup before anything imports triton (triton.jit reads
    TRITON_INTERPRET when it decorates a kernel): importing it must import neither triton nor our kernels, and
    without a GPU it overrides an inherited TRITON_INTERPRET=0."""
    probe = ("import os, sys; from tfm_kernels.bench import interpreter; "
             "imported = sorted(m for m in sys.modules if m.split('.')[0] == 'triton' or "
             "m.startswith('tfm_kernels.triton')); interpreter.use_triton_interpreter_without_gpu(); "
             "print(imported, os.environ['TRITON_INTERPRET'])")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TRITON_INTERPRET": "0"}, cwd=pathlib.Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]", "0" if torch.cuda.is_available() else "1"]


def test_sigterm_during_the_self_check_ends_the_command_as_ctrl_c_does():
    """SIGTERM (a `timeout` cap) in the self-check ends the command with "interrupted" and status 130, as Ctrl-C
    does; it killed the process without a word while the handler was set only for the timing."""
    probe = ("import os, signal, sys; from tfm_kernels.bench import cli; from tfm_kernels.__main__ import main; "
             "cli.self_check = lambda device, dtype: os.kill(os.getpid(), signal.SIGTERM); "
             "sys.exit(main(['bench', '--quick', '--device', 'cpu', '--suite', 'mlp', '--json', '']))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                            cwd=pathlib.Path(__file__).parents[1])
    assert result.returncode == 130, (result.returncode, result.stderr)
    assert result.stderr.splitlines()[-1] == "python -m tfm_kernels bench: interrupted"


def test_model_suite_times_our_language_model_and_its_torch_peer():
    from tfm_kernels.bench import model

    cases = model.model_cases([], ("fwd+bwd",), "cpu", lm_presets=["tiny"], lm_batch=2, lm_seq=1024,
                              dtype=torch.float32, with_compile=False)
    # the tiny preset holds 64 positions: its case runs at that length, not at lm_seq
    assert [(c.config, c.shape["seq"], c.work) for c in cases] == [("lm tiny b2 s64", 64, 128)]
    rows = suite.run_cases(cases, warmup_ms=1, rep_ms=5)
    assert [(r["provider"], r["status"]) for r in rows] == [("ours tfm_kernels.models", "ok"),
                                                           ("torch-layer baseline", "ok")], rows
    assert all(r["unit"] == "tokens/s" and r["value"] > 0 for r in rows)


def test_replay_prints_a_recorded_run(tmp_path, capsys):
    rows = suite.add_ratios([{**suite._empty_row(_case(), suite.Provider(p, o, None)), "value": v,
                              "median_ms": 1.0, "p20_ms": 0.9, "p80_ms": 1.1}
                             for p, o, v in (("ours-x", True, 300.0), ("peer", False, 200.0))])
    record = report.append_record(tmp_path / "r.jsonl", report.environment("cpu"), rows)
    assert cli.main(["--replay", str(record)]) == 0
    out = capsys.readouterr().out
    assert "## CPU timing" in out and "| **ours-x** | 300.0 |" in out and "| 1.50x |" in out
    assert "| 1.000 [0.900, 1.100] | - |" in out  # no host time (a CPU run, or a record older than the column)


@pytest.mark.gpu
def test_measure_on_cuda_reports_time_and_memory():
    x = timing.randn(4096, 4096, dtype=torch.bfloat16, device="cuda")
    result = timing.measure(lambda: x @ x, "cuda", warmup_ms=5, rep_ms=20)
    assert 0 < result.p20_ms <= result.median_ms <= result.p80_ms
    assert 0 < result.host_ms < result.median_ms  # one launch (microseconds) against 137 GFLOP (0.2 ms)
    assert result.peak_bytes >= 4096 * 4096 * 2  # the product's output
    assert timing.cache_bytes("cuda") > 0


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_attention_providers_run_on_cuda(mode):
    from tfm_kernels.bench import attention

    shape = configs.AttentionShape("test", 2, 4, 256, 64, True, torch.bfloat16, headline=True)
    rows = suite.run_cases(attention.attention_cases([shape], (mode,), "cuda", with_flex="all"), warmup_ms=2,
                           rep_ms=5)
    by_name = {r["provider"]: r for r in rows}
    assert not [r for r in rows if r["status"] == "error"], rows
    for peer in ("torch-flash", "torch-efficient", "torch-flex (compiled)"):
        assert by_name[peer]["status"] == "ok", by_name[peer]
    assert by_name["ours-triton"]["status"] == "ok", by_name["ours-triton"]
    kernels = [part.split(" ")[0] for part in by_name["ours-triton"]["tiles"].split("; ")]
    assert kernels == (["fwd"] if mode == "fwd" else ["fwd", "dk/dv", "dq"]), by_name["ours-triton"]["tiles"]


def test_a_time_budget_measures_compiling_providers_last(monkeypatch):
    clock, order = [0.0], []
    cost = {"eager-slow": 0.6, "eager": 0.6}

    def fake_measure(case, provider, warmup_ms, rep_ms):  # a measurement that takes `cost` on a fake clock
        order.append(provider.name)
        clock[0] += cost.get(provider.name, 0.1)
        return {**suite._empty_row(case, provider), "status": "n/a", "reason": "measured"}

    monkeypatch.setattr(suite, "measure_provider", fake_measure)
    monkeypatch.setattr(suite, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    provider = lambda name, compiles: suite.Provider(name, False, None, compiles=compiles)  # noqa: E731
    cases = [_case(provider("compiled", True), provider("eager-slow", False)),
             _case(provider("eager", False), provider("compiled-2", True))]
    rows = suite.run_cases(cases, budget_s=1.0)
    assert order == ["eager-slow", "eager"]  # compile-free first; the budget ran out before the compiled ones
    assert [r["provider"] for r in rows] == ["compiled", "eager-slow", "eager", "compiled-2"]  # case order
    assert [r["reason"] == suite.OVER_BUDGET for r in rows] == [True, False, False, True]


SCRIPTS = pathlib.Path(__file__).parents[1] / "benchmarks"
RUNNER = SCRIPTS / "run_gpu_tests.py"


def test_device_check_refuses_an_unknown_mode(tmp_path):
    """A mistyped mode would otherwise run the whole first call (install, tests, benchmark) on scarce GPU time."""
    result = subprocess.run(["bash", str(SCRIPTS / "device_check.sh"), "tabel"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "OUT": str(tmp_path)})
    usage = "usage: bash benchmarks/device_check.sh [all | tests | table | models | pytest-bench]; got 'tabel'"
    assert result.returncode == 2 and usage in result.stderr


def _load_script(name):
    """benchmarks/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_runner():
    return _load_script("run_gpu_tests")


def test_gpu_test_runner_spreads_tests_evenly():
    runner = _load_runner()
    functions = {f"t.py::{name}": [f"t.py::{name}[{i}]" for i in range(count)]
                 for name, count in (("big", 9), ("a", 4), ("b", 3), ("c", 2))}
    groups = runner.spread(functions, 3)  # 18 tests, a share of 6: "big" is cut into runs of 6 and 3
    assert groups == [["t.py::big[0]", "t.py::big[1]", "t.py::big[2]", "t.py::big[3]", "t.py::big[4]",
                       "t.py::big[5]"], ["t.py::a", "t.py::c"], ["t.py::big[6]", "t.py::big[7]", "t.py::big[8]",
                                                                 "t.py::b"]]
    assert runner.spread({"t.py::a": ["t.py::a[0]"]}, 4) == [["t.py::a"]]


def test_gpu_test_runner_reports_each_group():
    tests = pathlib.Path(__file__).parent
    files = [str(tests / "test_tuning.py"), str(tests / "test_patch.py")]
    result = subprocess.run([sys.executable, str(RUNNER), "--workers", "2", "--timeout", "120", *files],
                            capture_output=True, text=True, cwd=tests.parent, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("---- ") == 2
    assert "gpu tests: 2 of 2 groups passed" in result.stdout


STUCK_TEST = """
import signal, time
import pytest

@pytest.mark.gpu
@pytest.mark.parametrize("i", range(4))
def test_stuck(i):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a process busy in a kernel compile, deaf to the interrupt
    time.sleep(60)
"""


def test_gpu_test_runner_stops_every_process_within_one_grace(tmp_path, monkeypatch, capsys):
    (tmp_path / "test_stuck.py").write_text(STUCK_TEST)
    runner = _load_runner()
    monkeypatch.setattr(runner, "INTERRUPT_GRACE_S", 2)
    monkeypatch.chdir(tmp_path)
    timeout = 5
    start = time.monotonic()
    assert runner.main([".", "--workers", "4", "--timeout", str(timeout)]) == 1
    elapsed = time.monotonic() - start
    # One grace for all four, not one each in turn (5 + 4 * 3 s): device_check.sh allows the runner 20 s over.
    assert elapsed < timeout + runner.INTERRUPT_GRACE_S + 2.5, elapsed
    out = capsys.readouterr().out
    assert out.count("exit stopped after 5 s") == 4 and "0 of 4 groups passed" in out


FAIL_THEN_HANG = """
import time
import pytest

@pytest.mark.gpu
def test_a_fails():
    assert 1 == 2

@pytest.mark.gpu
def test_b_hangs():
    open("hang_started", "w").close()
    time.sleep(60)
"""


def test_gpu_test_runner_prints_what_ran_when_terminated(tmp_path):
    """A SIGTERM (device_check.sh's or the device tool's time limit) stops the groups as the deadline does, so
    their output, the failures so far, is printed rather than lost with the runner."""
    (tmp_path / "test_fail_then_hang.py").write_text(FAIL_THEN_HANG)
    runner = subprocess.Popen([sys.executable, str(RUNNER), "--workers", "1", "--timeout", "100", "."],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (tmp_path / "hang_started").exists():
        time.sleep(0.2)
    runner.send_signal(signal.SIGTERM)
    out, _ = runner.communicate(timeout=30)
    assert runner.returncode == 1, out
    assert "exit stopped by SIGTERM" in out and "test_a_fails" in out and "assert 1 == 2" in out, out


CRASHING_TESTS = """
import os, signal
import pytest

@pytest.mark.gpu
def test_a_fails():
    assert 1 == 2, "the failure before the crash"

@pytest.mark.gpu
def test_b_crashes():
    os.kill(os.getpid(), signal.SIGSEGV)

@pytest.mark.gpu
def test_c_passes():
    pass

@pytest.mark.gpu
def test_d_fails():
    assert 3 == 4, "the failure after the crash"
"""


def test_gpu_test_runner_names_a_crash_and_runs_the_tests_after_it(tmp_path, monkeypatch, capsys):
    (tmp_path / "test_crash.py").write_text(CRASHING_TESTS)
    monkeypatch.chdir(tmp_path)
    assert _load_runner().main([".", "--workers", "1", "--timeout", "120"]) == 1
    out = capsys.readouterr().out
    assert "the failure before the crash" in out  # printed when it failed, not lost with the process
    assert "test_crash.py::test_b_crashes crashed its process (signal 11)" in out
    assert "running its 2 unfinished tests again" in out
    assert "the failure after the crash" in out and "1 passed" in out  # c and d ran in the new process
    assert "crashed their process: test_crash.py::test_b_crashes" in out


def test_gpu_test_runner_reruns_only_the_unfinished_tests_after_a_second_crash(tmp_path, monkeypatch, capsys):
    tests = CRASHING_TESTS.replace("def test_c_passes():\n    pass",
                                   "def test_c_crashes():\n    os.kill(os.getpid(), signal.SIGSEGV)")
    (tmp_path / "test_crash.py").write_text(tests)
    monkeypatch.chdir(tmp_path)
    assert _load_runner().main([".", "--workers", "1", "--timeout", "120"]) == 1
    out = capsys.readouterr().out
    assert "crashed their process: test_crash.py::test_b_crashes, test_crash.py::test_c_crashes" in out
    assert "running its 1 unfinished tests again" in out  # d alone after c: not a and b once more
    assert out.count("FAILED test_crash.py::test_a_fails") == 1 and "the failure after the crash" in out


def test_gpu_test_runner_fails_on_a_file_that_does_not_collect(tmp_path, monkeypatch, capsys):
    gpu_test = "import pytest\n\n@pytest.mark.gpu\ndef test_gpu():\n    pass\n"
    (tmp_path / "test_fine.py").write_text(gpu_test)
    (tmp_path / "test_broken.py").write_text("import module_that_does_not_exist\n" + gpu_test)
    monkeypatch.chdir(tmp_path)
    assert _load_runner().main([".", "--workers", "2", "--timeout", "60"]) == 1  # its tests would be missing, unseen
    out = capsys.readouterr().out
    assert "collection errors" in out and "module_that_does_not_exist" in out
    assert "1 of 1 groups passed" in out  # the tests that did collect still ran


def test_sanitizer_script_turns_off_the_caching_allocator():
    script = SCRIPTS / "sanitize_attention.py"
    check = ("import os, runpy; runpy.run_path(os.environ['SCRIPT']); "
             "print(os.environ.get('PYTORCH_NO_CUDA_MEMORY_CACHING'))")
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_NO_CUDA_MEMORY_CACHING"}
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120,
                            env={**env, "SCRIPT": str(script)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"  # memcheck sees each tensor as its own allocation


@pytest.mark.slow
def test_host_overhead_script_times_every_case_and_restores_the_launches(capsys):
    host_overhead = _load_script("host_overhead")
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from tfm_kernels import backends
    from tfm_kernels.triton import attention

    restored = (JITFunction._do_compile, driver._active, attention._FORWARD._tuned, dict(backends.AUTO_ORDER))
    host_overhead.main(["--repeat", "2"])
    rows = [line.split("|")[1:3] for line in capsys.readouterr().out.splitlines()
            if line.startswith(("| ours", "| torch"))]
    assert len(rows) == 14 and all(float(us) > 0 for _, us in rows)
    assert restored == (JITFunction._do_compile, driver._active, attention._FORWARD._tuned, backends.AUTO_ORDER)
    assert attention._FORWARD.min_work > 0


def test_host_overhead_script_times_chosen_cases_on_cpu_time(capsys):
    host_overhead = _load_script("host_overhead")
    case = "ours fused_linear gelu fwd+bwd"
    host_overhead.main(["--repeat", "2", "--rounds", "2", "--cpu-time", "--case", case])
    out = capsys.readouterr().out
    rows = [line.split("|")[1:3] for line in out.splitlines() if line.startswith(("| ours", "| torch"))]
    assert "process CPU time, best of 2 rounds" in out
    assert [name.strip() for name, _ in rows] == [case] and float(rows[0][1]) > 0
    with pytest.raises(SystemExit):
        host_overhead.main(["--case", "ours nothing"])
    assert "--case must name one of" in capsys.readouterr().err


def _empty_kernel(X, n, BLOCK: tl.constexpr):
    pass


def test_host_overhead_launches_run_triton_and_leave_no_stand_in_cached():
    """A compiled (not interpreted) Triton kernel goes through Triton's launch path under the stand-in driver,
    and the stand-in kernel it caches is gone afterwards, so no later launch on a real device can reach it."""
    host_overhead = _load_script("host_overhead")
    from triton.runtime.jit import JITFunction

    kernel = JITFunction(_empty_kernel)
    x = torch.zeros(4)
    with host_overhead.stubbed_launches():
        assert isinstance(kernel[(1,)](x, 4, BLOCK=4), host_overhead._StandInKernel)
        assert len(kernel.device_caches[host_overhead.STAND_IN_DEVICE][0]) == 1  # compiled once, cached
        kernel[(1,)](x, 4, BLOCK=4)
        assert len(kernel.device_caches[host_overhead.STAND_IN_DEVICE][0]) == 1
    assert host_overhead.STAND_IN_DEVICE not in kernel.device_caches


def test_profile_script_summarises_each_mha_call(capsys):
    profile_step = _load_script("profile_step")
    profile_step.main(["--suite", "mha", "--calls", "1"])
    out = capsys.readouterr().out
    summaries = [line for line in out.splitlines() if line.startswith("### ")]
    assert len(summaries) == 4  # fwd and fwd+bwd, ours and torch's
    # cProfile's table after each: our calls' own Python is in it
    assert out.count("Ordered by: internal time") == 4
    assert "tfm_kernels/nn/attention.py" in out.split(summaries[1])[0]
    for line in summaries:
        host, wall = (float(line.split(f"{what} ")[1].split(" ms")[0]) for what in ("host", "wall"))
        assert 0 < host <= wall
