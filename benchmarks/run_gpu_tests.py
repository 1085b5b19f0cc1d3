"""Runs the `gpu`-marked tests in several pytest processes at once.

On a GPU machine the suite's time goes to compiling Triton kernels, which is single-threaded and CPU-bound
while the GPU idles, so WORKERS processes finish it several times sooner. The unit spread over the processes
is a test function with all its parametrizations (their kernels compile once, in one process; processes share
Triton's on-disk cache), or a run of consecutive parametrizations of a function too big for one process. Each
process's output is printed whole when it ends; one still running at --timeout is interrupted (pytest then
reports what it has run) and counts as failed. Exit status: 0 when every process passed.

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
    """The gpu-marked test ids, grouped by test function: {"file::function": [ids]}."""
    listing = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
                              "-p", "no:cacheprovider", *paths], capture_output=True, text=True, check=False)
    functions = collections.defaultdict(list)
    for line in listing.stdout.splitlines():
        if "::" in line:
            functions[line.split("[")[0]].append(line.strip())
    if not functions:
        raise SystemExit(f"no gpu tests collected:\n{listing.stdout}{listing.stderr}")
    return functions


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
    groups = spread(collect(args.paths), args.workers)
    logs = [tempfile.TemporaryFile("w+") for _ in groups]  # files, not pipes: a full pipe would stall a worker
    processes = [subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                   *group], stdout=log, stderr=subprocess.STDOUT, text=True)
                 for group, log in zip(groups, logs)]
    failed = 0
    for index, (group, process, log) in enumerate(zip(groups, processes, logs), 1):
        left = max(1.0, args.timeout - (time.monotonic() - start))
        try:
            status = process.wait(timeout=left)
        except subprocess.TimeoutExpired:  # interrupted, pytest still reports the failures it has seen
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=INTERRUPT_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            status = f"stopped after {args.timeout:.0f} s"
        failed += status != 0
        log.seek(0)
        print(f"---- group {index} of {len(groups)} ({group[0]} and {len(group) - 1} more selections): exit "
              f"{status} at {time.monotonic() - start:.0f} s")
        print(log.read(), flush=True)
    print(f"gpu tests: {len(groups) - failed} of {len(groups)} groups passed in {time.monotonic() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
