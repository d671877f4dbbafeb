#!/usr/bin/env bash
# Builds the CPU microbenchmarks into ${OUT:-/tmp/jax_mla_cpu_tools}: kernel_bench
# (the attention kernel alone, every ISA copy, chosen by JAX_MLA_CPU_ISA) and
# fma_peak (one core's float32 FMA peak) and mem_bw (the machine's read bandwidth).
# Same flags as CMakeLists.txt.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${OUT:-/tmp/jax_mla_cpu_tools}"
mkdir -p "$OUT"
declare -A FLAGS=(
  [generic]=""
  [avx2]="-mavx2 -mfma -mf16c"
  [avx512]="-mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx512vnni -mavx512bf16 -mfma -mf16c"
)
for isa in generic avx2 avx512; do
  g++ -O3 -g -std=c++17 ${FLAGS[$isa]} -DJAX_MLA_ISA=$isa -I"$ROOT" -c "$ROOT/ffi/cpu/kernels.cc" \
      -o "$OUT/kernels_$isa.o" &
done
wait
g++ -O3 -std=c++17 -I"$ROOT" -DJAX_MLA_HAVE_GENERIC=1 -DJAX_MLA_HAVE_AVX2=1 -DJAX_MLA_HAVE_AVX512=1 \
    "$ROOT/ffi/cpu/isa.cc" "$ROOT/benchmarks/cpu/kernel_bench.cc" "$OUT"/kernels_*.o -o "$OUT/kernel_bench"
g++ -O2 -mavx2 -mfma "$ROOT/benchmarks/cpu/fma_peak.cc" -o "$OUT/fma_peak"
echo "built $OUT/kernel_bench $OUT/fma_peak"
g++ -O2 -mavx2 -pthread "$ROOT/benchmarks/cpu/mem_bw.cc" -o "$OUT/mem_bw"
echo "built $OUT/mem_bw"
