#!/bin/bash
# One device call for the 128-head MLA decode rows' profile (benchmarks/NOTES.md,
# CUDA 4): builds, then Nsight Compute on one launch of the seesaw kernel at
# (128, 128, 8192) with the sections that say what bounds it (throughputs,
# warp stall reasons, scheduler issue rate), and a num_splits sweep of the
# 128-head rows. Run from the tree's root: bash benchmarks/gpu/profile_seesaw.sh
# Logs go to $OUT (tarred: at most 8 files come back).
set -u
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 \
  CUDACXX="${CUDACXX:-/usr/local/cuda/bin/nvcc}"
L=/tmp/logs
mkdir -p $L
CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip install -q --no-build-isolation --no-deps \
  -Ccmake.define.JAX_MLA_CUDA=ON . > $L/build.log 2>&1 || { tail -20 $L/build.log; exit 1; }
timeout 150 ncu --clock-control none --kernel-name regex:MlaSm90Seesaw --launch-skip 2 \
  --launch-count 1 --section SpeedOfLight --section ComputeWorkloadAnalysis \
  --section MemoryWorkloadAnalysis --section SchedulerStats --section WarpStateStats \
  --section Occupancy --section LaunchStats \
  python3 -P benchmarks/gpu/profile_mla.py 128 128 8192 > $L/ncu_seesaw_128_128_8192.log 2>&1
timeout 120 python3 -P benchmarks/gpu/split_sweep.py --label seesaw \
  --rows "128,128,8192:1,2,3,4/128,128,4096:1,2,4/32,128,32768:1,2,4,8" > $L/sweep.log 2>&1
cp $OUT/split_sweep_*.json $L/ 2>/dev/null
tar czf $OUT/logs.tgz -C $L .
grep -E "Duration|Throughput|Issue Slots|Issued Ipc|No Eligible|Stall|stall|Warp Cycles|Achieved|Registers|Shared Memory Configuration|Block Limit" \
  $L/ncu_seesaw_128_128_8192.log | head -60
tail -25 $L/sweep.log
