#!/usr/bin/env bash
# On the GPU machine (device tool): the flash_mla part of merged_check.sh, for
# a change that touches only the MLA kernels: the build, every MLA `-m gpu`
# test (tests/test_mla.py and test_cuda.py's mla cases, two processes),
# racecheck and memcheck on the quick cases (all of jax_mla's kernels), and
# the MLA decode side by side against FlashInfer with the q8_0 rows.
# Usage: mla_check.sh FI_DIR. Logs go to $OUT (or ./gpu_out); 7 files.
set -uo pipefail
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
FI_DIR="$1"
export CUDACXX="${CUDACXX:-/usr/local/cuda/bin/nvcc}" PYTHONUNBUFFERED=1 \
    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
SAN=/usr/local/cuda/bin/compute-sanitizer
t() { echo "[$1: $(( $(date +%s) - T0 )) s]"; }
{
  T0=$(date +%s)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip install --no-build-isolation --no-deps -v \
      -Ccmake.define.JAX_MLA_CUDA=ON . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
  t build
  pt() {  # log name, pytest args
    local log=$1
    shift
    timeout "${TEST_TIMEOUT:-200}" python3 -P -m pytest "$@" -p no:cacheprovider -q -rfs \
        -m gpu > "$OUT/$log" 2>&1
  }
  pt pytest_mla.log tests/test_mla.py &
  pt pytest_cuda_mla.log tests/test_cuda.py -k mla &
  wait
  for f in "$OUT"/pytest_*.log; do
    echo "$(basename "$f"): $(tail -1 "$f")"
    grep -E "^(FAILED|ERROR)" "$f" | head -5
  done
  t test
  for tool in racecheck memcheck; do
    timeout "${SAN_TIMEOUT:-120}" $SAN --tool $tool --kernel-name kns=jax_mla --print-limit 20 \
        python3 -P benchmarks/gpu/sanitize_cases.py --quick > "$OUT/$tool.log" 2>&1
    echo "$tool rc $?"
    grep -E "RACECHECK SUMMARY|ERROR SUMMARY|hazard|Invalid|sanitize cases|FAIL" "$OUT/$tool.log" | head -6
  done
  t sanitizers
  python3 -m pip install -q --no-index --no-deps --target /tmp/fi_deps "$FI_DIR"/apache_tvm_ffi-*.whl
  PYTHONPATH=/tmp/fi_deps timeout "${BENCH_TIMEOUT:-150}" python3 -P benchmarks/gpu/side_by_side.py \
      --fi-dir "$FI_DIR" --quant q8_0 --skip prefill > "$OUT/side_by_side.log" 2>&1
  echo "bench rc $?"
  sed -n '/==== MLA decode (ms/,$p' "$OUT/side_by_side.log" | head -20
  t bench
} 2>&1 | tee "$OUT/mla_check.log"
