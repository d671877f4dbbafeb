"""Paged KV caches (block_table): a paged call equals the contiguous call over
the same rows, whatever the page order, page size, lengths and cache format;
pages and slots no sequence reaches hold NaN, so a read of them shows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mla
from jax_mla import _capabilities, _ffi

from .conftest import cache, randn

PAGE_SIZES = (16, 32, 64, 128)
FORMATS = (None, "q8_0", "q8_kv", "q6_0", "fp8_e4m3")
BACKENDS = ("reference", "native")
# (backend, format) pairs of the equality tests: the native kernels over every
# format; the reference (a gather, then the contiguous reference) over a float
# and an 8-bit cache, its gather being format-blind.
BACKEND_FORMATS = [("native", f) for f in FORMATS] + [("reference", None), ("reference", "q8_0")]
SUPPORTED_ISAS = _ffi.module("cpu").supported_isas().split(",")
# The native kernels read the pages in place in the contiguous call's key
# order, tiles and 8-bit P groups: the results are bit-exact.
NATIVE_TOL = 0


def paginate(rng, x, page_size: int, kv_len, spare: int = 3):
    """A contiguous cache x ([B, Skv, ...] array or QuantizedKV, Skv a
    multiple of page_size) as (pages, block_table): each sequence's pages
    scattered over a shuffled pool, interleaved with the other sequences'
    and with `spare` pages no one uses. Pages past a sequence's kv_len are
    left out of the pool (their table entries hold garbage: out-of-range
    values), and the unused pages hold NaN (scales NaN in a QuantizedKV)."""
    leaves = jax.tree_util.tree_leaves(x)
    batch, seq_kv = leaves[0].shape[:2]
    max_pages = seq_kv // page_size
    reached = -(-np.clip(np.broadcast_to(kv_len, (batch,)), 0, seq_kv) // page_size)
    owners = [(b, j) for b in range(batch) for j in range(int(reached[b]))]
    num_pages = len(owners) + spare
    slot = rng.permutation(num_pages)
    table = rng.integers(num_pages, 2**30, (batch, max_pages)).astype(np.int32)
    table[rng.random((batch, max_pages)) < 0.5] *= -1
    for (b, j), p in zip(owners, slot):
        table[b, j] = p

    def pool(leaf):
        a = np.asarray(leaf)
        nan = np.issubdtype(a.dtype, np.floating) or a.dtype == jnp.bfloat16
        out = np.full((num_pages, page_size) + a.shape[2:], np.nan if nan else 77, a.dtype)
        for (b, j), p in zip(owners, slot):
            out[p] = a[b, j * page_size : (j + 1) * page_size]
        return jnp.asarray(out)

    return jax.tree_util.tree_map(pool, x), jnp.asarray(table)


def quantized(x, fmt):
    return x if fmt is None else jax_mla.quantize(x, fmt)


def mla_case(rng, *, batch, seq_q, seq_kv, kv_len, fmt, dtype=jnp.float32, heads=4, dk=64):
    q = randn(rng, (batch, seq_q, heads, dk), dtype)
    kv = cache(rng, (batch, seq_kv, dk), dtype, kv_len)
    if fmt is not None:  # a quantized cache's NaN rows would make NaN scales: zero them
        kv = jnp.nan_to_num(kv)
    return q, quantized(kv, fmt)


def assert_same(paged, contiguous, tol=1e-6):
    for a, b in zip(jax.tree_util.tree_leaves(paged), jax.tree_util.tree_leaves(contiguous)):
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol
        )


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("backend, fmt", BACKEND_FORMATS, ids=str)
def test_mla_paged_equals_contiguous(rng, backend, page_size, fmt):
    batch, max_pages = 4, 3
    seq_kv = max_pages * page_size
    # Empty, a page boundary - 1, + 1, full.
    kv_len = np.array([0, page_size - 1, page_size + 1, seq_kv])
    q, kv = mla_case(rng, batch=batch, seq_q=3, seq_kv=seq_kv, kv_len=kv_len, fmt=fmt)
    pages, table = paginate(rng, kv, page_size, kv_len)
    kw = dict(dv=32, kv_len=kv_len, causal=True, return_lse=True, backend=backend)
    got = jax_mla.flash_mla(q, pages, block_table=table, **kw)
    assert_same(got, jax_mla.flash_mla(q, kv, **kw), NATIVE_TOL if backend == "native" else 1e-6)
    assert np.isfinite(np.asarray(got[0])).all()


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("fmt", (None, "q8_0"), ids=str)
@pytest.mark.parametrize("num_splits", (1, 3))
def test_mla_decode_heads_and_splits(rng, page_size, fmt, num_splits):
    # DeepSeek's row (V the first 512 columns), 16 heads: the direct float
    # path and the 8-bit tile path, the keys split across pages.
    batch, seq_kv = 2, 320 if page_size < 128 else 384
    kv_len = np.array([seq_kv - page_size // 2, 190])
    q, kv = mla_case(
        rng,
        batch=batch,
        seq_q=1,
        seq_kv=seq_kv,
        kv_len=kv_len,
        fmt=fmt,
        heads=16,
        dk=576,
        dtype=jnp.float16,
    )
    pages, table = paginate(rng, kv, page_size, kv_len)
    kw = dict(kv_len=kv_len, num_splits=num_splits, return_lse=True)
    got = jax_mla.flash_mla(q, pages, block_table=table, **kw)
    assert_same(got, jax_mla.flash_mla(q, kv, **kw), NATIVE_TOL)
    expected = jax_mla.reference.mla_quantized(q, kv, dv=512, kv_len=kv_len)
    assert_same(got, expected, 2e-2)


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("heads", (1, 16))
def test_mla_paged_on_each_isa(rng, monkeypatch, isa, fmt, heads):
    monkeypatch.setenv("JAX_MLA_CPU_ISA", isa)
    page_size, seq_kv = 16, 160
    kv_len = np.array([150, 33])
    q, kv = mla_case(rng, batch=2, seq_q=2, seq_kv=seq_kv, kv_len=kv_len, fmt=fmt, heads=heads)
    pages, table = paginate(rng, kv, page_size, kv_len)
    kw = dict(dv=32, kv_len=kv_len, causal=True, return_lse=True)
    got = jax_mla.flash_mla(q, pages, block_table=table, **kw)
    assert_same(got, jax_mla.flash_mla(q, kv, **kw), NATIVE_TOL)


@pytest.mark.parametrize("page_size", (16, 64))
@pytest.mark.parametrize("backend, fmt", BACKEND_FORMATS, ids=str)
@pytest.mark.parametrize("seq_q, group", [(1, 2), (4, 2), (1, 16)])
def test_attention_paged_equals_contiguous(rng, backend, page_size, fmt, seq_q, group):
    batch, max_pages, heads_kv, dk, dv = 2, 3, 2, 64, 64
    seq_kv = max_pages * page_size
    kv_len = np.array([2 * page_size, seq_kv - 5])
    q = randn(rng, (batch, seq_q, group * heads_kv, dk), jnp.bfloat16)
    k = jnp.nan_to_num(cache(rng, (batch, seq_kv, heads_kv, dk), jnp.float16, kv_len))
    v = cache(rng, (batch, seq_kv, heads_kv, dv), jnp.float32, kv_len)
    k = quantized(k, fmt)
    if fmt in ("q8_0", "q8_kv"):  # both 8-bit: the several-heads 8-bit kernel
        v = quantized(jnp.nan_to_num(v), fmt)
    (k_pages, table) = paginate(rng, k, page_size, kv_len)
    # One table for both: lay v's pages out as k's.
    v_pages = _relayout(v, page_size, kv_len, table, k_pages)
    kw = dict(kv_len=kv_len, causal=True, q_pos=kv_len - 2, return_lse=True, backend=backend)
    got = jax_mla.flash_attention(q, k_pages, v_pages, block_table=table, **kw)
    assert_same(
        got, jax_mla.flash_attention(q, k, v, **kw), NATIVE_TOL if backend == "native" else 1e-6
    )


@pytest.mark.parametrize("fmt", (None, "q8_0"), ids=str)
def test_decode_over_several_kv_heads_and_many_pages(rng, monkeypatch, fmt):
    # GQA groups of 2 over 4 KV heads at decode: the kernels that walk all KV
    # heads key by key (float: attend_heads; 8-bit: attend_heads_q8, P groups
    # over 4 pages each) read 13 shuffled pages in one call, on every ISA path,
    # bit-exact with the contiguous cache.
    page_size, seq_kv = 16, 224
    kv_len = np.array([208, 201])
    q = randn(rng, (2, 1, 8, 64), jnp.float32)
    k = jnp.nan_to_num(cache(rng, (2, seq_kv, 4, 64), jnp.bfloat16, kv_len))
    v = jnp.nan_to_num(cache(rng, (2, seq_kv, 4, 64), jnp.float16, kv_len))
    k, v = quantized(k, fmt), quantized(v, fmt)
    k_pages, table = paginate(rng, k, page_size, kv_len)
    v_pages = _relayout(v, page_size, kv_len, table, k_pages)
    kw = dict(kv_len=kv_len, return_lse=True)
    for isa in SUPPORTED_ISAS:
        monkeypatch.setenv("JAX_MLA_CPU_ISA", isa)
        got = jax_mla.flash_attention(q, k_pages, v_pages, block_table=table, **kw)
        assert_same(got, jax_mla.flash_attention(q, k, v, **kw), NATIVE_TOL)


def _relayout(x, page_size, kv_len, table, like):
    """x's pages in the slots table gives them (the others NaN), a pool as large as like's."""
    num_pages = jax.tree_util.tree_leaves(like)[0].shape[0]
    table = np.asarray(table)

    def relayout(leaf):
        a = np.asarray(leaf)
        fill = np.nan if np.issubdtype(a.dtype, np.floating) else 77
        out = np.full((num_pages, page_size) + a.shape[2:], fill, a.dtype)
        for b in range(a.shape[0]):
            for j in range(-(-int(kv_len[b]) // page_size)):
                out[table[b, j]] = a[b, j * page_size : (j + 1) * page_size]
        return jnp.asarray(out)

    return jax.tree_util.tree_map(relayout, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_under_jit_and_vmap(rng, backend):
    page_size, batch = 16, 2
    kv_len = np.array([20, 33])
    q, kv = mla_case(rng, batch=batch, seq_q=2, seq_kv=48, kv_len=kv_len, fmt=None)
    pages, table = paginate(rng, kv, page_size, kv_len)

    @jax.jit
    def paged(q, pages, table, kv_len):
        return jax_mla.flash_mla(q, pages, block_table=table, kv_len=kv_len, dv=32, backend=backend)

    expected = jax_mla.flash_mla(q, kv, kv_len=kv_len, dv=32, backend=backend)
    assert_same(paged(q, pages, table, kv_len), expected)
    # vmap over query sets sharing the pages, and over caches with their own pages.
    qs = jnp.stack([q, 2 * q])
    assert_same(
        jax.vmap(paged, (0, None, None, None))(qs, pages, table, kv_len),
        jnp.stack([expected, jax_mla.flash_mla(2 * q, kv, kv_len=kv_len, dv=32)]),
        1e-5,
    )
    assert_same(
        jax.vmap(paged, (None, 0, None, None))(q, jnp.stack([pages, pages]), table, kv_len),
        jnp.stack([expected, expected]),
        1e-5,
    )
    # Per-example tables and lengths over shared pages.
    tables = jnp.stack([table, table[::-1]])
    lens = jnp.stack([kv_len, kv_len[::-1]])
    assert_same(
        jax.vmap(paged, (0, None, 0, 0))(jnp.stack([q, q[::-1]]), pages, tables, lens),
        jnp.stack([expected, expected[::-1]]),
        1e-5,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", (None, "q8_0"), ids=str)
def test_traced_bad_page_is_skipped(rng, backend, fmt):
    page_size = 16
    kv_len = np.array([40, 40])
    q, kv = mla_case(rng, batch=2, seq_q=1, seq_kv=48, kv_len=kv_len, fmt=fmt)
    pages, table = paginate(rng, kv, page_size, kv_len)
    bad = table.at[0, 1].set(10**6).at[1, 0].set(-1)

    @jax.jit
    def run(table):
        return jax_mla.flash_mla(
            q, pages, block_table=table, kv_len=kv_len, dv=32, return_lse=True, backend=backend
        )

    # Sequence 0 sees its pages 0 and 2 only, sequence 1 pages 1 and 2.
    key_mask = np.ones((2, 48), bool)
    key_mask[0, 16:32] = False
    key_mask[1, 0:16] = False
    expected = jax_mla.reference.mla_quantized(
        q, kv, dv=32, kv_len=kv_len, key_mask=jnp.asarray(key_mask), round_p=False
    )
    # The 8-bit kernels round P per call when a page of the group is skipped.
    assert_same(run(bad), expected, 1e-5 if fmt is None else 2e-2)
    # A sequence whose every page is out of range sees nothing: out 0, LSE -inf.
    out, lse = run(jnp.full_like(table, -3))
    assert (np.asarray(out) == 0).all() and np.isneginf(np.asarray(lse)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_to_q_and_pages(rng, backend):
    page_size = 16
    kv_len = np.array([20, 40])
    q, kv = mla_case(rng, batch=2, seq_q=2, seq_kv=48, kv_len=kv_len, fmt=None)
    kv = jnp.nan_to_num(kv)
    pages, table = paginate(rng, kv, page_size, kv_len, spare=0)

    def loss(fn):
        return lambda q, c: jnp.sum(jnp.sin(fn(q, c)))

    paged = loss(
        lambda q, c: jax_mla.flash_mla(
            q, c, block_table=table, kv_len=kv_len, dv=32, causal=True, backend=backend
        )
    )
    flat = loss(
        lambda q, c: jax_mla.flash_mla(q, c, kv_len=kv_len, dv=32, causal=True, backend=backend)
    )
    dq, dpages = jax.grad(paged, (0, 1))(q, pages)
    dq_flat, dkv = jax.grad(flat, (0, 1))(q, kv)
    assert_same(dq, dq_flat, 1e-5)
    # Each page's gradient is its rows' in the contiguous cache.
    assert_same(dpages, paginate_like(dkv, table, page_size, kv_len, pages.shape[0]), 1e-5)


def test_attention_gradient_and_vmap_over_quantized_pages(rng):
    # k q8_0, v float: the scales placeholder of v beside mapped pages; the
    # gradient flows to q and the float v pages.
    page_size, kv_len = 16, np.array([40, 17])
    q = randn(rng, (2, 2, 4, 32), jnp.float32)
    k = jnp.nan_to_num(cache(rng, (2, 48, 2, 32), jnp.float32, kv_len))
    v = jnp.nan_to_num(cache(rng, (2, 48, 2, 32), jnp.float32, kv_len))
    k = jax_mla.quantize(k, "q8_0")
    k_pages, table = paginate(rng, k, page_size, kv_len, spare=0)
    v_pages = _relayout(v, page_size, kv_len, table, k_pages)
    v_pages = jnp.nan_to_num(v_pages)

    def run(q, k, v, table=None):
        return jax_mla.flash_attention(q, k, v, block_table=table, kv_len=kv_len, causal=True)

    both = jax.vmap(run, (None, 0, 0, None))(
        q,
        jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), k_pages),
        jnp.stack([v_pages, -v_pages]),
        table,
    )
    assert_same(both, jnp.stack([run(q, k, v), run(q, k, -v)]), 1e-5)

    def loss(q, v, table=None):
        return jnp.sum(jnp.sin(run(q, k if table is None else k_pages, v, table)))

    dq, dv_pages = jax.grad(loss, (0, 1))(q, v_pages, table)
    dq_flat, dv = jax.grad(loss, (0, 1))(q, v)
    assert_same(dq, dq_flat, 1e-5)
    assert_same(dv_pages, paginate_like(dv, table, page_size, kv_len, v_pages.shape[0]), 1e-5)


def paginate_like(x, table, page_size, kv_len, num_pages):
    out = np.zeros((num_pages, page_size) + x.shape[2:], np.float32)
    table = np.asarray(table)
    for b in range(x.shape[0]):
        for j in range(-(-int(kv_len[b]) // page_size)):
            out[table[b, j]] = np.asarray(x[b, j * page_size : (j + 1) * page_size])
    return out


# ------------------------------------------------------------------ errors


def test_page_size_must_be_supported(rng):
    q = randn(rng, (1, 1, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match=r"page size \(kv.shape\[1\]\) must be one of .* got 24"):
        jax_mla.flash_mla(q, jnp.zeros((4, 24, 64)), block_table=jnp.zeros((1, 2), jnp.int32))


def test_block_table_checks(rng):
    q = randn(rng, (2, 1, 2, 64), jnp.float32)
    pages = jnp.zeros((4, 16, 64))
    with pytest.raises(TypeError, match="block_table must have an integer dtype"):
        jax_mla.flash_mla(q, pages, block_table=jnp.zeros((2, 2)), dv=32)
    with pytest.raises(ValueError, match=r"block_table must have shape \(2, max_pages\)"):
        jax_mla.flash_mla(q, pages, block_table=jnp.zeros((3, 2), jnp.int32), dv=32)
    table = jnp.array([[0, 1], [2, 4]], jnp.int32)
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = 4 must lie in \[0, 4\)"):
        jax_mla.flash_mla(q, pages, block_table=table, dv=32)
    # Past kv_len the entry is never read, so it may hold anything.
    jax_mla.flash_mla(q, pages, block_table=table, kv_len=16, dv=32, backend="reference")


def test_paged_targets_and_page_sizes_are_in_the_table():
    table = _capabilities.cpu()
    assert tuple(table["page_sizes"]) == PAGE_SIZES
    for target in ("flash_mla", "flash_mla_quant", "flash_attention", "flash_attention_quant"):
        assert _ffi.has_target("cpu", f"jax_mla_{target}_paged")
    assert _capabilities.page_size_problem({}, 16) is not None
    assert "16, 32" in _capabilities.page_size_problem({"page_sizes": [16, 32]}, 64)


def test_cpu_handler_rejects_a_bad_page_size(rng):
    # The C++ check behind the Python one: a direct FFI call with pages of 8.
    q = randn(rng, (1, 1, 2, 64), jnp.float32)
    out_types = (
        jax.ShapeDtypeStruct((1, 1, 2, 64), jnp.float32),
        jax.ShapeDtypeStruct((1, 2, 1), jnp.float32),
        jax.ShapeDtypeStruct((0,), jnp.float32),
        jax.ShapeDtypeStruct((0,), jnp.float32),
    )
    call = jax.ffi.ffi_call("jax_mla_flash_mla_paged", out_types)
    args = (q, jnp.zeros((2, 8, 64)), jnp.zeros((1, 2), jnp.int32))
    with pytest.raises(Exception, match="page size .* must be 16, 32, 64 or 128, got 8"):
        call(
            *args,
            jnp.zeros(1, jnp.int32),
            jnp.ones(1, jnp.int32),
            scale=np.float32(1),
            causal=np.bool_(False),
            dv=np.int64(64),
            v_offset=np.int64(0),
            num_splits=np.int64(1),
        )


@pytest.mark.parametrize("fmt", ("q8_0", "q8_kv"))
@pytest.mark.parametrize("page_size", (16, 32))
def test_runs_of_consecutive_pages_over_8bit_v(rng, fmt, page_size):
    # Pages in pool order, with one gap in the pool inside a 64-key P group:
    # the kernels cross it inside one call, every group rounded as in the
    # contiguous cache.
    seq_kv, kv_len = 320, np.array([300])
    q, kv = mla_case(rng, batch=1, seq_q=1, seq_kv=seq_kv, kv_len=kv_len, fmt=fmt, heads=16)
    n = seq_kv // page_size
    order = np.arange(n)
    order[n // 2 :] += 3  # a gap in the pool: pages n/2 .. are not next to page n/2 - 1
    pages = jax.tree_util.tree_map(
        lambda a: (
            jnp.zeros((n + 3, page_size) + a.shape[2:], a.dtype)
            .at[order]
            .set(a[0].reshape((n, page_size) + a.shape[2:]))
        ),
        kv,
    )
    table = jnp.asarray(order[None], jnp.int32)
    kw = dict(dv=32, kv_len=kv_len, return_lse=True)
    got = jax_mla.flash_mla(q, pages, block_table=table, **kw)
    assert_same(got, jax_mla.flash_mla(q, kv, **kw), NATIVE_TOL)
