"""The DeepSeek layer over a paged latent cache: every mode and format gives
the contiguous cache's results (pages shuffled in a shared pool, unwritten
slots NaN), the decode loop runs over pages, writes are in place under
donation, and table entries that are no page raise (concrete) or are dropped,
skipped and flagged in cache.overflow (traced)."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mla
from jax_mla import deepseek as ds

from .test_deepseek import ATTN, CALLS, SMALL, assert_rel

PAGE = 16
MAX_PAGES = 3  # 48 positions, like the contiguous caches below
# Two rows' pages, out of order, in a pool of 8 pages (the others unused).
TABLE = np.array([[5, 2, 7], [0, 6, 3]], np.int32)


@pytest.fixture(autouse=True)
def _on_cpu(cpu):
    """As tests/test_deepseek.py: float32 activations run on the CPU."""


def paged_cache(fmt, table=TABLE, num_pages=8, batch=2):
    cache = ds.init_paged_cache(SMALL, batch, num_pages, PAGE, table.shape[1], fmt)
    kv = cache.kv
    if not isinstance(kv, jax_mla.QuantizedKV):
        kv = jnp.full(kv.shape, jnp.nan, kv.dtype)  # nothing unwritten may be read
    return dataclasses.replace(cache, kv=kv, block_table=jnp.asarray(table))


def run_calls(params, cache, mode, seed):
    """CALLS (tests/test_deepseek.py's scenario: a prefill, a rewind, a
    decode) on `cache`; the outputs of every call, concatenated."""
    rng = np.random.default_rng(seed)
    outs = []
    for starts, seq in CALLS:
        x = rng.standard_normal((2, seq, SMALL.hidden_size)).astype(np.float32)
        positions = jnp.asarray(starts[:, None] + np.arange(seq), jnp.int32)
        out, cache = ATTN(params, jnp.asarray(x), positions, cache, cfg=SMALL, mode=mode)
        np.testing.assert_array_equal(np.asarray(cache.length), starts + seq)
        outs.append(np.asarray(out).reshape(-1, SMALL.hidden_size))
    return np.concatenate(outs), cache


# Every mode over a float32 cache, and each other format in one mode: the
# formats' paged reads are the ops' (tests/test_paged.py covers them all), so
# here they only need to reach the layer once each.
@pytest.mark.parametrize(
    "fmt, mode",
    [("f32", m) for m in ds.MODES] + [("bf16", "latent"), ("q8_0", "standard"), ("q6_0", "hybrid")],
)
def test_paged_matches_contiguous(fmt, mode):
    params = ds.init_params(jax.random.PRNGKey(1), SMALL)
    want, _ = run_calls(params, ds.init_cache(SMALL, 2, MAX_PAGES * PAGE, fmt), mode, 3)
    got, cache = run_calls(params, paged_cache(fmt), mode, 3)
    # The same rows and the same arithmetic, read through the table.
    assert_rel(got, want, 1e-6, f"{mode} {fmt}")
    assert cache.paged and cache.max_len == MAX_PAGES * PAGE
    assert not np.asarray(cache.overflow).any()
    np.testing.assert_array_equal(np.asarray(cache.block_table), TABLE)


def test_decode_loop_over_pages_matches_contiguous(rng):
    params = ds.init_params(jax.random.PRNGKey(2), SMALL)
    prompt = jnp.asarray(rng.standard_normal((2, 17, SMALL.hidden_size)).astype(np.float32))
    loop = jax.jit(
        ds.decode_loop, static_argnames=("cfg", "steps", "mode", "next_input"), donate_argnums=2
    )
    head, ys, cache = loop(params, prompt, paged_cache("q8_0"), SMALL, 6)
    want_head, want_ys, _ = loop(
        params, prompt, ds.init_cache(SMALL, 2, MAX_PAGES * PAGE, "q8_0"), SMALL, 6
    )
    assert_rel(head, want_head, 1e-6, "prefill")
    assert_rel(ys, want_ys, 1e-5, "decode")  # fed back through 6 steps
    np.testing.assert_array_equal(np.asarray(cache.length), [23, 23])


def test_paged_cache_written_in_place_under_donation(rng):
    params = ds.init_params(jax.random.PRNGKey(0), SMALL)
    step = jax.jit(ds.attention, static_argnames=("cfg", "mode"), donate_argnames=("cache",))
    cache = paged_cache("q8_kv")
    x = jnp.asarray(rng.standard_normal((2, 1, SMALL.hidden_size)).astype(np.float32))
    for t in range(3):
        before = [leaf.unsafe_buffer_pointer() for leaf in jax.tree_util.tree_leaves(cache.kv)]
        old = cache
        _, cache = step(params, x, jnp.full((2, 1), t, jnp.int32), cache, cfg=SMALL, mode="latent")
        assert old.kv.qs.is_deleted() and old.kv.d.is_deleted()
        after = [leaf.unsafe_buffer_pointer() for leaf in jax.tree_util.tree_leaves(cache.kv)]
        assert after == before, "the donated pages must be reused, not copied"


def test_concrete_table_entries_that_are_no_page_raise(rng):
    params = ds.init_params(jax.random.PRNGKey(0), SMALL)
    x = jnp.asarray(rng.standard_normal((2, 2, SMALL.hidden_size)).astype(np.float32))
    table = np.array([[5, -1, -1], [0, 8, 3]], np.int32)
    positions = jnp.asarray([[14, 15], [16, 17]], jnp.int32)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "attention: cache.block_table[1, 1] must be a page in [0, 8) (row 1 holds "
            "positions up to 17), got 8"
        ),
    ):
        ds.attention(params, x, positions, paged_cache("f32", table), SMALL, "latent")
    # Entries past a row's length are not looked at.
    _, cache = ds.attention(
        params, x, jnp.asarray([[14, 15], [0, 1]]), paged_cache("f32", table), SMALL, "latent"
    )
    assert not np.asarray(cache.overflow).any()


@pytest.mark.parametrize("mode", ["standard", "latent"])
def test_traced_table_entries_that_are_no_page_are_skipped_and_flagged(rng, mode):
    """Under jit the table cannot be checked: a token on an entry that is no
    page is neither written nor read (the others attend as if it did not
    exist) and its row is flagged; a row with good pages is untouched."""
    params = ds.init_params(jax.random.PRNGKey(0), SMALL)
    step = jax.jit(ds.attention, static_argnames=("cfg", "mode"))
    x = jnp.asarray(rng.standard_normal((2, 20, SMALL.hidden_size)).astype(np.float32))
    positions = jnp.broadcast_to(jnp.arange(20, dtype=jnp.int32), (2, 20))
    table = np.array([[5, -1, 7], [0, 6, 3]], np.int32)  # row 0's tokens 16..19: no page
    out, cache = step(params, x, positions, paged_cache("f32", table), cfg=SMALL, mode=mode)
    assert cache.overflow.tolist() == [True, False]
    pool = np.asarray(cache.kv)
    assert np.isnan(pool[[1, 2, 4]]).all(), "nothing written outside the rows' pages"
    # Row 0's first 16 tokens see only each other: the same as a 16-token call.
    short, _ = step(params, x[:, :16], positions[:, :16], paged_cache("f32"), cfg=SMALL, mode=mode)
    assert_rel(out[0, :16], short[0], 1e-6, "row 0's tokens before the hole")
    full, _ = step(params, x, positions, paged_cache("f32"), cfg=SMALL, mode=mode)
    assert_rel(out[1], full[1], 1e-6, "row 1")
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize(
    "change, error, message",
    [
        (
            dict(block_table=jnp.zeros((3, 2), jnp.int32)),
            ValueError,
            "attention: cache.block_table must have shape (2, max_pages) with B = 2 like x, "
            "got (3, 2)",
        ),
        (
            dict(block_table=jnp.zeros((2, 2), jnp.float32)),
            TypeError,
            "attention: cache.block_table must be an int32 array [B, max_pages], got float32",
        ),
        (
            dict(kv=jnp.zeros((8, PAGE, 64))),
            ValueError,
            "attention: a paged cache's kv must have shape (num_pages, page_size, 96), "
            "got (8, 16, 64)",
        ),
        (
            dict(length=jnp.zeros((3,), jnp.int32)),
            ValueError,
            "attention: cache.length must have shape (2,) like the block table's rows, got (3,)",
        ),
    ],
)
def test_paged_cache_errors(change, error, message):
    params = ds.init_params(jax.random.PRNGKey(0), SMALL)
    cache = dataclasses.replace(paged_cache("f32"), **change)
    with pytest.raises(error, match=re.escape(message)):
        ds.attention(
            params, jnp.zeros((2, 1, SMALL.hidden_size)), jnp.zeros((2, 1), jnp.int32), cache, SMALL
        )


def test_init_paged_cache():
    cache = ds.init_paged_cache(SMALL, 3, num_pages=10, page_size=32, max_pages=4, fmt="q6_0")
    assert cache.kv.shape == (10, 32, SMALL.cache_dim) and cache.fmt == "q6_0"
    assert cache.max_len == 128 and cache.page_size == 32
    np.testing.assert_array_equal(np.asarray(cache.block_table), np.full((3, 4), -1))
    with pytest.raises(ValueError, match="init_paged_cache: num_pages must be a positive int"):
        ds.init_paged_cache(SMALL, 3, num_pages=0, page_size=32, max_pages=4)
    with pytest.raises(
        ValueError,
        match=re.escape("init_paged_cache: page_size must be one of 16, 32, 64, 128 (the page "),
    ):
        ds.init_paged_cache(SMALL, 3, num_pages=4, page_size=24, max_pages=4)


# V2-Lite's latent and head dims (what the CUDA kernels take: flash_mla at
# 576/512, flash_attention at 192/128) on a small hidden size.
LITE = ds.MLAConfig(hidden_size=256, num_heads=4, kv_chunk=64)


@pytest.mark.parametrize("fmt", ["bf16", "q8_0"])
@pytest.mark.parametrize("mode", ds.MODES)
def test_half_precision_layer_over_pages(platform, rng, fmt, mode):
    """bfloat16 activations and params (the dtypes the GPU takes): a prefill
    and three decode steps over shuffled pages of 64 give the contiguous
    cache's outputs on the same device."""
    params = ds.init_params(jax.random.PRNGKey(4), LITE, jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((2, 23, LITE.hidden_size)), jnp.bfloat16)
    table = jnp.asarray([[3, 0], [5, 1]], jnp.int32)
    paged = dataclasses.replace(
        ds.init_paged_cache(LITE, 2, num_pages=6, page_size=64, max_pages=2, fmt=fmt),
        block_table=table,
    )
    contiguous = ds.init_cache(LITE, 2, 128, fmt)
    outs = {}
    for name, cache in (("paged", paged), ("contiguous", contiguous)):
        got = []
        for start, stop in ((0, 20), (20, 21), (21, 22), (22, 23)):
            positions = jnp.broadcast_to(
                jnp.arange(start, stop, dtype=jnp.int32), (2, stop - start)
            )
            out, cache = ATTN(params, x[:, start:stop], positions, cache, cfg=LITE, mode=mode)
            assert out.dtype == jnp.bfloat16
            got.append(np.asarray(out.astype(jnp.float32)))
        outs[name] = np.concatenate(got, axis=1)
        assert not np.asarray(cache.overflow).any()
    # The same rows and kernels read through the table: bf16 output rounding at most.
    assert_rel(outs["paged"], outs["contiguous"], 1e-2, f"{mode} {fmt}")
