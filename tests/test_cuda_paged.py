"""The CUDA paged targets (jax_mla_flash_mla_paged, jax_mla_flash_mla_quant_paged,
jax_mla_flash_attention_paged), called directly so the kernels answer, not the
Python checks: the pages of a cache, in a random order inside a pool whose
unused pages (and every slot past kv_len) hold NaN, must give exactly what the
contiguous target gives on the cache itself (the same kernel, tiles and
arithmetic; only the row addresses differ), for every page size, kernel
family, float and 8-bit cache, with and without split-KV. Keys on pages whose
index is out of range are skipped: compared with the contiguous call over the
cache without them. Bad tables and page sizes are the handler's errors. Last,
flash_mla(block_table=...) through the public API under jit."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mla
from jax_mla import _capabilities, _ffi

from .conftest import assert_attention, gpu_tol

pytestmark = pytest.mark.gpu

CUDA = _capabilities.cuda() if _ffi.module("gpu") is not None else {}
PAGED_MLA = "flash_mla" in CUDA.get("paged_ops", [])
PAGE_SIZES = list(CUDA.get("page_sizes", [])) if PAGED_MLA else []
FAMILIES = list(CUDA.get("mla_kernels", [])) if PAGED_MLA else []
FORMATS = list(CUDA.get("mla_formats", {})) if PAGED_MLA else []
DK, DV = 576, 512


@pytest.fixture
def gpu():
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        devices = []
    if not devices:
        pytest.skip("no GPU")
    with jax.default_device(devices[0]):
        yield "gpu"


def runs_sm90a() -> bool:
    return jax.devices("gpu")[0].compute_capability == "9.0"


def mla_call(target, q, cache, block_table, q_pos, kv_len, *, num_splits, kernel=0, **attrs):
    """(out, lse) of a CUDA flash_mla target; block_table None for the
    contiguous targets. `cache` is (kv,) or (qs, d)."""
    b, sq, h, _ = q.shape
    ns = num_splits
    out_types = (
        jax.ShapeDtypeStruct((b, sq, h, DV), q.dtype),
        jax.ShapeDtypeStruct((b, h, sq), jnp.float32),
        jax.ShapeDtypeStruct((b, ns, sq, h, DV) if ns > 1 else (0,), jnp.float32),
        jax.ShapeDtypeStruct((b, ns, sq, h) if ns > 1 else (0,), jnp.float32),
    )
    call = jax.ffi.ffi_call(target, out_types, vmap_method="sequential")
    table = () if block_table is None else (jnp.asarray(block_table, jnp.int32),)
    out, lse, _, _ = call(
        q,
        *cache,
        *table,
        jnp.asarray(q_pos, jnp.int32),
        jnp.asarray(kv_len, jnp.int32),
        dv=np.int64(DV),
        v_offset=np.int64(0),
        num_splits=np.int64(ns),
        kernel=np.int32(kernel),
        **attrs,
    )
    return jax.block_until_ready((out, lse))


def float_cache(rng, batch, seq_kv, dtype, kv_len):
    """[B, Skv, 576] with NaN at every slot past kv_len[b]."""
    x = rng.standard_normal((batch, seq_kv, DK), dtype=np.float32)
    for b, n in enumerate(kv_len):
        x[b, n:] = np.nan
    return (np.asarray(jnp.asarray(x).astype(dtype)),)


def quant_cache(rng, batch, seq_kv, fmt, kv_len):
    """(qs, d) of a quantized [B, Skv, 576], scales NaN past kv_len[b]."""
    x = jnp.asarray(rng.standard_normal((batch, seq_kv, DK), dtype=np.float32))
    qkv = jax_mla.quantize(x, fmt)
    qs, d = np.asarray(qkv.qs).copy(), np.asarray(qkv.d).copy()
    for b, n in enumerate(kv_len):
        d[b, n:] = np.nan
    return qs, d


def page_pool(rng, cache, page_size, spare, kv_len):
    """The cache's pages in a random order in a pool of batch * max_pages +
    spare pages (the unused ones NaN: scales for a quantized cache, values
    for a float one), and the block table; table entries of pages no key
    below kv_len reaches hold out-of-range indices (never read)."""
    batch, seq_kv = cache[0].shape[:2]
    max_pages = seq_kv // page_size
    num_pages = batch * max_pages + spare
    table = rng.permutation(num_pages)[: batch * max_pages].reshape(batch, max_pages)
    pools = []
    for i, arr in enumerate(cache):
        pool = np.zeros((num_pages, page_size) + arr.shape[2:], arr.dtype)
        if i == len(cache) - 1:  # the scales, or the float values
            pool[...] = np.nan
        pages = arr.reshape((batch, max_pages, page_size) + arr.shape[2:])
        pool[table] = pages
        pools.append(pool)
    table = table.astype(np.int32)
    for b, n in enumerate(kv_len):
        unused = np.arange(max_pages) * page_size >= n
        table[b, unused] = rng.choice([-1, num_pages, 2**31 - 1], size=int(unused.sum()))
    return tuple(pools), table


def case_cache(rng, fmt, batch, seq_kv, kv_len):
    """(cache arrays, target suffix, extra attrs) for a float (fmt a dtype) or 8-bit cache."""
    if fmt in FORMATS:
        code = np.int64(CUDA["mla_formats"][fmt])
        return quant_cache(rng, batch, seq_kv, fmt, kv_len), "_quant", dict(kv_fmt=code)
    return float_cache(rng, batch, seq_kv, fmt, kv_len), "", {}


# (Sq, H, causal): 16-row blocks (decode, 16 heads) and 64-row ones.
ROWS = {"h16": (1, 16, False), "h64-causal": (2, 64, True)}
CACHES = ["bfloat16", "float16", *FORMATS]


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("rows", ROWS.values(), ids=ROWS.keys())
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", CACHES)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_paged_equals_contiguous(rng, gpu, page_size, fmt, family, rows, num_splits):
    seq_q, heads, causal = rows
    if fmt in FORMATS and family != "auto":
        pytest.skip("quantized caches have one kernel family")
    if heads == 16 and family != "auto":
        pytest.skip("16-row blocks run mma.sync in every family")
    if family.startswith("sm90") and not runs_sm90a():
        pytest.skip("sm_90a kernels need a compute capability 9.0 device")
    max_pages = math.ceil(300 / page_size)
    seq_kv = max_pages * page_size
    kv_len = [seq_kv, 0, seq_kv // 2 + 3, 1]
    batch = len(kv_len)
    q_pos = [seq_kv - seq_q, 0, 5, 0] if causal else [0] * batch
    dtype = jnp.bfloat16 if fmt in FORMATS else jnp.dtype(fmt)
    q = jnp.asarray(rng.standard_normal((batch, seq_q, heads, DK), np.float32)).astype(dtype)
    cache, suffix, attrs = case_cache(rng, fmt, batch, seq_kv, kv_len)
    pools, table = page_pool(rng, cache, page_size, spare=5, kv_len=kv_len)
    kw = dict(
        num_splits=num_splits,
        kernel=FAMILIES.index(family),
        scale=np.float32(0.135),
        causal=np.bool_(causal),
        **attrs,
    )
    target = f"jax_mla_flash_mla{suffix}"
    want = mla_call(target, q, tuple(map(jnp.asarray, cache)), None, q_pos, kv_len, **kw)
    got = mla_call(f"{target}_paged", q, tuple(map(jnp.asarray, pools)), table, q_pos, kv_len, **kw)
    # The same kernel over the same rows in the same tiles: bit-identical.
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    assert np.isfinite(np.asarray(got[0], np.float32)).all()


def assert_identical(got, want, what: str) -> None:
    """got == want bit for bit (out, lse), or a message naming the case, the
    first differing (batch, head) and the largest difference."""
    for name, g, w in (("out", got[0], want[0]), ("lse", got[1], want[1])):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        same = (g == w) | (np.isnan(g) & np.isnan(w))
        if not same.all():
            first = np.argwhere(~same)[0]
            diff = np.nanmax(np.abs(g.astype(np.float64) - w)[~same])
            raise AssertionError(
                f"{what}: paged {name} differs from contiguous at index {tuple(first)} "
                f"([B, Sq, H, dv] or [B, H, Sq]), {int((~same).sum())} elements, max |diff| {diff}"
            )


@pytest.mark.parametrize("heads", [16, 64], ids=["h16", "h64"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", CACHES)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_out_of_range_pages_are_skipped(rng, gpu, page_size, fmt, family, heads):
    """Entries outside [0, num_pages) below kv_len: those keys contribute
    nothing (a row left with none gives 0 and LSE -inf), like the contiguous
    call over the cache without them (non-causal, so positions do not matter).
    16 heads: the 16-row blocks; 64: the 64-row ones (every family)."""
    if fmt in FORMATS and family != "auto":
        pytest.skip("quantized caches have one kernel family")
    if heads == 16 and family != "auto":
        pytest.skip("16-row blocks run mma.sync in every family")
    if family.startswith("sm90") and not runs_sm90a():
        pytest.skip("sm_90a kernels need a compute capability 9.0 device")
    max_pages = math.ceil(260 / page_size)
    seq_kv = max_pages * page_size
    kv_len = [seq_kv, seq_kv - 7, 2 * page_size, page_size + 5]
    batch = len(kv_len)
    dtype = jnp.bfloat16 if fmt in FORMATS else jnp.dtype(fmt)
    q = jnp.asarray(rng.standard_normal((batch, 1, heads, DK), np.float32)).astype(dtype)
    cache, suffix, attrs = case_cache(rng, fmt, batch, seq_kv, kv_len)
    pools, table = page_pool(rng, cache, page_size, spare=3, kv_len=kv_len)
    num_pages = pools[0].shape[0]
    # Batch 0: every other page skipped; 1: the first and the last; 2: all of
    # them (the row sees no key); 3: none.
    skip = np.zeros(table.shape, bool)
    skip[0, ::2] = True
    skip[1, [0, (kv_len[1] - 1) // page_size]] = True
    skip[2, : kv_len[2] // page_size] = True
    table[skip] = rng.choice([-1, -(2**31), num_pages, num_pages + 100], size=int(skip.sum()))
    # The contiguous cache without the skipped keys, its kv_len the live count.
    live = ~np.repeat(skip, page_size, axis=1)
    live &= np.arange(seq_kv)[None, :] < np.asarray(kv_len)[:, None]
    kept_len = live.sum(axis=1)
    compact = []
    for arr in cache:
        c = np.full_like(arr, np.nan) if arr.dtype != np.int8 else np.zeros_like(arr)
        for b in range(batch):
            c[b, : kept_len[b]] = arr[b, live[b]]
        compact.append(jnp.asarray(c))
    kw = dict(
        num_splits=2,
        kernel=FAMILIES.index(family),
        scale=np.float32(0.135),
        causal=np.bool_(False),
        **attrs,
    )
    target = f"jax_mla_flash_mla{suffix}"
    zeros = [0] * batch
    want = mla_call(target, q, tuple(compact), None, zeros, kept_len, **kw)
    got = mla_call(f"{target}_paged", q, tuple(map(jnp.asarray, pools)), table, zeros, kv_len, **kw)
    visible = np.broadcast_to(kept_len[:, None], (batch, 1))
    assert_attention(got, want, dtype, visible, f32_tol=gpu_tol(dtype))


@pytest.mark.parametrize("num_splits", [1, 5])
@pytest.mark.parametrize("heads", [16, 128], ids=["h16", "h128"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", ["bfloat16", *FORMATS])
@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_paged_long_rows_equal_contiguous(rng, gpu, page_size, fmt, family, heads, num_splits):
    """Rows of about 1100 keys: many more tiles per block than pipeline
    stages, so the page entries read a tile ahead of the copies and masks
    roll through the whole range; tiles span pages (pages of 16 and 32 are
    shorter than the 32- and 64-key tiles) or share one (64, 128); 5 splits
    start tiles mid-page; kv_len ends mid-page and mid-tile, and one row ends
    on the table's last entry. Bit-identical to the contiguous call."""
    if fmt in FORMATS and family != "auto":
        pytest.skip("quantized caches have one kernel family")
    if heads == 16 and family != "auto":
        pytest.skip("16-row blocks run mma.sync in every family")
    if family.startswith("sm90") and not runs_sm90a():
        pytest.skip("sm_90a kernels need a compute capability 9.0 device")
    max_pages = math.ceil(1100 / page_size)
    seq_kv = max_pages * page_size
    kv_len = [seq_kv - 37, 531, 16 + 64 + 3, seq_kv]
    batch = len(kv_len)
    dtype = jnp.bfloat16
    q = jnp.asarray(rng.standard_normal((batch, 1, heads, DK), np.float32)).astype(dtype)
    cache, suffix, attrs = case_cache(rng, fmt, batch, seq_kv, kv_len)
    pools, table = page_pool(rng, cache, page_size, spare=3, kv_len=kv_len)
    kw = dict(
        num_splits=num_splits,
        kernel=FAMILIES.index(family),
        scale=np.float32(0.07),
        causal=np.bool_(False),
        **attrs,
    )
    target = f"jax_mla_flash_mla{suffix}"
    zeros = [0] * batch
    want = mla_call(target, q, tuple(map(jnp.asarray, cache)), None, zeros, kv_len, **kw)
    got = mla_call(f"{target}_paged", q, tuple(map(jnp.asarray, pools)), table, zeros, kv_len, **kw)
    what = f"{family} {fmt} page={page_size} H={heads} splits={num_splits} kv_len={kv_len}"
    assert_identical(got, want, what)
    assert np.isfinite(np.asarray(got[0], np.float32)).all(), what


