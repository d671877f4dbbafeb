#!/bin/bash
# The B = 1 decode work in one device call (benchmarks/NOTES.md, CUDA 5): builds
# this tree (and, when given, a baseline tree) side by side, then per build an
# ncu profile of the B = 1 row's kernels, a num_splits sweep (split_sweep.py),
# and for this tree FlashInfer side by side, the GPU tests of the split paths
# and memcheck. Run from the tree's root on the device:
#   bash benchmarks/gpu/small_batch_check.sh [BASELINE_TREE] [FI_DIR]
# Logs go to $OUT (at most 8 files come back: they are tarred at the end).
set -u
BASE=${1:-}
FI=${2:-../flashinfer_mla}
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 \
  CUDACXX="${CUDACXX:-/usr/local/cuda/bin/nvcc}"
L=/tmp/logs
mkdir -p $L
build() {  # build SRC TARGET LOG
  (cd "$1" && CMAKE_BUILD_PARALLEL_LEVEL=8 python3 -m pip install -q --no-build-isolation \
     --no-deps --target "$2" -Ccmake.define.JAX_MLA_CUDA=ON . > "$3" 2>&1) || echo "BUILD FAILED $1"
}
[ -n "$BASE" ] && build "$BASE" /tmp/site_old $L/build_old.log &
build . /tmp/site_new $L/build_new.log
wait
NCU="ncu --clock-control none --kernel-name regex:Mla|Combine --section SpeedOfLight --section LaunchStats"
SWEEP_NEW="1,16,16384:32,64,103,119,128,171/64,16,4096:2/64,16,16384:2"
SWEEP_OLD="1,16,16384:103,128/64,16,4096:2"
for v in old new; do
  [ -d /tmp/site_$v ] || continue
  sw=$SWEEP_NEW; [ $v = old ] && sw=$SWEEP_OLD
  PYTHONPATH=/tmp/site_$v python3 -P benchmarks/gpu/split_sweep.py --rows "$sw" --label $v \
    > $L/sweep_$v.log 2>&1
  PYTHONPATH=/tmp/site_$v $NCU python3 -P benchmarks/gpu/profile_mla.py 1 16 16384 bf16 \
    none,128 > $L/ncu_$v.log 2>&1
done
PYTHONPATH=/tmp/site_new python3 -P benchmarks/gpu/split_sweep.py --fmt q8_0 --label new \
  --rows "1,16,16384:128,171,256/64,16,16384:2" > $L/sweep_new_q8_0.log 2>&1
python3 -m pip install -q --no-index --no-deps --target /tmp/fi_deps $FI/apache_tvm_ffi-*.whl
PYTHONPATH=/tmp/fi_deps:/tmp/site_new python3 -P benchmarks/gpu/side_by_side.py --fi-dir $FI \
  --skip prefill --rows 1,16,16384/64,16,4096/64,16,16384 > $L/side_by_side.log 2>&1
cp $OUT/side_by_side.json $L/ 2>/dev/null
pt() {  # log, pytest args: the GPU tests of this tree, several processes at once
  local log=$1
  shift
  PYTHONPATH=/tmp/site_new timeout 180 python3 -P -m pytest "$@" -m gpu -q -rfs \
    -p no:cacheprovider > $L/$log 2>&1
}
pt pytest_cuda_dims.log tests/test_cuda.py -k attention_dims &
pt pytest_cuda_rest.log tests/test_cuda.py -k "not attention_dims" &
pt pytest_mla.log tests/test_mla.py &
pt pytest_attention.log tests/test_attention.py &
PYTHONPATH=/tmp/site_new timeout 300 /usr/local/cuda/bin/compute-sanitizer --tool memcheck \
  --kernel-name kns=jax_mla python3 -P benchmarks/gpu/sanitize_cases.py --quick \
  > $L/memcheck.log 2>&1
wait
tar czf $OUT/logs.tgz -C $L .
for f in $L/*.log; do echo "== $f"; tail -n 25 "$f"; done
grep -h "==== \| ns \|jax_mla.*in-jit\|fa3" $L/sweep_*.log $L/side_by_side.log | tail -60
