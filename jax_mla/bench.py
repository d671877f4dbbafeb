"""The benchmark behind `python -m jax_mla`: a llama-bench-style sweep over
DeepSeek attention shapes, native kernels against the best plain-JAX
formulation, each row checked against jax_mla.reference before it is timed.

Tests (llama-bench names, batch 1, f32 queries over a cache of the given dtype
or quantized format):
  tg@N     decode: 1 query at the end of N cached tokens.
  ppS@N    prefill chunk: S causal queries that are the last S of N tokens
           (query i sees N - S + i + 1 keys).

Backends:
  native   jax_mla.flash_mla / flash_attention(backend="native").
  jax      what a JAX user would write: einsums in the cache's own dtype with
           float32 accumulation (preferred_element_type), masking, softmax;
           for MLA, V is the slice kv[..., :512]; a quantized cache is
           dequantized to bf16 first. Not the naive reference.
  ik       with --ik-bench DIR: ik_llama.cpp's flash attention on the same op
           and shape, run by ik_bench's fa_bench_ik (f16, bf16 and q8_0 caches) with the
           same best-of-passes-of-medians timing; its err is its own float64
           check. "vs ik" on native rows is native ms / ik ms.

Timing: a jitted call as a user makes it (dispatch included), warm; each pass
is the median of R calls (R adapts to the call's duration) with
block_until_ready after each; the best of 3 passes is reported.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
import numpy as np

import jax_mla
from jax_mla import reference

# DeepSeek-V2-Lite attention: 16 heads; MLA over the 576-wide latent row
# (kv_lora_rank 512 + rope 64, V = the first 512 columns); standard attention
# with per-head K 192 (nope 128 + rope 64) and V 128, 16 KV heads.
HEADS = 16
MLA_DK, MLA_DV = 576, 512
STD_DK, STD_DV, STD_KV_HEADS = 192, 128, 16
SCALE = 1.0 / math.sqrt(192)  # as ik_bench and ANCHORS.md use for both ops

OPS = ("flash_mla", "flash_attention")
# Float caches by dtype, quantized ones by format name (read in place by the kernels).
CACHES = {"f16": jnp.float16, "bf16": jnp.bfloat16, "f32": jnp.float32,
          "q8_0": "q8_0", "q8_kv": "q8_kv", "q6_0": "q6_0"}
BACKENDS = ("native", "jax")
QUICK_TESTS = ("tg@1024", "tg@4096", "pp64@1024")
FULL_TESTS = ("tg@1024", "tg@4096", "tg@16384", "pp512@512", "pp512@4096")

PASSES = 3
MIN_REPS, MAX_REPS = 3, 50
# Max |out - ref| / max |ref| allowed. The native kernels accumulate in f32 from
# exact inputs, so they must be close to the f32 reference whatever the cache;
# the plain-JAX baseline rounds q and the probabilities to the cache dtype.
# Over quantized caches the reference runs on the dequantized cache; over 8-bit
# keys the kernels also round the query to 8 bits (README, "Quantized caches"),
# which moves outputs by about 1e-2 of their largest value; the plain-JAX
# baseline dequantizes to bf16.
TOLERANCE = {"native": {"f32": 1e-4, "f16": 1e-4, "bf16": 1e-4,
                        "q8_0": 3e-2, "q8_kv": 3e-2, "q6_0": 1e-4},
             "jax": {"f32": 1e-4, "f16": 5e-3, "bf16": 4e-2,
                     "q8_0": 4e-2, "q8_kv": 4e-2, "q6_0": 4e-2},
             # ik_llama.cpp's own --check: relative error against float64.
             "ik": {"f16": 1e-2, "bf16": 1e-2, "q8_0": 3e-2}}
# ik_bench's harness for ik_llama.cpp (../shared/tools/ik_bench): its cache types.
IK_BINARY = "fa_bench_ik"
# Above this many reference FLOPs (dense, float32 at HIGHEST precision), the
# check uses only the last CHECK_QUERIES queries of the row.
CHECK_MAX_FLOPS = 4e9
CHECK_QUERIES = 64
# A row timed while other processes kept more than this many cores busy is
# marked: on a 2-core machine its time is not trustworthy.
DISTURBED_CORES = 0.25
# /proc/stat counts in clock ticks (10 ms): a shorter timing cannot tell.
MIN_LOAD_WINDOW_S = 0.25


@dataclass(frozen=True)
class Case:
    """One benchmark configuration (both backends are timed on it)."""
    op: str      # "flash_mla" | "flash_attention"
    seq_q: int   # queries per call; 1 = decode
    n_kv: int    # cached tokens; the queries are the last seq_q of them
    cache: str   # key of CACHES

    @property
    def test(self) -> str:
        return f"tg@{self.n_kv}" if self.seq_q == 1 else f"pp{self.seq_q}@{self.n_kv}"

    @property
    def causal(self) -> bool:
        return self.seq_q > 1

    @property
    def dims(self) -> tuple[int, int]:
        return (MLA_DK, MLA_DV) if self.op == "flash_mla" else (STD_DK, STD_DV)

    @property
    def kv_bytes_per_token(self) -> int:
        fmt = CACHES[self.cache]
        if self.op == "flash_mla":
            return jax_mla.cache_bytes(fmt, (1, 1, MLA_DK))
        return (jax_mla.cache_bytes(fmt, (1, 1, STD_KV_HEADS, STD_DK))
                + jax_mla.cache_bytes(fmt, (1, 1, STD_KV_HEADS, STD_DV)))

    @property
    def visible_keys(self) -> int:
        """Sum over the queries of the keys each one sees."""
        if not self.causal:
            return self.seq_q * self.n_kv
        s, n = self.seq_q, self.n_kv
        return s * (n - s) + s * (s + 1) // 2

    @property
    def flops(self) -> int:
        dk, dv = self.dims
        return 2 * HEADS * self.visible_keys * (dk + dv)


@dataclass
class Row:
    """One line of the table (and of the JSON output)."""
    test: str
    op: str
    cache: str
    backend: str
    ms: float
    tokens_per_s: float
    gflops: float         # 2 * Sq * H * visible keys * (Dk + Dv) / time
    gbps: float           # cache bytes read (each cached token once) / time
    speedup: float | None  # plain-JAX ms / native ms, on native rows
    vs_ik: float | None    # native ms / ik_llama.cpp ms, on native rows with --ik-bench
    err: float            # max |out - ref| / max |ref| against jax_mla.reference
    checked_queries: int  # queries the check covered (all, or the last CHECK_QUERIES)
    reps: int
    other_load: float | None  # cores other processes kept busy while this row was
                              # timed (None: unknown, or timed too briefly to tell)
    seq_q: int
    n_kv: int
    kv_bytes_per_token: int


def parse_test(name: str) -> tuple[int, int]:
    """'tg@N' -> (1, N); 'ppS@N' -> (S, N)."""
    m = re.fullmatch(r"(tg|pp(\d+))@(\d+)", name)
    if not m:
        raise argparse.ArgumentTypeError(f"test {name!r} is not tg@N or ppS@N")
    seq_q, n_kv = (1 if m[1] == "tg" else int(m[2])), int(m[3])
    if not 1 <= seq_q <= n_kv:
        raise argparse.ArgumentTypeError(f"test {name!r}: need 1 <= S <= N")
    return seq_q, n_kv


# ------------------------------------------------------------------ inputs and functions

def make_inputs(case: Case, seed: int = 0) -> tuple:
    """f32 queries and a cache of case.cache dtype or format, N(0, 1) entries."""
    dk, dv = case.dims
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    fmt = CACHES[case.cache]

    def cache(key, shape):
        x = jax.random.normal(key, shape, jnp.float32)
        return jax_mla.quantize(x, fmt) if isinstance(fmt, str) else x.astype(fmt)

    q = jax.random.normal(keys[0], (1, case.seq_q, HEADS, dk), jnp.float32)
    if case.op == "flash_mla":
        return q, cache(keys[1], (1, case.n_kv, dk))
    return (q, cache(keys[1], (1, case.n_kv, STD_KV_HEADS, dk)),
            cache(keys[2], (1, case.n_kv, STD_KV_HEADS, dv)))


def _float(x, dtype=jnp.float32):
    """A cache as floats: quantized ones dequantized (the reference's and the
    plain-JAX baseline's view of them)."""
    return jax_mla.dequantize(x, dtype) if isinstance(x, jax_mla.QuantizedKV) else x


def native_fn(case: Case):
    if case.op == "flash_mla":
        fn = functools.partial(jax_mla.flash_mla, dv=MLA_DV, scale=SCALE, causal=case.causal,
                               backend="native")
    else:
        fn = functools.partial(jax_mla.flash_attention, scale=SCALE, causal=case.causal,
                               backend="native")
    return jax.jit(fn)


def reference_fn(case: Case):
    if case.op == "flash_mla":
        fn = functools.partial(reference.mla, dv=MLA_DV, scale=SCALE, causal=case.causal)
    else:
        fn = functools.partial(reference.attention, scale=SCALE, causal=case.causal)
    return jax.jit(lambda q, *caches: fn(q, *(_float(c) for c in caches))[0])


def _softmax_f32(s, causal: bool):
    """Softmax over the last axis of f32 scores [..., Sq, N], causal with the
    queries at the end of the keys."""
    if causal:
        seq_q, n_kv = s.shape[-2:]
        q_pos = jnp.arange(seq_q)[:, None] + (n_kv - seq_q)
        s = jnp.where(jnp.arange(n_kv)[None, :] <= q_pos, s, -jnp.inf)
    return jax.nn.softmax(s, axis=-1)


def plain_mla(q, kv, *, causal: bool):
    """MLA as a JAX user writes it: scores against the whole row, V the slice."""
    s = jnp.einsum("bqhd,bkd->bhqk", q.astype(kv.dtype), kv,
                   preferred_element_type=jnp.float32) * jnp.float32(SCALE)
    p = _softmax_f32(s, causal).astype(kv.dtype)
    out = jnp.einsum("bhqk,bkd->bqhd", p, kv[..., :MLA_DV], preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def plain_attention(q, k, v, *, causal: bool):
    """GQA attention as a JAX user writes it (query head h uses KV head h // group)."""
    batch, seq_q, heads, dk = q.shape
    heads_kv = k.shape[2]
    qg = q.reshape(batch, seq_q, heads_kv, heads // heads_kv, dk).astype(k.dtype)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k,
                   preferred_element_type=jnp.float32) * jnp.float32(SCALE)
    p = _softmax_f32(s, causal).astype(v.dtype)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, seq_q, heads, v.shape[-1]).astype(q.dtype)


def plain_fn(case: Case):
    """The plain-JAX formulation; a quantized cache is dequantized to bf16 first
    (what a JAX user without these kernels would do: XLA's bf16 dots are its
    fast ones on the CPU)."""
    fn = functools.partial(plain_mla if case.op == "flash_mla" else plain_attention,
                           causal=case.causal)
    return jax.jit(lambda q, *caches: fn(q, *(_float(c, jnp.bfloat16) for c in caches)))


BACKEND_FNS = {"native": native_fn, "jax": plain_fn}


# ------------------------------------------------------------------ check and timing

def check_inputs(case: Case, inputs):
    """The row's inputs, or its last CHECK_QUERIES queries when the reference
    would be too slow (the queries stay at the end of the cache)."""
    dk, dv = case.dims
    dense_flops = 2 * HEADS * case.seq_q * case.n_kv * (dk + dv)
    if dense_flops <= CHECK_MAX_FLOPS or case.seq_q <= CHECK_QUERIES:
        return inputs
    return (inputs[0][:, -CHECK_QUERIES:],) + tuple(inputs[1:])


def relative_error(fn, ref_fn, inputs) -> float:
    out = np.asarray(jax.block_until_ready(fn(*inputs)), np.float64)
    ref = np.asarray(ref_fn(*inputs), np.float64)
    return float(np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _call_s(fn, args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def time_call(fn, args, budget_s: float) -> tuple[float, int]:
    """Best over PASSES of the median of R calls, in seconds; returns (s, R).
    R is chosen so that a pass takes about budget_s."""
    _call_s(fn, args)  # compiles if the check ran on other shapes; warms caches
    reps = max(MIN_REPS, min(MAX_REPS, round(budget_s / _call_s(fn, args))))
    best = min(statistics.median(_call_s(fn, args) for _ in range(reps)) for _ in range(PASSES))
    return best, reps


def _busy_s() -> tuple[float, float] | None:
    """(CPU seconds the whole machine has been busy, CPU seconds of this
    process), from /proc/stat; None where it is unavailable."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    own = os.times()
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), own.user + own.system


class OtherLoad:
    """Measures how many cores other processes kept busy during a block, so a
    timing disturbed by someone else's work on a small machine shows."""

    def __enter__(self):
        self._start, self._t0, self.cores = _busy_s(), time.perf_counter(), None
        return self

    def __exit__(self, *exc):
        end, wall = _busy_s(), time.perf_counter() - self._t0
        if self._start and end and wall >= MIN_LOAD_WINDOW_S:
            self.cores = max(0.0, (end[0] - self._start[0]) - (end[1] - self._start[1])) / wall


def run_case(case: Case, backends, budget_s: float) -> list[Row]:
    inputs = make_inputs(case)
    checked = check_inputs(case, inputs)
    ref_fn = reference_fn(case)
    rows = []
    for backend in backends:
        fn = BACKEND_FNS[backend](case)
        err = relative_error(fn, ref_fn, checked)
        seconds, reps, other = math.nan, 0, None
        if err <= TOLERANCE[backend][case.cache]:  # False for NaN too
            with OtherLoad() as load:
                seconds, reps = time_call(fn, inputs, budget_s)
            other = load.cores
        rows.append(Row(
            test=case.test, op=case.op, cache=case.cache, backend=backend,
            ms=seconds * 1e3, tokens_per_s=case.seq_q / seconds,
            gflops=case.flops / seconds / 1e9,
            gbps=case.n_kv * case.kv_bytes_per_token / seconds / 1e9,
            speedup=None, vs_ik=None, err=err, checked_queries=checked[0].shape[1], reps=reps,
            other_load=other, seq_q=case.seq_q, n_kv=case.n_kv,
            kv_bytes_per_token=case.kv_bytes_per_token))
    by_backend = {r.backend: r for r in rows}
    if "native" in by_backend and "jax" in by_backend:
        by_backend["native"].speedup = by_backend["jax"].ms / by_backend["native"].ms
    return rows


def run_ik(case: Case, ik_dir: str, native: Row) -> Row | None:
    """ik_llama.cpp on the same op and shape, timed by ik_bench the same way (best
    of PASSES medians), with its float64 check as the error; None for a cache
    type ik_bench has no equivalent for."""
    if case.cache not in TOLERANCE["ik"]:
        return None
    cmd = [os.path.join(ik_dir, IK_BINARY), "mla" if case.op == "flash_mla" else "std", case.cache,
           str(case.seq_q), str(case.n_kv), "--threads", str(threads()), "--reps", str(native.reps)]
    if case.op == "flash_mla":
        cmd += ["--voff", "0"]  # V = the first 512 columns, as native_fn reads it
    if case.causal:
        cmd.append("--causal")

    def run(*extra):
        line = subprocess.run(cmd + list(extra), check=True, capture_output=True, text=True).stdout
        return dict(re.findall(r"(\w+)=(\S+)", line))

    err = float(run("--check", "--reps", "1")["rel_err"])
    ms = min(float(run()["median_ms"]) for _ in range(PASSES))
    native.vs_ik = native.ms / ms
    seconds = ms / 1e3
    return Row(test=case.test, op=case.op, cache=case.cache, backend="ik", ms=ms,
               tokens_per_s=case.seq_q / seconds, gflops=case.flops / seconds / 1e9,
               gbps=case.n_kv * case.kv_bytes_per_token / seconds / 1e9, speedup=None,
               vs_ik=None, err=err, checked_queries=case.seq_q, reps=native.reps,
               other_load=None, seq_q=case.seq_q, n_kv=case.n_kv,
               kv_bytes_per_token=case.kv_bytes_per_token)


def failed(row: Row) -> bool:
    return not row.err <= TOLERANCE[row.backend][row.cache]


def disturbed(row: Row) -> bool:
    return row.other_load is not None and row.other_load > DISTURBED_CORES


# ------------------------------------------------------------------ reporting

def cpu_info() -> dict:
    """Model name, family/model and the flags that decide the kernel path."""
    info = {"model": platform.processor() or platform.machine(), "family": None,
            "model_id": None, "avx512f": None, "avx2": None}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read().split("\n\n")[0]
    except OSError:
        return info
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    info.update(model=fields.get("model name", info["model"]), family=fields.get("cpu family"),
                model_id=fields.get("model"), avx512f="avx512f" in flags, avx2="avx2" in flags)
    return info


def threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def metadata(quick: bool, ik_bench: str | None = None) -> dict:
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "quick": quick,
        "cpu": cpu_info(),
        "threads": threads(),
        "jax": jax.__version__,
        "jax_mla": jax_mla.__version__,
        "isa": jax_mla.backends()["cpu"]["isa"],
        "shapes": {"heads": HEADS, "mla": [MLA_DK, MLA_DV],
                   "standard": [STD_DK, STD_DV, STD_KV_HEADS], "scale": SCALE,
                   "batch": 1, "query_dtype": "f32"},
        "timing": {"passes": PASSES, "min_reps": MIN_REPS, "max_reps": MAX_REPS},
        "ik_bench": ik_bench,
    }


def header(meta: dict) -> str:
    cpu = meta["cpu"]
    kind = cpu["model"]
    if cpu["family"] is not None:
        kind += f" (family {cpu['family']}, model {cpu['model_id']})"
    yes = {True: "yes", False: "no", None: "unknown"}
    return "\n".join([
        f"jax_mla {meta['jax_mla']} benchmark{' (--quick)' if meta['quick'] else ''}, "
        f"{meta['date']}",
        f"CPU: {kind}, avx512f: {yes[cpu['avx512f']]}, avx2: {yes[cpu['avx2']]}; "
        f"{meta['threads']} threads; jax {meta['jax']}; jax_mla CPU ISA path: {meta['isa']}",
        f"DeepSeek-V2-Lite shapes: {HEADS} heads; flash_mla {MLA_DK}/{MLA_DV} over one latent "
        f"head; flash_attention {STD_DK}/{STD_DV} with {STD_KV_HEADS} KV heads; batch 1, f32 "
        f"queries, scale 1/sqrt(192)",
        "tg@N: decode over N cached tokens; ppS@N: S causal queries ending a cache of N",
        "native: jax_mla kernel; jax: plain-JAX einsums in the cache dtype, f32 accumulation"
        + ("; ik: ik_llama.cpp via ik_bench (vs ik: native ms / ik ms; its err: rel. error vs "
           "float64)" if meta.get("ik_bench") else ""),
        f"ms: jitted call incl. dispatch, warm, best of {PASSES} passes of the median of "
        f"{MIN_REPS}..{MAX_REPS} calls; GB/s: cache bytes read; speedup: jax ms / native ms; "
        "err: max|out-ref|/max|ref| vs jax_mla.reference",
    ])


# (field, title, width, format); widths are fixed so rows print as they finish.
COLUMNS = (("test", "test", 11, "{}"), ("op", "op", 15, "{}"), ("cache", "cache", 5, "{}"),
           ("backend", "backend", 7, "{}"), ("ms", "ms", 10, "{:.3f}"),
           ("tokens_per_s", "tokens/s", 9, "{:.1f}"), ("gflops", "GFLOP/s", 7, "{:.1f}"),
           ("gbps", "GB/s", 6, "{:.2f}"), ("speedup", "speedup", 7, "{:.2f}"),
           ("vs_ik", "vs ik", 5, "{:.2f}"), ("err", "err", 12, "{:.1e}"))
LEFT = {"test", "op", "cache", "backend"}


def format_cell(row: Row, name: str, fmt: str) -> str:
    value = getattr(row, name)
    if value is None:
        return ""
    text = fmt.format(value)
    if name == "err" and failed(row):
        return text + " FAIL"
    if name == "ms" and disturbed(row):
        return text + " *"
    return text


def _line(values) -> str:
    return "| " + " | ".join(f"{v:{'<' if name in LEFT else '>'}{width}}"
                             for v, (name, _, width, _) in zip(values, COLUMNS)) + " |"


def table_head() -> str:
    """The title line and rule of a markdown table, like llama-bench's."""
    rule = "| " + " | ".join("-" * width if name in LEFT else "-" * (width - 1) + ":"
                             for name, _, width, _ in COLUMNS) + " |"
    return _line([title for _, title, _, _ in COLUMNS]) + "\n" + rule


def table_row(row: Row) -> str:
    return _line([format_cell(row, name, fmt) for name, _, _, fmt in COLUMNS])


# ------------------------------------------------------------------ main

def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m jax_mla",
        description="Benchmark jax_mla's native kernels against plain JAX on DeepSeek-V2-Lite "
                    "attention shapes, checking each against jax_mla.reference first.")
    p.add_argument("--quick", action="store_true",
                   help=f"small sweep, f16 cache only ({', '.join(QUICK_TESTS)}); under a minute")
    p.add_argument("--json", metavar="PATH", help="also write the rows and metadata as JSON")
    p.add_argument("--tests", type=lambda s: [parse_test(t) for t in s.split(",")],
                   help="comma-separated tg@N / ppS@N (default: the quick or full list)")
    p.add_argument("--ops", type=lambda s: s.split(","), default=list(OPS),
                   help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--caches", type=lambda s: s.split(","),
                   help=f"comma-separated subset of {','.join(CACHES)} (default: f16 with --quick, all)")
    p.add_argument("--ik-bench", metavar="DIR", default=os.environ.get("JAX_MLA_IK_BENCH"),
                   help=f"folder holding ik_bench's {IK_BINARY} (../shared/tools/ik_bench; default "
                        "$JAX_MLA_IK_BENCH): also time ik_llama.cpp on every f16, bf16 and q8_0 "
                        "row and print native ms / ik ms")
    p.add_argument("--modes", type=lambda s: s.split(","), default=["standard", "latent", "hybrid"],
                   help="model level: comma-separated subset of standard,latent,hybrid")
    p.add_argument("--model-tests", type=lambda s: [parse_model_test(t) for t in s.split(",")],
                   help=f"model level: comma-separated ppN / tg{MODEL_TG_STEPS}@N / pgN (default: "
                        f"{','.join(MODEL_QUICK_TESTS)} with --quick, else "
                        f"{','.join(MODEL_FULL_TESTS)})")
    p.add_argument("--model-caches", type=lambda s: s.split(","),
                   help=f"model level: comma-separated subset of {','.join(MODEL_CACHES)} "
                        "(default: f16 with --quick, else f16,q8_0,q6_0)")
    p.add_argument("--long", action="store_true",
                   help=f"model level: add {','.join(MODEL_LONG_TESTS)}")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model-only", action="store_true",
                       help="only the model-level rows (the DeepSeek layer), not the op rows")
    which.add_argument("--no-model", action="store_true", help="only the op rows")
    args = p.parse_args(argv)
    if args.ik_bench and not os.access(os.path.join(args.ik_bench, IK_BINARY), os.X_OK):
        p.error(f"--ik-bench: no executable {IK_BINARY} in {args.ik_bench}")
    for name, given, allowed in (("--ops", args.ops, OPS), ("--caches", args.caches or [], CACHES)):
        bad = [x for x in given if x not in allowed]
        if bad:
            p.error(f"{name}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    for name, given, allowed in (("--modes", args.modes, ("standard", "latent", "hybrid")),
                                 ("--model-caches", args.model_caches or [], MODEL_CACHES)):
        bad = [x for x in given if x not in allowed]
        if bad:
            p.error(f"{name}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    if args.model_tests is None:
        args.model_tests = [parse_model_test(t) for t in
                            (MODEL_QUICK_TESTS if args.quick else MODEL_FULL_TESTS)]
    if args.long:
        args.model_tests += [parse_model_test(t) for t in MODEL_LONG_TESTS]
    if args.model_caches is None:
        args.model_caches = ["f16"] if args.quick else ["f16", "q8_0", "q6_0"]
    if args.tests is None:
        args.tests = [parse_test(t) for t in (QUICK_TESTS if args.quick else FULL_TESTS)]
    if args.caches is None:
        args.caches = ["f16"] if args.quick else list(CACHES)
    return args


def native_ready() -> str | None:
    """Why the native CPU kernels cannot be benchmarked here, or None."""
    if jax.default_backend() != "cpu":
        return (f"the default JAX platform is {jax.default_backend()!r}, but jax_mla has CPU "
                "kernels only so far; rerun with JAX_PLATFORMS=cpu")
    cpu = jax_mla.backends()["cpu"]
    if not cpu["loaded"]:
        return f"the native CPU module did not load: {cpu['error']}"
    if str(cpu["isa"]).startswith("error"):  # JAX_MLA_CPU_ISA names a path this CPU lacks
        return cpu["isa"]
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    why = native_ready()
    if why:
        print(f"python -m jax_mla: {why}", file=sys.stderr)
        return 2
    meta = metadata(args.quick, args.ik_bench)
    print(header(meta), flush=True)
    budget_s = 0.1 if args.quick else 0.5
    cases = [Case(op, seq_q, n_kv, cache) for seq_q, n_kv in args.tests
             for op in args.ops for cache in args.caches]
    rows = []
    if args.model_only:
        cases = []
    else:
        print(table_head(), flush=True)
    for case in cases:
        case_rows = run_case(case, BACKENDS, budget_s)
        native = next(r for r in case_rows if r.backend == "native")
        if args.ik_bench and not failed(native):
            ik = run_ik(case, args.ik_bench, native)
            if ik is not None:
                case_rows.append(ik)
        for row in case_rows:
            print(table_row(row), flush=True)
            rows.append(row)
    noisy = [r for r in rows if disturbed(r)]
    if noisy:
        print(f"* timed while other processes kept up to "
              f"{max(r.other_load for r in noisy):.1f} cores busy: rerun on a quiet machine")
    model_rows, mem_rows = ([], []) if args.no_model else run_model(args, budget_s)
    if args.json:
        meta["model"] = asdict(_model_cfg())
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": [asdict(r) for r in rows],
                       "model_rows": [asdict(r) for r in model_rows],
                       "memory_rows": [asdict(r) for r in mem_rows]}, f, indent=1)
    bad = [r for r in rows if failed(r)]
    bad_model = [r for r in model_rows if model_failed(r)]
    sys.stdout.flush()
    for r in bad:
        print(f"FAILED CHECK: {r.test} {r.op} {r.cache} {r.backend}: err {r.err:.3g} > "
              f"{TOLERANCE[r.backend][r.cache]:g} (vs jax_mla.reference)", file=sys.stderr)
    for r in bad_model:
        print(f"FAILED CHECK: {r.test} {r.mode} {r.cache}: vs std {r.vs_std:.3g} > "
              f"{model_agreement(r.cache):g} (the modes disagree)", file=sys.stderr)
    return 1 if bad or bad_model else 0


