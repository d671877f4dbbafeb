"""Paged against contiguous MLA decode on the CPU, side by side in one process:
16 heads, one query, a cache of SKV (default 16384) 576-wide rows, V the
first 512 columns, for each cache format (float: f16, bf16, f32; else a
quantized format of the f16 rows) and page size. The pages of the
paged cache are shuffled (no two consecutive positions in consecutive pages,
the worst case for the driver, which merges runs of consecutive pages into
one kernel call) or, with --sequential, laid out in order.

Calls alternate between the contiguous and the paged cache (ABAB...) so that
both see the same machine load; the times are the median over rounds of each
round's mean time per call, "paged/contig" their ratio, and "round ratios" the
quartiles of each round's own paged / contiguous ratio (a round's two halves
ran back to back, so a slow minute on a shared host moves both: the spread
shows what a single run can tell apart).

    python -P benchmarks/cpu/paged_decode.py [--skv 16384] [--formats f16,q8_0]
        [--pages 16,32,64,128] [--rounds 7] [--calls 20] [--sequential]
        [--num-splits N]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_mla


def paged(cache, page_size: int, rng, sequential: bool):
    """The single-sequence cache [1, S, ...] as (pages, block_table [1, S / page_size])."""
    n = cache.shape[1] // page_size if not hasattr(cache, "qs") else cache.qs.shape[1] // page_size
    order = np.arange(n) if sequential else rng.permutation(n)

    def pool(leaf):
        pages = leaf[0].reshape((n, page_size) + leaf.shape[2:])
        out = jnp.zeros_like(pages).at[order].set(pages)
        return out

    return jax.tree_util.tree_map(pool, cache), jnp.asarray(order[None], jnp.int32)


def timed(f, args, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        out = f(*args)
    out.block_until_ready()
    return (time.perf_counter() - start) / calls


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skv", type=int, default=16384)
    parser.add_argument("--formats", default="f16,q8_0")
    parser.add_argument("--pages", default="16,32,64,128")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--sequential", action="store_true")
    parser.add_argument("--num-splits", type=int, default=None, help="default: the heuristic's")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 1, 16, 576)), jnp.float32)
    x = rng.standard_normal((1, args.skv, 576))
    floats = {"f16": jnp.float16, "bf16": jnp.bfloat16, "f32": jnp.float32}
    splits = args.num_splits
    contiguous = jax.jit(
        lambda q, kv: jax_mla.flash_mla(q, kv, num_splits=splits, backend="native")
    )
    paged_call = jax.jit(
        lambda q, kv, table: jax_mla.flash_mla(
            q, kv, block_table=table, num_splits=splits, backend="native"
        )
    )
    print(
        f"MLA decode, 16 heads, Skv {args.skv}, ISA {jax_mla.backends()['cpu']['isa']}, "
        f"{'sequential' if args.sequential else 'shuffled'} pages; median of {args.rounds} "
        f"rounds x {args.calls} calls, num_splits {splits or 'heuristic'}"
    )
    print(
        f"{'format':>7} {'page':>5} {'contiguous ms':>14} {'paged ms':>9} {'paged/contig':>13}"
        f" {'round ratios p25-p50-p75':>26}"
    )
    for fmt in args.formats.split(","):
        f16 = jnp.asarray(x, jnp.float16)
        kv = jnp.asarray(x, floats[fmt]) if fmt in floats else jax_mla.quantize(f16, fmt)
        for page_size in map(int, args.pages.split(",")):
            pages, table = paged(kv, page_size, rng, args.sequential)
            expected = contiguous(q, kv)
            got = paged_call(q, pages, table)
            np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-4)
            a, b = [], []
            for _ in range(args.rounds):
                a.append(timed(contiguous, (q, kv), args.calls))
                b.append(timed(paged_call, (q, pages, table), args.calls))
            ta, tb = np.median(a) * 1e3, np.median(b) * 1e3
            q25, q50, q75 = np.percentile(np.divide(b, a), [25, 50, 75])
            print(
                f"{fmt:>7} {page_size:>5} {ta:>14.3f} {tb:>9.3f} {tb / ta:>13.3f}"
                f" {f'{q25:.3f}-{q50:.3f}-{q75:.3f}':>26}"
            )


if __name__ == "__main__":
    main()
