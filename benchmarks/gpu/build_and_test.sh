#!/usr/bin/env bash
# On the GPU machine (device tool): build jax_mla with the CUDA module forced
# on, show what loaded, and run the test suite (CPU kernels, plus the `gpu`
# parametrizations, which skip while the CUDA module registers no kernels).
# Everything is logged to $OUT (or ./gpu_out when OUT is unset). pytest's
# plugin autoload is off: one of the machine's preinstalled plugins crashed the
# interpreter (SIGSEGV) before collection.
set -euo pipefail
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export CUDACXX="${CUDACXX:-/usr/local/cuda/bin/nvcc}" PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  lscpu | grep -E "Model name|^CPU\(s\)"
  time python3 -m pip install --no-build-isolation --no-deps -v \
      -Ccmake.define.JAX_MLA_CUDA=ON . 2>&1 | grep -E "nvcc|CUDA|Building|Linking|error|Successfully" || true
  python3 -P -c "import jax, jax_mla; print('jax', jax.__version__, jax.devices()); print(jax_mla.backends()); print('SMs', jax_mla._ffi.module('gpu').sm_count())"
  PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 python3 -P -X faulthandler -m pytest tests -v -p no:cacheprovider -rs \
      > "$OUT/pytest.log" 2>&1 || echo "pytest exited with $?"
  grep -E "passed|failed|FAILED|Fatal|File \"$PWD" "$OUT/pytest.log" | tail -25
} 2>&1 | tee "$OUT/build_and_test.log"
