#!/usr/bin/env bash
# The one-command GPU check: the CUDA test cases and the layer benchmark on the GPU, capped by the
# timeouts below at 150 + 110 + 200 s (under 8 minutes), tables in benchmarks/results/device/
# (bench.md, bench.json, bench.csv, tests.txt, summary.md) for BENCHMARKS.md to quote. On a GPU
# machine without the project's .venv, PYTHON defaults to python3 (torch, numba and pytest there).
#
#     benchmarks/device_check.sh                # from the repository root, or anywhere
#     PYTHON=/path/to/python benchmarks/device_check.sh
#
# Without a GPU it runs its CPU part instead (a smoke run of the benchmark, first shape of each
# section, into a temporary folder so that no CPU number lands among the device tables) and says
# clearly that CUDA was not available; it then exits 0, since there was nothing to fail on.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
OUT=${DEVICE_CHECK_OUT:-benchmarks/results/device}
start=$(date +%s)

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)")
    echo "== CUDA available: $gpu"
    mkdir -p "$OUT"
    status=0
    # 1. the test cases parametrized over "cuda" (forward, backward, the torch-level kernels, soft BPDA),
    #    (pytest exits non-zero if none is selected), then the rest of the layer tests on this machine's CPU
    echo "== CUDA test cases"
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_layers.py tests/test_kernels.py tests/test_bpda.py \
        -k cuda 2>&1 | tee "$OUT/tests.txt" || status=1
    echo "== the other layer tests"
    timeout 110 "$PY" -m pytest -q -p no:cacheprovider tests/test_layers.py tests/test_kernels.py tests/test_bpda.py \
        -k "not cuda" 2>&1 | tail -3 | tee -a "$OUT/tests.txt" || status=1
    # 2. the layer benchmark on the GPU (every shape, the training section; 2 repeats)
    echo "== bench_layers on the GPU"
    timeout 200 "$PY" benchmarks/bench_layers.py --device cuda --quick --out "$OUT" || status=1
    {
        echo "# Device check"
        echo
        echo "- GPU: $gpu"
        echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
        echo "- CUDA tests: $(grep -E '(passed|failed|error)' "$OUT/tests.txt" | head -1)"
        echo "- other layer tests: $(grep -E '(passed|failed|error)' "$OUT/tests.txt" | tail -1)"
        echo "- wall time: $(( $(date +%s) - start )) s; exit status $status"
        echo "- benchmark table: bench.md (bench.json, bench.csv beside it)"
    } > "$OUT/summary.md"
    cat "$OUT/summary.md"
    exit $status
fi

echo "== CUDA NOT AVAILABLE on this machine: no CUDA test ran and no GPU number was measured."
echo "== Running the CPU part only: a smoke run of bench_layers (first shape of each section)."
tmp=$(mktemp -d "${TMPDIR:-/tmp}/device-check-cpu.XXXXXX")
"$PY" benchmarks/bench_layers.py --quick --shapes 1 --only max --only sum --only tkc --only linear --out "$tmp"
echo "== CPU part done in $(( $(date +%s) - start )) s (tables in $tmp, not in $OUT)."
echo "== CUDA NOT AVAILABLE: run this script on a GPU machine for the device tables."
