"""Paged caches on the host and in cache_update: PageAllocator's bookkeeping,
writes through a block table (float and quantized, in place under donation)
and the bad-slot rules (concrete: ValueError; traced: dropped, nothing else
written)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mla
from jax_mla import quant

FORMATS = [jnp.float32, jnp.bfloat16, *quant.FORMATS]
# The donation test compiles a program per format and call: one float and one
# quantized cache show that both kinds update in place.
DONATED = [jnp.bfloat16, "q8_0"]


def empty_pages(fmt, shape):
    zeros = jnp.zeros(shape, jnp.float32)
    return jax_mla.quantize(zeros, fmt) if isinstance(fmt, str) else zeros.astype(fmt)


def stored(fmt, rows):
    """rows as the cache stores them, back in float32 numpy."""
    if isinstance(fmt, str):
        return np.asarray(jax_mla.dequantize(jax_mla.quantize(rows, fmt)))
    return np.asarray(jnp.asarray(rows).astype(fmt).astype(jnp.float32))


def as_f32(cache):
    if isinstance(cache, jax_mla.QuantizedKV):
        return np.asarray(jax_mla.dequantize(cache))
    return np.asarray(cache.astype(jnp.float32))


def expected_pages(fmt, shape, rows, positions, table):
    """The pages after writing rows at positions, slot by slot in numpy; slots
    that no page holds (a bad position or page) are skipped."""
    want = np.zeros(shape, np.float32)
    values = stored(fmt, rows)
    num_pages, page_size = shape[:2]
    for b, s in np.ndindex(*positions.shape):
        t = int(positions[b, s])
        if not 0 <= t < table.shape[1] * page_size:
            continue
        page = int(table[b, t // page_size])
        if 0 <= page < num_pages:
            want[page, t % page_size] = values[b, s]
    return want


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f if isinstance(f, str) else f.__name__)
def test_paged_update_matches_slot_by_slot(rng, fmt):
    """Three sequences over a pool of 7 pages of 4 rows, pages out of order;
    each writes a run of positions crossing page boundaries."""
    num_pages, page_size, d = 7, 4, 64
    table = np.array([[5, 0, 3], [2, 6, -1], [1, -1, -1]], np.int32)
    positions = np.array([[2, 3, 4, 5, 6], [0, 1, 2, 3, 4], [1, 2, 3, 0, 0]], np.int32)
    rows = rng.standard_normal((3, 5, d)).astype(np.float32)
    rows[2, 4] = rows[2, 3]  # a slot written twice: both writes carry the same row
    cache = empty_pages(fmt, (num_pages, page_size, d))
    new = jax_mla.cache_update(cache, rows, positions, block_table=table)
    want = expected_pages(fmt, (num_pages, page_size, d), rows, positions, table)
    np.testing.assert_array_equal(as_f32(new), want)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f if isinstance(f, str) else f.__name__)
def test_paged_equals_contiguous_after_gathering(rng, fmt):
    """Gathering each sequence's pages gives the contiguous cache written with
    the same rows and positions."""
    batch, max_pages, page_size, d = 2, 3, 16, 32
    table = np.array([[4, 1, 0], [2, 5, 3]], np.int32)
    positions = np.array([[0, 1, 2, 17, 40], [15, 16, 31, 32, 47]], np.int32)
    rows = rng.standard_normal((batch, 5, d)).astype(np.float32)
    pages = jax_mla.cache_update(
        empty_pages(fmt, (6, page_size, d)), rows, positions, block_table=table
    )
    contiguous = jax_mla.cache_update(
        empty_pages(fmt, (batch, max_pages * page_size, d)), rows, positions
    )
    gathered = as_f32(pages)[table].reshape(batch, max_pages * page_size, d)
    np.testing.assert_array_equal(gathered, as_f32(contiguous))


def buffers(cache):
    leaves = jax.tree_util.tree_leaves(cache)
    return [leaf.unsafe_buffer_pointer() for leaf in leaves]


@pytest.mark.parametrize("fmt", DONATED, ids=lambda f: f if isinstance(f, str) else f.__name__)
def test_paged_update_in_place_under_donation(rng, fmt):
    """Donated, the pages are written where they are: the old arrays are
    deleted and the new ones live in the same buffers, call after call."""
    table = jnp.asarray([[3, 1], [0, 2]], jnp.int32)
    update = jax.jit(jax_mla.cache_update, donate_argnums=0)
    cache = empty_pages(fmt, (4, 16, 64))
    want = np.zeros((4, 16, 64), np.float32)
    for step in range(3):
        rows = rng.standard_normal((2, 1, 64)).astype(np.float32)
        positions = jnp.asarray([[step * 7], [step * 11]], jnp.int32)
        before = buffers(cache)
        old = cache
        cache = update(cache, rows, positions, block_table=table)
        assert all(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(old))
        assert buffers(cache) == before, "the donated pages must be reused, not copied"
        want += expected_pages(fmt, want.shape, rows, np.asarray(positions), np.asarray(table))
    np.testing.assert_array_equal(as_f32(cache), want)


@pytest.mark.parametrize("fmt", [jnp.float16, "q8_0"], ids=["f16", "q8_0"])
def test_traced_bad_slots_are_dropped_and_written_nowhere(rng, fmt):
    """Under jit, positions outside [0, max_pages * page_size) and positions on
    a page outside [0, num_pages) (the unused -1, or past the pool) are not
    written: never wrapped to the last page or row, never elsewhere."""
    num_pages, page_size, d = 4, 16, 32
    table = jnp.asarray([[2, -1], [num_pages, 0], [1, 3]], jnp.int32)
    positions = jnp.asarray([[5, 16, -1], [3, 17, 32], [-16, 31, 2]], jnp.int32)
    rows = rng.standard_normal((3, 3, d)).astype(np.float32) + 1.0
    start = rng.standard_normal((num_pages, page_size, d)).astype(np.float32)
    cache = jax_mla.quantize(start, fmt) if isinstance(fmt, str) else jnp.asarray(start, fmt)
    new = jax.jit(jax_mla.cache_update)(cache, rows, positions, block_table=table)
    want = as_f32(cache).copy()
    values = stored(fmt, rows)
    # Only these land: (b, s) -> (page, row).
    for (b, s), (page, row) in {
        (0, 0): (2, 5),
        (1, 1): (0, 1),
        (2, 1): (3, 15),
        (2, 2): (1, 2),
    }.items():
        want[page, row] = values[b, s]
    np.testing.assert_array_equal(as_f32(new), want)


@pytest.mark.parametrize(
    "table, positions, message",
    [
        ([[0, 1]], [[31, 32]], "positions must lie in [0, 32), got 32"),
        ([[0, 1]], [[-1, 0]], "positions must lie in [0, 32), got -1"),
        (
            [[0, -1]],
            [[15, 16]],
            "block_table[0, 1] must be a page in [0, 3) (sequence 0 writes position 16 "
            "there), got -1",
        ),
        (
            [[2, 3]],
            [[3, 20]],
            "block_table[0, 1] must be a page in [0, 3) (sequence 0 writes position 20 "
            "there), got 3",
        ),
    ],
)
def test_concrete_bad_slots_raise(table, positions, message):
    cache = jnp.zeros((3, 16, 32))
    with pytest.raises(ValueError, match=re.escape(message)):
        jax_mla.cache_update(
            cache,
            jnp.ones((1, 2, 32)),
            jnp.asarray(positions, jnp.int32),
            block_table=jnp.asarray(table, jnp.int32),
        )


def test_table_entries_beyond_int32_raise():
    # Cast to int32, 2**32 would become page 0; the positions here are traced.
    table = np.array([[1, 2**32]], np.int64)
    with pytest.raises(
        ValueError, match=re.escape("entries must fit in int32, got 1 .. 4294967296")
    ):
        jax.jit(lambda c, r, p: jax_mla.cache_update(c, r, p, block_table=table))(
            jnp.zeros((2, 16, 32)), jnp.ones((1, 1, 32)), jnp.asarray([[17]], jnp.int32)
        )


def test_unused_entries_not_reached_are_fine():
    table = jnp.asarray([[1, -1, -1]], jnp.int32)
    new = jax_mla.cache_update(
        jnp.zeros((2, 16, 32)), jnp.ones((1, 1, 32)), jnp.asarray([[3]]), block_table=table
    )
    assert np.asarray(new)[1, 3].all() and np.asarray(new).sum() == 32


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda c: jax_mla.cache_update(
                c, jnp.ones((2, 1, 32)), jnp.zeros((2, 1), jnp.int32), block_table=jnp.zeros((1, 2))
            ),
            TypeError,
            "block_table must be an int32 array [B, max_pages], got float32",
        ),
        (
            lambda c: jax_mla.cache_update(
                c,
                jnp.ones((2, 1, 32)),
                jnp.zeros((2, 1), jnp.int32),
                block_table=jnp.zeros((1, 2), jnp.int32),
            ),
            ValueError,
            "block_table must have shape (2, max_pages >= 1) (B of rows), got (1, 2)",
        ),
        (
            lambda c: jax_mla.cache_update(
                c,
                jnp.ones((2, 1, 32)),
                jnp.zeros((2, 1), jnp.int32),
                block_table=jnp.zeros((2,), jnp.int32),
            ),
            ValueError,
            "block_table must have shape (2, max_pages >= 1) (B of rows), got (2,)",
        ),
        (
            lambda c: jax_mla.cache_update(
                c,
                jnp.ones((2, 1, 16)),
                jnp.zeros((2, 1), jnp.int32),
                block_table=jnp.zeros((2, 1), jnp.int32),
            ),
            ValueError,
            "rows must have shape (B, S, 32) to fit the pages (3, 16, 32), got (2, 1, 16)",
        ),
        (
            lambda c: jax_mla.cache_update(
                c,
                jnp.ones((2, 1, 32)),
                jnp.zeros((2, 2), jnp.int32),
                block_table=jnp.zeros((2, 1), jnp.int32),
            ),
            ValueError,
            "positions must have shape (2, 1), got (2, 2)",
        ),
    ],
)
def test_paged_update_errors(call, error, message):
    with pytest.raises(error, match=re.escape(message)):
        call(jnp.zeros((3, 16, 32)))


# ------------------------------------------------------------------ PageAllocator


def test_allocator_grows_frees_and_reuses():
    alloc = jax_mla.PageAllocator(num_pages=6, page_size=16, max_pages=4)
    assert alloc.max_len == 64 and alloc.pages_free == 6 and alloc.pages_in_use == 0
    assert alloc.reserve("a", 17) == [0, 1]
    assert alloc.reserve("b", 1) == [2]
    assert alloc.reserve("a", 32) == [0, 1]  # still fits: nothing taken
    assert alloc.reserve("a", 33) == [0, 1, 3]
    assert alloc.reserve("a", 5) == [0, 1, 3]  # never shrinks
    assert alloc.pages_in_use == 4 and alloc.pages_free == 2
    np.testing.assert_array_equal(
        alloc.block_table(["b", None, "a"]),
        [[2, -1, -1, -1], [-1, -1, -1, -1], [0, 1, 3, -1]],
    )
    assert alloc.block_table(["a"]).dtype == np.int32
    alloc.free("a")
    assert "a" not in alloc and alloc.pages_in_use == 1
    assert alloc.reserve("c", 48) == [0, 1, 3]  # the freed pages, lowest first
    assert alloc.pages("c") == [0, 1, 3] and alloc.pages_needed("c", 64) == 1
    assert alloc.reserve("d", 0) == [] and alloc.block_table(["d"]).tolist() == [[-1] * 4]


def test_allocator_refuses_what_does_not_fit_and_takes_nothing():
    alloc = jax_mla.PageAllocator(num_pages=3, page_size=16, max_pages=2)
    alloc.reserve("a", 20)
    assert not alloc.can_reserve("b", 32) and alloc.can_reserve("b", 16)
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            "PageAllocator.reserve: sequence 'b' needs 2 more pages for 32 tokens, only 1 of 3 "
            "are free"
        ),
    ):
        alloc.reserve("b", 32)
    assert "b" not in alloc and alloc.pages_free == 1
    with pytest.raises(
        ValueError,
        match=re.escape("PageAllocator.reserve: length 33 exceeds max_len 32 (2 pages of 16)"),
    ):
        alloc.reserve("a", 33)
    assert not alloc.can_reserve("a", 33)
    with pytest.raises(ValueError, match=re.escape("length must be an int >= 0, got -1")):
        alloc.reserve("a", -1)
    with pytest.raises(KeyError, match="no sequence 'z'"):
        alloc.free("z")
    with pytest.raises(KeyError, match="no sequence 'z'"):
        alloc.block_table(["a", "z"])
    for kwargs, name in (
        (dict(num_pages=0, page_size=16), "num_pages"),
        (dict(num_pages=4, page_size=16.0), "page_size"),
        (dict(num_pages=4, page_size=16, max_pages=True), "max_pages"),
    ):
        with pytest.raises(ValueError, match=f"PageAllocator: {name} must be a positive int"):
            jax_mla.PageAllocator(**kwargs)


def test_allocator_bytes_count_the_pages_in_use():
    alloc = jax_mla.PageAllocator(num_pages=8, page_size=32)
    alloc.reserve(0, 70)  # 3 pages
    for fmt in (jnp.float16, "q8_0", "q6_0", "q8_kv"):
        pages = jax.eval_shape(lambda f=fmt: empty_pages(f, (3, 32, 576)))
        leaves = jax.tree_util.tree_leaves(pages)
        assert alloc.bytes_in_use(fmt, (576,)) == sum(x.size * x.dtype.itemsize for x in leaves)


def test_allocator_tables_drive_cache_update(rng):
    """Sequences that come and go over one pool: after each round every live
    sequence reads back exactly its own tokens through its table row, so a
    reused page holds only its new owner's rows."""
    page_size, d = 16, 32
    alloc = jax_mla.PageAllocator(num_pages=5, page_size=page_size, max_pages=3)
    cache = jnp.full((5, page_size, d), jnp.nan, jnp.float32)
    update = jax.jit(jax_mla.cache_update, donate_argnums=0)
    tokens: dict[str, np.ndarray] = {}
    rounds = [{"a": 20, "b": 9}, {"a": 5, "b": 7}, {"c": 40}, {"c": 1, "d": 12}]
    finished_after = [set(), {"a"}, {"b"}, set()]
    for grow, done in zip(rounds, finished_after):
        seqs = sorted(grow)
        for seq in seqs:
            alloc.reserve(seq, len(tokens.get(seq, ())) + grow[seq])
        width = max(grow.values())
        rows = rng.standard_normal((len(seqs), width, d)).astype(np.float32)
        positions = np.stack(
            [len(tokens.get(s, ())) + np.minimum(np.arange(width), grow[s] - 1) for s in seqs]
        ).astype(np.int32)
        for b, s in enumerate(seqs):  # short rows repeat their last token's row
            rows[b, grow[s] :] = rows[b, grow[s] - 1]
            tokens[s] = np.concatenate(
                [tokens.get(s, np.zeros((0, d), np.float32)), rows[b, : grow[s]]]
            )
        cache = update(cache, rows, positions, block_table=alloc.block_table(seqs))
        for s in done:
            alloc.free(s)
            del tokens[s]
        live = sorted(tokens)
        table = alloc.block_table(live)
        for b, s in enumerate(live):
            got = np.asarray(cache)[table[b][table[b] >= 0]].reshape(-1, d)[: len(tokens[s])]
            np.testing.assert_array_equal(got, tokens[s], err_msg=s)
    assert alloc.pages_in_use == len(alloc.pages("c")) + len(alloc.pages("d")) == 4