def paged_decode_args(page_size=16, table_shape=(1, 1), num_pages=2):
    q = jnp.ones((1, 1, 16, DK), jnp.bfloat16)
    kv = jnp.ones((num_pages, page_size, DK), jnp.bfloat16)
    return q, (kv,), jnp.zeros(table_shape, jnp.int32)


@pytest.mark.skipif(not PAGED_MLA, reason="no paged CUDA flash_mla in this build")
@pytest.mark.parametrize(
    "page_size, table_shape, match",
    [
        (48, (1, 1), r"page size \(kv.shape\[1\]\) must be 16, 32, 64 or 128, got 48"),
        (8, (1, 1), "must be 16, 32, 64 or 128, got 8"),
        (16, (2, 1), r"block_table must be int32 \[1, max_pages\], got \[2, 1\]"),
        (16, (1,), r"block_table must be int32 \[1, max_pages\], got \[1\]"),
    ],
    ids=["page-48", "page-8", "table-batch", "table-rank"],
)
def test_paged_handler_checks(gpu, page_size, table_shape, match):
    q, cache, table = paged_decode_args(page_size, table_shape)
    with pytest.raises(Exception, match=match):
        mla_call(
            "jax_mla_flash_mla_paged",
            q,
            cache,
            table,
            [0],
            [8],
            num_splits=1,
            scale=np.float32(0.1),
            causal=np.bool_(False),
        )


