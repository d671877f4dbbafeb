#!/usr/bin/env bash
# The GPU machine's checks and measurements, one step at a time, each under its
# own time limit so one call of the device tool holds several. Run from the
# repository root:
#   bash benchmarks/gpu/run.sh STEP...
# Steps, in the order given:
#   build     a wheel with the CUDA module forced on (JAX_MLA_CUDA=ON) for
#             $CUDA_ARCHS (default "80;90a") into $WHEEL_DIR, installed, then
#             what loaded (backends(), the module's capabilities()).
#   unit      benchmarks/gpu/wgmma_unit.cu: the wgmma helpers against a host
#             reference (sm_90a cards only).
#   test      pytest -m gpu over tests/ ($PYTEST_ARGS adds to or narrows it,
#             e.g. PYTEST_ARGS="tests/test_cuda.py -k family"); TEST_JOBS=N
#             runs the collected tests as N processes side by side, each going
#             on in a fresh process after a failure (a CUDA fault is sticky).
#   sanitize  compute-sanitizer memcheck over benchmarks/gpu/sanitize_cases.py,
#             jax_mla's kernels only; SANITIZE_TOOLS="memcheck racecheck" adds
#             racecheck (on the --quick cases); SANITIZE_ARGS=--paged-only runs the
#             paged-cache cases alone, SANITIZE_ARGS=--backward the attention
#             backward's cases alone.
#   bench     python -m jax_mla $BENCH_ARGS, then benchmarks/gpu/side_by_side.py
#             $SIDE_BY_SIDE_ARGS (the peers: FlashInfer, cuDNN).
#   paged     FlashMLA built from .carry/flashmla (once per machine, into /tmp/fmb;
#             sm_90a), then the MLA decode rows with jax_mla over pages of $PAGE
#             (default 64; a list, e.g. "64 16", runs once per size) against FlashMLA
#             and FlashInfer (pages of 64) on the same bytes, jax_mla's contiguous call
#             in the same run (side_by_side.py --paged; $SIDE_BY_SIDE_ARGS adds, e.g.
#             --skip fa3, or --shuffle: jax_mla's and FlashMLA's pages in a random
#             order of the pool).
#             The paged targets' GPU tests run in the test step (alone:
#             PYTEST_ARGS=tests/test_cuda_paged.py), their memcheck cases in sanitize.
#   backward  benchmarks/gpu/backward.py $BACKWARD_ARGS: the attention backward
#             (192/128 causal, bf16), auto and each kernel family the card runs
#             (mma_sync; sm90 on Hopper), against cuDNN's through torch SDPA.
#   layer     the DeepSeek layer rows (python -m jax_mla --model-only: bf16, every
#             mode next to plain JAX that decompresses the cache at every step,
#             contexts up to 64k), one process per batch size in $LAYER_BATCHES
#             (default "1 16 64"), each with $LAYER_ARGS (e.g. --quick) and its
#             JSON in $OUT/layer_b<B>.json. All three batches may need more than
#             one call's 10 minutes: LAYER_BATCHES=64 runs the largest alone.
#   profile   Nsight Compute on one launch of each MLA kernel of
#             benchmarks/gpu/profile_mla.py $PROFILE_ROW (default "128 128 8192"; add
#             "--page 64" for the paged kernel over the same rows).
#   sweep     benchmarks/gpu/split_sweep.py --rows $SWEEP_ROWS: decode time against
#             num_splits.
#   ab        builds side by side: the working tree (a) and, for each folder of
#             $AB_DIRS, the working tree with that folder's files laid over it (b,
#             c, ...: e.g. another form of a kernel header at its repository
#             path), then jax_mla's MLA decode rows $AB_ROWS (side_by_side.py
#             --rows; paged with $PAGE, default 64) timed a b ... a b ..., no peers.
# Limits: TIMEOUT_<STEP> seconds (defaults below). Logs: each step's into
# $OUT/<step>.log when $OUT is set (the device tool brings $OUT back), and a
# summary into $OUT/run.log; without $OUT, to the terminal only.
set -uo pipefail
[ $# -gt 0 ] || { sed -n '2,47p' "$0"; exit 2; }
export CUDACXX="${CUDACXX:-/usr/local/cuda/bin/nvcc}" PYTHONUNBUFFERED=1 \
  XLA_PYTHON_CLIENT_PREALLOCATE=false
# One of the GPU machine's preinstalled pytest plugins crashed the interpreter
# (SIGSEGV) before collection.
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
export SAN=/usr/local/cuda/bin/compute-sanitizer
LOGS="${OUT:-}"
[ -n "$LOGS" ] && mkdir -p "$LOGS"

log() {  # log NAME: stdin to $OUT/NAME.log (and the terminal) or the terminal
  if [ -n "$LOGS" ]; then tee -a "$LOGS/$1.log"; else cat; fi
}

# cuda_wheel DIR ARCHS: a wheel of the tree in the current folder, the CUDA
# module forced on for ARCHS, into DIR; only errors, warnings and the result shown.
cuda_wheel() {
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" python3 -m pip wheel --no-build-isolation --no-deps -v \
    -w "$1" -Ccmake.define.JAX_MLA_CUDA=ON "-Ccmake.define.JAX_MLA_CUDA_ARCHS=$2" . 2>&1 |
    grep -E "error|warning: |Successfully built"
}

step_build() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  git log -1 --format="commit %h %s" 2>/dev/null || true
  # The wheel is kept ($WHEEL_DIR) so that a later call on a fresh machine can
  # install it instead of compiling again.
  local wheels="${WHEEL_DIR:-/tmp/jax_mla_wheel}"
  rm -rf "$wheels"
  cuda_wheel "$wheels" "${CUDA_ARCHS:-80;90a}" || return 1
  python3 -m pip install --no-deps --force-reinstall -q "$wheels"/jax_mla-*.whl || return 1
  ls -l "$wheels"
  python3 -P -c "import jax, jax_mla
print('jax', jax.__version__, jax.devices())
print(jax_mla.backends()['cuda'])
print(jax_mla._ffi.module('gpu').capabilities())"
}

