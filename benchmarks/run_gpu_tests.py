"""Runs the `gpu`-marked tests in several pytest processes at once.

On a GPU machine the suite's time goes to compiling Triton kernels, which is single-threaded and CPU-bound
while the GPU idles, so WORKERS processes finish it several times sooner. The unit spread over the processes
is a test function with all its parametrizations (their kernels compile once, in one process; processes share
Triton's on-disk cache), or a run of consecutive parametrizations of a function too big for one process. Each
process's output is printed whole when it ends.

Each pytest process loads this module as a plugin: it prints a failure's message the moment the test fails and
records which tests started and finished. A test that kills its process (a segfault) would otherwise take the
reports of every failure before it, and every test after it, down with it; instead the runner names the test
that crashed and runs the group's unfinished tests again in a new process, as long as time remains.

At --timeout every process still running is interrupted at once (pytest then reports what it has run), killed
if still running INTERRUPT_GRACE_S later, and counts as failed; so the run ends within --timeout plus one grace
period (device_check.sh allows 20 s over). A test file that fails to import is reported and fails the run (its
tests would be missing from the listing). Exit status: 0 when the collection and every process passed.

    python benchmarks/run_gpu_tests.py --workers 8 --timeout 150
"""

import argparse
import collections
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

INTERRUPT_GRACE_S = 10  # for an interrupted pytest to print its summary before it is killed
POLL_S = 0.2
HANG_DUMP_S = 120
PROGRESS_ENV = "TFM_KERNELS_TEST_PROGRESS"  # the file a pytest process records its tests' starts and ends in
PLUGIN = pathlib.Path(__file__).stem

# ------------------------------------------------------------------------------- the plugin, in each pytest
_config = None


def pytest_configure(config):
    global _config
    _config = config


def _record(event, nodeid):
    path = os.environ.get(PROGRESS_ENV)
    if path:
        with open(path, "a") as progress:
            progress.write(f"{event} {nodeid}\n")


def pytest_runtest_logstart(nodeid, location):
    _record("start", nodeid)


def pytest_runtest_logfinish(nodeid, location):
    _record("end", nodeid)


def pytest_runtest_logreport(report):
    """A failure's one-line message at once (pytest prints the tracebacks when the whole run ends)."""
    terminal = _config.pluginmanager.get_plugin("terminalreporter") if _config is not None else None
    if report.failed and terminal is not None:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message if crash is not None else (report.longreprtext.strip().splitlines() or [""])[-1]
        terminal.write_line(f"\nFAILED {report.nodeid} ({report.when}): {message}")
        terminal.flush()


# ---------------------------------------------------------------------------------------------- the runner
def collect(paths):
    """The gpu-marked test ids, grouped by test function: {"file::function": [ids]}, and pytest's report of
    the collection when it had errors (a module that fails to import lists none of its tests), else ""."""
    listing = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
                              "-p", "no:cacheprovider", *paths], capture_output=True, text=True, check=False)
    functions = collections.defaultdict(list)
    for line in listing.stdout.splitlines():
        if "::" in line:
            functions[line.split("[")[0]].append(line.strip())
    if not functions:
        raise SystemExit(f"no gpu tests collected:\n{listing.stdout}{listing.stderr}")
    errors = listing.stdout + listing.stderr if listing.returncode != 0 else ""
    return functions, errors