# ---------------------------------------------------------------- flash_attention
PAGED_ATTENTION = "flash_attention" in CUDA.get("paged_ops", [])
HEAD_DIMS = [tuple(d) for d in CUDA.get("attention_head_dims", [])] if PAGED_ATTENTION else []
ATTENTION_FAMILIES = list(CUDA.get("attention_kernels", [])) if PAGED_ATTENTION else []


def attention_call(target, q, k, v, block_table, q_pos, kv_len, *, num_splits, kernel, **attrs):
    """(out, lse) of a CUDA flash_attention target (block_table None: contiguous)."""
    b, sq, hq, _ = q.shape
    dv, ns = v.shape[-1], num_splits
    out_types = (
        jax.ShapeDtypeStruct((b, sq, hq, dv), q.dtype),
        jax.ShapeDtypeStruct((b, hq, sq), jnp.float32),
        jax.ShapeDtypeStruct((b, ns, sq, hq, dv) if ns > 1 else (0,), jnp.float32),
        jax.ShapeDtypeStruct((b, ns, sq, hq) if ns > 1 else (0,), jnp.float32),
    )
    call = jax.ffi.ffi_call(target, out_types, vmap_method="sequential")
    table = () if block_table is None else (jnp.asarray(block_table, jnp.int32),)
    out, lse, _, _ = call(
        q,
        jnp.asarray(k),
        jnp.asarray(v),
        *table,
        jnp.asarray(q_pos, jnp.int32),
        jnp.asarray(kv_len, jnp.int32),
        num_splits=np.int64(ns),
        kernel=np.int32(kernel),
        **attrs,
    )
    return jax.block_until_ready((out, lse))


