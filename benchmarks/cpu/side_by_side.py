"""jax_mla vs ik_llama.cpp (and mainline ggml) on the CPU, in one run, on the
workloads of the CPU speed issue (ANCHORS.md shapes: 16 heads, scale
1/sqrt(192), f32 queries over an f16 cache).

Both sides are timed the same way: warm, the median of repeated calls, the
best of 3 passes. jax_mla is timed as a user calls it (a jitted call,
dispatch included, block_until_ready); ik_bench times one ggml graph node on
its OpenMP threads. Ratio = jax_mla / ik (lower is better).

    python benchmarks/cpu/side_by_side.py --ik-bench /tmp/ik_bench/harness [--quick] [--json F]

Run from outside the repo root or with `python -P`, so the installed jax_mla
(with its native module) is imported. ik_bench: ../shared/tools/ik_bench.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_mla

HEADS = 16
SCALE = 1.0 / math.sqrt(192)
# (name, mode, cache type, n_q, n_kv, causal); mode mla = 576/512 latent
# (V = columns 64..575 of the row, as ik_bench lays it out), std = 192/128,
# 16 KV heads; cache type f16 or q8_0 (ggml's Q8_0, jax_mla's "q8_0").
WORKLOADS = [
    ("MLA tg@1024", "mla", "f16", 1, 1024, False),
    ("MLA tg@4096", "mla", "f16", 1, 4096, False),
    ("MLA tg@16384", "mla", "f16", 1, 16384, False),
    ("MLA q8_0 tg@16384", "mla", "q8_0", 1, 16384, False),
    ("MLA pp512@4096", "mla", "f16", 512, 4096, True),
    ("MLA q8_0 pp512@4096", "mla", "q8_0", 512, 4096, True),
    ("std tg@16384", "std", "f16", 1, 16384, False),
    ("std q8_0 tg@4096", "std", "q8_0", 1, 4096, False),
    ("std q8_0 tg@16384", "std", "q8_0", 1, 16384, False),
    ("std pp512@4096", "std", "f16", 512, 4096, True),
    ("std q8_0 pp512@4096", "std", "q8_0", 512, 4096, True),
]
QUICK = {"MLA tg@1024", "MLA tg@4096", "std tg@16384", "MLA q8_0 tg@16384"}


def _inputs(mode, ctype, n_q, n_kv, rng):
    def make(shape):
        x = jnp.asarray(rng.standard_normal(shape), jnp.float16)
        return x if ctype == "f16" else jax_mla.quantize(x, ctype)

    if mode == "mla":
        q = jnp.asarray(rng.standard_normal((1, n_q, HEADS, 576)), jnp.float32)
        return q, (make((1, n_kv, 576)),)
    q = jnp.asarray(rng.standard_normal((1, n_q, HEADS, 192)), jnp.float32)
    return q, (make((1, n_kv, HEADS, 192)), make((1, n_kv, HEADS, 128)))


def _jax_mla_fn(mode, causal):
    if mode == "mla":
        return jax.jit(lambda q, kv: jax_mla.flash_mla(q, kv, dv=512, v_offset=64, scale=SCALE,
                                                       causal=causal, backend="native"))
    return jax.jit(lambda q, k, v: jax_mla.flash_attention(q, k, v, scale=SCALE, causal=causal,
                                                           backend="native"))


def time_jax_mla(mode, ctype, n_q, n_kv, causal, reps):
    rng = np.random.default_rng(0)
    q, cache = _inputs(mode, ctype, n_q, n_kv, rng)
    fn = _jax_mla_fn(mode, causal)
    fn(q, *cache).block_until_ready()
    best = math.inf
    for _ in range(3):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(q, *cache).block_until_ready()
            times.append(time.perf_counter() - t0)
        best = min(best, statistics.median(times))
    return best * 1e3


def time_ik(binary, mode, ctype, n_q, n_kv, causal, reps):
    args = [binary, mode, ctype, str(n_q), str(n_kv), "--threads", "2", "--reps", str(reps)]
    if causal:
        args.append("--causal")
    best, util = math.inf, []
    for _ in range(3):
        line = subprocess.run(args, check=True, capture_output=True, text=True).stdout
        fields = dict(re.findall(r"(\w+)=(\S+)", line))
        best = min(best, float(fields["median_ms"]))
        util.append(float(fields["cpu_util"]))
    return best, min(util)


def flops(mode, n_q, n_kv, causal):
    dk, dv = (576, 512) if mode == "mla" else (192, 128)
    visible = sum(n_kv - n_q + i + 1 for i in range(n_q)) if causal else n_q * n_kv
    return 2.0 * HEADS * visible * (dk + dv)


def cpu_kind():
    flags = open("/proc/cpuinfo").read()
    model = re.search(r"model name\s*:\s*(.*)", flags).group(1)
    return f"{model}, {'AVX-512' if ' avx512f' in flags else 'AVX2 only'}, {os.cpu_count()} cores"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ik-bench", default=os.environ.get("JAX_MLA_IK_BENCH"),
                        help="folder with fa_bench_ik (and fa_bench_mainline)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    parser.add_argument("--only", help="run the workloads whose name contains this")
    args = parser.parse_args()
    if not args.ik_bench:
        parser.error("--ik-bench (or JAX_MLA_IK_BENCH) must name the ik_bench harness folder")
    ik = os.path.join(args.ik_bench, "fa_bench_ik")
    print(f"# {cpu_kind()}; jax {jax.__version__}; jax_mla ISA {jax_mla.backends()['cpu']['isa']}")
    print(f"{'workload':<20} {'jax_mla ms':>10} {'ik ms':>9} {'ratio':>6} {'jax_mla GFLOP/s':>15} "
          f"{'ik GFLOP/s':>10} {'ik cpu_util':>11}")
    rows = []
    for name, mode, ctype, n_q, n_kv, causal in WORKLOADS:
        if args.quick and name not in QUICK or args.only and args.only not in name:
            continue
        reps = 5 if n_q > 1 else 21
        ours = time_jax_mla(mode, ctype, n_q, n_kv, causal, reps)
        theirs, util = time_ik(ik, mode, ctype, n_q, n_kv, causal, reps)
        f = flops(mode, n_q, n_kv, causal)
        row = dict(workload=name, jax_mla_ms=ours, ik_ms=theirs, ratio=ours / theirs,
                   jax_mla_gflops=f / ours / 1e6, ik_gflops=f / theirs / 1e6, ik_cpu_util=util)
        rows.append(row)
        print(f"{name:<20} {ours:>10.3f} {theirs:>9.3f} {ours / theirs:>6.2f} "
              f"{row['jax_mla_gflops']:>15.1f} {row['ik_gflops']:>10.1f} {util:>11.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(cpu=cpu_kind(), jax=jax.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