# ------------------------------------------------------------------ model level: the DeepSeek layer
#
# Rows in the seeds' terms for one DeepSeek-V2-Lite attention layer (jax_mla.deepseek: the
# projections, RoPE, the latent cache write and the attention), batch 1, f32 activations:
#   ppN      prefill of N tokens into an empty cache (one call); tokens/s = N / time.
#   tg64@N   64 decode steps (one lax.scan) after N cached tokens; tokens/s = 64 / time.
#   pgN      N prompt tokens then N/10 generated (deepseek.decode_loop), the seeds' combined
#            figure; tokens/s = (N + N/10) / time.
# per mode (standard / latent / hybrid: ik_llama.cpp's -mla variants) and cache format. "vs std"
# is max |out - out_standard| / max |out_standard| on the same inputs: the modes must agree.
# The memory table gives the latent cache's bytes ("KV self size", one layer: every mode shares
# that cache) and each mode's peak workspace ("compute buffer size": XLA's temporary bytes of the
# compiled call) for a decode step and for a 512-token ubatch at the end of 16k and 64k contexts.

MODEL_CACHES = {"f16": "float16", "bf16": "bfloat16", "f32": "float32", "q8_0": "q8_0",
                "q8_kv": "q8_kv", "q6_0": "q6_0"}
