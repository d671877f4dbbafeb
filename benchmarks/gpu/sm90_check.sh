#!/usr/bin/env bash
# On the GPU machine (device tool), one call for the sm_90a flash_attention
# kernel: the wgmma unit test (benchmarks/gpu/wgmma_unit.cu), the build, the
# attention GPU tests, the 192/128 causal prefill rows against cuDNN
# (side_by_side.py --skip mla,fa3) and compute-sanitizer memcheck on the small
# cases. Each step has its own time limit so one call stays inside the tool's.
# Usage: sm90_check.sh FI_DIR [steps...]; steps from: unit build test bench memcheck
# racecheck (default: all but racecheck). Logs go to $OUT (or ./gpu_out).
set -uo pipefail
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
FI_DIR="$1"
shift
STEPS="${*:-unit build test bench memcheck}"
export CUDACXX="${CUDACXX:-/usr/local/cuda/bin/nvcc}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
SAN=/usr/local/cuda/bin/compute-sanitizer
has() { [[ " $STEPS " == *" $1 "* ]]; }
t() { echo "[$1: $(( $(date +%s) - T0 )) s]"; }
{
  T0=$(date +%s)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  if has unit; then
    $CUDACXX -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a -I. benchmarks/gpu/wgmma_unit.cu \
        -o /tmp/wgmma_unit && timeout 30 /tmp/wgmma_unit
    t unit
  fi
  if has build; then
    CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip install --no-build-isolation --no-deps -v \
        -Ccmake.define.JAX_MLA_CUDA=ON . > "$OUT/build.log" 2>&1
    grep -E "error|warning: |Successfully installed|registers" "$OUT/build.log" | head -20
    so=$(python3 -P -c "import jax_mla, os; print(os.path.dirname(jax_mla.__file__))")/_cuda*.so
    cuobjdump -sass $so 2>/dev/null | grep -c HGMMA | sed 's/^/HGMMA instructions in _cuda: /'
    t build
  fi
  if has test; then
    # Three pytest processes on disjoint subsets share the GPU: the tests spend
    # most of their time compiling on the CPU.
    pt() {  # log name, pytest args
      local log=$1
      shift
      PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout "${TEST_TIMEOUT:-150}" python3 -P -m pytest "$@" \
          -p no:cacheprovider -q -rf -m gpu --maxfail=3 > "$OUT/$log" 2>&1
    }
    pt pytest0.log tests/test_cuda.py -k "attention_dims" &
    pt pytest1.log tests/test_cuda.py -k "attention and not attention_dims" &
    pt pytest2.log tests/test_attention.py &
    wait
    for f in "$OUT"/pytest?.log; do
      echo "$f:"; grep -E "^(FAILED|ERROR)" "$f" | head -5; tail -1 "$f"
    done
    t test
  fi
  if has bench; then
    timeout "${BENCH_TIMEOUT:-90}" python3 -P benchmarks/gpu/side_by_side.py --fi-dir "$FI_DIR" \
        --skip mla,fa3 > "$OUT/bench.log" 2>&1
    echo "bench rc $?"
    grep -A6 "prefill, B=1" "$OUT/bench.log" || tail -5 "$OUT/bench.log"
    t bench
  fi
  for tool in memcheck racecheck; do
    has $tool || continue
    timeout "${SAN_TIMEOUT:-60}" $SAN --tool $tool --kernel-name kns=AttentionSm90 --print-limit 20 \
        python3 -P benchmarks/gpu/sanitize_cases.py $([ $tool = racecheck ] && echo --quick) \
        > "$OUT/sanitize_$tool.log" 2>&1
    echo "$tool: exit $?"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|hazard|Invalid|sanitize cases|FAIL" \
        "$OUT/sanitize_$tool.log" | head -8
    t $tool
  done
} 2>&1 | tee "$OUT/sm90_check.log"
