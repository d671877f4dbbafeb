#!/usr/bin/env bash
# The CPU tests under AddressSanitizer and UndefinedBehaviorSanitizer: the CPU module built with
# -fsanitize=address,undefined (RelWithDebInfo, every ISA copy), the sanitizer runtimes preloaded
# into Python, the first error fatal. Under AddressSanitizer the kernels' per-thread scratch is
# sized exactly for each call (ffi/cpu/flash.cc), so an overrun shows even after a larger call;
# inputs and outputs are XLA's own heap buffers. About 15 minutes on 2 cores. Not part of CI.
#
#   PY=/path/to/venv/bin/python tests/sanitized_cpu.sh [pytest args]   (default: -m "not gpu")
#
# Paged caches alone (tests/test_paged.py: shuffled pages, out-of-range table entries, every
# page size, format and ISA path; about 15 minutes on 2 busy cores): pass `-k test_paged`.
#
# PY's environment needs jax, pytest, scikit-build-core and nanobind; this REPLACES the jax_mla
# installed there with the sanitized build (CPU module only), so give it a venv of its own.
# Needs GCC (its libasan and libubsan).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:?set PY to the python of a venv dedicated to the sanitized build}"
BUILD="${BUILD:-/tmp/jax_mla_sanitized_build}"
"$PY" -m pip install -q --no-build-isolation --no-deps -Ccmake.define.JAX_MLA_CUDA=OFF \
  -Ccmake.build-type=RelWithDebInfo -Cinstall.strip=false -Cbuild-dir="$BUILD" \
  "-Ccmake.define.CMAKE_CXX_FLAGS=-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined" \
  "$ROOT"
# The reports go to files: pytest's capture would drop them when the process aborts.
logs="$(mktemp -d)"
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
# Leaks are not checked: Python and XLA keep memory until exit by design.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:log_path=$logs/asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$logs/ubsan"
cd "$ROOT"
if [ $# -eq 0 ]; then set -- -m "not gpu"; fi
status=0
"$PY" -P -m pytest tests -q -p no:cacheprovider "$@" || status=$?
if compgen -G "$logs/*" > /dev/null; then
  echo "sanitizer reports ($logs):" >&2
  cat "$logs"/* >&2
  status=1
fi
exit $status
