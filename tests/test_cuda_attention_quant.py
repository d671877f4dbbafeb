"""CUDA flash_attention over 8-bit K and V caches (q8_0, q8_kv, each its own
format; ffi/cuda/attention/attention_quant_kernel.cuh), read in place, in the
configurations the CUDA module's capabilities() lists (attention_formats,
attention_quant_head_dims, dtypes).

Expected values: the reference over the dequantized caches with the query
rounded to 8 bits per block of 32 as the kernels take it (test_cuda.rounded_query),
i.e. reference.attention_quantized(round_p=False). The kernel's Q.K is exact
integer arithmetic scaled in float32; V = d * q is rounded to the query's
type, like P, so the float kernels' GPU tolerance (conftest.gpu_tol) holds.
The caches' scales are NaN past kv_len, so a kernel that reads a key that
does not exist fails. flash_attention takes no num_splits: the split cases
are decode shapes the heuristic splits (asserted)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mla
from jax_mla import _capabilities, _ffi, _splits

from .conftest import (
    assert_attention,
    gpu_tol,
    native_attention,
    randn,
    reference_attention,
    visible_keys,
)
from .test_cuda import (
    POSITIONS,
    gpu,  # noqa: F401 (the fixture every test here uses)
    rounded_query,
)
from .test_quant_kernels import quantized_cache

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("gpu")]

CUDA = _capabilities.cuda() if _ffi.module("gpu") is not None else {}
HALF = [jnp.dtype(d) for d in CUDA.get("dtypes", [])]
FORMATS = list(CUDA.get("attention_formats", {}))
PAIRS = [(k, v) for k in FORMATS for v in FORMATS]
PAIR_IDS = [f"{k}-{v}" for k, v in PAIRS]
HEAD_DIMS = [tuple(dims) for dims in CUDA.get("attention_quant_head_dims", [])]
HEAD_DIMS_IDS = [f"{a}x{b}" for a, b in HEAD_DIMS]


def check_attention_quant_gpu(
    rng,
    k_fmt,
    v_fmt,
    *,
    batch,
    seq_q,
    heads_q,
    heads_kv,
    seq_kv,
    dk,
    dv,
    dtype,
    causal=False,
    q_pos=None,
    kv_len=None,
    scale=None,
):
    """The kernel against the reference (module docstring), the contract's
    empty rows exactly; returns (out, lse)."""
    q = randn(rng, (batch, seq_q, heads_q, dk), dtype)
    k = quantized_cache(rng, (batch, seq_kv, heads_kv, dk), k_fmt, kv_len)
    v = quantized_cache(rng, (batch, seq_kv, heads_kv, dv), v_fmt, kv_len)
    kw = dict(causal=causal, q_pos=q_pos, kv_len=kv_len)
    got = native_attention(q, k, v, scale=scale, **kw)
    want = reference_attention(
        rounded_query(q, scale), jax_mla.dequantize(k), jax_mla.dequantize(v), scale=1.0, **kw
    )
    visible = visible_keys(q_pos, kv_len, batch, seq_q, seq_kv, causal)
    assert_attention(got, want, dtype, visible, f32_tol=gpu_tol(dtype))
    return got


# (Hq, Hkv): MHA, GQA 4, GQA 16 (16 rows of a position share a KV head, so a
# 64-row block holds 4 positions).
HEADS = {"mha": (4, 4), "gqa4": (8, 2), "gqa16": (16, 1)}
# (Sq, Skv): decode, a prefill chunk over odd lengths, one past a 64-key tile
# and two 64-row blocks, more queries than keys.
LENGTHS = [(1, 300), (3, 77), (130, 130), (70, 33)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seq_q, seq_kv", LENGTHS, ids=[f"sq{a}-skv{b}" for a, b in LENGTHS])
@pytest.mark.parametrize("heads_q, heads_kv", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("k_fmt, v_fmt", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("dk, dv", HEAD_DIMS, ids=HEAD_DIMS_IDS)
def test_formats_heads_lengths(rng, dk, dv, k_fmt, v_fmt, heads_q, heads_kv, seq_q, seq_kv, causal):
    dtype = HALF[(seq_q + heads_q + causal) % len(HALF)]  # both dtypes across the grid
    check_attention_quant_gpu(
        rng,
        k_fmt,
        v_fmt,
        batch=2,
        seq_q=seq_q,
        heads_q=heads_q,
        heads_kv=heads_kv,
        seq_kv=seq_kv,
        dk=dk,
        dv=dv,
        dtype=dtype,
        causal=causal,
        kv_len=[seq_kv, max(1, seq_kv // 3)],
    )


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("q_pos, kv_len", POSITIONS.values(), ids=POSITIONS.keys())
@pytest.mark.parametrize("k_fmt, v_fmt", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("dk, dv", HEAD_DIMS, ids=HEAD_DIMS_IDS)
def test_positions(rng, dk, dv, k_fmt, v_fmt, q_pos, kv_len, causal):
    # Empty caches, empty rows, negative q_pos, q_pos past kv_len, per batch.
    check_attention_quant_gpu(
        rng,
        k_fmt,
        v_fmt,
        batch=4,
        seq_q=5,
        heads_q=4,
        heads_kv=2,
        seq_kv=77,
        dk=dk,
        dv=dv,
        dtype=jnp.float16,
        causal=causal,
        q_pos=q_pos,
        kv_len=kv_len,
        scale=0.1147,
    )


# Decode shapes the heuristic splits: (B, Hq, Hkv, Skv, kv_len, fewest splits).
# 2 x 16 MHA rows over 1000 keys (a row with no key at all), and 2 x 4 MQA rows
# over 5000 keys (many splits: several warps per column chunk in the combine).
SPLIT_CASES = {
    "mha_1000": (2, 16, 16, 1000, [1000, 0], 2),
    "mqa_5000": (2, 4, 1, 5000, [5000, 1200], 16),
}


@pytest.mark.parametrize("case", SPLIT_CASES.values(), ids=SPLIT_CASES.keys())
@pytest.mark.parametrize("k_fmt, v_fmt", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("dk, dv", HEAD_DIMS, ids=HEAD_DIMS_IDS)
def test_split_kv_decode(rng, dk, dv, k_fmt, v_fmt, case):
    batch, heads_q, heads_kv, seq_kv, kv_len, fewest = case
    splits = _splits.choose_num_splits(
        None, batch, 1, heads_q, heads_kv, seq_kv, platform="gpu", dk=dk
    )
    assert splits >= fewest, f"the heuristic chose {splits} splits"
    check_attention_quant_gpu(
        rng,
        k_fmt,
        v_fmt,
        batch=batch,
        seq_q=1,
        heads_q=heads_q,
        heads_kv=heads_kv,
        seq_kv=seq_kv,
        dk=dk,
        dv=dv,
        dtype=jnp.bfloat16,
        causal=True,
        kv_len=kv_len,
        scale=0.1147,
    )


@pytest.mark.parametrize("dk, dv", HEAD_DIMS, ids=HEAD_DIMS_IDS)
def test_q_pos_near_int32_max(rng, dk, dv):
    # Causal with every query past every key: the full (non-causal) attention.
    q = randn(rng, (2, 4, 8, dk), jnp.bfloat16)
    kv_len = jnp.array([77, 30], jnp.int32)
    k = quantized_cache(rng, (2, 77, 2, dk), "q8_0", kv_len)
    v = quantized_cache(rng, (2, 77, 2, dv), "q8_kv", kv_len)
    got = native_attention(q, k, v, causal=True, q_pos=2**31 - 3, kv_len=kv_len)
    want = reference_attention(
        rounded_query(q), jax_mla.dequantize(k), jax_mla.dequantize(v), scale=1.0, kv_len=kv_len
    )
    visible = visible_keys(None, kv_len, 2, 4, 77, False)
    assert_attention(got, want, jnp.bfloat16, visible, f32_tol=gpu_tol(jnp.bfloat16))


@pytest.mark.parametrize("dk, dv", HEAD_DIMS, ids=HEAD_DIMS_IDS)
def test_return_lse_and_jit(rng, dk, dv):
    # The output alone (return_lse=False) and under jit are the same call's.
    q = randn(rng, (2, 3, 8, dk), jnp.float16)
    k = quantized_cache(rng, (2, 90, 2, dk), "q8_kv", [90, 41])
    v = quantized_cache(rng, (2, 90, 2, dv), "q8_0", [90, 41])
    kv_len = jnp.array([90, 41], jnp.int32)
    out, lse = native_attention(q, k, v, causal=True, kv_len=kv_len)
    alone = jax_mla.flash_attention(q, k, v, causal=True, kv_len=kv_len, backend="native")
    jitted = jax.jit(
        lambda q, k, v, n: jax_mla.flash_attention(
            q, k, v, causal=True, kv_len=n, return_lse=True, backend="native"
        )
    )(q, k, v, kv_len)
    np.testing.assert_array_equal(np.asarray(alone, np.float32), np.asarray(out, np.float32))
    np.testing.assert_array_equal(np.asarray(jitted[0], np.float32), np.asarray(out, np.float32))
    np.testing.assert_array_equal(np.asarray(jitted[1]), np.asarray(lse))


@pytest.mark.parametrize(
    "in_axes",
    [(0, None, None, None), (0, None, None, 0), (0, 0, 0, 0)],
    ids=["q", "q_and_kv_len", "all"],
)
def test_vmap(rng, in_axes):
    # vmap over the queries alone folds into the query heads, over the queries
    # and lengths into the batch with the caches shared, over everything into
    # the batch. Each slice equals its own call (90 keys: never split).
    (dk, dv), n = HEAD_DIMS[0], 3
    q = randn(rng, (n, 2, 2, 8, dk), jnp.bfloat16)
    k = quantized_cache(rng, (n, 2, 90, 2, dk), "q8_0")
    v = quantized_cache(rng, (n, 2, 90, 2, dv), "q8_kv")
    kv_len = jnp.asarray(rng.integers(1, 91, (n, 2)), jnp.int32)
    args = [
        x if ax is not None else jax.tree.map(lambda a: a[0], x)
        for x, ax in zip([q, k, v, kv_len], in_axes)
    ]

    def op(q, k, v, kv_len):
        return jax_mla.flash_attention(
            q, k, v, kv_len=kv_len, causal=True, return_lse=True, backend="native"
        )

    got = jax.vmap(op, in_axes=in_axes)(*args)
    for j in range(n):
        one = [a if ax is None else jax.tree.map(lambda x: x[j], a) for a, ax in zip(args, in_axes)]
        want = op(*one)
        np.testing.assert_array_equal(
            np.asarray(got[0][j], np.float32), np.asarray(want[0], np.float32)
        )
        np.testing.assert_array_equal(np.asarray(got[1][j]), np.asarray(want[1]))


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("k_fmt, v_fmt", PAIRS, ids=PAIR_IDS)
def test_grad_is_the_dequantized_float_one(rng, k_fmt, v_fmt, dtype):
    # jax.grad (under jit) with respect to q: the pure-JAX backward over the
    # kernel's out and LSE, against jax.grad of the float reference over the
    # dequantized caches (docs/design.md, "Autodiff"). They differ by the
    # forward's 8-bit query and the half-precision rounding of out and of the
    # gradient: the CPU kernels' path (P rounded too) measured 3.9e-3 (bf16)
    # and 9.4e-4 (f16) relative; bound 2e-2.
    (dk, dv) = HEAD_DIMS[0]
    kv_len = jnp.array([90, 41], jnp.int32)
    q = randn(rng, (2, 5, 8, dk), dtype)
    # No NaN past kv_len here: the reference's gradient would carry it (0 * NaN).
    k = quantized_cache(rng, (2, 90, 2, dk), k_fmt)
    v = quantized_cache(rng, (2, 90, 2, dv), v_fmt)
    w = randn(rng, (2, 5, 8, dv), jnp.float32)

    def loss(q, k, v, attention):
        return jnp.sum(attention(q, k, v).astype(jnp.float32) * w)

    native = lambda q, k, v: jax_mla.flash_attention(  # noqa: E731
        q, k, v, causal=True, kv_len=kv_len, backend="native"
    )
    reference = lambda q, k, v: jax_mla.reference.attention(  # noqa: E731
        q.astype(jnp.float32), k, v, causal=True, kv_len=kv_len
    )[0]
    got = jax.jit(jax.grad(loss), static_argnums=3)(q, k, v, native)
    want = jax.jit(jax.grad(loss), static_argnums=3)(
        q, jax_mla.dequantize(k), jax_mla.dequantize(v), reference
    )
    assert got.dtype == q.dtype
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.isfinite(got).all()
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 2e-2, f"{k_fmt}/{v_fmt} {jnp.dtype(dtype).name}: relative error {err:.3g}"


@pytest.mark.parametrize("k_fmt, v_fmt", PAIRS, ids=PAIR_IDS)
def test_close_to_the_float_cache(rng, k_fmt, v_fmt):
    # End to end, as test_quant_kernels does on the CPU: 8-bit K and V keep
    # outputs within about 1e-2 of float64 attention over the float values.
    (dk, dv) = HEAD_DIMS[0]
    q = randn(rng, (1, 1, 16, dk), jnp.float32) * 0.5
    xk = randn(rng, (1, 500, 1, dk), jnp.float32)
    xv = randn(rng, (1, 500, 1, dv), jnp.float32)
    out = jax_mla.flash_attention(
        q.astype(jnp.bfloat16),
        jax_mla.quantize(xk, k_fmt),
        jax_mla.quantize(xv, v_fmt),
        backend="native",
    )
    out = np.asarray(out.astype(jnp.float32))[0, 0]
    qn = np.asarray(q.astype(jnp.bfloat16).astype(jnp.float32), np.float64)[0, 0]
    kn, vn = np.asarray(xk, np.float64)[0, :, 0], np.asarray(xv, np.float64)[0, :, 0]
    s = qn @ kn.T / np.sqrt(dk)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    want = (p / p.sum(axis=-1, keepdims=True)) @ vn
    err = np.abs(out - want).max() / np.abs(want).max()
    assert err < 1e-2, f"{k_fmt}/{v_fmt}: relative error {err:.3g}"


def family_switch(monkeypatch, family: str) -> None:
    monkeypatch.setenv("JAX_MLA_CUDA_ATTENTION_KERNEL", family)


@pytest.mark.parametrize("family", CUDA.get("attention_kernels", []))
def test_kernel_family(rng, monkeypatch, family):
    # Every family but sm90 runs the 8-bit kernel; a forced sm90 is refused,
    # never another kernel.
    family_switch(monkeypatch, family)
    (dk, dv) = HEAD_DIMS[0]
    kw = dict(
        batch=2,
        seq_q=70,
        heads_q=8,
        heads_kv=2,
        seq_kv=200,
        dk=dk,
        dv=dv,
        dtype=jnp.bfloat16,
        causal=True,
        kv_len=[200, 150],
    )
    if family == "sm90":
        with pytest.raises(Exception, match="kernel sm90 does not read quantized caches"):
            check_attention_quant_gpu(rng, "q8_0", "q8_0", **kw)
    else:
        check_attention_quant_gpu(rng, "q8_0", "q8_0", **kw)


def _caches(rng, k_fmt, v_fmt, dk=192, dv=128, seq_kv=40):
    """k and v of the given formats (a dtype: a float cache), B 1, Hkv 2."""

    def make(fmt, d):
        x = randn(rng, (1, seq_kv, 2, d), jnp.float32)
        return jax_mla.quantize(x, fmt) if isinstance(fmt, str) else x.astype(fmt)

    return make(k_fmt, dk), make(v_fmt, dv)


UNSUPPORTED = {
    "q6_0": ("q6_0", "q6_0", jnp.bfloat16, 192, 128, "both in q8_0 or q8_kv.*got k q6_0, v q6_0"),
    "fp8": ("q8_0", "fp8_e4m3", jnp.bfloat16, 192, 128, "got k q8_0, v fp8_e4m3"),
    "float_k": (jnp.bfloat16, "q8_0", jnp.bfloat16, 192, 128, "got k bfloat16, v q8_0"),
    "float_v": ("q8_kv", jnp.float16, jnp.float16, 192, 128, "got k q8_kv, v float16"),
    "f32_query": ("q8_0", "q8_0", jnp.float32, 192, 128, "q float16 or bfloat16 over quantized"),
    "dims": ("q8_0", "q8_kv", jnp.bfloat16, 64, 64, r"over quantized caches; got \(64, 64\)"),
}


@pytest.mark.parametrize(
    "k_fmt, v_fmt, dtype, dk, dv, match", UNSUPPORTED.values(), ids=UNSUPPORTED.keys()
)
def test_unsupported_is_not_implemented(rng, k_fmt, v_fmt, dtype, dk, dv, match):
    q = randn(rng, (1, 1, 4, dk), dtype)
    k, v = _caches(rng, k_fmt, v_fmt, dk, dv)
    for backend in ("native", None):  # the native kernel exists: never the reference
        with pytest.raises(NotImplementedError, match=match):
            jax_mla.flash_attention(q, k, v, backend=backend)


def test_paged_quantized_is_not_implemented(rng):
    (dk, dv) = HEAD_DIMS[0]
    q = randn(rng, (1, 1, 4, dk), jnp.bfloat16)
    k, v = _caches(rng, "q8_0", "q8_0", dk, dv, seq_kv=32)  # 2 pages of 16
    k, v = (jax.tree.map(lambda a: a.reshape((2, 16) + a.shape[2:]), c) for c in (k, v))
    table = jnp.array([[1, 0]], jnp.int32)
    for backend in ("native", None):
        with pytest.raises(NotImplementedError, match="jax_mla_flash_attention_quant_paged"):
            jax_mla.flash_attention(q, k, v, block_table=table, backend=backend)
    # The reference reads them.
    jax_mla.flash_attention(q, k, v, block_table=table, backend="reference")


def direct_quant_call(k, k_d, v, v_d, *, k_fmt, v_fmt, kernel=0, dk=192, dv=128):
    """One call (B 1, Sq 1, Hq 4) of jax_mla_flash_attention_quant itself,
    bypassing the Python checks, so the handler's own checks answer."""
    out_types = (
        jax.ShapeDtypeStruct((1, 1, 4, dv), jnp.bfloat16),
        jax.ShapeDtypeStruct((1, 4, 1), jnp.float32),
        jax.ShapeDtypeStruct((0,), jnp.float32),
        jax.ShapeDtypeStruct((0,), jnp.float32),
    )
    call = jax.ffi.ffi_call("jax_mla_flash_attention_quant", out_types, vmap_method="sequential")
    q = jnp.ones((1, 1, 4, dk), jnp.bfloat16)
    positions = (jnp.zeros((1,), jnp.int32), jnp.full((1,), k.shape[1], jnp.int32))
    return jax.block_until_ready(
        call(
            q,
            k,
            k_d,
            v,
            v_d,
            *positions,
            scale=np.float32(0.1),
            causal=np.bool_(False),
            num_splits=np.int64(1),
            k_fmt=np.int64(k_fmt),
            v_fmt=np.int64(v_fmt),
            kernel=np.int32(kernel),
        )
    )