MODEL_QUICK_TESTS = ("pp512", "tg64@1024", "pg512")
MODEL_FULL_TESTS = ("pp512", "pp2048", "tg64@512", "tg64@4096", "tg64@16384", "pg2048")
MODEL_LONG_TESTS = ("pp8192", "pp16384", "tg64@32768", "tg64@65536", "pg8192", "pg16384")
MEMORY_CONTEXTS = (16384, 65536)
MEMORY_UBATCH = 512
MODEL_TG_STEPS = 64
# The modes compute the same function; beyond this they do not ("vs std" FAIL).
# Over 8-bit caches the latent mode's flash_mla rounds the absorbed query to 8
# bits (integer Q.K, README "Quantized caches") while standard mode multiplies
# decompressed rows in float32: measured up to 9.3e-3 apart on these rows.
MODEL_AGREEMENT = 1e-3
MODEL_AGREEMENT_8BIT = 3e-2


def model_agreement(cache: str) -> float:
    return MODEL_AGREEMENT_8BIT if cache in ("q8_0", "q8_kv") else MODEL_AGREEMENT
# A call longer than this is timed once, with no separate warm-up call.
MODEL_SINGLE_CALL_S = 2.0


@dataclass
class ModelRow:
    """One model-level timing (table and JSON)."""
    test: str
    mode: str
    cache: str
    ms: float
    tokens_per_s: float
    vs_std: float | None     # max |out - standard's| / max |standard's|
    reps: int
    other_load: float | None
    context: int              # tokens in the cache at the end
    kv_bytes_per_token: int   # latent cache, one layer
    workspace_bytes: int      # XLA temporary bytes of the timed call


