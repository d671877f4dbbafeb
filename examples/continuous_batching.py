"""Continuous batching over one paged latent cache.

Requests of different lengths arrive over time and share a fixed number of
batch slots. Each new request is prefilled on its own (hybrid mode: standard
attention for its prompt), then every active request decodes one token per
step together (latent mode: flash_mla over the pages in place). Pages come
from a jax_mla.PageAllocator as sequences grow and go back when a request
finishes, so the next one reuses them. At the end the script prints the
tokens per second and the cache memory the pages in use took at their peak,
against a contiguous cache of the same capacity (slots x max_len rows).

The layer stands alone here (no embedding, MLP or sampling): a decode step's
input is its previous output RMS-normalized, as jax_mla.deepseek.generate
does. Run: python examples/continuous_batching.py [--fmt q8_0] [--requests 12]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_mla
from jax_mla import deepseek as ds

# A small layer with DeepSeek's structure (latent row 128 + 32, 4 heads).
CFG = ds.MLAConfig(
    hidden_size=256,
    num_heads=4,
    kv_lora_rank=128,
    qk_nope_head_dim=32,
    qk_rope_head_dim=32,
    v_head_dim=32,
    original_max_position_embeddings=256,
    hybrid_threshold=16,
)
PAGE_SIZE = 16
MAX_PAGES = 8  # per sequence: up to 128 tokens
PROMPT_LENGTHS = (16, 32, 48)  # a few shapes, so prefill compiles a few times


@dataclasses.dataclass
class Request:
    rid: int
    arrival: int  # the decode step it arrives at
    prompt: np.ndarray  # [prompt_len, hidden]
    max_new: int
    outputs: list = dataclasses.field(default_factory=list)  # each generated token's output


def make_requests(n: int, seed: int = 0) -> list[Request]:
    rng = np.random.default_rng(seed)
    return [
        Request(
            rid=i,
            arrival=int(rng.integers(0, 3 * n)),
            prompt=rng.standard_normal((int(rng.choice(PROMPT_LENGTHS)), CFG.hidden_size)).astype(
                np.float32
            ),
            max_new=int(rng.integers(4, 41)),
        )
        for i in range(n)
    ]


def renorm(y):
    return y * jax.lax.rsqrt(jnp.mean(y * y, -1, keepdims=True) + 1e-6)


# The cache is donated: the pool's pages are written in place.
step = jax.jit(ds.attention, static_argnames=("cfg", "mode"), donate_argnames=("cache",))


def view(pool, table, length) -> ds.LatentCache:
    """The pool seen by a batch: its block table rows and lengths."""
    return ds.LatentCache(
        pool,
        jnp.asarray(length, jnp.int32),
        jnp.zeros((len(length),), jnp.bool_),
        jnp.asarray(table),
    )


def check_nothing_lost(cache: ds.LatentCache, live: list[bool]) -> None:
    """A token written to or read from a table entry that is no page is
    dropped or skipped under jit and flags its row: never silently. (Empty
    slots, whose rows have no pages, are flagged too, and ignored.)"""
    if np.asarray(cache.overflow)[live].any():
        raise RuntimeError("a live request lost a token: its pages were not reserved")


def serve(
    requests: list[Request],
    params,
    fmt: str = "q8_0",
    slots: int = 4,
    num_pages: int = 24,
) -> dict:
    """Runs every request to completion; returns the run's statistics."""
    alloc = jax_mla.PageAllocator(num_pages, PAGE_SIZE, MAX_PAGES)
    for r in requests:
        if alloc.pages_needed(r.rid, len(r.prompt) + r.max_new) > min(num_pages, MAX_PAGES):
            raise ValueError(f"request {r.rid} needs more pages than a sequence can hold")
    pool = ds.init_paged_cache(CFG, 1, num_pages, PAGE_SIZE, MAX_PAGES, fmt).kv
    waiting = sorted(requests, key=lambda r: r.arrival)
    active: list[Request | None] = [None] * slots
    x = np.zeros((slots, 1, CFG.hidden_size), np.float32)  # each slot's next input
    committed = 0  # pages the active requests will need at their longest
    stats = dict(prefill_tokens=0, decode_tokens=0, steps=0, peak_pages=0, pages_taken=0)
    t = 0
    while waiting or any(active):
        # Admit arrived requests while a slot is free and the pages their
        # whole run needs are not promised to others (no preemption here).
        for slot in range(slots):
            if active[slot] is not None or not waiting or waiting[0].arrival > t:
                continue
            req = waiting[0]
            need = alloc.pages_needed(req.rid, len(req.prompt) + req.max_new)
            if committed + need > num_pages:
                break
            waiting.pop(0)
            committed += need
            alloc.reserve(req.rid, len(req.prompt))
            stats["pages_taken"] += len(alloc.pages(req.rid))
            n = len(req.prompt)
            out, cache = step(
                params,
                jnp.asarray(req.prompt[None]),
                jnp.arange(n, dtype=jnp.int32)[None],
                view(pool, alloc.block_table([req.rid]), [0]),
                cfg=CFG,
                mode="hybrid",
            )
            pool = cache.kv
            check_nothing_lost(cache, [True])
            x[slot] = np.asarray(renorm(out[:, -1]))
            active[slot] = req
            stats["prefill_tokens"] += n
        live = [r for r in active if r is not None]
        if live:
            lengths = [len(r.prompt) + len(r.outputs) if r else 0 for r in active]
            for r, length in zip(active, lengths):
                if r is not None:
                    before = len(alloc.pages(r.rid))
                    alloc.reserve(r.rid, length + 1)
                    stats["pages_taken"] += len(alloc.pages(r.rid)) - before
            stats["peak_pages"] = max(stats["peak_pages"], alloc.pages_in_use)
            # Empty slots have no pages (a table row of -1): their writes are
            # dropped and their outputs ignored.
            out, cache = step(
                params,
                jnp.asarray(x),
                jnp.asarray(lengths, jnp.int32)[:, None],
                view(pool, alloc.block_table([r.rid if r else None for r in active]), lengths),
                cfg=CFG,
                mode="hybrid",
            )
            pool = cache.kv
            check_nothing_lost(cache, [r is not None for r in active])
            out = np.asarray(out)
            x = np.array(renorm(jnp.asarray(out)))  # writable: admissions set rows
            for slot, r in enumerate(active):
                if r is None:
                    continue
                r.outputs.append(out[slot, 0])
                stats["decode_tokens"] += 1
                if len(r.outputs) == r.max_new:
                    committed -= -(-(len(r.prompt) + r.max_new) // PAGE_SIZE)
                    alloc.free(r.rid)
                    active[slot] = None
            stats["steps"] += 1
        t += 1
    stats["pages_left"] = alloc.pages_in_use
    stats["peak_bytes"] = jax_mla.cache_bytes(fmt, (stats["peak_pages"], PAGE_SIZE, CFG.cache_dim))
    stats["contiguous_bytes"] = jax_mla.cache_bytes(
        fmt, (slots, MAX_PAGES * PAGE_SIZE, CFG.cache_dim)
    )
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fmt", default="q8_0", help="cache format: f32, f16, bf16, q8_0, ...")
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--pages", type=int, default=24, help="pages in the pool")
    args = parser.parse_args(argv)
    params = ds.init_params(jax.random.PRNGKey(0), CFG)
    # Compile every shape once on throwaway requests, so the timing is the serving.
    warm = [
        Request(i, 0, np.zeros((n, CFG.hidden_size), np.float32), 1)
        for i, n in enumerate(PROMPT_LENGTHS)
    ]
    serve(warm, params, args.fmt, args.slots, args.pages)
    requests = make_requests(args.requests)
    start = time.perf_counter()
    stats = serve(requests, params, args.fmt, args.slots, args.pages)
    seconds = time.perf_counter() - start
    tokens = stats["prefill_tokens"] + stats["decode_tokens"]
    lengths = [len(r.prompt) for r in requests]
    print(
        f"{len(requests)} requests (prompts of {min(lengths)}-{max(lengths)} tokens, "
        f"{min(r.max_new for r in requests)}-{max(r.max_new for r in requests)} new tokens) "
        f"over {args.slots} slots, cache {args.fmt}, pages of {PAGE_SIZE} rows"
    )
    print(
        f"{stats['prefill_tokens']} prefill + {stats['decode_tokens']} decoded tokens in "
        f"{stats['steps']} decode steps, {seconds:.2f} s: {tokens / seconds:.0f} tokens/s "
        f"({stats['decode_tokens'] / seconds:.0f} decoded tokens/s)"
    )
    print(
        f"pages handed out {stats['pages_taken']} times from a pool of {args.pages} "
        f"(freed pages reused)"
    )
    print(
        f"cache in use at the peak: {stats['peak_pages']} pages = "
        f"{stats['peak_bytes'] / 1024:.1f} KiB; a contiguous cache of the same capacity "
        f"({args.slots} x {MAX_PAGES * PAGE_SIZE} rows): "
        f"{stats['contiguous_bytes'] / 1024:.1f} KiB "
        f"({stats['peak_bytes'] / stats['contiguous_bytes']:.0%})"
    )


if __name__ == "__main__":
    main()
