#!/usr/bin/env bash
# On the GPU machine (device tool), one call that checks a merged tree: the
# build with JAX_MLA_CUDA=ON, every `-m gpu` test in six pytest processes at
# once (the tests spend most of their time compiling on the CPU, which has 16
# cores), compute-sanitizer racecheck and memcheck on the quick cases, then the side by side
# (MLA decode against FlashInfer with the q8_0 cache rows, prefill against
# cuDNN). Each step has its own limit so the call fits the tool's.
# MLA_ONLY=1, for a change that touches only flash_mla's kernels: the MLA tests
# alone (tests/test_mla.py and test_cuda.py's mla cases) and no prefill in the
# side by side, about half the device time.
# Usage: merged_check.sh FI_DIR. Logs go to $OUT (or ./gpu_out).
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
  grep -E "error|warning: " "$OUT/build.log" | head -10
  t build
  pt() {  # log name, pytest args
    local log=$1
    shift
    timeout "${TEST_TIMEOUT:-200}" python3 -P -m pytest "$@" -p no:cacheprovider -q -rfs \
        -m gpu > "$OUT/$log" 2>&1
  }
  if [ "${MLA_ONLY:-0}" = 1 ]; then
    pt pytest_mla.log tests/test_mla.py &
    pt pytest_cuda_mla.log tests/test_cuda.py -k mla &
  else
    pt pytest_cuda_dims.log tests/test_cuda.py -k "attention_dims" &
    pt pytest_cuda_quant.log tests/test_cuda.py -k "not attention_dims and quant" &
    pt pytest_cuda_rest.log tests/test_cuda.py -k "not attention_dims and not quant" &
    pt pytest_attention.log tests/test_attention.py &
    pt pytest_mla.log tests/test_mla.py &
    pt pytest_others.log tests --ignore=tests/test_cuda.py --ignore=tests/test_attention.py \
        --ignore=tests/test_mla.py &
  fi
  wait
  for f in "$OUT"/pytest_*.log; do
    echo "$(basename "$f"): $(tail -1 "$f")"
    grep -E "^(FAILED|ERROR)" "$f" | head -5
  done
  t test
  timeout "${SAN_TIMEOUT:-120}" $SAN --tool racecheck --kernel-name kns=jax_mla --print-limit 20 \
      python3 -P benchmarks/gpu/sanitize_cases.py --quick > "$OUT/racecheck.log" 2>&1
  echo "racecheck rc $?"
  grep -E "RACECHECK SUMMARY|hazard|sanitize cases|FAIL" "$OUT/racecheck.log" | head -8
  t racecheck
  timeout "${SAN_TIMEOUT:-120}" $SAN --tool memcheck --kernel-name kns=jax_mla --print-limit 20 \
      python3 -P benchmarks/gpu/sanitize_cases.py --quick > "$OUT/memcheck.log" 2>&1
  echo "memcheck rc $?"
  grep -E "ERROR SUMMARY|Invalid|sanitize cases|FAIL" "$OUT/memcheck.log" | head -8
  t memcheck
  # FlashInfer's one dependency the GPU image lacks (../shared/tools/flashinfer_mla/README.md);
  # without it the FlashInfer columns come out nan (seen at 5742033).
  python3 -m pip install -q --no-index --no-deps --target /tmp/fi_deps "$FI_DIR"/apache_tvm_ffi-*.whl
  skip=()
  [ "${MLA_ONLY:-0}" = 1 ] && skip=(--skip prefill)
  PYTHONPATH=/tmp/fi_deps timeout "${BENCH_TIMEOUT:-150}" python3 -P benchmarks/gpu/side_by_side.py \
      --fi-dir "$FI_DIR" --quant q8_0 "${skip[@]}" > "$OUT/side_by_side.log" 2>&1
  echo "bench rc $?"
  sed -n '/==== MLA decode (ms/,$p' "$OUT/side_by_side.log" | head -40
  t bench
} 2>&1 | tee "$OUT/merged_check.log"