step_unit() {
  "$CUDACXX" -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a -I. \
    benchmarks/gpu/wgmma_unit.cu -o /tmp/wgmma_unit && /tmp/wgmma_unit
}

step_test() {
  # shellcheck disable=SC2086  # PYTEST_ARGS is a list of words
  local pytest="python3 -P -X faulthandler -m pytest -p no:cacheprovider -q -rfs -m gpu"
  local jobs="${TEST_JOBS:-1}" dir i status=0
  if [ "$jobs" -le 1 ]; then
    $pytest ${PYTEST_ARGS:-tests}
    return
  fi
  # Most of a GPU test's time is tracing, compiling and the host-side
  # reference, so TEST_JOBS processes share the card: the collected test ids
  # are dealt out round-robin, and each share's lines stream out prefixed with
  # its number (a step cut off by its time limit still shows what ran).
  # A kernel fault is sticky (every later CUDA call of the process fails), so
  # a share stops at its first failure (-x) and goes on in a fresh process
  # with the ids not reported yet; a test that kills its process (no status
  # printed) is reported CRASHED and left out.
  share() {  # share N IDS: run the ids in file IDS, lines prefixed with [N]
    local n=$1 rest=$2 status=0 rc crashed
    while [ -s "$rest" ]; do
      xargs -a "$rest" -d '\n' $pytest -vv -x 2>&1 | tee "$rest.out" | sed -u "s/^/[$n] /"
      rc=${PIPESTATUS[0]}
      [ "$rc" -eq 0 ] && break
      status=1
      grep -oE "^tests/[^ ]+ (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)" "$rest.out" |
        cut -d' ' -f1 >"$rest.done"
      crashed=""
      # xargs: 123 when pytest failed, 125 when a signal killed it (then the
      # test it had started printed no status).
      if [ "$rc" -ne 123 ]; then
        crashed=$(grep -oE "^tests/[^ ]+::[^ ]+" "$rest.out" | tail -n 1)
        grep -qxF "$crashed" "$rest.done" && crashed=""
        [ -n "$crashed" ] || crashed=$(grep -vxFf "$rest.done" "$rest" | head -n 1)
        echo "[$n] $crashed CRASHED (exit $rc)"
      fi
      grep -vxFf <(cat "$rest.done"; [ -n "$crashed" ] && echo "$crashed") "$rest" >"$rest.next"
      # Nothing reported and nothing dropped: a collection error; stop.
      cmp -s "$rest" "$rest.next" && break
      mv "$rest.next" "$rest"
    done
    return $status
  }
  dir=$(mktemp -d)
  echo "collecting"
  $pytest --collect-only ${PYTEST_ARGS:-tests} | grep "::" >"$dir/ids" || return 1
  echo "$(wc -l <"$dir/ids") tests in $jobs shares"
  for ((i = 0; i < jobs; i++)); do
    awk -v n="$jobs" -v i="$i" 'NR % n == i' "$dir/ids" >"$dir/ids.$i"
    [ -s "$dir/ids.$i" ] || continue
    share "$i" "$dir/ids.$i" &
  done
  for ((i = 0; i < jobs; i++)); do
    [ -s "$dir/ids.$i" ] || continue
    wait -n || status=1
  done
  return $status
}

step_sanitize() {
  local tool quick
  for tool in ${SANITIZE_TOOLS:-memcheck}; do
    quick=""
    [ "$tool" = racecheck ] && quick=--quick
    # shellcheck disable=SC2086
    "$SAN" --tool "$tool" --kernel-name kns=jax_mla --print-limit 20 \
      python3 -P benchmarks/gpu/sanitize_cases.py $quick ${SANITIZE_ARGS:-}
    echo "$tool: exit $?"
  done
}

step_bench() {
  # shellcheck disable=SC2086
  python3 -P -m jax_mla ${BENCH_ARGS:-}
  fi_deps
  # shellcheck disable=SC2086
  python3 -P benchmarks/gpu/side_by_side.py ${SIDE_BY_SIDE_ARGS:-}
}

