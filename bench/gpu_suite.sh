#!/usr/bin/env bash
# On a CUDA machine: build pyprune._C, run the cuda-marked tests, the Triton self-check and the
# kernel benchmarks. Logs and results go to $OUT (default ./gpu_out) as one tarball plus a log.
#   bench/gpu_suite.sh [build] [bindings] [tests] [selfcheck] [solver] [admm-precision] [serving] [serving-quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT/results"
LOG="$OUT/log.txt"
steps=${*:-build tests solver serving-quick}  # tests include the Triton selfcheck
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PYPRUNE_CUDA_ARCHS=${PYPRUNE_CUDA_ARCHS:-90}  # Hopper only: a faster build on the H100/H200
phase() { echo "=== $1 ($(date +%T))" | tee -a "$LOG"; }
for step in $steps; do
  case $step in
    build)
      phase build
      MAX_JOBS=16 timeout 300 \
        python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -20 | tee -a "$LOG"
      python3 -c "import torch, pyprune._C; print('extension ok', torch.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$LOG" ;;
    tests)
      phase tests
      # Worker processes (pytest-xdist, when installed): a crashing test is reported, the rest still run.
      xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
      PYPRUNE_EXPECT_EXTENSION=1 timeout ${TEST_TIMEOUT:-600} python3 -X faulthandler -m pytest -rfE -m cuda -p no:cacheprovider $xdist tests \
        > "$OUT/tests.txt" 2>&1
      tail -25 "$OUT/tests.txt" | tee -a "$LOG" ;;
    selfcheck)
      phase selfcheck
      timeout 900 python3 -m pyprune.triton_kernels.selfcheck 2>&1 | tail -15 | tee -a "$LOG" ;;
    solver)
      phase solver
      timeout 300 python3 bench/bench_solver_kernels.py --repeats 5 --budget 8 --out "$OUT/results" 2>&1 | tail -60 | tee -a "$LOG" ;;
    admm-precision)
      phase admm-precision
      timeout 200 python3 bench/bench_admm_precision.py --out "$OUT/results" 2>&1 | tail -10 | tee -a "$LOG" ;;
    bindings)
      phase bindings
      PYPRUNE_EXPECT_EXTENSION=1 timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_extension_bindings.py 2>&1 | tail -15 | tee -a "$LOG" ;;
    serving)
      phase serving
      timeout ${SERVING_TIMEOUT:-500} python3 bench/bench_serving_kernels.py --out-dir "$OUT/results" > "$OUT/serving.txt" 2>&1
      tail -60 "$OUT/serving.txt" | tee -a "$LOG" ;;
    serving-quick)
      phase serving-quick
      timeout ${SERVING_TIMEOUT:-300} python3 bench/bench_serving_kernels.py --quick --e2e-layers 8 --out-dir "$OUT/results" > "$OUT/serving.txt" 2>&1
      tail -40 "$OUT/serving.txt" | tee -a "$LOG" ;;
  esac
done
tar -czf "$OUT/results.tgz" -C "$OUT" results && rm -rf "$OUT/results"
phase done