def spread(functions, workers):
    """Test ids into at most `workers` groups of about equal size. A function stays whole (pytest selects it
    by "file::function") unless it alone holds more than a group's share; then its ids are cut into
    consecutive runs of at most that share. Units go largest first to the lightest group."""
    total = sum(len(ids) for ids in functions.values())
    share = -(-total // workers)
    units = []
    for function, ids in functions.items():
        if len(ids) <= share:
            units.append(([function], len(ids)))
        else:
            units += [(ids[i:i + share], len(ids[i:i + share])) for i in range(0, len(ids), share)]
    groups = [[] for _ in range(min(workers, len(units)))]
    loads = [0] * len(groups)
    for selection, size in sorted(units, key=lambda unit: -unit[1]):
        lightest = loads.index(min(loads))
        groups[lightest] += selection
        loads[lightest] += size
    return groups


class Run:
    """One pytest process over a selection of one group, its output and its progress in temporary files."""

    def __init__(self, selection):
        self.selection = selection
        self.log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would stall the process
        progress = tempfile.NamedTemporaryFile("w", suffix=".progress", delete=False)
        progress.close()
        self.progress_path = progress.name
        plugin_path = os.pathsep.join(filter(None, [str(pathlib.Path(__file__).parent),
                                                    os.environ.get("PYTHONPATH")]))
        env = {**os.environ, PROGRESS_ENV: self.progress_path, "PYTHONPATH": plugin_path}
        # faulthandler_timeout: a test still running after HANG_DUMP_S prints every thread's stack, naming it.
        self.process = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                         "-o", f"faulthandler_timeout={HANG_DUMP_S}", "-p", PLUGIN, *selection],
                                        stdout=self.log, stderr=subprocess.STDOUT, text=True, env=env)
        self.interrupted = False

    def progress(self):
        """(ids started, ids finished), each in the order they happened."""
        started, finished = [], []
        with open(self.progress_path) as progress:
            for line in progress:
                event, nodeid = line.rstrip("\n").split(" ", 1)
                (started if event == "start" else finished).append(nodeid)
        return started, finished

    def output(self):
        self.log.seek(0)
        text = self.log.read()
        self.log.close()
        os.unlink(self.progress_path)
        return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", default=["tests"])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds for the whole run")
    args = parser.parse_args(argv)

    start = time.monotonic()
    functions, collection_errors = collect(args.paths)
    if collection_errors:
        print(f"---- collection errors: their tests are not run\n{collection_errors}", flush=True)
    groups = spread(functions, args.workers)
    running = {index: Run(group) for index, group in enumerate(groups, 1)}
    failed_groups, crashed = set(), []
    deadline = start + args.timeout
    interrupting = False
    terminated = []  # a SIGTERM (a time limit around the runner) stops the groups as the deadline does
    signal.signal(signal.SIGTERM, lambda signum, frame: terminated.append(signum))
    while running:
        if (terminated or time.monotonic() >= deadline) and not interrupting:  # one grace for all, not each in turn
            interrupting = True
            for run in running.values():
                run.interrupted = True
                run.process.send_signal(signal.SIGINT)
            deadline = time.monotonic() + INTERRUPT_GRACE_S
        elif time.monotonic() >= deadline:
            for run in running.values():
                run.process.kill()
        for index, run in list(running.items()):
            status = run.process.poll()
            if status is None:
                continue
            del running[index]
            started, finished = run.progress()
            killed_by_signal = status < 0 and not run.interrupted  # not our own kill at the deadline
            crash = next((i for i in reversed(started) if i not in finished), None) if killed_by_signal else None
            stopped = "stopped by SIGTERM" if terminated else f"stopped after {args.timeout:.0f} s"
            label = stopped if run.interrupted else status
            if status != 0:
                failed_groups.add(index)
            print(f"---- group {index} of {len(groups)} ({run.selection[0]} and {len(run.selection) - 1} more "
                  f"selections): exit {label} at {time.monotonic() - start:.0f} s")
            print(run.output(), flush=True)
            if crash is not None:
                crashed.append(crash)
                print(f"---- group {index}: {crash} crashed its process (signal {-status})", flush=True)
                done = set(finished) | {crash}
                # The crashed run's own test ids (a selection names a function or one id): a rerun that crashes
                # again reruns only what it had not finished.
                ids = [i for selection in run.selection for i in functions.get(selection, [selection])]
                rest = [i for i in ids if i not in done]
                if rest and not interrupting:
                    print(f"---- group {index}: running its {len(rest)} unfinished tests again", flush=True)
                    running[index] = Run(rest)
        time.sleep(POLL_S if running else 0)
    broken = "; some test files failed to collect (above)" if collection_errors else ""
    print(f"gpu tests: {len(groups) - len(failed_groups)} of {len(groups)} groups passed in "
          f"{time.monotonic() - start:.0f} s{broken}")
    if crashed:
        print("crashed their process: " + ", ".join(crashed))
    return 1 if failed_groups or collection_errors else 0


if __name__ == "__main__":
    sys.exit(main())