def test_cpp_checks():
    # The CUDA handler checks again when called directly (no Python checks):
    # formats, scale shapes and dtypes, the pairs, the kernel family.
    codes = CUDA["attention_formats"]
    q8_0, q8_kv = codes["q8_0"], codes["q8_kv"]
    kq, vq = jnp.ones((1, 8, 2, 192), jnp.int8), jnp.ones((1, 8, 2, 128), jnp.int8)
    k_d, v_d = jnp.ones((1, 8, 2, 6), jnp.float16), jnp.ones((1, 8, 2, 4), jnp.float16)
    row_d = jnp.ones((1, 8, 2, 1), jnp.float32)
    _, lse, _, _ = direct_quant_call(kq, k_d, vq, row_d, k_fmt=q8_0, v_fmt=q8_kv)
    assert np.isfinite(np.asarray(lse)).all()
    q6 = jnp.ones((1, 8, 2, 144), jnp.uint8)  # 192 values in q6_0's 24 bytes per 32
    k_float = jnp.ones((1, 8, 2, 192), jnp.bfloat16)
    cases = [
        ((q6, k_d), dict(k_fmt=3, v_fmt=q8_0), r"k and v must each be q8_0 or q8_kv, got k q6_0"),
        ((k_float, k_d), dict(k_fmt=0, v_fmt=q8_0), r"got k float, v q8_0"),
        ((kq, k_d), dict(k_fmt=7, v_fmt=q8_0), r"unknown cache format code 7"),
        ((kq, k_d), dict(k_fmt=q8_kv, v_fmt=q8_0), r"k.d of a q8_kv cache must be float32"),
        ((kq, k_d), dict(k_fmt=q8_0, v_fmt=q8_0, kernel=2), r"sm90 does not read quantized"),
        (
            (kq, k_d),
            dict(k_fmt=q8_0, v_fmt=q8_0, kernel=99),
            r"kernel must be in \[0, \d+\), got 99",
        ),
    ]
    for (k, kd), kw, match in cases:
        with pytest.raises(Exception, match=match):
            direct_quant_call(k, kd, vq, v_d, **kw)
    # A pair the 8-bit kernel is not built for.
    if (64, 64) not in HEAD_DIMS:
        q64, d64 = jnp.ones((1, 8, 2, 64), jnp.int8), jnp.ones((1, 8, 2, 2), jnp.float16)
        with pytest.raises(Exception, match=r"over quantized caches \(Dk, Dv\) must be"):
            direct_quant_call(q64, d64, q64, d64, k_fmt=q8_0, v_fmt=q8_0, dk=64, dv=64)
