#!/bin/bash
# Device call: builds benchmarks/gpu/seesaw_probe.cu with and without the
# counters and runs both on the 128-head decode rows (NOTES, CUDA 7); with
# TESTS=1 it then builds the package and runs the MLA GPU tests.
# (The orders compared in CUDA 7 were template variants of the kernel, since
# removed; check out 0b85822's tree for them, JAX_MLA_CUDA_MLA_SEESAW=1..4.)
set -u
NVCC=/usr/local/cuda/bin/nvcc
F="-std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -DJAX_MLA_SM90A -I. ${EXTRA_FLAGS:-}"
$NVCC $F benchmarks/gpu/seesaw_probe.cu -o /tmp/plain 2>&1 | grep -v -E "C7519|177-D|kSeesawProbeNames|^ *\^|^$|Remark" &
$NVCC $F -DJAX_MLA_SEESAW_PROBE benchmarks/gpu/seesaw_probe.cu -o /tmp/probe 2>&1 | grep -v C7519
wait
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
for row in ${ROWS:-128,128,4096,1 128,128,8192,1 32,128,32768,2}; do  # B,H,S,splits
  row=${row//,/ }
  /tmp/plain $row
  /tmp/probe $row
done
if [ "${TESTS:-0}" = 1 ]; then
  export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 CUDACXX=$NVCC
  CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip install -q --no-build-isolation --no-deps \
    --target /tmp/site -Ccmake.define.JAX_MLA_CUDA=ON . > /tmp/build.log 2>&1 || tail -20 /tmp/build.log
  PYTHONPATH=/tmp/site timeout ${TEST_TIMEOUT:-150} python3 -P -m pytest \
    tests/test_mla.py -m gpu -q -x -p no:cacheprovider 2>&1 | tail -5
fi
