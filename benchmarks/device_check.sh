#!/usr/bin/env bash
# The one command for a GPU machine: versions, install (CUDA kernels compiled for this card), the gpu-marked
# tests (TEST_WORKERS pytest processes at once: benchmarks/run_gpu_tests.py), compute-sanitizer memcheck of an
# attention case, then the short benchmark table, printed last.
#
#   bash benchmarks/device_check.sh [all]     install, gpu tests, memcheck, attention + MLP table
#   bash benchmarks/device_check.sh tests     the gpu tests alone, with the whole budget (the first call's
#                                             share of it, TESTS_TIMEOUT_S, runs only part of them)
#   bash benchmarks/device_check.sh table     install, memcheck, attention + MLP table: after "tests"
#   bash benchmarks/device_check.sh pytest-bench   `pytest benchmarks/ --benchmark-only`: pytest-benchmark's
#                                             timing of the suite's core cases, with the whole budget
#   bash benchmarks/device_check.sh models    the host time per call without
#                                             kernels (benchmarks/host_overhead.py), a profile of the eager
#                                             nn.MultiheadAttention and LM calls (benchmarks/profile_step.py),
#                                             then nn.MultiheadAttention, a 12-layer TransformerEncoder and
#                                             GPT-2-small LM training against torch, eager and compiled
# (every call installs: on a warm machine only what changed is rebuilt)
#
# Knobs: TFM_KERNELS_CUDA_ARCHS (default 90a here, for a fast build on H100/H200; the package's own default is
# "80;90a"), MAX_JOBS (default 16), TEST_WORKERS (default 16: the tests' time is Triton compiles, one core per
# process; 8 processes took 280 s on an H200 machine's 16 cores), PYTHON (default python3), SKIP_INSTALL=1
# (reuse the installed build as it is), BUDGET_S (345: the whole script's time;
# each step's cap comes out of what is left, keeping BENCH_RESERVE_S, 170, for the table, and TESTS_TIMEOUT_S,
# 150, at most for the tests in the first call). A benchmark stopped by its cap still prints the rows it
# measured. Logs, the JSON record and the table go to $OUT when set (the
# device tool collects it), else benchmarks/results/. The table:
# our attention (triton, cuda) against torch SDPA flash, cudnn and efficient (and compiled FlexAttention at
# d128 s4096), TFLOP/s forward and backward, bf16, d64 and d128, s1024 and s4096, causal and full,
# B*S = 16k tokens, H*D = 2048, and the training shape d64 s1024 causal with dropout 0.1; then one LLM MLP (16384 x 4096 -> 16384, GELU) forward and forward+backward
# against eager PyTorch and torch.compile. Budget: under 6 minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."

RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
LOG="$RESULTS/device_check-$STAMP.log"
TABLE="$RESULTS/device_check-$STAMP.md"
export MAX_JOBS="${MAX_JOBS:-16}"
export TFM_KERNELS_CUDA=1
export TFM_KERNELS_CUDA_ARCHS="${TFM_KERNELS_CUDA_ARCHS:-90a}"
TESTS_TIMEOUT_S="${TESTS_TIMEOUT_S:-150}"
TEST_WORKERS="${TEST_WORKERS:-16}"
BUDGET_S="${BUDGET_S:-345}"
BENCH_RESERVE_S="${BENCH_RESERVE_S:-170}"
SANITIZER_TIMEOUT_S=60
# The interpreter that holds torch: python3 on the GPU machines (where `python` may not exist).
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"

# Seconds left of the budget minus $1, at least $2 and at most $3 (when given).
cap() {
    local left=$((BUDGET_S - SECONDS - $1))
    [ "$left" -lt "$2" ] && left=$2
    [ -n "${3:-}" ] && [ "$left" -gt "$3" ] && left=$3
    echo "$left"
}

find_sanitizer() {
    command -v compute-sanitizer && return 0
    local dir
    for dir in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-*; do
        if [ -n "$dir" ] && [ -x "$dir/bin/compute-sanitizer" ]; then
            echo "$dir/bin/compute-sanitizer"
            return 0
        fi
    done
    return 1
}

# Builds and installs the package with its CUDA kernels. On a warm machine ninja recompiles only the sources
# changed since the last call, so a second call never tests or times stale kernels.
install() {
    if [ "${SKIP_INSTALL:-0}" = 1 ]; then
        echo "== install skipped (SKIP_INSTALL=1)"
        return
    fi
    local t0=$SECONDS
    echo "== install (TFM_KERNELS_CUDA_ARCHS=$TFM_KERNELS_CUDA_ARCHS, MAX_JOBS=$MAX_JOBS)"
    "$PYTHON" -m pip install --disable-pip-version-check --no-build-isolation --no-deps -q -e .
    echo "installed in $((SECONDS - t0)) s"
}

# The gpu tests alone, with what is left of the budget.
tests() {
    local tests_rc=0 limit
    install
    limit=$(cap 30 60)
    echo "== gpu tests (cap $limit s)"
    timeout -k 20 $((limit + 20)) "$PYTHON" benchmarks/run_gpu_tests.py --workers "$TEST_WORKERS" --timeout "$limit" || tests_rc=$?
    echo "== summary: gpu tests exit $tests_rc, total $SECONDS s"
    [ "$tests_rc" = 0 ]
}