@dataclass
class MemoryRow:
    """KV cache and workspace of one mode at one context (table and JSON)."""
    context: int
    cache: str
    mode: str
    kv_bytes_per_token: int
    kv_bytes: int
    workspace_decode_bytes: int
    workspace_ubatch_bytes: int


def parse_model_test(name: str) -> tuple[str, int]:
    """'ppN' -> ('pp', N); 'tg64@N' -> ('tg', N); 'pgN' -> ('pg', N)."""
    m = re.fullmatch(rf"pp(\d+)|tg{MODEL_TG_STEPS}@(\d+)|pg(\d+)", name)
    if not m or int(next(g for g in m.groups() if g is not None)) < 1:
        raise argparse.ArgumentTypeError(
            f"model test {name!r} is not ppN, tg{MODEL_TG_STEPS}@N or pgN (N >= 1)")
    kind = name[:2]
    return kind, int(next(g for g in m.groups() if g is not None))


def _model_cfg():
    from jax_mla import deepseek
    return deepseek.MLAConfig()


def _filled_cache(cfg, fmt: str, max_len: int, n: int):
    """A cache of max_len rows whose first n hold random rows (as a prefill leaves them)."""
    from jax_mla import deepseek
    cache = deepseek.init_cache(cfg, 1, max_len, fmt)
    if n == 0:
        return cache
    rows = jax.random.normal(jax.random.PRNGKey(7), (1, n, cfg.cache_dim), jnp.float32)
    kv = jax.jit(jax_mla.cache_update)(cache.kv, rows, jnp.arange(n, dtype=jnp.int32)[None])
    return deepseek.LatentCache(kv, jnp.full((1,), n, jnp.int32))


