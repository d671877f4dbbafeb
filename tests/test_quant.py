"""Quantized cache formats: bit-exactness against the reference quantizers
(gguf's Q8_0, a transcription of ik_llama.cpp's quantize_row_q6_0_ref, and
fp8_e4m3's rounding from the e4m3 format's definition), round-trip error
bounds, pytree behaviour, cache updates and byte counts."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mla
from jax_mla import quant

INTEGER_FORMATS = ("q8_0", "q8_kv", "q6_0")


def varied(rng, shape):
    """Random rows at very different magnitudes, with an all-zero block."""
    x = rng.standard_normal(shape).astype(np.float32)
    x *= np.float32(10.0) ** rng.integers(-4, 4, size=shape[:-1] + (1,)).astype(np.float32)
    x.reshape(-1, shape[-1])[0, :32] = 0
    return x


def q6_0_ik(x: np.ndarray):
    """ik_llama.cpp's quantize_row_q6_0_ref, element by element, in float32."""
    blocks = x.reshape(-1, 32)
    d_out = np.zeros(len(blocks), np.float16)
    qs_out = np.zeros((len(blocks), 24), np.uint8)
    for i, blk in enumerate(blocks):
        amax, mx = np.float32(0), np.float32(0)
        for v in blk:
            if amax < abs(v):
                amax, mx = abs(v), v
        d = np.float32(mx / np.float32(-32))
        inv = np.float32(1) / d if d else np.float32(0)
        d_out[i] = np.float16(d)
        for j in range(16):
            x0 = np.float32(blk[j] * inv)
            x1 = np.float32(blk[j + 16] * inv)
            xi0 = min(63, int(np.float32(x0 + np.float32(32.5))))  # (int8_t) truncates
            xi1 = min(63, int(np.float32(x1 + np.float32(32.5))))
            qs_out[i, j] = (xi0 & 0xF) | ((xi1 & 0xF) << 4)
            h = (xi0 >> 4) | ((xi1 >> 4) << 2)
            qs_out[i, 16 + j % 8] |= h << (4 * (j // 8))
    return qs_out, d_out


def test_q8_0_matches_ggml_bit_for_bit(rng):
    gguf = pytest.importorskip("gguf")
    from gguf import quants

    x = varied(rng, (5, 7, 128))
    q = jax_mla.quantize(jnp.asarray(x), "q8_0")
    ref = quants.quantize(x.reshape(-1, 128), gguf.GGMLQuantizationType.Q8_0).reshape(-1, 34)
    np.testing.assert_array_equal(
        np.asarray(q.d).reshape(-1).view(np.uint8).reshape(-1, 2), ref[:, :2]
    )
    np.testing.assert_array_equal(np.asarray(q.qs).reshape(-1, 32).view(np.uint8), ref[:, 2:])


def test_q6_0_matches_ik_llama_cpp_bit_for_bit(rng):
    x = varied(rng, (3, 96))
    x[1, 32:64] = -x[1, 32:64]  # negative largest values too
    q = jax_mla.quantize(jnp.asarray(x), "q6_0")
    qs, d = q6_0_ik(x)
    np.testing.assert_array_equal(np.asarray(q.qs).reshape(-1, 24), qs)
    np.testing.assert_array_equal(np.asarray(q.d).reshape(-1), d)


@pytest.mark.parametrize("fmt", INTEGER_FORMATS)
def test_round_trip_error_is_within_half_a_step(rng, fmt):
    # q is chosen with the float32 scale d32 (half a step from x at most; q6_0
    # clamps q = 64 to 63 at its positive extreme, a full step there), then
    # stored with a float16 scale for the block formats: |x - d16 q| <=
    # slack * d32 + |q|max * |d16 - d32|.
    x = varied(rng, (4, 3, 64))
    q = jax_mla.quantize(jnp.asarray(x), fmt)
    y = np.asarray(jax_mla.dequantize(q, jnp.float32), np.float64)
    group = 64 if fmt == "q8_kv" else 32
    xb = x.reshape(x.shape[:-1] + (-1, group)).astype(np.float64)
    amax = np.abs(xb).max(axis=-1)
    d32 = amax / (32 if fmt == "q6_0" else 127)
    d_stored = np.abs(np.asarray(q.d, np.float64))
    slack, qmax = (1.0, 32) if fmt == "q6_0" else (0.5, 127)
    bound = slack * d32 + qmax * np.abs(d_stored - d32) + 1e-30
    err = np.abs(y - x).reshape(xb.shape)
    assert np.all(err <= bound[..., None] * (1 + 1e-6)), np.max(err / bound[..., None])
    # And the bound is tight enough to mean something: half a step of a
    # 127-level (or 32-level) grid.
    if fmt != "q6_0":
        assert np.max(err / np.maximum(amax, 1e-30)[..., None]) < 1 / 127


def e4m3_values() -> np.ndarray:
    """The 256 e4m3fn bytes' values in float64, from the format's definition:
    sign, 4 exponent bits (bias 7), 3 mantissa bits; subnormals at exponent 0;
    NaN at 0x7F and 0xFF (no infinities)."""
    b = np.arange(256)
    e, m = (b >> 3) & 0xF, b & 7
    mag = np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * 2.0 ** (e - 7))
    mag = np.where((b & 0x7F) == 0x7F, np.nan, mag)
    return np.where(b & 0x80, -mag, mag)


def test_fp8_e4m3_byte_values():
    got = np.arange(256, dtype=np.uint8).view(jnp.float8_e4m3fn).astype(np.float64)
    np.testing.assert_array_equal(got, e4m3_values())


def test_fp8_e4m3_rounds_to_nearest_with_a_row_scale(rng):
    # d = max|row| / 448 in float32; each value is the e4m3 value nearest to
    # x / d (float32), ties to even, found here by search over all 254 finite
    # values in float64; the row's largest magnitude maps to +-448 exactly.
    x = varied(rng, (6, 3, 80))
    x[0, 0] = 0.0
    x[1, 1, :40] *= 1e-6  # small values fall on e4m3's subnormals
    q = jax_mla.quantize(jnp.asarray(x), "fp8_e4m3")
    # (XLA may divide by 448 as a multiplication by its reciprocal: an ulp.)
    d = np.asarray(q.d)
    assert d.dtype == np.float32
    np.testing.assert_array_max_ulp(d, np.abs(x).max(-1, keepdims=True) / np.float32(448), 1)
    y = np.clip(x / np.where(d == 0, 1, d), -448, 448).astype(np.float64)
    grid = e4m3_values()
    finite = np.isfinite(grid)
    dist = np.abs(y[..., None] - grid[finite])
    best = dist.min(-1, keepdims=True)
    ties = dist == best
    codes = np.arange(256)[finite]
    # Among equally near values, the one with an even mantissa.
    even = ties & (codes % 2 == 0)
    pick = np.where(even.any(-1, keepdims=True), even, ties).argmax(-1)
    want = grid[finite][pick]
    got = np.asarray(q.qs).astype(np.float64)
    np.testing.assert_array_equal(got, np.where(y == 0, 0.0, want))
    assert np.all(np.abs(got).max(-1)[np.abs(x).max(-1) > 0] == 448)
    # dequantize is d * q in float32.
    np.testing.assert_array_equal(
        np.asarray(jax_mla.dequantize(q)), (got.astype(np.float32) * d).astype(np.float32)
    )


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_all_zero_rows_stay_zero(fmt):
    q = jax_mla.quantize(jnp.zeros((2, 64), jnp.float32), fmt)
    assert not np.any(np.asarray(q.d))
    np.testing.assert_array_equal(np.asarray(jax_mla.dequantize(q)), 0.0)


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_shapes_and_dtypes(fmt):
    q = jax_mla.quantize(jnp.ones((2, 5, 576), jnp.bfloat16), fmt)
    assert q.shape == (2, 5, 576) and q.fmt == fmt
    qs_shape, qs_dtype, d_shape, d_dtype = {
        "q8_0": ((2, 5, 576), jnp.int8, (2, 5, 18), jnp.float16),
        "q8_kv": ((2, 5, 576), jnp.int8, (2, 5, 1), jnp.float32),
        "q6_0": ((2, 5, 432), jnp.uint8, (2, 5, 18), jnp.float16),
        "fp8_e4m3": ((2, 5, 576), jnp.float8_e4m3fn, (2, 5, 1), jnp.float32),
    }[fmt]
    assert (q.qs.shape, q.qs.dtype, q.d.shape, q.d.dtype) == (qs_shape, qs_dtype, d_shape, d_dtype)
    assert jax_mla.dequantize(q, jnp.bfloat16).dtype == jnp.bfloat16


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_pytree_through_jit_vmap_and_scan(rng, fmt):
    x = jnp.asarray(varied(rng, (3, 4, 64)))
    eager = jax_mla.dequantize(jax_mla.quantize(x, fmt))
    jitted = jax.jit(lambda x: jax_mla.quantize(x, fmt))(x)
    assert isinstance(jitted, quant.QuantizedKV)
    np.testing.assert_array_equal(np.asarray(jax_mla.dequantize(jitted)), np.asarray(eager))
    mapped = jax.vmap(lambda x: jax_mla.quantize(x, fmt))(x)
    np.testing.assert_array_equal(np.asarray(jax_mla.dequantize(mapped)), np.asarray(eager))

    def step(carry, row):
        return carry, jax_mla.quantize(row, fmt)

    _, scanned = jax.lax.scan(step, 0, x)
    np.testing.assert_array_equal(np.asarray(jax_mla.dequantize(scanned)), np.asarray(eager))


@pytest.mark.parametrize("fmt", [jnp.float16, *quant.FORMATS])
def test_cache_update_under_jit_with_donation(rng, fmt):
    B, SMAX, D = 2, 10, 64
    rows = jnp.asarray(varied(rng, (B, 3, D)))
    start = jnp.zeros((B, SMAX, D), jnp.float32)
    cache = start.astype(fmt) if not isinstance(fmt, str) else jax_mla.quantize(start, fmt)
    positions = jnp.array([[0, 4, 9], [2, 3, 5]], jnp.int32)
    update = jax.jit(jax_mla.cache_update, donate_argnums=0)
    new = update(cache, rows, positions)
    got = np.asarray(
        new.astype(jnp.float32) if not isinstance(fmt, str) else jax_mla.dequantize(new)
    )
    want = np.zeros((B, SMAX, D), np.float32)
    stored = (
        rows.astype(fmt).astype(jnp.float32)
        if not isinstance(fmt, str)
        else jax_mla.dequantize(jax_mla.quantize(rows, fmt))
    )
    for b in range(B):
        want[b, np.asarray(positions[b])] = np.asarray(stored[b])
    np.testing.assert_array_equal(got, want)


def test_cache_update_drops_traced_out_of_range_positions(rng):
    cache = jax_mla.quantize(jnp.zeros((1, 4, 32), jnp.float32), "q8_0")
    rows = jnp.asarray(varied(rng, (1, 3, 32))) + 1.0
    positions = jnp.array([[-1, 4, 2]], jnp.int32)  # only position 2 exists
    new = jax.jit(jax_mla.cache_update)(cache, rows, positions)
    got = np.asarray(jax_mla.dequantize(new))
    np.testing.assert_array_equal(got[0, [0, 1, 3]], 0.0)  # -1 did not wrap to 3
    np.testing.assert_array_equal(
        got[0, 2], np.asarray(jax_mla.dequantize(jax_mla.quantize(rows[0, 2], "q8_0")))
    )


def test_cache_bytes():
    shape = (1, 16384, 576)  # one latent row per token, DeepSeek MLA
    n = 16384 * 576
    assert jax_mla.cache_bytes(jnp.float16, shape) == 2 * n
    assert jax_mla.cache_bytes("bfloat16", shape) == 2 * n
    assert jax_mla.cache_bytes("q8_0", shape) == n + n // 32 * 2  # 34 bytes per 32 values
    assert jax_mla.cache_bytes("q6_0", shape) == n * 3 // 4 + n // 32 * 2  # 26 per 32
    assert jax_mla.cache_bytes("q8_kv", shape) == n + 16384 * 4
    assert jax_mla.cache_bytes("fp8_e4m3", shape) == n + 16384 * 4  # 580 a token
    for name, size in (("f32", 4), ("f16", 2), ("bf16", 2), ("float32", 4), (jnp.bfloat16, 2)):
        assert jax_mla.cache_bytes(name, shape) == size * n, name
    q = jax_mla.quantize(jnp.zeros((2, 8, 64)), "q6_0")
    assert jax_mla.cache_bytes("q6_0", q.shape) == q.qs.nbytes + q.d.nbytes


@pytest.mark.parametrize("fmt", ["f64", "float64", np.float64, "f8", "q4_0", np.int8, None])
def test_cache_bytes_refuses_what_no_cache_holds(fmt):
    # numpy alone reads "f16" as float128 and "f8" as float64: never a silent size.
    with pytest.raises(
        ValueError,
        match=re.escape(
            "cache_bytes: fmt must be a float dtype (f32, "
            "f16, bf16 or that numpy dtype) or one of "
            f"q8_0, q8_kv, q6_0, fp8_e4m3, got {fmt!r}"
        ),
    ):
        jax_mla.cache_bytes(fmt, (1, 4, 64))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: jax_mla.quantize(jnp.ones((2, 64)), "q4_0"), ValueError, "fmt must be one of"),
        (
            lambda: jax_mla.quantize(jnp.ones((2, 48)), "q8_0"),
            ValueError,
            r"q8_0: the last axis must be a multiple of 32, got shape \(2, 48\)",
        ),
        (lambda: jax_mla.quantize(jnp.ones((2, 48)), "q6_0"), ValueError, "multiple of 32"),
        (
            lambda: jax_mla.quantize(jnp.ones((2, 64), jnp.int32), "q8_0"),
            TypeError,
            "x must have a float dtype, got int32",
        ),
        (lambda: jax_mla.dequantize(jnp.ones((2, 64))), TypeError, "must be a QuantizedKV"),
        (lambda: jax_mla.cache_bytes("q5", (2, 64)), ValueError, "fmt must be a float dtype"),
        (lambda: jax_mla.cache_bytes(jnp.int8, (2, 64)), ValueError, "fmt must be a float dtype"),
        (
            lambda: jax_mla.cache_update(
                jnp.zeros((1, 4, 32)), jnp.ones((1, 2, 16)), jnp.zeros((1, 2), jnp.int32)
            ),
            ValueError,
            r"rows must have shape \(1, S, 32\)",
        ),
        (
            lambda: jax_mla.cache_update(
                jnp.zeros((1, 4, 32)), jnp.ones((1, 2, 32)), jnp.array([[0, 4]], jnp.int32)
            ),
            ValueError,
            r"positions must lie in \[0, 4\), got 4",
        ),
        (
            lambda: jax_mla.cache_update(
                jnp.zeros((1, 4, 32)), jnp.ones((1, 2, 32)), jnp.zeros((1, 3), jnp.int32)
            ),
            ValueError,
            r"positions must have shape \(1, 2\), got \(1, 3\)",
        ),
        (
            lambda: jax_mla.cache_update(
                jnp.zeros((1, 4, 32)), jnp.ones((1, 2, 32)), jnp.zeros((1, 2), jnp.float32)
            ),
            TypeError,
            "positions must be an integer array",
        ),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