# FlashInfer's one dependency the GPU image lacks, next to its unpacked tree
# (side_by_side.py --site).
fi_deps() {
  python3 -c "import tvm_ffi" 2>/dev/null ||
    python3 -m pip install -q --no-index --no-deps --target /tmp/fisite \
      .carry/flashinfer_mla/apache_tvm_ffi-*.whl
}

step_paged() {
  local fm=/tmp/fmb
  if ! ls "$fm"/flashmla/flash_mla/cuda*.so >/dev/null 2>&1; then
    MAX_JOBS="${MAX_JOBS:-12}" bash .carry/flashmla/build.sh .carry/flashmla/flashmla_src.tar.xz \
      "$fm" | tail -5
  fi
  fi_deps
  local page status=0
  for page in ${PAGE:-64}; do
    # shellcheck disable=SC2086
    python3 -P benchmarks/gpu/side_by_side.py --paged "$page" --flashmla-dir "$fm/flashmla" \
      --skip prefill ${SIDE_BY_SIDE_ARGS:-} || status=1
    [ -n "${OUT:-}" ] && [ -f "$OUT/side_by_side.json" ] &&
      mv "$OUT/side_by_side.json" "$OUT/side_by_side_page$page.json"
  done
  return $status
}

step_backward() {
  # shellcheck disable=SC2086
  python3 -P benchmarks/gpu/backward.py ${BACKWARD_ARGS:-}
}

step_layer() {
  local batch status=0
  for batch in ${LAYER_BATCHES:-1 16 64}; do
    # shellcheck disable=SC2086
    python3 -P -m jax_mla --model-only --model-batches "$batch" ${LAYER_ARGS:-} \
      ${OUT:+--json "$OUT/layer_b$batch.json"} || status=1
  done
  return $status
}

step_profile() {
  # shellcheck disable=SC2086
  ncu --clock-control none --kernel-name regex:Mla --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    --section SchedulerStats --section WarpStateStats --section Occupancy --section LaunchStats \
    python3 -P benchmarks/gpu/profile_mla.py ${PROFILE_ROW:-128 128 8192}
}

step_ab() {
  # shellcheck disable=SC2206  # AB_DIRS is a list of words
  local dirs=("" ${AB_DIRS:-}) letters=(a b c d e f) names=() src=$PWD tree i
  [ ${#dirs[@]} -gt 1 ] && [ ${#dirs[@]} -le 6 ] || { echo "ab: AB_DIRS: 1 to 5 folders"; return 2; }
  for ((i = 0; i < ${#dirs[@]}; i++)); do
    [ "$i" -eq 0 ] || [ -d "${dirs[$i]}" ] || { echo "ab: ${dirs[$i]} is not a folder"; return 2; }
    names+=("${letters[$i]}")
    tree=$(mktemp -d)
    # Not build/: its CMake cache names the tree it was configured in.
    tar -C "$src" --exclude=./build --exclude=./.carry -cf - . | tar -C "$tree" -xf - || return 1
    [ "$i" -gt 0 ] && { cp -r "${dirs[$i]}"/. "$tree" || return 1; }
    echo "== build ${names[$i]}: ${dirs[$i]:-the working tree}"
    (cd "$tree" && cuda_wheel "/tmp/ab/${names[$i]}" "${CUDA_ARCHS:-90a}") || return 1
  done
  local round
  for round in "${names[@]}" "${names[@]}"; do
    python3 -m pip install --no-deps --force-reinstall -q /tmp/ab/$round/jax_mla-*.whl || return 1
    echo "== run $round"
    # shellcheck disable=SC2086
    python3 -P benchmarks/gpu/side_by_side.py --skip fa3,prefill --paged "${PAGE:-64}" \
      --rows "${AB_ROWS:-128,128,4096/128,128,8192/32,128,32768}" | grep -A8 "paged ("
  done
}

step_sweep() {
  python3 -P benchmarks/gpu/split_sweep.py \
    --rows "${SWEEP_ROWS:-128,128,8192:1,2,3,4/1,16,16384:32,64,128/64,16,4096:1,2,4}"
}

declare -A LIMIT=([build]=600 [unit]=60 [test]=900 [sanitize]=600 [bench]=600 [paged]=600
                  [backward]=600 [layer]=600 [profile]=300 [sweep]=300 [ab]=600)
status=0
for step in "$@"; do
  if [ -z "${LIMIT[$step]:-}" ]; then
    echo "unknown step '$step'; steps: ${!LIMIT[*]}" | log run
    exit 2
  fi
  var="TIMEOUT_${step^^}"
  limit="${!var:-${LIMIT[$step]}}"
  start=$(date +%s)
  # timeout runs the step in a child shell that sees the step functions.
  export -f "step_$step" fi_deps cuda_wheel
  timeout "$limit" bash -c "step_$step" 2>&1 | log "$step"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || status=1
  echo "[$step: exit $rc in $(( $(date +%s) - start )) s (limit $limit s)]" | log run
done
exit $status
