"""Runs the `gpu`-marked tests in several pytest processes at once.

On a GPU machine the suite's time goes to compiling Triton kernels, which is single-threaded and CPU-bound
while the GPU idles, so WORKERS processes finish it several times sooner. The unit spread over the processes
is a test function with all its parametrizations (their kernels compile once, in one process; processes share
Triton's on-disk cache), or a run of consecutive parametrizations of a function too big for one process. Each
process's output is printed whole when it ends. At --timeout every process still running is interrupted at
once (pytest then reports what it has run), killed if still running INTERRUPT_GRACE_S later, and counts as
failed; so the run ends within --timeout plus one grace period (device_check.sh allows 20 s over). A test file
that fails to import is reported and fails the run (its tests would be missing from the listing).
Exit status: 0 when the collection and every process passed.

    python benchmarks/run_gpu_tests.py --workers 8 --timeout 150
"""

import argparse
import collections
import signal
import subprocess
import sys
import tempfile
import time

INTERRUPT_GRACE_S = 10  # for an interrupted pytest to print its summary before it is killed


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
    logs = [tempfile.TemporaryFile("w+") for _ in groups]  # files, not pipes: a full pipe would stall a worker
    processes = [subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                   *group], stdout=log, stderr=subprocess.STDOUT, text=True)
                 for group, log in zip(groups, logs)]
    deadline = start + args.timeout
    interrupted = []  # the processes still running at --timeout: all interrupted at once, one grace for all
    failed = 0
    for index, (group, process, log) in enumerate(zip(groups, processes, logs), 1):
        try:
            status = process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            if not interrupted:  # pytest interrupted still reports the failures it has seen
                interrupted = [p for p in processes if p.poll() is None]
                for running in interrupted:
                    running.send_signal(signal.SIGINT)
                deadline = time.monotonic() + INTERRUPT_GRACE_S
            try:
                status = process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                status = process.wait()
        if process in interrupted:
            status = f"stopped after {args.timeout:.0f} s"
        failed += status != 0
        log.seek(0)
        print(f"---- group {index} of {len(groups)} ({group[0]} and {len(group) - 1} more selections): exit "
              f"{status} at {time.monotonic() - start:.0f} s")
        print(log.read(), flush=True)
    broken = "; some test files failed to collect (above)" if collection_errors else ""
    print(f"gpu tests: {len(groups) - failed} of {len(groups)} groups passed in {time.monotonic() - start:.0f} s"
          f"{broken}")
    return 1 if failed or collection_errors else 0


if __name__ == "__main__":
    sys.exit(main())
