#!/usr/bin/env bash
# On the GPU machine (device tool): build jax_mla with the CUDA module forced
# on, show what loaded, run the GPU tests (pytest -m gpu), then
# compute-sanitizer memcheck and racecheck on small cases
# (benchmarks/gpu/sanitize_cases.py). Logs go to $OUT (or ./gpu_out).
# pytest's plugin autoload is off: one of the machine's preinstalled plugins
# crashed the interpreter (SIGSEGV) before collection.
# Usage: build_and_test.sh [pytest args...] (default: -m gpu)
set -uo pipefail
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export CUDACXX="${CUDACXX:-/usr/local/cuda/bin/nvcc}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
SAN=/usr/local/cuda/bin/compute-sanitizer
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  git log -1 --format="commit %h %s" 2>/dev/null || true
  start=$(date +%s)
  CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip install --no-build-isolation --no-deps -v \
      -Ccmake.define.JAX_MLA_CUDA=ON . 2>&1 | grep -E "error|warning: |Successfully" || true
  echo "build: $(( $(date +%s) - start )) s"
  python3 -P -c "import jax, jax_mla; print('jax', jax.__version__, jax.devices()); print(jax_mla.backends()['cuda']); print('SMs', jax_mla._ffi.module('gpu').sm_count())" || exit 1
  start=$(date +%s)
  PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 python3 -P -X faulthandler -m pytest tests -p no:cacheprovider \
      -q -rfs "${@:--m gpu}" > "$OUT/pytest.log" 2>&1 || echo "pytest exited with $?"
  echo "pytest: $(( $(date +%s) - start )) s"
  grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -30
  tail -3 "$OUT/pytest.log"
  if [ -n "${SKIP_SANITIZER:-}" ]; then exit 0; fi
  # The sanitizers check only jax_mla's kernels (XLA's own are excluded by name).
  for tool in memcheck racecheck; do
    start=$(date +%s)
    $SAN --tool $tool --kernel-name kns=jax_mla --print-limit 20 \
        python3 -P benchmarks/gpu/sanitize_cases.py > "$OUT/sanitize_$tool.log" 2>&1
    echo "$tool: exit $? in $(( $(date +%s) - start )) s"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|hazard|Invalid|sanitize cases|FAIL" "$OUT/sanitize_$tool.log" | head -8
  done
} 2>&1 | tee "$OUT/build_and_test.log"
