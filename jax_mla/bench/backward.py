"""Gradient rows (`python -m jax_mla --backward`): a whole training step of
each op, the forward and `jax.vjp`'s backward through jax_mla's custom VJP
(its native backward kernel where the backend has one, else the pure-JAX
blockwise backward), next to `jax.vjp` of the plain-JAX formulation
(jax_mla.bench.baselines: einsums, float32 softmax, the S x S weights saved for
the backward), in one run.

Causal prefill, Sq = Skv = S, batch 1: flash_attention at DeepSeek's 192/128
(KV heads = heads) and flash_mla over the 576-wide latent row (V its first
512 columns). Each row's gradients are checked against the plain ones before
it is timed; XLA's temporary bytes of both compiled steps show what the S x S
matrix costs. A plain-JAX step whose S x S scores would not fit the device
is left out (its columns empty; the check then runs both on fewer heads).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

import jax_mla
from jax_mla._autodiff import native_backward_problem
from jax_mla.bench import baselines, report, timing
from jax_mla.bench.cases import MLA_DV, SCALE

HEAD_DIMS = {"flash_attention": (192, 128), "flash_mla": (576, MLA_DV)}
# (S, heads, dtype) per platform.
CPU_TESTS = tuple((s, 16, d) for s in (1024, 4096) for d in ("f32", "bf16"))
CPU_QUICK_TESTS = ((256, 16, "f32"), (256, 16, "bf16"))
GPU_TESTS = tuple((s, h, "bf16") for s in (4096, 16384) for h in (16, 128))
GPU_QUICK_TESTS = ((1024, 16, "bf16"),)
DTYPES = {"f32": jnp.float32, "f16": jnp.float16, "bf16": jnp.bfloat16}
# max |native - plain| / max |plain| over every gradient: both round to the
# inputs' dtype at different places, so half-precision rows differ by ~1e-2.
TOLERANCE = {"f32": 1e-4, "f16": 3e-2, "bf16": 3e-2}
# The plain step is skipped when its float32 S x S scores alone would take
# more than this share of the device's memory.
PLAIN_MEMORY_SHARE = 0.25


@dataclass
class BackwardRow:
    """One line of the gradient table (and of the JSON's "backward_rows")."""

    test: str  # ppS
    op: str
    dtype: str
    heads: int
    dk: int
    dv: int
    ms: float  # jax_mla's step; NaN when the check failed
    jax_ms: float | None  # the plain-JAX step; None when skipped
    speedup: float | None  # jax_ms / ms
    tflops: float  # causal forward + backward FLOPs / ms (see flops())
    temp_mib: float  # XLA temporaries of jax_mla's compiled step
    jax_temp_mib: float | None
    err: float
    tolerance: float
    backward: str  # "native" or "pure-JAX": what jax_mla's VJP ran
    other_load: float | None


def flops(seq: int, heads: int, dk: int, dv: int) -> float:
    """Forward 2 S^2 H (Dk + Dv) halved by the causal mask, backward 2.5 times
    that (FlashAttention's count: five GEMMs to the forward's two)."""
    forward = 2.0 * seq * seq * heads * (dk + dv) / 2
    return 3.5 * forward


def _inputs(op: str, seq: int, heads: int, dtype, seed: int = 0):
    dk, dv = HEAD_DIMS[op]
    rng = np.random.default_rng(seed)
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    dout = draw(1, seq, heads, dv)
    if op == "flash_mla":
        return (draw(1, seq, heads, dk), draw(1, seq, dk)), dout
    return (draw(1, seq, heads, dk), draw(1, seq, heads, dk), draw(1, seq, heads, dv)), dout


def _ours(op: str):
    if op == "flash_mla":
        return lambda q, kv: jax_mla.flash_mla(q, kv, dv=MLA_DV, scale=SCALE, causal=True)
    return lambda q, k, v: jax_mla.flash_attention(q, k, v, scale=SCALE, causal=True)


def _plain(op: str):
    fn = baselines.plain_mla if op == "flash_mla" else baselines.plain_attention
    return functools.partial(fn, causal=True)


def _step(fn):
    """The jitted training step: the forward, then its VJP of dout."""
    return jax.jit(lambda inputs, dout: jax.vjp(fn, *inputs)[1](dout))


def _temp_mib(step, args) -> float:
    return step.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20


def _relative_error(got, want) -> float:
    err = 0.0
    for a, b in zip(got, want):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        err = max(err, float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)))
    return err


def device_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def backward_kind(op: str, inputs, dout) -> str:
    """What jax_mla's VJP runs for these inputs: "native" or "pure-JAX"."""
    if op == "flash_mla":  # attention's backward with one KV head (the latent row)
        q, kv = inputs
        k, v = kv[:, :, None], kv[:, :, None, :MLA_DV]
    else:
        q, k, v = inputs
    why = native_backward_problem(jax.devices()[0].platform, q, k, v, dout)
    return "native" if why is None else "pure-JAX"


