#!/usr/bin/env bash
# The CPU speed measurement on this machine in one command: three full runs of side_by_side.py
# (jax_mla against ik_llama.cpp, same run) and the main table (python -m jax_mla's op rows over
# f16 and q8_0 caches, against plain JAX), written to benchmarks/results/cpu/ as
# DATE_CPU-KIND_COMMIT_{vs_ik_run1..3,ops_f16_q8_0}.{txt,json}.
#
#   PY=/path/to/venv/bin/python IK_BENCH=/tmp/ik_bench/harness benchmarks/cpu/side_by_side.sh
#
# PY's environment must have this checkout's jax_mla installed; IK_BENCH is the folder that
# the ik_bench tool builds (about 13 minutes, once per machine). ISA=avx2 times jax_mla's
# AVX2 path instead of the best one (with an ik_bench built for AVX2 only, the proxy of a Zen 3
# on a Zen 4); RUNS=n sets the side-by-side runs (3), TABLE=0 leaves out the main table. Run it
# on a quiet machine: both sides use both cores.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PY:-python}"
IK="${IK_BENCH:-/tmp/ik_bench/harness}"
[ -x "$IK/fa_bench_ik" ] || { echo "no $IK/fa_bench_ik: build ik_bench first (IK_BENCH=its folder)" >&2; exit 2; }
# Our machines are AMD EPYC Zen 4 (AVX-512) or Zen 3 (AVX2 only).
if grep -q ' avx512f' /proc/cpuinfo; then kind=amd-epyc-zen4; else kind=amd-epyc-zen3; fi
if [ -n "${ISA:-}" ]; then
  export JAX_MLA_CPU_ISA="$ISA"
  kind="$kind-$ISA-proxy"
fi
rev="$(git -C "$ROOT" rev-parse --short HEAD)"
git -C "$ROOT" diff --quiet HEAD -- ffi jax_mla || echo "warning: uncommitted changes in ffi/ or jax_mla/" >&2
mkdir -p "$ROOT/benchmarks/results/cpu"
out="$ROOT/benchmarks/results/cpu/$(date -u +%F)_${kind}_${rev}"
cd /tmp  # import the installed jax_mla, not the source tree
for run in $(seq "${RUNS:-3}"); do
  "$PY" -P "$ROOT/benchmarks/cpu/side_by_side.py" --ik-bench "$IK" --json "${out}_vs_ik_run$run.json" \
    | tee "${out}_vs_ik_run$run.txt"
done
if [ "${TABLE:-1}" != 0 ]; then
  "$PY" -P -m jax_mla --no-model --caches f16,q8_0 --json "${out}_ops_f16_q8_0.json" \
    | tee "${out}_ops_f16_q8_0.txt"
fi
echo "written: ${out}_*"
