"""flash_mla decode time against num_splits, timed as side_by_side.py times jax_mla.

For each row (B, H, S): q [B, 1, H, 576] and a bf16 latent cache [B, S, 576]
(or that cache quantized, --fmt), caches under 256 MB rotated among copies;
for each num_splits (and None, the heuristic's choice) the median over 7
repetitions of n calls inside one jitted executable ("in-jit") and of n
back-to-back calls of one jitted call ("loop"), per call; and the max |diff|
of the output against num_splits = 1.

Usage (device): python3 -P benchmarks/gpu/split_sweep.py \
    --rows 1,16,16384:16,32,64,103,119,128/64,16,4096:1,2,4 [--fmt q8_0] [--label old]
Prints a table last and writes $OUT/split_sweep_<label>_<fmt>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np

import jax_mla
from jax_mla import _ffi, _splits

SCALE = 1.0 / math.sqrt(192.0)


def median_time(run, reps: int) -> float:
    run()
    ts = []
    for _ in range(7):
        t0 = time.perf_counter()
        run()
        ts.append((time.perf_counter() - t0) / reps)
    return float(np.median(ts))


def sweep_row(B, H, S, splits, fmt, calls):
    kq, kk = jax.random.split(jax.random.PRNGKey(0))
    q = jax.random.normal(kq, (B, 1, H, 576), jnp.bfloat16)
    ncp = max(1, min(8, math.ceil(256e6 / (B * S * 576 * 2))))
    kvs = [jax.random.normal(k, (B, S, 576), jnp.bfloat16) for k in jax.random.split(kk, ncp)]
    if fmt != "bf16":
        kvs = [jax_mla.quantize(kv, fmt) for kv in kvs]
    jax.block_until_ready((q, kvs))
    reps = max(ncp, (calls // ncp) * ncp)
    base = None
    rows = []
    for ns in [1, None] + [n for n in splits if n != 1]:
        one = jax.jit(
            lambda q, kv, ns=ns: jax_mla.flash_mla(
                q, kv, scale=SCALE, num_splits=ns, backend="native"
            )
        )
        many = jax.jit(
            lambda q, kvs, ns=ns: [
                jax_mla.flash_mla(q, kv, scale=SCALE, num_splits=ns, backend="native") for kv in kvs
            ]
        )
        seq = [kvs[i % ncp] for i in range(reps)]
        t_jit = median_time(lambda: jax.block_until_ready(many(q, seq)), reps)

        def loop():
            o = None
            for i in range(reps):
                o = one(q, kvs[i % ncp])
            o.block_until_ready()

        t_loop = median_time(loop, reps)
        out = np.asarray(one(q, kvs[0]).astype(jnp.float32))
        if base is None:
            base = out
        used = ns
        if ns is None:
            kv_code = 0 if fmt == "bf16" else _ffi.module("gpu").capabilities()["mla_formats"][fmt]
            bps = _ffi.module("gpu").mla_blocks_per_sm(H, kv_code)
            used = _splits.choose_num_splits(
                None, B, 1, H, 1, S, platform="gpu", dk=576, blocks_per_sm=bps
            )
        rows.append(
            dict(
                B=B,
                H=H,
                S=S,
                fmt=fmt,
                num_splits=ns,
                used=used,
                in_jit_ms=t_jit * 1e3,
                loop_ms=t_loop * 1e3,
                max_abs_diff_vs_1=float(np.abs(out - base).max()),
            )
        )
        print(
            f"{B},{H},{S} {fmt} ns={str(ns):>4} (used {used:>4}): in-jit {t_jit * 1e3:.4f} ms, "
            f"loop {t_loop * 1e3:.4f} ms, max|diff| vs ns=1 {rows[-1]['max_abs_diff_vs_1']:.2e}",
            flush=True,
        )
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,16,16384:16,32,64,103,119,128,132,256/64,16,4096:1,2,4,8")
    ap.add_argument("--fmt", default="bf16")
    ap.add_argument("--label", default="")
    ap.add_argument("--calls", type=int, default=32)
    a = ap.parse_args()
    res = []
    for spec in a.rows.split("/"):
        shape, splits = spec.split(":")
        B, H, S = (int(x) for x in shape.split(","))
        res += sweep_row(B, H, S, [int(x) for x in splits.split(",")], a.fmt, a.calls)
    out = os.environ.get("OUT", "/tmp")
    with open(os.path.join(out, f"split_sweep_{a.label or 'run'}_{a.fmt}.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    print(f"\n==== {a.label} {a.fmt}: ms per call ====")
    for r in res:
        print(
            f"{r['B']:>3} {r['H']:>4} {r['S']:>6} ns {str(r['num_splits']):>4} ({r['used']:>4}) "
            f"in-jit {r['in_jit_ms']:.4f} loop {r['loop_ms']:.4f}"
        )


if __name__ == "__main__":
    main()
