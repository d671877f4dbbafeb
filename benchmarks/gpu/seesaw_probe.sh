#!/bin/bash
# Device call: builds benchmarks/gpu/seesaw_probe.cu with and without the
# counters, once per set of extra nvcc flags in VARIANTS (";"-separated, e.g.
# "-DFOO=0;-DFOO=2"; default one build), and runs them on the 128-head decode
# rows (NOTES, CUDA 7 and 8);
# with TESTS=1 it then builds the package (extra CUDA flags: PKG_CUDA_FLAGS) and
# runs the MLA GPU tests (test_cuda.py's too unless FULL_TESTS=0) and the
# sanitizers on the quick cases.
# (The orders compared in CUDA 7 were template variants of the kernel, since
# removed; check out 0b85822's tree for them, JAX_MLA_CUDA_MLA_SEESAW=1..4.)
set -u
NVCC=/usr/local/cuda/bin/nvcc
F="-std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -DJAX_MLA_SM90A -I. ${EXTRA_FLAGS:-}"
QUIET="C7519|177-D|kSeesawProbeNames|^ *\^|^$|Remark"
IFS=';' read -r -a VS <<< "${VARIANTS:- }"
for d in "${!VS[@]}"; do
  $NVCC $F ${VS[$d]} benchmarks/gpu/seesaw_probe.cu -o /tmp/plain_$d 2>&1 | grep -v -E "$QUIET" &
  $NVCC $F ${VS[$d]} -DJAX_MLA_SEESAW_PROBE benchmarks/gpu/seesaw_probe.cu -o /tmp/probe_$d 2>&1 \
    | grep -v -E "$QUIET" &
done
wait
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
for row in ${ROWS:-128,128,4096,1 128,128,8192,1 32,128,32768,2}; do  # B,H,S,splits
  row=${row//,/ }
  for d in "${!VS[@]}"; do
    echo "== variant ${VS[$d]}"
    /tmp/plain_$d $row
    /tmp/probe_$d $row
  done
done
if [ "${TESTS:-0}" = 1 ]; then
  export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 CUDACXX=$NVCC
  CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip install -q --no-build-isolation --no-deps \
    --target /tmp/site -Ccmake.define.JAX_MLA_CUDA=ON ${PKG_CUDA_FLAGS:+"-Ccmake.define.CMAKE_CUDA_FLAGS=$PKG_CUDA_FLAGS"} \
    . > /tmp/build.log 2>&1 || tail -20 /tmp/build.log
  PYTHONPATH=/tmp/site timeout ${TEST_TIMEOUT:-150} python3 -P -m pytest \
    tests/test_mla.py -m gpu -q -p no:cacheprovider 2>&1 | tail -3 &
  [ "${FULL_TESTS:-1}" = 1 ] && PYTHONPATH=/tmp/site timeout ${TEST_TIMEOUT:-150} python3 -P -m pytest \
    tests/test_cuda.py -k "mla" -m gpu -q -p no:cacheprovider 2>&1 | tail -3 &
  wait
  SAN=/usr/local/cuda/bin/compute-sanitizer
  for tool in racecheck memcheck; do
    PYTHONPATH=/tmp/site timeout 90 $SAN --tool $tool --kernel-name kns=MlaSm90 \
      python3 -P benchmarks/gpu/sanitize_cases.py --quick 2>&1 \
      | grep -E "RACECHECK SUMMARY|ERROR SUMMARY|sanitize cases|FAIL" | head -5
  done
fi
