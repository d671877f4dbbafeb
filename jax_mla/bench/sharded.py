"""Sharded rows (`python -m jax_mla --sharded`): each op on every device JAX
has, its inputs split by batch, by heads or by the cache's sequence (context
parallelism, merged by LSE), or by two of them on a 2-D mesh (data x tensor,
data x context, tensor x context), next to the same call on one device, in
one run.

Each split row is checked against the one-device result (which is checked
against jax_mla.reference first) before it is timed with the package's timer,
and its compiled HLO's collectives are listed: none for batch and heads, the
LSE merge's all-reduces for context (docs/sharding.md). Several fake CPU
devices share one machine's cores, so there the rows show what splitting
costs, not how it scales.
"""

from __future__ import annotations

import collections
import math
import re
import sys
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_mla.bench import cases, ops, report, timing

DIMS = ("batch", "heads", "context")
# A 2-D split is two dims joined by "+": the first over a mesh axis of 2
# devices, the second over the rest.
SPLITS = (*DIMS, "batch+heads", "batch+context", "heads+context")
# The shapes, chosen so that every split divides its dim: batch rows per
# device, and query heads (DeepSeek-V2-Lite's 16 on the CPU, as the op rows;
# V3's 128 on GPUs), rounded up to a multiple of the devices, as are the keys.
BATCH_PER_DEVICE = {"cpu": 1, "gpu": 16}
HEADS = {"cpu": cases.CPU_HEADS, "gpu": 128}
TESTS = {"cpu": ("tg@4096",), "gpu": ("tg@4096",)}
QUICK_TESTS = {"cpu": ("tg@1024",), "gpu": ("tg@4096",)}
CACHE = {"cpu": "f16", "gpu": "bf16"}

_COLLECTIVE = re.compile(
    r"\s(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(?:-start)?\("
)


@dataclass
class ShardedRow:
    """One line of the sharded table (and of the JSON's "sharded_rows")."""

    test: str
    op: str
    cache: str
    split: str  # "one device", or the dim split over every device
    devices: int
    batch: int
    heads: int
    ms: float  # NaN when the check failed (the row is not timed)
    tokens_per_s: float  # batch * seq_q / time
    gbps: float  # cache bytes read, all devices together / time
    vs_one: float | None  # one-device ms / this row's ms, on split rows
    err: float  # max |out - want| / max |want|: want is jax_mla.reference on the
    # one-device row, the one-device result on split rows
    tolerance: float  # the most err may be: the native kernel's against the reference
    collectives: str  # of the compiled call: "none", or e.g. "all-reduce x2"
    calls: int
    samples: int
    copies: int
    other_load: float | None
    seq_q: int
    n_kv: int


def failed(row: ShardedRow) -> bool:
    return not row.err <= row.tolerance  # True for NaN too