# The module and model tables of issues 5 and 6, printed last, after a profile of their eager calls (each
# call's host, wall and device ms in the log; torch.profiler's and cProfile's tables in
# $RESULTS/profile-*.txt), the MHA calls again without replayed launches (tfm_kernels/triton/replay.py: what
# the replays save there), and the host time of the Triton paths measured as on the development machines
# (benchmarks/host_overhead.py; its rows against theirs say how much slower this machine's CPU issues the same
# calls).
models() {
    local bench_rc=0 limit
    install
    echo "== host time per call, kernels not launched (cap 40 s)"
    timeout -k 10 40 "$PYTHON" benchmarks/host_overhead.py || echo "host_overhead: exit $?"
    limit=$(cap 240 30 60)
    echo "== profile of the MHA and LM calls (cap $limit s)"
    timeout -k 20 "$limit" "$PYTHON" -u benchmarks/profile_step.py > "$RESULTS/profile-$STAMP.txt" \
        || echo "profile: exit $? (the rows it finished are in $RESULTS/profile-$STAMP.txt)"
    grep "^###" "$RESULTS/profile-$STAMP.txt" || true
    echo "== the same MHA calls with every Triton launch through Triton's own launch path (cap 30 s)"
    TFM_KERNELS_REPLAY=0 timeout -k 10 30 "$PYTHON" -u benchmarks/profile_step.py --suite mha \
        > "$RESULTS/profile-no-replay-$STAMP.txt" || echo "profile without replays: exit $?"
    grep "^###" "$RESULTS/profile-no-replay-$STAMP.txt" || true
    limit=$(cap 10 90)  # at least 90: the bench's --budget below stays positive (0 would mean no budget)
    echo "== module and model benchmark (cap $limit s)"
    timeout -k 20 "$limit" "$PYTHON" -m tfm_kernels bench --suite mha,model --budget $((limit - 60)) \
        --json "$RESULTS/bench.jsonl" > "$TABLE" || bench_rc=$?
    echo "== summary: benchmark exit $bench_rc, total $SECONDS s"
    echo
    cat "$TABLE"
    [ "$bench_rc" = 0 ]
}

# pytest-benchmark over the suite's core cases (benchmarks/bench_*.py, synchronised after each call), with what
# is left of the budget; its table goes to the log.
pytest_bench() {
    local rc=0 limit
    install
    limit=$(cap 10 60)
    echo "== pytest benchmarks/ --benchmark-only (cap $limit s)"
    timeout -k 20 "$limit" "$PYTHON" -m pytest -q -p no:cacheprovider benchmarks/ --benchmark-only \
        --benchmark-columns=median,iqr,rounds --benchmark-sort=name || rc=$?
    echo "== summary: pytest-benchmark exit $rc, total $SECONDS s"
    [ "$rc" = 0 ]
}

# $1 = 1: with the gpu tests (capped at TESTS_TIMEOUT_S); 0: without them (mode "table").
main() {
    local tests_rc=skipped sanitizer_rc=skipped bench_rc=0 limit
    echo "== device ($(date -u))"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null \
        || echo "nvidia-smi: not available"
    "$PYTHON" - <<'PY'
import platform, torch, triton
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}), triton {triton.__version__}")
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device visible")
PY

    install
    "$PYTHON" -m tfm_kernels info

    if [ "$1" = 1 ]; then
        limit=$(cap $((BENCH_RESERVE_S + SANITIZER_TIMEOUT_S)) 30 "$TESTS_TIMEOUT_S")
        echo "== gpu tests (cap $limit s)"
        t0=$SECONDS
        tests_rc=0
        timeout -k 20 $((limit + 20)) "$PYTHON" benchmarks/run_gpu_tests.py --workers "$TEST_WORKERS" \
            --timeout "$limit" || tests_rc=$?
        echo "gpu tests: exit $tests_rc in $((SECONDS - t0)) s"
    fi

    if [ -f benchmarks/sanitize_attention.py ]; then
        local sanitizer
        if sanitizer="$(find_sanitizer)"; then
            echo "== compute-sanitizer memcheck"
            sanitizer_rc=0
            limit=$(cap "$BENCH_RESERVE_S" 20 "$SANITIZER_TIMEOUT_S")
            timeout -k 20 "$limit" "$sanitizer" --tool memcheck --error-exitcode 1 \
                "$PYTHON" benchmarks/sanitize_attention.py || sanitizer_rc=$?
        else
            sanitizer_rc="skipped (compute-sanitizer not found)"
        fi
    fi

    limit=$(cap 5 90)
    echo "== benchmark (cap $limit s)"
    t0=$SECONDS
    timeout -k 20 "$limit" "$PYTHON" -m tfm_kernels bench --suite attention,mlp --mlp-shapes "gpt-style d4096" \
        --budget $((limit - 40)) --json "$RESULTS/bench.jsonl" > "$TABLE" || bench_rc=$?
    echo "benchmark: exit $bench_rc in $((SECONDS - t0)) s; record appended to $RESULTS/bench.jsonl"

    echo "== summary: gpu tests exit $tests_rc, memcheck $sanitizer_rc, benchmark exit $bench_rc," \
         "total $SECONDS s"
    echo
    cat "$TABLE"
    { [ "$tests_rc" = 0 ] || [ "$tests_rc" = skipped ]; } && [ "$bench_rc" = 0 ] \
        && { [ "$sanitizer_rc" = 0 ] || [[ "$sanitizer_rc" == skipped* ]]; }
}

case "${1:-}" in
    "" | all) main 1 2>&1 | tee "$LOG" ;;
    table) main 0 2>&1 | tee "$LOG" ;;
    models) models 2>&1 | tee "$LOG" ;;
    tests) tests 2>&1 | tee "$LOG" ;;
    pytest-bench) pytest_bench 2>&1 | tee "$LOG" ;;
    *) echo "usage: bash benchmarks/device_check.sh [all | tests | table | models | pytest-bench]; got '$1'" >&2
       exit 2 ;;
esac
