#!/bin/bash
# One device call for a change to the seesaw MLA kernel (benchmarks/NOTES.md,
# CUDA 4): builds this tree and a baseline tree side by side, times the
# 128-head decode rows of both (split_sweep.py, heuristic splits) and this
# tree against FlashInfer fa3 (side_by_side.py), then this tree's 64-row MLA
# GPU tests and racecheck / memcheck on the quick cases, each under a limit.
#   bash benchmarks/gpu/half_release_check.sh BASELINE_TREE FI_DIR
# Logs go to $OUT (tarred: at most 8 files come back).
set -u
BASE=$1
FI=$2
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 \
  CUDACXX="${CUDACXX:-/usr/local/cuda/bin/nvcc}"
L=/tmp/logs
mkdir -p $L
T0=$(date +%s)
t() { echo "[$1: $(( $(date +%s) - T0 )) s]"; }
build() {  # SRC TARGET LOG
  (cd "$1" && CMAKE_BUILD_PARALLEL_LEVEL=8 python3 -m pip install -q --no-build-isolation \
     --no-deps --target "$2" -Ccmake.define.JAX_MLA_CUDA=ON . > "$3" 2>&1) || echo "BUILD FAILED $1"
}
build "$BASE" /tmp/site_old $L/build_old.log &
build . /tmp/site_new $L/build_new.log
wait
t build
ROWS="128,128,4096:1/128,128,8192:1/32,128,32768:2"
for v in old new; do
  PYTHONPATH=/tmp/site_$v timeout 40 python3 -P benchmarks/gpu/split_sweep.py --rows "$ROWS" \
    --label $v > $L/sweep_$v.log 2>&1
  grep "in-jit" $L/sweep_$v.log | tail -7 | sed "s/^/$v /"
done
t sweep
python3 -m pip install -q --no-index --no-deps --target /tmp/fi_deps $FI/apache_tvm_ffi-*.whl
PYTHONPATH=/tmp/fi_deps:/tmp/site_new timeout 60 python3 -P benchmarks/gpu/side_by_side.py \
  --fi-dir $FI --skip prefill --rows 128,128,4096/128,128,8192/32,128,32768 > $L/side_by_side.log 2>&1
sed -n '/==== MLA decode (ms/,/====.*q8/p' $L/side_by_side.log | head -8
t bench
pt() {  # log, pytest args
  local log=$1
  shift
  PYTHONPATH=/tmp/site_new timeout "${TEST_TIMEOUT:-75}" python3 -P -m pytest "$@" -m gpu -q -rfs \
    -p no:cacheprovider > $L/$log 2>&1
}
pt pytest_mla.log tests/test_mla.py &
pt pytest_cuda_mla.log tests/test_cuda.py -k "mla and not quant" &
PYTHONPATH=/tmp/site_new timeout 60 /usr/local/cuda/bin/compute-sanitizer --tool racecheck \
  --kernel-name kns=MlaSm90 python3 -P benchmarks/gpu/sanitize_cases.py --quick > $L/racecheck.log 2>&1
PYTHONPATH=/tmp/site_new timeout 40 /usr/local/cuda/bin/compute-sanitizer --tool memcheck \
  --kernel-name kns=MlaSm90 python3 -P benchmarks/gpu/sanitize_cases.py --quick > $L/memcheck.log 2>&1
wait
for f in pytest_mla pytest_cuda_mla; do echo "$f: $(tail -1 $L/$f.log)"; grep -E "^(FAILED|ERROR)" $L/$f.log | head -5; done
grep -hE "RACECHECK SUMMARY|ERROR SUMMARY|sanitize cases|FAIL" $L/racecheck.log $L/memcheck.log
t tests
tar czf $OUT/logs.tgz -C $L .