def round_up(x: int, n: int) -> int:
    return -(-x // n) * n


def sharded_cases(tests, ops_, caches, platform: str, devices: int) -> list[cases.Case]:
    """The cases, shaped so that every split divides its dim over `devices`."""
    query = "f32" if platform == "cpu" else "bf16"
    return [
        cases.Case(
            op,
            seq_q,
            round_up(n_kv, devices),
            cache,
            BATCH_PER_DEVICE[platform] * devices,
            round_up(HEADS[platform], devices),
            query,
        )
        for seq_q, n_kv in tests
        for op in ops_
        for cache in caches
    ]


def mesh_for(split: str, devices: list):
    """A 1-D mesh over every device for one dim; for "a+b", 2 x (n / 2)."""
    dims = split.split("+")
    n = len(devices)
    shape = (n,) if len(dims) == 1 else (2, n // 2)
    types = (jax.sharding.AxisType.Auto,) * len(dims)
    return jax.make_mesh(shape, tuple(dims), axis_types=types, devices=devices)


def specs(op: str, split: str) -> tuple[P, P]:
    """(q's spec, each cache's spec): each dim of the split over the mesh axis
    named after it. q is [B, Sq, H, D]; a cache is [B, S, (Hkv,) D]."""
    q, cache = [None] * 3, [None] * 3
    for dim in split.split("+"):
        if dim == "batch":
            q[0] = cache[0] = dim
        elif dim == "heads":
            q[2] = dim
            # flash_mla's one latent head is read by every query head.
            if op != "flash_mla":
                cache[2] = dim
        else:  # context: the cache's sequence; every device sees all queries
            cache[1] = dim
    return P(*q), P(*cache)


def place(inputs: tuple, mesh, op: str, split: str) -> tuple:
    q_spec, cache_spec = specs(op, split)
    q, *caches = inputs
    # From the host: resharding a device array would compile a program per input.
    put = lambda x, spec: jax.device_put(np.asarray(x), NamedSharding(mesh, spec))
    # A quantized cache is placed leaf by leaf (its values and scales split alike).
    return (
        put(q, q_spec),
        *(jax.tree_util.tree_map(lambda a: put(a, cache_spec), c) for c in caches),
    )


def collectives(fn, args) -> str:
    text = fn.lower(*args).compile().as_text()
    found = collections.Counter(_COLLECTIVE.findall(text))
    return ", ".join(f"{k} x{n}" for k, n in sorted(found.items())) or "none"


def relative_error(out, want) -> float:
    out, want = np.asarray(out, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(out - want)) / max(np.max(np.abs(want)), 1e-30))


def run_case(case: cases.Case, platform: str, splits, budget_s: float) -> list[ShardedRow]:
    """The one-device row, then one row per split over every device."""
    gpu = platform != "cpu"
    devices = jax.devices()
    # Rotated past the L2 of a device holding a 1/n share of the cache, so no
    # split row reads a warm cache either.
    copies = timing.copies_past_l2(case.cache_bytes // len(devices)) if gpu else 1
    inputs = [cases.make_inputs(case, seed) for seed in range(copies)]
    fn = ops.native_fn(case)
    tol = ops.TOLERANCE[platform]["native"][case.cache]
    one = np.asarray(jax.block_until_ready(fn(*inputs[0])), np.float64)
    ref = np.asarray(ops.reference_fn(case)(*ops.check_inputs(case, inputs[0])), np.float64)
    rows, one_ms = [], None
    for split in ("one device", *splits):
        placed = (
            inputs
            if split == "one device"
            else [place(x, mesh_for(split, devices), case.op, split) for x in inputs]
        )
        if split == "one device":
            out = fn(*ops.check_inputs(case, placed[0]))
            err = relative_error(out, ref)
        else:
            err = relative_error(fn(*placed[0]), one)
        row = ShardedRow(
            test=case.test,
            op=case.op,
            cache=case.cache,
            split=split,
            devices=1 if split == "one device" else len(devices),
            batch=case.batch,
            heads=case.heads,
            ms=math.nan,
            tokens_per_s=math.nan,
            gbps=math.nan,
            vs_one=None,
            err=err,
            tolerance=tol,
            collectives=collectives(fn, placed[0]),
            calls=0,
            samples=0,
            copies=copies,
            other_load=None,
            seq_q=case.seq_q,
            n_kv=case.n_kv,
        )
        rows.append(row)
        if failed(row):
            continue
        jax.block_until_ready(fn(*placed[0]))  # compiled for these shardings
        with timing.OtherLoad() as load:
            t = timing.time_calls(
                fn, lambda i: placed[i % copies], budget_s=budget_s, back_to_back=gpu
            )
        s = t.seconds
        row.ms, row.calls, row.samples, row.other_load = s * 1e3, t.calls, t.samples, load.cores
        row.tokens_per_s = case.batch * case.seq_q / s
        row.gbps = case.cache_bytes / s / 1e9
        if split == "one device":
            one_ms = row.ms
        elif one_ms is not None:
            row.vs_one = one_ms / row.ms
    return rows


def header(meta: dict) -> str:
    d, v = meta["devices"], meta["versions"]
    timed = (
        f"jitted call incl. dispatch, warm, each synchronized; best of {timing.PASSES} passes "
        f"of the median of {timing.MIN_SAMPLES}..{timing.MAX_SAMPLES} calls"
        if d["platform"] == "cpu"
        else f"jitted calls incl. dispatch issued back to back ({timing.MIN_CALLS}.."
        f"{timing.MAX_CALLS}) between synchronizations, inputs rotated past the L2; best of "
        f"{timing.PASSES} passes of the median of {timing.MIN_SAMPLES}..{timing.MAX_SAMPLES} "
        "samples"
    )
    lines = [
        f"jax_mla {v['jax_mla']} sharded benchmark{' (--quick)' if meta['quick'] else ''}, "
        f"{meta['date']}, commit {meta['commit'] or 'unknown (not a checkout)'}",
        f"{d['count']} x {d['kind']} ({d['platform']}); python {v['python']}, jax {v['jax']}, "
        f"jaxlib {v['jaxlib']}",
        f"{'f32' if d['platform'] == 'cpu' else 'bf16'} queries over the cache type; "
        "flash_mla: 576/512 over one latent head; flash_attention: 192/128, KV heads = heads; "
        "tg@N: decode over N cached tokens; ppS@N: S causal queries ending them",
        "each split over all the devices, next to the same call on one device: "
        "batch: q and the cache by rows; heads: q by heads (flash_attention's KV heads with "
        "them, flash_mla's latent cache replicated); context: the cache by its sequence, the "
        "partial results merged by LSE; a+b: a 2-D mesh, a over 2 devices and b over the rest",
        f"ms: {timed}; GB/s: cache bytes read by all devices; vs one: one-device ms / this ms",
        "err: max|out-want|/max|want|, want = jax_mla.reference on the one-device row, the "
        "one-device result on split rows; collectives: those in the compiled call's HLO",
    ]
    if d["platform"] == "cpu":
        lines.append(
            f"NOTE: these {d['count']} CPU devices share this machine's "
            f"{meta['cpu']['threads']} threads: the rows show what splitting costs "
            "(partitioning, merge, dispatch), not how it scales"
        )
    return "\n".join(lines)


COLUMNS = (
    ("test", "test", 11, "{}"),
    ("batch", "B", 4, "{}"),
    ("heads", "H", 4, "{}"),
    ("op", "op", 15, "{}"),
    ("cache", "cache", 5, "{}"),
    ("split", "split", 13, "{}"),
    ("devices", "dev", 3, "{}"),
    ("ms", "ms", 10, "{:.3f}"),
    ("tokens_per_s", "tokens/s", 9, "{:.1f}"),
    ("gbps", "GB/s", 7, "{:.1f}"),
    ("vs_one", "vs one", 6, "{:.2f}"),
    ("err", "err", 12, "{:.1e}"),
    ("collectives", "collectives", 16, "{}"),
)
LEFT = {"test", "op", "cache", "split", "collectives"}


TABLE = report.Table(COLUMNS, LEFT)


def table_head() -> str:
    return TABLE.head()


def table_row(row: ShardedRow) -> str:
    return TABLE.row(row)


def main(args, platform: str, command: str) -> int:
    """The sharded run of `python -m jax_mla --sharded`: prints the table,
    writes --json, returns 1 if a check failed, 2 with a single device."""
    n = jax.device_count()
    if n < 2:
        # Fake CPU devices exist only if XLA_FLAGS asks before JAX starts. The
        # command says how rather than re-executing itself with that flag: a
        # re-executed run would time devices other than the ones the user has
        # (on a GPU machine, the CPU), which is not what they asked to measure.
        print(
            f"python -m jax_mla --sharded: JAX has 1 device ({jax.devices()[0].device_kind}); "
            "sharding needs several. To try it on fake CPU devices (they share this machine's "
            "cores: overhead only, not scaling), set XLA_FLAGS before JAX starts:\n"
            "  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu "
            "python -P -m jax_mla --sharded",
            file=sys.stderr,
        )
        return 2
    tests = args.tests or [
        cases.parse_test(t) for t in (QUICK_TESTS if args.quick else TESTS)[platform]
    ]
    caches = args.caches or [CACHE[platform]]
    bad = [c for c in caches if c not in ops.TOLERANCE[platform]["native"]]
    if bad:
        print(
            f"python -m jax_mla --sharded: the {platform} rows take the caches "
            f"{', '.join(ops.TOLERANCE[platform]['native'])}; got {', '.join(bad)}",
            file=sys.stderr,
        )
        return 2
    splits = list(args.splits)
    if n % 2 or n < 4:
        two_d = [s for s in splits if "+" in s]
        if two_d:
            print(
                f"python -m jax_mla --sharded: {n} devices make no 2 x (n / 2) mesh; "
                f"leaving out {', '.join(two_d)}",
                file=sys.stderr,
            )
        splits = [s for s in splits if "+" not in s]
    case_list = sharded_cases(tests, args.ops, caches, platform, n)
    meta = report.metadata(args.quick, command)
    dev = jax.devices()[0]
    meta["devices"] = {"count": n, "platform": dev.platform, "kind": dev.device_kind}
    print(header(meta), flush=True)
    print(table_head(), flush=True)
    rows = []
    for case in case_list:
        for row in run_case(case, platform, splits, 0.1 if args.quick else 0.5):
            print(table_row(row), flush=True)
            rows.append(row)
    report.print_load_note(rows)
    if args.json:
        report.write_json(args.json, meta, [], [], [], sharded_rows=rows)
    sys.stdout.flush()
    for r in rows:
        if failed(r):
            print(
                f"FAILED CHECK: {r.test} B={r.batch} H={r.heads} {r.op} {r.cache} split "
                f"{r.split}: err {r.err:.3g} > {r.tolerance:g}",
                file=sys.stderr,
            )
    return 1 if any(failed(r) for r in rows) else 0