def check_heads(seq: int, heads: int) -> int:
    """How many heads the plain step can run at S (all of them, or fewer
    when the float32 S x S scores would not fit the device)."""
    limit = device_bytes()
    if limit is None:
        return heads
    fits = int(PLAIN_MEMORY_SHARE * limit // (4.0 * seq * seq))
    return max(1, min(heads, fits))


def run_case(op: str, seq: int, heads: int, dtype: str, budget_s: float) -> BackwardRow:
    dk, dv = HEAD_DIMS[op]
    inputs, dout = _inputs(op, seq, heads, DTYPES[dtype])
    ours, plain = _step(_ours(op)), _step(_plain(op))
    n = check_heads(seq, heads)
    run_plain = n == heads
    if run_plain:
        err = _relative_error(ours(inputs, dout), plain(inputs, dout))
    else:
        # Too big for the plain step: the check runs both on the first n heads
        # (a problem of its own: MLA's kv gradient sums fewer heads).
        sub = _inputs(op, seq, n, DTYPES[dtype])
        err = _relative_error(ours(*sub), plain(*sub))
    native = backward_kind(op, inputs, dout)
    row = BackwardRow(
        test=f"pp{seq}",
        op=op,
        dtype=dtype,
        heads=heads,
        dk=dk,
        dv=dv,
        ms=math.nan,
        jax_ms=None,
        speedup=None,
        tflops=math.nan,
        temp_mib=_temp_mib(ours, (inputs, dout)),
        jax_temp_mib=_temp_mib(plain, (inputs, dout)) if run_plain else None,
        err=err,
        tolerance=TOLERANCE[dtype],
        backward=native,
        other_load=None,
    )
    if not err <= row.tolerance:
        return row
    back_to_back = jax.devices()[0].platform != "cpu"
    with timing.OtherLoad() as load:
        t = timing.time_calls(
            ours, lambda _: (inputs, dout), budget_s=budget_s, back_to_back=back_to_back
        )
        if run_plain:
            t_plain = timing.time_calls(
                plain, lambda _: (inputs, dout), budget_s=budget_s, back_to_back=back_to_back
            )
    row.ms, row.other_load = t.seconds * 1e3, load.cores
    row.tflops = flops(seq, heads, dk, dv) / t.seconds / 1e12
    if run_plain:
        row.jax_ms = t_plain.seconds * 1e3
        row.speedup = row.jax_ms / row.ms
    return row


COLUMNS = (
    ("test", "test", 8, "{}"),
    ("op", "op", 15, "{}"),
    ("dtype", "dtype", 5, "{}"),
    ("heads", "H", 4, "{}"),
    ("backward", "backward", 8, "{}"),
    ("ms", "ms", 11, "{:.2f}"),
    ("jax_ms", "jax ms", 10, "{:.2f}"),
    ("speedup", "speedup", 7, "{:.2f}"),
    ("tflops", "TFLOP/s", 8, "{:.3f}"),
    ("temp_mib", "temp MiB", 8, "{:.0f}"),
    ("jax_temp_mib", "jax temp MiB", 12, "{:.0f}"),
    ("err", "err", 12, "{:.1e}"),
)
TABLE = report.Table(COLUMNS, {"test", "op", "dtype", "backward"})


def header(meta: dict) -> str:
    # The op table's title, device and versions lines; the rest is this table's.
    title, device, _, versions = report.header(meta).splitlines()[:4]
    gpu = "cpu" not in meta
    timed = (
        "jitted steps issued back to back between synchronizations"
        if gpu
        else "jitted step, warm, each synchronized"
    )
    return "\n".join(
        [
            title.replace("benchmark", "gradient benchmark"),
            device.split(";")[0] if gpu else device,
            versions,
            "gradient step: the forward and jax.vjp's backward of q and the caches; causal, "
            "Sq = Skv = S, batch 1; flash_attention 192/128 with KV heads = heads, "
            f"flash_mla 576/{MLA_DV} over one latent head; scale 1/sqrt(192)",
            f"ms: {timed}, best of {timing.PASSES} passes of the median of samples; backward: "
            "what jax_mla's VJP ran (the native kernel or the pure-JAX blockwise one)",
            "jax: jax.vjp of the plain-JAX formulation (S x S weights saved); speedup: jax ms / "
            "ms; TFLOP/s: 3.5 x the causal forward's FLOPs; temp MiB: XLA's temporaries of "
            "the compiled step; err: max|ours - plain|/max|plain| over the gradients",
        ]
    )


def main(args, platform: str, command: str) -> int:
    """The gradient rows of `python -m jax_mla --backward`; 1 if a check failed."""
    tests = {
        "cpu": CPU_QUICK_TESTS if args.quick else CPU_TESTS,
        "gpu": GPU_QUICK_TESTS if args.quick else GPU_TESTS,
    }[platform]
    meta = report.metadata(args.quick, command)
    print(header(meta), flush=True)
    print(TABLE.head(), flush=True)
    rows = []
    for op in args.ops:
        for seq, heads, dtype in tests:
            row = run_case(op, seq, heads, dtype, 0.2 if args.quick else 1.0)
            print(TABLE.row(row), flush=True)
            rows.append(row)
    report.print_load_note(rows)
    if args.json:
        report.write_json(args.json, meta, [], [], [], backward_rows=rows)
    bad = [r for r in rows if not r.err <= r.tolerance]
    for r in bad:
        print(
            f"FAILED CHECK: {r.test} {r.op} {r.dtype} H={r.heads}: err {r.err:.3g} > "
            f"{r.tolerance:g} (vs the plain-JAX gradients)",
            flush=True,
        )
    return 1 if bad else 0