def _model_call(kind: str, n: int, mode: str, fmt: str, cfg, params):
    """(jitted function, a maker of fresh arguments, tokens the call produces, context)."""
    from jax_mla import deepseek
    x = jax.random.normal(jax.random.PRNGKey(3), (1, n if kind != "tg" else 1, cfg.hidden_size))
    if kind == "pp":
        fn = jax.jit(functools.partial(deepseek.attention, cfg=cfg, mode=mode),
                     donate_argnames=("cache",))
        pos = jnp.arange(n, dtype=jnp.int32)[None]
        return fn, lambda: (params, x, pos, deepseek.init_cache(cfg, 1, n, fmt)), n, n
    if kind == "tg":
        fn = jax.jit(functools.partial(deepseek.generate, cfg=cfg, steps=MODEL_TG_STEPS,
                                       mode=mode), donate_argnames=("cache",))
        steps = MODEL_TG_STEPS
        return (fn, lambda: (params, x, _filled_cache(cfg, fmt, n + steps, n)), steps, n + steps)
    steps = max(1, n // 10)
    fn = jax.jit(functools.partial(deepseek.decode_loop, cfg=cfg, steps=steps, mode=mode),
                 donate_argnames=("cache",))
    return fn, lambda: (params, x, deepseek.init_cache(cfg, 1, n + steps, fmt)), n + steps, n + steps


def _model_output(kind: str, out):
    """The part of a call's result the modes must agree on: the prefill's outputs and
    the first generated token's. Later tokens are not compared: each step's input is
    the previous output, and this random layer fed its own output doubles a
    difference every step or two (1e-6 at the first token, O(1) by the 40th)."""
    if kind == "pp":
        parts = [out[0]]
    elif kind == "tg":
        parts = [out[0][:, 0]]
    else:
        parts = [out[0], out[1][:, 0]]
    return np.concatenate([np.asarray(o, np.float64).reshape(-1) for o in parts])


def run_model_case(kind: str, n: int, cache: str, modes, cfg, params, budget_s: float):
    fmt = MODEL_CACHES[cache]
    rows, outputs = [], {}
    test = f"tg{MODEL_TG_STEPS}@{n}" if kind == "tg" else f"{kind}{n}"
    for mode in modes:
        fn, make_args, tokens, context = _model_call(kind, n, mode, fmt, cfg, params)
        row = ModelRow(test=test, mode=mode, cache=cache, ms=math.nan, tokens_per_s=math.nan,
                       vs_std=None, reps=0, other_load=None, context=context,
                       kv_bytes_per_token=jax_mla.cache_bytes(fmt, (1, 1, cfg.cache_dim)),
                       workspace_bytes=0)
        rows.append(row)
        args = make_args()
        compiled = fn.lower(*args).compile()
        row.workspace_bytes = int(compiled.memory_analysis().temp_size_in_bytes)
        times = []
        with OtherLoad() as load:
            start = time.perf_counter()
            out = jax.block_until_ready(compiled(*args))
            first = time.perf_counter() - start
            if first >= MODEL_SINGLE_CALL_S:
                times.append(first)
            else:
                for _ in range(max(1, min(5, round(budget_s / max(first, 1e-6))))):
                    args = jax.block_until_ready(make_args())
                    start = time.perf_counter()
                    out = jax.block_until_ready(compiled(*args))
                    times.append(time.perf_counter() - start)
        outputs[mode] = _model_output(kind, out)
        seconds = statistics.median(times)
        row.ms, row.tokens_per_s, row.reps = seconds * 1e3, tokens / seconds, len(times)
        row.other_load = load.cores
    if "standard" in outputs:
        ref = outputs["standard"]
        for row in rows:
            if row.mode in outputs:
                row.vs_std = float(np.max(np.abs(outputs[row.mode] - ref))
                                   / max(np.max(np.abs(ref)), 1e-30))
    return rows


def memory_rows(cfg, params, caches, modes, contexts=MEMORY_CONTEXTS) -> list[MemoryRow]:
    """KV bytes and each mode's compiled workspace (compile only: nothing is allocated)."""
    from jax_mla import deepseek
    rows = []
    for context in contexts:
        for cache in caches:
            fmt = MODEL_CACHES[cache]
            abstract = jax.eval_shape(lambda: deepseek.init_cache(cfg, 1, context, fmt))
            for mode in modes:
                workspace = []
                for seq in (1, MEMORY_UBATCH):
                    fn = jax.jit(functools.partial(deepseek.attention, cfg=cfg, mode=mode),
                                 donate_argnames=("cache",))
                    x = jax.ShapeDtypeStruct((1, seq, cfg.hidden_size), jnp.float32)
                    pos = jax.ShapeDtypeStruct((1, seq), jnp.int32)
                    analysis = fn.lower(params, x, pos, abstract).compile().memory_analysis()
                    workspace.append(int(analysis.temp_size_in_bytes))
                per_token = jax_mla.cache_bytes(fmt, (1, 1, cfg.cache_dim))
                rows.append(MemoryRow(context=context, cache=cache, mode=mode,
                                      kv_bytes_per_token=per_token, kv_bytes=per_token * context,
                                      workspace_decode_bytes=workspace[0],
                                      workspace_ubatch_bytes=workspace[1]))
    return rows


def model_failed(row: ModelRow) -> bool:
    return row.vs_std is not None and not row.vs_std <= model_agreement(row.cache)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def model_table_head() -> str:
    return ("| test        | mode     | cache | ms         | tokens/s  | vs std       |\n"
            "| ----------- | -------- | ----- | ---------: | --------: | -----------: |")


def model_table_row(row: ModelRow) -> str:
    ms = f"{row.ms:.1f}" + (" *" if row.other_load is not None and row.other_load >
                            DISTURBED_CORES else "")
    err = "" if row.vs_std is None else f"{row.vs_std:.1e}" + (" FAIL" if model_failed(row) else "")
    return (f"| {row.test:<11} | {row.mode:<8} | {row.cache:<5} | {ms:>10} | "
            f"{row.tokens_per_s:>9.1f} | {err:>12} |")


def memory_table(rows: list[MemoryRow]) -> str:
    lines = [f"| context | cache | mode     | KV B/token | KV MiB (1 layer) | workspace MiB, decode "
             f"| workspace MiB, ubatch {MEMORY_UBATCH} |",
             "| ------: | ----- | -------- | ---------: | ---------------: | --------------------: "
             "| ----------------------: |"]
    for r in rows:
        lines.append(f"| {r.context:>7} | {r.cache:<5} | {r.mode:<8} | {r.kv_bytes_per_token:>10} "
                     f"| {_mib(r.kv_bytes):>16} | {_mib(r.workspace_decode_bytes):>21} "
                     f"| {_mib(r.workspace_ubatch_bytes):>23} |")
    return "\n".join(lines)


def run_model(args, budget_s: float):
    """The model-level rows and the memory table; prints as it goes."""
    from jax_mla import deepseek
    cfg = _model_cfg()
    params = deepseek.init_params(jax.random.PRNGKey(0), cfg)
    print(f"\nDeepSeek-V2-Lite attention layer (jax_mla.deepseek): hidden {cfg.hidden_size}, "
          f"{cfg.num_heads} heads, latent {cfg.kv_lora_rank} + rope {cfg.qk_rope_head_dim}, "
          f"batch 1, f32 activations; ppN: prefill of N tokens; tg{MODEL_TG_STEPS}@N: "
          f"{MODEL_TG_STEPS} decode steps after N tokens; pgN: N prompt tokens then N/10 "
          "generated; tokens/s as llama-bench; vs std: max|out - standard|/max|standard|",
          flush=True)
    print(model_table_head(), flush=True)
    rows = []
    for kind, n in args.model_tests:
        for cache in args.model_caches:
            for row in run_model_case(kind, n, cache, args.modes, cfg, params, budget_s):
                print(model_table_row(row), flush=True)
                rows.append(row)
    mem = memory_rows(cfg, params, args.model_caches[:1] if args.quick else args.model_caches,
                      args.modes)
    print(f"\nKV cache (the latent cache of one layer, shared by every mode) and peak workspace "
          f"(XLA temporaries of the compiled call) at {', '.join(map(str, MEMORY_CONTEXTS))} "
          "tokens of context", flush=True)
    print(memory_table(mem), flush=True)
    return rows, mem
