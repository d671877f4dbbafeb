"""The native kernels over quantized caches (q8_0, q8_kv, q6_0, fp8_e4m3), read in place,
against jax_mla.reference.attention_quantized / mla_quantized (what the CPU
kernels compute: the dequantized cache, the query rounded to 8 bits over 8-bit
K, the softmax weights P rounded to 8 bits over 8-bit V); the C++ checks of
the quantized operands; and no dequantized copy of a cache.

Tolerance: over q6_0, fp8_e4m3 or float V, kernel and reference see bit-identical values
and the float tests' tolerance (conftest.F32_TOL: summation order and the
vectorized exp) applies unchanged. Over 8-bit V each rounded weight q_t is an
integer chosen from float32 values that kernel and reference compute a few
ulps apart, so a weight that lands within those ulps of a rounding boundary
may round the other way (about one weight in 10^4); such a flip moves the
outputs of its row and 32-column block by one step of P, at most max|v| / 255
(over q8_kv, whose one scale per key makes every block's weight the same
number, a flip moves the whole row). `assert_rounded_p` holds all other
elements to F32_TOL, allows at most 2 + 10^-3 x (rounded weights) flipped
blocks (rows over q8_kv), and requires the whole output within 5e-4 (relative
L2) of the reference, where leaving P unrounded is 10x further away (~5e-3).
The bound counts flips, not elements: one flip in a small output is more than
1% of its elements, and which weights flip depends on the last bits of the
reference, which XLA computes differently on AVX2 and AVX-512 machines.
The quantization error itself (the cache against the float values it was made
from) is measured in test_quant.py and in the README, not here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mla
from jax_mla import _capabilities, quant, reference

from .conftest import (
    F32_TOL,
    KV_TILE,
    OUT_ULPS,
    assert_attention,
    cache,
    native_attention,
    native_mla,
    per_batch,
    randn,
    visible_keys,
)

FORMATS = quant.FORMATS


def quantized_cache(rng, shape, fmt, kv_len=None):
    """A random cache quantized to `fmt`, with the scales of every row at a
    position >= kv_len[b] set to NaN: those rows dequantize to NaN, so a
    kernel that reads a key that does not exist fails (docs/design.md, "Tests")."""
    x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    qkv = jax_mla.quantize(x, fmt)
    if kv_len is None:
        return qkv
    d = np.asarray(qkv.d).copy()
    for b, n in enumerate(np.clip(per_batch(kv_len, shape[0]), 0, shape[1])):
        d[b, n:] = np.nan
    return quant.QuantizedKV(qkv.qs, jnp.asarray(d), fmt)


def as_cache(rng, shape, fmt, kv_len):
    """A float cache when fmt is a dtype, else a quantized one (both poisoned)."""
    if fmt in FORMATS:
        return quantized_cache(rng, shape, fmt, kv_len)
    return cache(rng, shape, fmt, kv_len)


EIGHT_BIT = ("q8_0", "q8_kv")


def rounds_p(v_fmt) -> bool:
    return isinstance(v_fmt, str) and v_fmt in EIGHT_BIT


def assert_rounded_p(got, want, out_dtype, visible, v_absmax, v_fmt, *, f32_tol=F32_TOL):
    """assert_attention for outputs over 8-bit V (module docstring): the LSE
    exactly as for float caches, the output up to rare one-step flips of P."""
    out, lse = got
    want_out, want_lse = want
    assert_attention((want_out, lse), want, out_dtype, visible, f32_tol=f32_tol)
    a = np.asarray(out).astype(np.float64)
    e = np.asarray(want_out).astype(np.float64)
    assert out.dtype == jnp.dtype(out_dtype) and np.isfinite(a).all()
    eps = float(jnp.finfo(out_dtype).eps)
    bad = np.abs(a - e) > f32_tol + (f32_tol + OUT_ULPS * eps) * np.abs(e)
    step = float(v_absmax) / 255
    # Output [B, Sq, H, Dv]: a flip shows in one (row, 32-column block), or in
    # the whole row over q8_kv; P holds one rounded weight per visible key and
    # block (per visible key over q8_kv).
    dv, heads = a.shape[-1], a.shape[2]
    width = dv if v_fmt == "q8_kv" else 32
    blocks = -(-dv // width)
    flipped = np.pad(bad, [(0, 0)] * 3 + [(0, blocks * width - dv)])
    flipped = flipped.reshape(a.shape[:3] + (blocks, width)).any(-1)
    weights = int(np.asarray(visible).sum()) * heads * blocks
    assert flipped.sum() <= 2 + 1e-3 * weights, (
        f"{int(flipped.sum())} flipped P blocks ({int(bad.sum())} of {a.size} elements outside "
        f"F32_TOL) for {weights} rounded weights"
    )
    worst = np.abs(a - e).max(initial=0.0)
    assert worst <= step + f32_tol + OUT_ULPS * eps * np.abs(e).max(initial=0.0), (
        f"max |out - reference| {worst:.3g} is more than one P step ({step:.3g})"
    )
    rel = np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30)
    assert rel <= 5e-4 + 2 * OUT_ULPS * eps, f"relative L2 error {rel:.3g}"
    empty = np.asarray(visible) == 0  # [B, Sq]: exactly 0 there
    assert (a[empty] == 0).all()


def float_view(x):
    return jax_mla.dequantize(x) if isinstance(x, quant.QuantizedKV) else x


def check_mla_quant(
    rng,
    fmt,
    *,
    batch,
    seq_q,
    heads,
    seq_kv,
    dk,
    dv,
    v_offset=0,
    q_dtype=jnp.float32,
    causal=False,
    q_pos=None,
    kv_len=None,
    num_splits=None,
    scale=None,
):
    q = randn(rng, (batch, seq_q, heads, dk), q_dtype)
    kv = quantized_cache(rng, (batch, seq_kv, dk), fmt, kv_len)
    kw = dict(dv=dv, v_offset=v_offset, causal=causal, q_pos=q_pos, kv_len=kv_len, scale=scale)
    got = native_mla(q, kv, num_splits=num_splits, **kw)
    want = reference.mla_quantized(q, kv, **kw)
    visible = visible_keys(q_pos, kv_len, batch, seq_q, seq_kv, causal)
    if rounds_p(fmt):
        v_absmax = np.nanmax(
            np.abs(np.asarray(jax_mla.dequantize(kv))[..., v_offset : v_offset + dv])
        )
        assert_rounded_p(got, want, q_dtype, visible, v_absmax, fmt)
    else:
        assert_attention(got, want, q_dtype, visible)


# (Dk, dv, v_offset): DeepSeek's latent row with V first, V as the row's tail
# (a block boundary), and a small row whose dv is not a whole number of blocks.
MLA_LAYOUTS = [(576, 512, 0), (576, 512, 64), (96, 48, 32)]


@pytest.mark.parametrize(
    "dk, dv, v_offset", MLA_LAYOUTS, ids=[f"{a}-dv{b}-off{c}" for a, b, c in MLA_LAYOUTS]
)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("heads", [16, 2], ids=["tile", "gemv"])
def test_mla_over_quantized_cache(rng, cpu, fmt, heads, dk, dv, v_offset):
    # 16 heads take the tile (GEMM) kernel, 2 the few-rows (GEMV) kernel.
    check_mla_quant(
        rng,
        fmt,
        batch=2,
        seq_q=2,
        heads=heads,
        seq_kv=KV_TILE + 13,
        dk=dk,
        dv=dv,
        v_offset=v_offset,
        causal=True,
        kv_len=[KV_TILE + 13, 30],
        num_splits=3,
    )


@pytest.mark.parametrize("num_splits", [None, 1, 4])
@pytest.mark.parametrize("fmt", FORMATS)
def test_mla_decode_splits_and_empty_rows(rng, cpu, fmt, num_splits):
    check_mla_quant(
        rng,
        fmt,
        batch=3,
        seq_q=1,
        heads=16,
        seq_kv=300,
        dk=576,
        dv=512,
        q_dtype=jnp.bfloat16,
        kv_len=[300, 0, 150],
        num_splits=num_splits,
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_mla_prefill_with_positions(rng, cpu, fmt):
    # Queries partly before position 0 (they see nothing) and past kv_len.
    check_mla_quant(
        rng,
        fmt,
        batch=2,
        seq_q=5,
        heads=4,
        seq_kv=77,
        dk=576,
        dv=512,
        causal=True,
        q_pos=[-2, 70],
        kv_len=[3, 77],
    )


# (k format, v format): each format with itself, float with quantized both
# ways, and two different formats.
ATTN_FORMATS = [
    ("q8_0", "q8_0"),
    ("q8_kv", "q8_kv"),
    ("q6_0", "q6_0"),
    (jnp.float16, "q8_0"),
    ("q6_0", jnp.bfloat16),
    ("q8_0", "q6_0"),
    ("q8_kv", "q8_0"),
    ("fp8_e4m3", "fp8_e4m3"),
    (jnp.bfloat16, "fp8_e4m3"),
    ("fp8_e4m3", "q8_0"),
]


def fmt_id(f) -> str:
    return f if isinstance(f, str) else jnp.dtype(f).name


@pytest.mark.parametrize(
    "k_fmt, v_fmt", ATTN_FORMATS, ids=[f"{fmt_id(a)}-{fmt_id(b)}" for a, b in ATTN_FORMATS]
)
@pytest.mark.parametrize(
    "case",
    [
        # (B, Sq, Hq, Hkv, Skv, causal, q_pos, kv_len): GQA decode with few rows
        # per KV head (several KV heads per work item), MHA decode, and a causal
        # prefill chunk with per-batch lengths.
        (2, 1, 8, 4, 300, False, None, [300, 111]),
        (1, 1, 4, 4, KV_TILE + 1, False, None, None),
        (2, 7, 16, 2, 77, True, None, [77, 9]),
    ],
    ids=["gqa_decode", "mha_decode", "prefill"],
)
def test_attention_over_quantized_caches(rng, cpu, k_fmt, v_fmt, case):
    check_attention_quant(rng, k_fmt, v_fmt, *case)


def check_attention_quant(
    rng,
    k_fmt,
    v_fmt,
    batch,
    seq_q,
    heads_q,
    heads_kv,
    seq_kv,
    causal,
    q_pos,
    kv_len,
    dk=192,
    dv=128,
):
    q = randn(rng, (batch, seq_q, heads_q, dk), jnp.float32)
    k = as_cache(rng, (batch, seq_kv, heads_kv, dk), k_fmt, kv_len)
    v = as_cache(rng, (batch, seq_kv, heads_kv, dv), v_fmt, kv_len)
    kw = dict(causal=causal, q_pos=q_pos, kv_len=kv_len)
    got = native_attention(q, k, v, **kw)
    want = reference.attention_quantized(q, k, v, **kw)
    visible = visible_keys(q_pos, kv_len, batch, seq_q, seq_kv, causal)
    if rounds_p(v_fmt):
        assert_rounded_p(got, want, jnp.float32, visible, np.nanmax(np.abs(float_view(v))), v_fmt)
    else:
        assert_attention(got, want, jnp.float32, visible)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_results_are_close_to_the_float_cache(rng, cpu, fmt):
    # End to end: attention over the quantized cache against float64 attention
    # over the float values it was made from. The bound is loose on purpose
    # (it measures the format, not the kernel): 8-bit integer rows keep outputs
    # within about 1e-2 of the float result, 6-bit rows and fp8_e4m3's 3-bit
    # mantissas (2.3e-2 here) within about 4e-2.
    q = randn(rng, (1, 1, 16, 576), jnp.float32) * 0.5
    x = randn(rng, (1, 500, 576), jnp.float32)
    out = np.asarray(jax_mla.flash_mla(q, jax_mla.quantize(x, fmt), backend="native"))
    qn, xn = np.asarray(q, np.float64)[0, 0], np.asarray(x, np.float64)[0]
    s = qn @ xn.T / np.sqrt(576)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    want = (p / p.sum(axis=-1, keepdims=True)) @ xn[:, :512]
    err = np.abs(out[0, 0] - want).max() / np.abs(want).max()
    assert err < (1e-2 if fmt in EIGHT_BIT else 4e-2), f"{fmt}: relative error {err:.3g}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_vmap_shares_the_quantized_cache(rng, cpu, fmt):
    # vmap over queries (and lengths) with one shared cache, and over
    # per-example caches: the same as separate calls.
    q = randn(rng, (3, 2, 1, 8, 64), jnp.float32)
    kv = quantized_cache(rng, (2, 100, 64), fmt)
    kv_len = jnp.array([[100, 50], [10, 1], [0, 64]], jnp.int32)
    op = lambda q, kv, n: jax_mla.flash_mla(q, kv, dv=32, kv_len=n, backend="native")
    got = jax.vmap(op, in_axes=(0, None, 0))(q, kv, kv_len)
    for i in range(3):
        np.testing.assert_allclose(got[i], op(q[i], kv, kv_len[i]), rtol=1e-6, atol=1e-6)
    kvs = jax.tree.map(lambda a: jnp.stack([a, a[::-1], a]), kv)
    got = jax.vmap(op)(q, kvs, kv_len)
    for i in range(3):
        one = jax.tree.map(lambda a: a[i], kvs)
        np.testing.assert_allclose(got[i], op(q[i], one, kv_len[i]), rtol=1e-6, atol=1e-6)
    k = quantized_cache(rng, (2, 100, 2, 64), fmt)
    v = randn(rng, (2, 100, 2, 32), jnp.float16)
    att = lambda q, k, v: jax_mla.flash_attention(q, k, v, backend="native")
    got = jax.vmap(att, in_axes=(0, None, None))(q, k, v)
    for i in range(3):
        np.testing.assert_allclose(got[i], att(q[i], k, v), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_dequantized_copy_of_the_cache(cpu, fmt):
    # The kernel reads qs and d in place: the executable's scratch stays far
    # below even the quantized cache's size (a float32 dequantized copy would
    # be 4x to 5x it), under jit and under vmap over queries.
    q = jnp.ones((2, 1, 1, 16, 576), jnp.float32)
    kv = jax_mla.quantize(jnp.ones((1, 4096, 576), jnp.float32), fmt)
    op = lambda q, kv: jax_mla.flash_mla(q, kv, num_splits=4, backend="native")
    for fn, arg in ((jax.jit(op), q[0]), (jax.jit(jax.vmap(op, in_axes=(0, None))), q)):
        lowered = fn.lower(arg, kv)
        temp = lowered.compile().memory_analysis().temp_size_in_bytes
        # (The split partials are most of it.)
        assert temp < kv.qs.nbytes // 4, f"{temp} bytes of scratch for a {kv.qs.nbytes}-byte cache"
        # Equal scores and V rows of one value: every output is that value.
        value = float(jax_mla.dequantize(kv)[0, 0, 0])
        np.testing.assert_allclose(np.asarray(fn(arg, kv)), value, rtol=1e-6)


@pytest.mark.parametrize("fmt", ["q8_0", "q6_0"])
@pytest.mark.parametrize("v_offset", [16, 40])
def test_v_offset_must_fall_on_a_block_boundary(fmt, v_offset):
    q = jnp.ones((1, 1, 4, 128), jnp.float32)
    kv = jax_mla.quantize(jnp.ones((1, 8, 128), jnp.float32), fmt)
    with pytest.raises(
        ValueError,
        match=rf"v_offset must fall on a block boundary .*{fmt}.*"
        rf"got {v_offset}",
    ):
        jax_mla.flash_mla(q, kv, dv=48, v_offset=v_offset, backend="native")


def test_v_offset_is_free_in_q8_kv(rng, cpu):
    check_mla_quant(rng, "q8_kv", batch=1, seq_q=1, heads=16, seq_kv=40, dk=96, dv=48, v_offset=16)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (
            lambda kv: quant.QuantizedKV(kv.qs, kv.d, "q4_0"),
            ValueError,
            r"flash_mla: kv has format 'q4_0'; expected one of q8_0, q8_kv, q6_0, fp8_e4m3",
        ),
        (
            lambda kv: quant.QuantizedKV(kv.qs.astype(jnp.int16), kv.d, "q8_0"),
            TypeError,
            r"kv.qs of a q8_0 cache must be int8, got int16",
        ),
        (
            lambda kv: quant.QuantizedKV(kv.qs, kv.d.astype(jnp.float32), "q8_0"),
            TypeError,
            r"kv.d of a q8_0 cache must be float16, got float32",
        ),
        (
            lambda kv: quant.QuantizedKV(kv.qs, kv.d[..., :1], "q8_0"),
            ValueError,
            r"kv.d must have shape \(1, 8, 4\) for qs of shape \(1, 8, 128\), got \(1, 8, 1\)",
        ),
        (
            lambda kv: quant.QuantizedKV(kv.qs[..., :100], kv.d, "q8_0"),
            ValueError,
            r"last axis must be a multiple of 32",
        ),
        (
            lambda kv: quant.QuantizedKV(kv.qs[0], kv.d[0], "q8_0"),
            ValueError,
            r"kv must have rank 3 \[B, Skv, Dk\], got a q8_0 cache of shape \(8, 128\)",
        ),
    ],
)
def test_malformed_quantized_cache(make, error, match):
    q = jnp.ones((1, 1, 4, 128), jnp.float32)
    kv = make(jax_mla.quantize(jnp.ones((1, 8, 128), jnp.float32), "q8_0"))
    with pytest.raises(error, match=match):
        jax_mla.flash_mla(q, kv, dv=64, backend="native")


def test_attention_rejects_mismatched_quantized_caches():
    q = jnp.ones((1, 1, 4, 64), jnp.float32)
    k = jax_mla.quantize(jnp.ones((1, 8, 2, 64), jnp.float32), "q8_0")
    v = jax_mla.quantize(jnp.ones((1, 9, 2, 64), jnp.float32), "q6_0")
    with pytest.raises(
        ValueError,
        match=r"v must have Skv = 8 and Hkv = 2 like k, got v "
        r"\(1, 9, 2, 64\)",
    ):
        jax_mla.flash_attention(q, k, v, backend="native")


# The C++ handlers check the quantized operands again (called directly here,
# bypassing the Python checks): a runtime error naming the problem, no crash.
def mla_quant_ffi(q, qs, d, fmt_code, *, dv=64, v_offset=0):
    batch, seq_q, heads = q.shape[:3]
    out_types = (
        jax.ShapeDtypeStruct((batch, seq_q, heads, dv), q.dtype),
        jax.ShapeDtypeStruct((batch, heads, seq_q), jnp.float32),
        jax.ShapeDtypeStruct((0,), jnp.float32),
        jax.ShapeDtypeStruct((0,), jnp.float32),
    )
    call = jax.ffi.ffi_call("jax_mla_flash_mla_quant", out_types, vmap_method="sequential")
    return jax.block_until_ready(
        call(
            q,
            qs,
            d,
            np.zeros((batch,), np.int32),
            np.full((batch,), qs.shape[1], np.int32),
            scale=np.float32(0.1),
            causal=np.bool_(False),
            dv=np.int64(dv),
            v_offset=np.int64(v_offset),
            num_splits=np.int64(1),
            kv_fmt=np.int64(fmt_code),
        )
    )


@pytest.mark.parametrize(
    "args, match",
    [
        (dict(fmt_code=7), r"unknown cache format code 7"),
        (dict(fmt_code=0), r"needs a quantized format"),
        (dict(fmt="q8_0", v_offset=16), r"v_offset 16 must fall on a block boundary .* q8_0"),
        (dict(fmt="q6_0"), r"kv.qs of a q6_0 cache must be uint8"),
        (dict(fmt="fp8_e4m3"), r"kv.qs of a fp8_e4m3 cache must be float8_e4m3fn"),
        (
            dict(fmt="fp8_e4m3", qs=np.ones((1, 8, 128), jnp.float8_e4m3fn)),
            r"kv.d of a fp8_e4m3 cache must be float32 with the shape of qs but a last "
            r"axis of 1, got \[1, 8, 4\]",
        ),
        (
            dict(fmt="q8_kv"),
            r"kv.d of a q8_kv cache must be float32 with the shape of qs but a last "
            r"axis of 1, got \[1, 8, 4\]",
        ),
        (dict(fmt="q8_0", d=np.ones((1, 8, 3), np.float16)), r"last axis of 4, got \[1, 8, 3\]"),
        (dict(fmt="q8_0", qs=np.ones((1, 8, 100), np.int8)), r"multiple of 32, got 100"),
    ],
)
def test_cpp_checks_quantized_operands(cpu, args, match):
    args = dict(args)
    if "fmt" in args:  # a format's code, as the module's table gives it
        args["fmt_code"] = _capabilities.cpu()["formats"][args.pop("fmt")]
    q = np.ones((1, 1, 4, 128 if "qs" not in args else 100), np.float32)
    qs = args.pop("qs", np.ones((1, 8, 128), np.int8))
    d = args.pop("d", np.ones((1, 8, 4), np.float16))
    with pytest.raises(Exception, match=match):
        mla_quant_ffi(q, qs, d, **args)


# --- The rounded P over 8-bit V (quant_format.h, reference.attention_quantized)


def numpy_rounded_p_mla(q, kv, dv, v_offset):
    """float64 numpy MLA decode (no positions) with P rounded as the contract
    says, from the int8 values and scales directly (not through reference.py)."""
    fmt = kv.fmt
    qs = np.asarray(kv.qs, np.float64)[0]  # [Skv, Dk]
    d = np.asarray(kv.d, np.float64)[0]  # [Skv, Dk / 32 or 1]
    k = np.asarray(jax_mla.dequantize(kv), np.float64)[0]
    x = np.asarray(q, np.float64)[0, 0] / np.sqrt(q.shape[-1])  # [H, Dk]
    blocks = x.reshape(x.shape[0], -1, 32)
    qd = np.abs(blocks).max(-1, keepdims=True) / 127
    qr = qd * np.sign(blocks) * np.floor(np.abs(blocks / np.where(qd > 0, qd, 1)) + 0.5)
    s = qr.reshape(x.shape) @ k.T  # [H, Skv]
    p = np.exp(s - s.max(-1, keepdims=True))
    vq = qs[:, v_offset : v_offset + dv]
    nbv = -(-dv // 32)
    vd = d[:, :1].repeat(nbv, 1) if fmt == "q8_kv" else d[:, v_offset // 32 : v_offset // 32 + nbv]
    out = np.zeros((x.shape[0], dv))
    for g0 in range(0, len(p[0]), 64):
        for j in range(nbv):
            xs = p[:, g0 : g0 + 64] * vd[None, g0 : g0 + 64, j]  # [H, n]
            dd = xs.max(-1, keepdims=True) / 255
            pq = np.round(xs / dd)
            out[:, 32 * j : 32 * j + 32] += dd * (pq @ vq[g0 : g0 + 64, 32 * j : 32 * j + 32])
    return out / p.sum(-1, keepdims=True)


@pytest.mark.parametrize("fmt", EIGHT_BIT)
def test_rounded_p_reference_against_float64_numpy(rng, fmt):
    # reference.mla_quantized against a float64 numpy statement of the rule,
    # and the native kernel against both; P left unrounded is far away.
    q = randn(rng, (1, 1, 16, 128), jnp.float32)
    kv = quantized_cache(rng, (1, 200, 128), fmt)
    want = numpy_rounded_p_mla(q, kv, dv=64, v_offset=64)
    ref = np.asarray(reference.mla_quantized(q, kv, dv=64, v_offset=64)[0], np.float64)[0, 0]
    got = np.asarray(
        jax_mla.flash_mla(q, kv, dv=64, v_offset=64, backend="native")
        if jax_mla.backends().get("cpu")
        else ref,
        np.float64,
    )
    unrounded = np.asarray(
        reference.mla_quantized(q, kv, dv=64, v_offset=64, round_p=False)[0], np.float64
    )[0, 0]
    rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
    assert rel(ref, want) < 1e-4, rel(ref, want)
    assert rel(unrounded, want) > 1e-3, rel(unrounded, want)
    np.testing.assert_allclose(got.reshape(want.shape), want, atol=np.abs(want).max() / 255 + 1e-5)


@pytest.mark.parametrize("fmt", EIGHT_BIT)
@pytest.mark.parametrize("heads", [16, 2], ids=["tile", "gemv"])
def test_rounded_p_with_peaked_scores(rng, cpu, fmt, heads):
    # A large scale: most weights underflow or fall below 2^-64 of the
    # running max (those groups round to 0), a few keys dominate.
    check_mla_quant(
        rng,
        fmt,
        batch=2,
        seq_q=1,
        heads=heads,
        seq_kv=3 * KV_TILE + 5,
        dk=192,
        dv=128,
        kv_len=[3 * KV_TILE + 5, KV_TILE],
        num_splits=2,
        scale=2.0,
    )


@pytest.mark.parametrize("v_fmt", ["q8_0", "q8_kv", jnp.float16, jnp.bfloat16])
def test_float_v_is_not_rounded(rng, cpu, v_fmt):
    # Over 8-bit K with float V only the query is rounded: the reference
    # without P rounding matches to F32_TOL; with 8-bit V it does not.
    q = randn(rng, (1, 4, 16, 64), jnp.float32)
    k = quantized_cache(rng, (1, 150, 1, 64), "q8_0")
    v = as_cache(rng, (1, 150, 1, 64), v_fmt, None)
    got = native_attention(q, k, v)
    unrounded = reference.attention_quantized(q, k, v, round_p=False)
    visible = visible_keys(None, None, 1, 4, 150, False)
    if rounds_p(v_fmt):
        with pytest.raises(AssertionError):
            assert_attention(got, unrounded, jnp.float32, visible)
    else:
        assert_attention(got, unrounded, jnp.float32, visible)