def attention_pools(rng, k, v, page_size, spare, kv_len):
    """k and v [B, Skv, Hkv, D] as pages of one pool order (page_pool on both)."""
    state = rng.bit_generator.state
    (k_pool,), table = page_pool(rng, (k,), page_size, spare, kv_len)
    rng.bit_generator.state = state  # the same permutation and table for v
    (v_pool,), table_v = page_pool(rng, (v,), page_size, spare, kv_len)
    assert np.array_equal(table, table_v)
    return k_pool, v_pool, table


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("family", ATTENTION_FAMILIES)
@pytest.mark.parametrize("dims", HEAD_DIMS, ids=lambda d: f"{d[0]}x{d[1]}")
@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_attention_paged_equals_contiguous(rng, gpu, page_size, dims, family, num_splits):
    """Paged k and v in a NaN-filled pool: bit-identical to the contiguous
    mma.sync kernel (auto takes mma.sync for paged calls); a forced sm90 is
    refused, never another kernel."""
    dk, dv = dims
    max_pages = math.ceil(150 / page_size)
    seq_kv = max_pages * page_size
    kv_len = [seq_kv, 0, seq_kv // 2 + 1]
    batch, seq_q, hq, hkv = len(kv_len), 5, 8, 2
    dtype = jnp.bfloat16
    q = jnp.asarray(rng.standard_normal((batch, seq_q, hq, dk), np.float32)).astype(dtype)

    def rows(d):  # [B, Skv, Hkv, d], NaN past kv_len
        x = rng.standard_normal((batch, seq_kv, hkv, d), dtype=np.float32)
        for b, n in enumerate(kv_len):
            x[b, n:] = np.nan
        return np.asarray(jnp.asarray(x).astype(dtype))

    k, v = rows(dk), rows(dv)
    k_pool, v_pool, table = attention_pools(rng, k, v, page_size, 4, kv_len)
    q_pos = [seq_kv - seq_q, 0, 3]
    attrs = dict(scale=np.float32(0.1), causal=np.bool_(True))
    paged = functools.partial(
        attention_call,
        "jax_mla_flash_attention_paged",
        q,
        k_pool,
        v_pool,
        table,
        q_pos,
        kv_len,
        num_splits=num_splits,
        kernel=ATTENTION_FAMILIES.index(family),
        **attrs,
    )
    if family == "sm90":
        with pytest.raises(Exception, match="kernel sm90 does not read paged caches"):
            paged()
        return
    want = attention_call(
        "jax_mla_flash_attention",
        q,
        k,
        v,
        None,
        q_pos,
        kv_len,
        num_splits=num_splits,
        kernel=ATTENTION_FAMILIES.index("mma_sync"),
        **attrs,
    )
    got = paged()
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    assert np.isfinite(np.asarray(got[0], np.float32)).all()


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_attention_out_of_range_pages_are_skipped(rng, gpu, page_size):
    """As for flash_mla: skipped pages below kv_len contribute nothing."""
    dk, dv = 128, 128
    if (dk, dv) not in HEAD_DIMS:
        pytest.skip("no 128/128 attention kernel")
    max_pages = math.ceil(150 / page_size)
    seq_kv = max_pages * page_size
    kv_len = [seq_kv, 2 * page_size]
    batch, hq, hkv, dtype = len(kv_len), 4, 2, jnp.bfloat16
    q = jnp.asarray(rng.standard_normal((batch, 1, hq, dk), np.float32)).astype(dtype)
    k = np.asarray(rng.standard_normal((batch, seq_kv, hkv, dk), np.float32)).astype(dtype)
    v = np.asarray(rng.standard_normal((batch, seq_kv, hkv, dv), np.float32)).astype(dtype)
    k_pool, v_pool, table = attention_pools(rng, k, v, page_size, 2, kv_len)
    skip = np.zeros(table.shape, bool)
    skip[0, 1::2] = True
    skip[1, :2] = True  # every page of the row: output 0, LSE -inf
    table[skip] = -1
    live = ~np.repeat(skip, page_size, axis=1)
    live &= np.arange(seq_kv)[None, :] < np.asarray(kv_len)[:, None]
    kept_len = live.sum(axis=1)
    k_kept, v_kept = np.zeros_like(k), np.zeros_like(v)
    for b in range(batch):
        k_kept[b, : kept_len[b]], v_kept[b, : kept_len[b]] = k[b, live[b]], v[b, live[b]]
    attrs = dict(scale=np.float32(0.1), causal=np.bool_(False), num_splits=2)
    mma = ATTENTION_FAMILIES.index("mma_sync")
    zeros = [0] * batch
    want = attention_call(
        "jax_mla_flash_attention", q, k_kept, v_kept, None, zeros, kept_len, kernel=mma, **attrs
    )
    got = attention_call(
        "jax_mla_flash_attention_paged", q, k_pool, v_pool, table, zeros, kv_len, kernel=0, **attrs
    )
    visible = np.broadcast_to(kept_len[:, None], (batch, 1))
    assert_attention(got, want, dtype, visible, f32_tol=gpu_tol(dtype))


@pytest.mark.parametrize("fmt", ["bfloat16", *FORMATS])
@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_public_api_reaches_the_paged_kernels(rng, gpu, page_size, fmt):
    """jax_mla.flash_mla(..., block_table=...) under jit on the GPU: the paged
    target, bit-identical to the contiguous call on the same rows."""
    max_pages = math.ceil(200 / page_size)
    seq_kv = max_pages * page_size
    kv_len = [seq_kv, 33, 0]
    batch, heads = len(kv_len), 64
    q = jnp.asarray(rng.standard_normal((batch, 1, heads, DK), np.float32)).astype(jnp.bfloat16)
    cache, _, _ = case_cache(rng, fmt, batch, seq_kv, kv_len)
    pools, table = page_pool(rng, cache, page_size, spare=2, kv_len=kv_len)

    def as_kv(arrays):
        arrays = tuple(map(jnp.asarray, arrays))
        return jax_mla.QuantizedKV(*arrays, fmt) if fmt in FORMATS else arrays[0]

    kw = dict(dv=DV, num_splits=2, return_lse=True, backend="native")
    lengths = jnp.asarray(kv_len, jnp.int32)
    paged = jax.jit(lambda q, kv, t, n: jax_mla.flash_mla(q, kv, block_table=t, kv_len=n, **kw))
    contiguous = jax.jit(lambda q, kv, n: jax_mla.flash_mla(q, kv, kv_len=n, **kw))
    got = jax.block_until_ready(paged(q, as_kv(pools), jnp.asarray(table), lengths))
    want = jax.block_until_ready(contiguous(q, as_kv(cache), lengths))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
