"""Op rows: each case's native kernel and plain-JAX baseline, checked against
jax_mla.reference on the same inputs, then timed (only if the check passes)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import numpy as np

import jax_mla
from jax_mla import reference
from jax_mla.bench import baselines, timing
from jax_mla.bench.cases import MLA_DV, SCALE, Case, make_inputs

BACKENDS = ("native", "jax")
# Max |out - ref| / max |ref| allowed, by platform, backend and cache. On the
# CPU the native kernels accumulate in f32 from f32 queries, so they must be
# close to the f32 reference whatever the cache; over 8-bit keys they also round
# the query to 8 bits (docs/formats.md), which moves outputs by about 1e-2 of
# their largest value. On a GPU the queries and P are bf16 (2^-8 relative
# rounding). The plain-JAX baseline rounds q and the probabilities to the cache
# dtype (bf16 for a dequantized cache). The reference runs on the dequantized
# cache.
TOLERANCE = {
    "cpu": {
        "native": {
            "f32": 1e-4,
            "f16": 1e-4,
            "bf16": 1e-4,
            "q8_0": 3e-2,
            "q8_kv": 3e-2,
            "q6_0": 1e-4,
            "fp8_e4m3": 1e-4,
        },
        "jax": {
            "f32": 1e-4,
            "f16": 5e-3,
            "bf16": 4e-2,
            "q8_0": 4e-2,
            "q8_kv": 4e-2,
            "q6_0": 4e-2,
            "fp8_e4m3": 4e-2,
        },
    },
    "gpu": {
        "native": {"f16": 1e-2, "bf16": 1e-2, "q8_0": 3e-2, "q8_kv": 3e-2, "fp8_e4m3": 1e-2},
        "jax": {"f16": 1e-2, "bf16": 4e-2, "q8_0": 4e-2, "q8_kv": 4e-2, "fp8_e4m3": 4e-2},
    },
}
# Above this many reference FLOPs (dense, float32 at HIGHEST precision), the
# check uses only the last CHECK_QUERIES queries of the row.
CHECK_MAX_FLOPS = 4e9
CHECK_QUERIES = 64


@dataclass
class Row:
    """One line of the op table (and of the JSON output)."""

    test: str
    op: str
    cache: str
    backend: str
    batch: int
    heads: int
    ms: float  # NaN when the check failed (the row is not timed)
    tokens_per_s: float  # batch * seq_q / time
    gflops: float  # 2 * B * H * visible keys * (Dk + Dv) / time
    gbps: float  # cache bytes read (each cached token once) / time
    speedup: float | None  # plain-JAX ms / native ms, on native rows
    err: float  # max |out - ref| / max |ref| against jax_mla.reference
    tolerance: float  # the most err may be
    checked_queries: int  # queries the check covered (all, or the last CHECK_QUERIES)
    calls: int  # calls per timed sample (1: each synchronized)
    samples: int  # samples per pass
    copies: int  # input copies the calls rotated among
    other_load: float | None  # cores other processes kept busy while this row was
    # timed (None: unknown, or timed too briefly to tell)
    seq_q: int
    n_kv: int
    kv_bytes_per_token: int


def native_fn(case: Case):
    if case.op == "flash_mla":
        fn = functools.partial(
            jax_mla.flash_mla, dv=MLA_DV, scale=SCALE, causal=case.causal, backend="native"
        )
    else:
        fn = functools.partial(
            jax_mla.flash_attention, scale=SCALE, causal=case.causal, backend="native"
        )
    return jax.jit(fn)


def reference_fn(case: Case):
    if case.op == "flash_mla":
        fn = functools.partial(reference.mla, dv=MLA_DV, scale=SCALE, causal=case.causal)
    else:
        fn = functools.partial(reference.attention, scale=SCALE, causal=case.causal)
    return jax.jit(lambda q, *caches: fn(q, *(baselines.as_float(c) for c in caches))[0])


BACKEND_FNS = {"native": native_fn, "jax": baselines.plain_fn}


def check_inputs(case: Case, inputs):
    """The row's inputs, or its last CHECK_QUERIES queries when the reference
    would be too slow (the queries stay at the end of the cache)."""
    dk, dv = case.dims
    dense_flops = 2 * case.batch * case.heads * case.seq_q * case.n_kv * (dk + dv)
    if dense_flops <= CHECK_MAX_FLOPS or case.seq_q <= CHECK_QUERIES:
        return inputs
    return (inputs[0][:, -CHECK_QUERIES:],) + tuple(inputs[1:])


def relative_error(fn, ref_fn, inputs) -> float:
    out = np.asarray(jax.block_until_ready(fn(*inputs)), np.float64)
    ref = np.asarray(ref_fn(*inputs), np.float64)
    return float(np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-30))


def failed(row: Row) -> bool:
    return not row.err <= row.tolerance  # True for NaN too


def run_case(case: Case, platform: str, budget_s: float, backends=BACKENDS) -> list[Row]:
    """Checks, then times, each backend on the case; on a GPU the calls go back
    to back over input copies rotated past the L2."""
    gpu = platform != "cpu"
    copies = timing.copies_past_l2(case.cache_bytes) if gpu else 1
    inputs = [make_inputs(case, seed) for seed in range(copies)]
    checked = check_inputs(case, inputs[0])
    ref_fn = reference_fn(case)
    rows = []
    for backend in backends:
        fn = BACKEND_FNS[backend](case)
        err = relative_error(fn, ref_fn, checked)
        tol = TOLERANCE[platform][backend][case.cache]
        row = Row(
            test=case.test,
            op=case.op,
            cache=case.cache,
            backend=backend,
            batch=case.batch,
            heads=case.heads,
            ms=math.nan,
            tokens_per_s=math.nan,
            gflops=math.nan,
            gbps=math.nan,
            speedup=None,
            err=err,
            tolerance=tol,
            checked_queries=checked[0].shape[1],
            calls=0,
            samples=0,
            copies=copies,
            other_load=None,
            seq_q=case.seq_q,
            n_kv=case.n_kv,
            kv_bytes_per_token=case.kv_bytes_per_token,
        )
        rows.append(row)
        if failed(row):
            continue
        jax.block_until_ready(fn(*inputs[0]))  # compiles for the full inputs
        with timing.OtherLoad() as load:
            t = timing.time_calls(
                fn, lambda i: inputs[i % copies], budget_s=budget_s, back_to_back=gpu
            )
        s = t.seconds
        row.ms, row.calls, row.samples, row.other_load = s * 1e3, t.calls, t.samples, load.cores
        row.tokens_per_s = case.batch * case.seq_q / s
        row.gflops, row.gbps = case.flops / s / 1e9, case.cache_bytes / s / 1e9
    by_backend = {r.backend: r for r in rows}
    native, plain = by_backend.get("native"), by_backend.get("jax")
    if native and plain and not (failed(native) or failed(plain)):
        native.speedup = plain.ms / native.ms
    return rows
