#!/usr/bin/env bash
# The GPU checks of maccore in one command, for the few minutes of a lent device (about 5-7 min).
#
#   bash benchmarks/gpu.sh                   # on the device machine, from anywhere in the checkout
#   bash benchmarks/gpu.sh --quick           # the benchmark with --quick (about 1 min less)
#   bash benchmarks/gpu.sh --download-wheels # HERE, with a network: maccore's pure-Python
#                                            # dependencies as wheels into benchmarks/results/wheels
#
# Steps, each timed and under its own time limit, each run whatever the previous one gave:
#   1. dependencies: nothing is installed when everything imports. Missing array-api-compat /
#      array-api-extra (maccore's dependencies) are installed from $MACCORE_WHEELS (default
#      benchmarks/results/wheels, made by --download-wheels; carry that folder to the device) into
#      /tmp/maccore-site, without an index. Missing torch: `pip install -e ".[torch,test,zoo]"
#      torch==2.13.0` (needs a registry; the lent H200 has torch and none). CuPy is optional
#      (GPU_SH_CUPY=1 tries `pip install cupy-cuda12x` when it does not import).
#   2. device correctness: tests/test_benchmarks_gpu.py -k "cuda or cupy" (mac_apply on the
#      device against the CPU, 12 MAC training steps of the ViT and the decoder on the device
#      against the CPU, every benchmark section at tiny sizes)            limit $TESTS_TIMEOUT s (240)
#   3. python -m benchmarks.gpu: the issue's GPU rows in one table        limit $BENCH_TIMEOUT s (300)
#   4. the core suite on CuPy: MACCORE_TEST_BACKENDS=cupy pytest tests/core -k cupy -n $WORKERS
#      (skipped without CuPy; GPU_SH_CORE=0 skips it)                     limit $CORE_TIMEOUT s (150)
# The benchmark runs before the long CuPy suite so that its table comes back even when the lease
# runs short. Logs go to $OUT when it is set (the device tool brings them back), else to
# benchmarks/results/gpu-<time>/. Exit status: 0 when every step passed, else the first failure's.
set -u
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
WHEELS=${MACCORE_WHEELS:-benchmarks/results/wheels}

if [ "${1:-}" = "--download-wheels" ]; then
  # pinned to the versions installed here (tested with this checkout); pure Python, any platform
  specs=$($PY - <<'EOF'
from importlib.metadata import version
names = ["array-api-compat", "array-api-extra", "array-api-strict"]
print(" ".join(f"{n}=={version(n)}" for n in names))
EOF
  ) || exit 1
  mkdir -p "$WHEELS" && exec $PY -m pip download --no-deps --only-binary=:all: -d "$WHEELS" $specs
fi
BENCH_ARGS=()
[ "${1:-}" = "--quick" ] && BENCH_ARGS+=(--quick)

LOGS=${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$LOGS"
export PYTHONPATH=".:adapters${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
T0=$(date +%s)
SUMMARY=()
RC=0

step() {  # step NAME LOG LIMIT CMD...: run CMD under LIMIT seconds, tee its output to LOG
  local name=$1 log=$2 limit=$3 t rc
  shift 3
  echo
  echo "=== $name (limit ${limit} s) ==="
  t=$(date +%s)
  set -o pipefail
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOGS/$log"
  rc=$?
  set +o pipefail
  t=$(( $(date +%s) - t ))
  local what="rc $rc"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && what="TIMEOUT after ${limit} s (incomplete)"
  [ "$rc" -eq 0 ] && what="ok"
  SUMMARY+=("$(printf '%-34s %5d s  %s' "$name" "$t" "$what")")
  [ "$RC" -eq 0 ] && [ "$rc" -ne 0 ] && RC=$rc
  echo "=== $name: $what, ${t} s (at $(( $(date +%s) - T0 )) s) ==="
  return 0
}

imports() { $PY -c "import $1" >/dev/null 2>&1; }

{
  echo "maccore GPU checks: $(date -u +%FT%TZ), $(git rev-parse --short HEAD 2>/dev/null || echo 'no git')"
  echo "python: $(command -v $PY) $($PY -V 2>&1)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" 2>&1
  $PY -c "import cupy; print('cupy', cupy.__version__)" 2>&1 | tail -1
} | tee "$LOGS/gpu_env.log"

# --- 1. dependencies --------------------------------------------------------------------------
t=$(date +%s)
if ! imports array_api_compat || ! imports array_api_extra; then
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "installing maccore's dependencies from $WHEELS (no index) into /tmp/maccore-site"
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/maccore-site "$WHEELS"/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/maccore-site"
  else
    echo "array-api-compat / array-api-extra missing and no wheels in $WHEELS: trying the registry"
    timeout 120 $PY -m pip install -q --retries 0 --timeout 10 "array-api-compat>=1.9" "array-api-extra>=0.7"
  fi
fi
if ! imports torch; then
  echo "torch missing: pip install -e .[torch,test,zoo] torch==2.13.0"
  timeout 600 $PY -m pip install -q --retries 1 --timeout 20 -e ".[torch,test,zoo]" "torch==2.13.0"
fi
if ! imports cupy && [ "${GPU_SH_CUPY:-0}" = 1 ]; then
  timeout 300 $PY -m pip install -q --retries 0 --timeout 10 cupy-cuda12x || echo "cupy not installed (optional)"
fi
if imports maccore && imports torch; then
  SUMMARY+=("$(printf '%-34s %5d s  %s' dependencies $(( $(date +%s) - t )) ok)")
else
  echo "maccore or torch does not import: nothing can run"
  $PY -c "import maccore, torch" 2>&1 | tail -3
  exit 3
fi

# --- 2. device correctness --------------------------------------------------------------------
step "device tests (cuda, cupy)" gpu_tests.log "${TESTS_TIMEOUT:-240}" \
  $PY -m pytest -q -p no:cacheprovider tests/test_benchmarks_gpu.py -k "cuda or cupy"

# --- 3. the benchmark -------------------------------------------------------------------------
step "python -m benchmarks.gpu" gpu_bench.log "${BENCH_TIMEOUT:-300}" \
  $PY -m benchmarks.gpu ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"}

# --- 4. the core suite on CuPy ----------------------------------------------------------------
if [ "${GPU_SH_CORE:-1}" != 1 ]; then
  echo "core suite on CuPy: skipped (GPU_SH_CORE=${GPU_SH_CORE})"
elif ! $PY -c "import cupy; assert cupy.cuda.runtime.getDeviceCount() > 0" >/dev/null 2>&1; then
  echo "core suite on CuPy: skipped (CuPy does not import or sees no device)"
  SUMMARY+=("$(printf '%-34s %5s    %s' 'core suite on CuPy' - 'skipped: no CuPy device')")
else
  xdist=()
  imports xdist && xdist=(-n "${WORKERS:-8}")
  step "core suite on CuPy" gpu_core_cupy.log "${CORE_TIMEOUT:-150}" \
    env MACCORE_TEST_BACKENDS=cupy $PY -m pytest -q -x -p no:cacheprovider ${xdist[@]+"${xdist[@]}"} tests/core -k cupy
fi

echo
echo "=== summary ($(( $(date +%s) - T0 )) s in all; logs in $LOGS) ==="
printf '%s\n' "${SUMMARY[@]}" | tee "$LOGS/gpu_summary.log"
exit "$RC"
