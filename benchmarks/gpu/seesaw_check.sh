#!/usr/bin/env bash
# On the GPU machine (device tool), one call for the sm_90a MLA seesaw kernel
# (ffi/cuda/mla_sm90_kernel.cuh): the build, the SASS of the kernel (wgmma and
# warpgroup-wait counts), the quick sanitize cases without a sanitizer (a hang
# or a wrong result stops the call early), the side by side against
# FlashInfer fa3 for the 64-row rows, the same rows with
# JAX_MLA_CUDA_MLA_SEESAW=0 (the key-split kernel, the baseline, same machine),
# the MLA GPU tests, and compute-sanitizer racecheck and memcheck on the quick cases.
# Usage: seesaw_check.sh FI_DIR [steps...]; steps from: build quick test bench base
# racecheck memcheck (default: all). Logs go to $OUT (or ./gpu_out).
set -uo pipefail
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
FI_DIR="$1"
shift
STEPS="${*:-build quick test bench base racecheck memcheck}"
export CUDACXX="${CUDACXX:-/usr/local/cuda/bin/nvcc}" PYTHONUNBUFFERED=1 \
    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
SAN=/usr/local/cuda/bin/compute-sanitizer
ROWS="${ROWS:-128,128,4096/128,128,8192/32,128,32768/64,16,16384}"
has() { [[ " $STEPS " == *" $1 "* ]]; }
t() { echo "[$1: $(( $(date +%s) - T0 )) s]"; }
{
  T0=$(date +%s)
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  if has build; then
    CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip install --no-build-isolation --no-deps -v \
        -Ccmake.define.JAX_MLA_CUDA=ON . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
    grep -E "error|warning: |C7515|Successfully installed" "$OUT/build.log" | sort | uniq -c | head -10
    so=$(python3 -P -c "import jax_mla, os; print(os.path.dirname(jax_mla.__file__))")/_cuda*.so
    cuobjdump -sass -fun '_ZN7jax_mla4cuda19MlaSm90SeesawKernelI13__nv_bfloat16EEvNS_15AttentionParamsE14CUtensorMap_st' \
        $so > "$OUT/seesaw_bf16.sass" 2>&1
    echo "seesaw bf16 SASS: $(grep -c HGMMA "$OUT/seesaw_bf16.sass") HGMMA," \
        "$(grep -c 'WARPGROUP.DEPBAR' "$OUT/seesaw_bf16.sass") WARPGROUP.DEPBAR," \
        "$(grep -c 'WARPGROUP.ARRIVE' "$OUT/seesaw_bf16.sass") WARPGROUP.ARRIVE"
    t build
  fi
  if has quick; then
    timeout "${QUICK_TIMEOUT:-90}" python3 -P benchmarks/gpu/sanitize_cases.py --quick \
        > "$OUT/quick.log" 2>&1
    rc=$?
    tail -3 "$OUT/quick.log"
    t quick
    [ $rc -ne 0 ] && { echo "quick cases rc $rc: stopping"; exit 1; }
  fi
  if has bench; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/fi_deps "$FI_DIR"/apache_tvm_ffi-*.whl
    PYTHONPATH=/tmp/fi_deps timeout "${BENCH_TIMEOUT:-150}" python3 -P benchmarks/gpu/side_by_side.py \
        --fi-dir "$FI_DIR" --skip "${BENCH_SKIP:-prefill}" --rows "$ROWS" > "$OUT/side_by_side.log" 2>&1
    echo "bench rc $?"
    grep -E "^MLA B=" "$OUT/side_by_side.log"
    sed -n '/==== MLA decode (ms/,/====.*prefill/p' "$OUT/side_by_side.log"
    t bench
  fi
  if has base; then
    mkdir -p "$OUT/base"
    PYTHONPATH=/tmp/fi_deps OUT="$OUT/base" JAX_MLA_CUDA_MLA_SEESAW=0 timeout "${BENCH_TIMEOUT:-150}" python3 -P \
        benchmarks/gpu/side_by_side.py --fi-dir "$FI_DIR" --skip prefill,fa3 --rows "$ROWS" \
        > "$OUT/side_by_side_base.log" 2>&1
    echo "base bench rc $?"
    grep -E "^MLA B=" "$OUT/side_by_side_base.log"
    t base
  fi
  if has test; then
    pt() {  # log name, pytest args
      local log=$1
      shift
      timeout "${TEST_TIMEOUT:-200}" python3 -P -m pytest "$@" -p no:cacheprovider -q -rf \
          -m gpu > "$OUT/$log" 2>&1
    }
    pt pytest_mla.log tests/test_mla.py &
    pt pytest_cuda_mla.log tests/test_cuda.py -k "mla and not quant" &
    pt pytest_cuda_mla_quant.log tests/test_cuda.py -k "mla and quant" &
    wait
    for f in "$OUT"/pytest_*.log; do
      echo "$(basename "$f"): $(tail -1 "$f")"
      grep -E "^(FAILED|ERROR)" "$f" | head -5
    done
    t test
  fi
  for tool in racecheck memcheck; do
    has $tool || continue
    timeout "${SAN_TIMEOUT:-120}" $SAN --tool $tool --kernel-name kns=MlaSm90 --print-limit 20 \
        python3 -P benchmarks/gpu/sanitize_cases.py --quick > "$OUT/$tool.log" 2>&1
    echo "$tool rc $?"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|hazard|Invalid|sanitize cases|FAIL" "$OUT/$tool.log" | head -8
    t $tool
  done
} 2>&1 | tee "$OUT/seesaw_check.log"
