#!/bin/bash
# Device call: builds benchmarks/gpu/seesaw_probe.cu with and without the
# counters and runs both on the 128-head decode rows (NOTES, CUDA 7).
set -u
NVCC=/usr/local/cuda/bin/nvcc
F="-std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -DJAX_MLA_SM90A -I. ${EXTRA_FLAGS:-}"
$NVCC $F benchmarks/gpu/seesaw_probe.cu -o /tmp/plain 2>&1 | grep -v C7519 &
$NVCC $F -DJAX_MLA_SEESAW_PROBE benchmarks/gpu/seesaw_probe.cu -o /tmp/probe 2>&1 | grep -v C7519
wait
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
for row in "128 128 4096 1" "128 128 8192 1" "32 128 32768 2" "64 16 16384 2"; do
  /tmp/plain $row
  /tmp/probe $row
done
