"""Quantized KV caches: the QuantizedKV pytree, quantize / dequantize, and the
cache helpers cache_update and cache_bytes.

Formats (quantization along the last axis, docs/formats.md):
  q8_0   blocks of 32: qs int8 [..., D], d float16 [..., D/32]; x ~ d * q.
         ggml's Q8_0 bit for bit: d = max|x| / 127, q = roundf(x * (1/d)).
  q8_kv  one scale per row: qs int8 [..., D], d float32 [..., 1]; x ~ d * q,
         d = max|row| / 127, q = roundf(x / d).
  q6_0   blocks of 32: qs uint8 [..., D*3/4] (24 bytes a block), d float16
         [..., D/32]; x ~ d * (q - 32), q in [0, 63], ik_llama.cpp's Q6_0:
         d = m / -32 with m the signed value of largest magnitude,
         q = min(63, floor(x * (1/d) + 32.5)).
         Block byte layout (as ik_llama.cpp's): bytes 0..15 hold the low
         nibbles, value j in the low half of byte j and value j + 16 in the
         high half; bytes 16..23 hold the high 2 bits, value j's (j < 16) in
         bits 4*(j // 8) .. +1 of byte 16 + j % 8 and value j + 16's in the two
         bits above them.
  fp8_e4m3  one scale per row: qs float8_e4m3fn [..., D], d float32 [..., 1];
         x ~ d * q, d = max|row| / 448, q = e4m3(x / d) rounded to nearest
         even (|x / d| clamped to 448, e4m3fn's largest finite value).
roundf rounds half away from zero (jnp.round rounds half to even: not it).
All arithmetic is float32, as the C reference quantizers do theirs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

__all__ = ["QuantizedKV", "quantize", "dequantize", "cache_update", "cache_bytes", "FORMATS"]

FORMATS = ("q8_0", "q8_kv", "q6_0", "fp8_e4m3")
# The short names the benchmark and the docs use. numpy reads "f16" as a
# 16-byte float (float128), so they are mapped before numpy sees them.
FLOAT_NAMES = {"f32": jnp.float32, "f16": jnp.float16, "bf16": jnp.bfloat16}
CACHE_FLOAT_DTYPES = tuple(jnp.dtype(d) for d in FLOAT_NAMES.values())
BLOCK = 32  # values per block of q8_0 and q6_0
BLOCK_FORMATS = ("q8_0", "q6_0")
ROW_SCALED = ("q8_kv", "fp8_e4m3")  # one float32 scale per row
FP8_MAX = 448.0  # e4m3fn's largest finite value
_QS_DTYPES = {"q8_0": jnp.int8, "q8_kv": jnp.int8, "q6_0": jnp.uint8, "fp8_e4m3": jnp.float8_e4m3fn}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKV:
    """A quantized tensor: leaves `qs` (the values) and `d` (the scales), and the
    static format name `fmt`. The logical shape comes from the leaves, so the
    pytree survives jit, vmap, lax.scan and buffer donation."""

    qs: jax.Array
    d: jax.Array
    fmt: str = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        last = self.qs.shape[-1] * 4 // 3 if self.fmt == "q6_0" else self.qs.shape[-1]
        return tuple(self.qs.shape[:-1]) + (last,)

    @property
    def ndim(self) -> int:
        return self.qs.ndim


def _check_format(fmt) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return fmt


def _check_float(name: str, x) -> None:
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a float dtype, got {jnp.dtype(x.dtype)}")


def _check_last_axis(fmt: str, shape) -> None:
    if len(shape) == 0:
        raise ValueError(f"{fmt}: x must have at least one axis, got a scalar")
    if fmt in BLOCK_FORMATS and shape[-1] % BLOCK:
        raise ValueError(
            f"{fmt}: the last axis must be a multiple of {BLOCK}, got shape {tuple(shape)}"
        )


def check_quantized(op: str, name: str, x: QuantizedKV) -> None:
    """Checks that a QuantizedKV's leaves agree with its format (a cache built
    by hand, or whose leaves were sliced apart, may not)."""
    where = f"{op}: {name}"
    if x.fmt not in FORMATS:
        raise ValueError(f"{where} has format {x.fmt!r}; expected one of {', '.join(FORMATS)}")
    for leaf in ("qs", "d"):
        if not hasattr(getattr(x, leaf), "shape"):
            raise TypeError(
                f"{where}.{leaf} must be an array, got {type(getattr(x, leaf)).__name__}"
            )
    qs_dtype = jnp.dtype(_QS_DTYPES[x.fmt])
    d_dtype = jnp.dtype(jnp.float32 if x.fmt in ROW_SCALED else jnp.float16)
    if jnp.dtype(x.qs.dtype) != qs_dtype:
        raise TypeError(
            f"{where}.qs of a {x.fmt} cache must be {qs_dtype}, got {jnp.dtype(x.qs.dtype)}"
        )
    if jnp.dtype(x.d.dtype) != d_dtype:
        raise TypeError(
            f"{where}.d of a {x.fmt} cache must be {d_dtype}, got {jnp.dtype(x.d.dtype)}"
        )
    if x.qs.ndim == 0:
        raise ValueError(f"{where}.qs must have at least one axis, got a scalar")
    if x.fmt == "q6_0" and x.qs.shape[-1] % 24:
        raise ValueError(
            f"{where}.qs of a q6_0 cache must have a last axis that is a multiple "
            f"of 24 (bytes per block), got shape {tuple(x.qs.shape)}"
        )
    _check_last_axis(x.fmt, x.shape)
    n_scales = 1 if x.fmt in ROW_SCALED else x.shape[-1] // BLOCK
    expected = tuple(x.qs.shape[:-1]) + (n_scales,)
    if tuple(x.d.shape) != expected:
        raise ValueError(
            f"{where}.d must have shape {expected} for qs of shape "
            f"{tuple(x.qs.shape)}, got {tuple(x.d.shape)}"
        )


def _roundf(v):
    """C's roundf: half away from zero (ggml's np_roundf, written the same way)."""
    a = jnp.abs(v)
    floored = jnp.floor(a)
    return jnp.sign(v) * (floored + jnp.floor(2 * (a - floored)))


def _blocks(x):
    return x.reshape(x.shape[:-1] + (x.shape[-1] // BLOCK, BLOCK))


def _q8_0(x):
    xb = _blocks(x)
    d = jnp.max(jnp.abs(xb), axis=-1, keepdims=True) / jnp.float32(127)
    inv = jnp.where(d == 0, jnp.float32(0), 1 / jnp.where(d == 0, 1, d))
    qs = _roundf(xb * inv).astype(jnp.int8).reshape(x.shape)
    return QuantizedKV(qs, d[..., 0].astype(jnp.float16), "q8_0")


def _q8_kv(x):
    d = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / jnp.float32(127)
    qs = jnp.where(d == 0, 0, _roundf(x / jnp.where(d == 0, 1, d))).astype(jnp.int8)
    return QuantizedKV(qs, d, "q8_kv")


def _q6_0(x):
    xb = _blocks(x)
    first_largest = jnp.argmax(jnp.abs(xb), axis=-1, keepdims=True)
    m = jnp.take_along_axis(xb, first_largest, axis=-1)
    d = m / jnp.float32(-32)
    inv = jnp.where(d == 0, jnp.float32(0), 1 / jnp.where(d == 0, 1, d))
    q = jnp.minimum(63, jnp.floor(xb * inv + jnp.float32(32.5))).astype(jnp.uint8)
    lo, hi = q[..., :16], q[..., 16:]
    nibbles = (lo & 0xF) | ((hi & 0xF) << 4)
    h = (lo >> 4) | ((hi >> 4) << 2)  # 4 bits per j < 16
    high = h[..., :8] | (h[..., 8:] << 4)  # byte j % 8, nibble j // 8
    qs = jnp.concatenate([nibbles, high], axis=-1).astype(jnp.uint8)
    qs = qs.reshape(x.shape[:-1] + (x.shape[-1] * 3 // 4,))
    return QuantizedKV(qs, d[..., 0].astype(jnp.float16), "q6_0")


def _fp8_e4m3(x):
    d = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / jnp.float32(FP8_MAX)
    # x / d may round just past 448, which e4m3fn has no finite value for.
    y = jnp.clip(x / jnp.where(d == 0, 1, d), -FP8_MAX, FP8_MAX)
    return QuantizedKV(y.astype(jnp.float8_e4m3fn), d, "fp8_e4m3")


# Each quantizer is one compiled program: called eagerly op by op, a q6_0
# quantization compiles some twenty small programs the first time.
_QUANTIZERS = {
    fmt: jax.jit(fn)
    for fmt, fn in {"q8_0": _q8_0, "q8_kv": _q8_kv, "q6_0": _q6_0, "fp8_e4m3": _fp8_e4m3}.items()
}


def quantize(x: ArrayLike, fmt: str) -> QuantizedKV:
    """Quantizes x (any float dtype) along its last axis into `fmt` (jittable)."""
    _check_format(fmt)
    _check_float("x", x)
    _check_last_axis(fmt, x.shape)
    return _QUANTIZERS[fmt](jnp.asarray(x).astype(jnp.float32))


def dequantize(qkv: QuantizedKV, dtype: DTypeLike = jnp.float32) -> jax.Array:
    """The values a QuantizedKV stands for, as `dtype`."""
    if not isinstance(qkv, QuantizedKV):
        raise TypeError(f"qkv must be a QuantizedKV, got {type(qkv).__name__}")
    _check_format(qkv.fmt)
    return _dequantize(qkv, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=1)
def _dequantize(qkv: QuantizedKV, dtype: np.dtype) -> jax.Array:
    fmt = qkv.fmt
    d = qkv.d.astype(jnp.float32)
    if fmt in ROW_SCALED:
        return (qkv.qs.astype(jnp.float32) * d).astype(dtype)
    if fmt == "q8_0":
        x = _blocks(qkv.qs.astype(jnp.float32)) * d[..., None]
        return x.reshape(qkv.shape).astype(dtype)
    packed = qkv.qs.reshape(qkv.qs.shape[:-1] + (-1, 24))
    nibbles, high = packed[..., :16], packed[..., 16:]
    h = jnp.concatenate([high & 0xF, high >> 4], axis=-1)  # 4 high bits of j and j + 16
    lo = (nibbles & 0xF) | ((h & 0x3) << 4)
    hi = (nibbles >> 4) | (((h >> 2) & 0x3) << 4)
    q = jnp.concatenate([lo, hi], axis=-1).astype(jnp.float32)
    return ((q - 32) * d[..., None]).reshape(qkv.shape).astype(dtype)


def cache_float_dtype(where: str, fmt: str | DTypeLike) -> np.dtype:
    """The float dtype a cache format names: "f32", "f16", "bf16", or a
    float32 / float16 / bfloat16 dtype or its name. Anything else (a
    quantized format name included) is a ValueError naming `where`."""
    try:
        dtype = jnp.dtype(FLOAT_NAMES.get(fmt, fmt) if isinstance(fmt, str) else fmt)
    except (TypeError, ValueError):
        dtype = None
    if dtype not in CACHE_FLOAT_DTYPES:
        raise ValueError(
            f"{where}: fmt must be a float dtype ({', '.join(FLOAT_NAMES)} or that "
            f"numpy dtype) or one of {', '.join(FORMATS)}, got {fmt!r}"
        )
    return dtype


def cache_bytes(fmt: str | DTypeLike, shape: Sequence[int]) -> int:
    """Bytes of a cache of logical `shape` stored as `fmt` (a float dtype or a
    format name), for memory accounting."""
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    if fmt in FORMATS:
        _check_last_axis(fmt, shape)
        if fmt == "q8_0":
            return n + n // BLOCK * 2
        if fmt == "q6_0":
            return n * 3 // 4 + n // BLOCK * 2
        rows = n // shape[-1] if shape[-1] else 0
        return n + rows * 4
    dtype = cache_float_dtype("cache_bytes", fmt)
    return n * dtype.itemsize


def _check_positions(positions, rows) -> None:
    if not hasattr(positions, "dtype") or not jnp.issubdtype(positions.dtype, jnp.integer):
        raise TypeError(
            f"positions must be an integer array [B, S], got "
            f"{getattr(positions, 'dtype', type(positions).__name__)}"
        )
    if tuple(positions.shape) != tuple(rows.shape[:2]):
        raise ValueError(
            f"positions must have shape {tuple(rows.shape[:2])}, got {tuple(positions.shape)}"
        )


def _check_block_table(block_table, batch: int):
    table = np.asarray(block_table) if isinstance(block_table, (list, tuple)) else block_table
    if not hasattr(table, "dtype") or not jnp.issubdtype(table.dtype, jnp.integer):
        raise TypeError(
            f"block_table must be an int32 array [B, max_pages], got "
            f"{getattr(table, 'dtype', type(block_table).__name__)}"
        )
    if table.ndim != 2 or table.shape[0] != batch or table.shape[1] < 1:
        raise ValueError(
            f"block_table must have shape ({batch}, max_pages >= 1) (B of rows), "
            f"got {tuple(table.shape)}"
        )
    if not isinstance(table, jax.core.Tracer):
        values = np.asarray(table)
        i32 = np.iinfo(np.int32)
        if values.size and (values.min() < i32.min or values.max() > i32.max):
            # Cast to int32 they would wrap, perhaps onto a real page.
            raise ValueError(
                f"block_table entries must fit in int32, got {values.min()} .. {values.max()}"
            )
    return table


def cache_update(
    cache: jax.Array | QuantizedKV,
    rows: ArrayLike,
    positions: ArrayLike,
    *,
    block_table: ArrayLike | None = None,
) -> jax.Array | QuantizedKV:
    """Writes rows [B, S, ...] into a cache at positions [B, S]; returns the
    new cache, updated in place when the cache is donated. The cache is a
    float array or a QuantizedKV (whose rows are quantized first).

    Contiguous (block_table None): cache [B, Smax, ...]; row s of sequence b
    goes to cache[b, positions[b, s]].

    Paged (block_table int32 [B, max_pages]): cache [num_pages, page_size,
    ...], shared by all sequences; Smax = max_pages * page_size, and row s of
    sequence b goes to row positions[b, s] % page_size of page
    block_table[b, positions[b, s] // page_size] (docs/design.md, "Paged
    caches"). Two sequences writing one slot leave either row.

    Bad slots: a concrete position outside [0, Smax) raises ValueError, and
    so does (paged) a concrete page index outside [0, num_pages) that a
    concrete position reaches (naming b, the table column j and the value).
    Traced ones are dropped: that row is not written, anywhere (never
    wrapped, negative ones included). The DeepSeek layer reports such drops
    in its cache's overflow flags.
    """
    quantized = isinstance(cache, QuantizedKV)
    shape = cache.shape if quantized else getattr(cache, "shape", None)
    if shape is None:
        raise TypeError(f"cache must be an array or a QuantizedKV, got {type(cache).__name__}")
    _check_float("rows", rows)
    if isinstance(positions, numbers.Integral):
        positions = np.asarray(positions)
    paged = block_table is not None
    if paged:
        if len(shape) < 2:
            raise ValueError(
                f"a paged cache must have shape (num_pages, page_size, ...), got {tuple(shape)}"
            )
        if rows.ndim != len(shape) or rows.shape[2:] != tuple(shape[2:]):
            raise ValueError(
                f"rows must have shape (B, S, {', '.join(map(str, shape[2:]))}) to fit the "
                f"pages {tuple(shape)}, got {tuple(rows.shape)}"
            )
        _check_positions(positions, rows)
        table = _check_block_table(block_table, rows.shape[0])
        num_pages, page_size = shape[0], shape[1]
        smax = table.shape[1] * page_size
    else:
        if (
            rows.ndim != len(shape)
            or rows.shape[0] != shape[0]
            or rows.shape[2:] != tuple(shape[2:])
        ):
            raise ValueError(
                f"rows must have shape ({shape[0]}, S, {', '.join(map(str, shape[2:]))}) "
                f"to fit the cache {tuple(shape)}, got {tuple(rows.shape)}"
            )
        _check_positions(positions, rows)
        smax = shape[1]
    if not isinstance(positions, jax.core.Tracer):
        values = np.asarray(positions)
        bad = (values < 0) | (values >= smax)
        if bad.any():
            raise ValueError(f"positions must lie in [0, {smax}), got {values[bad].reshape(-1)[0]}")
        if paged and not isinstance(table, jax.core.Tracer):
            cols = values // page_size
            pages = np.take_along_axis(np.asarray(table), cols, axis=1)
            bad = (pages < 0) | (pages >= num_pages)
            if bad.any():
                b, s = np.argwhere(bad)[0]
                raise ValueError(
                    f"block_table[{b}, {cols[b, s]}] must be a page in [0, {num_pages}) "
                    f"(sequence {b} writes position {values[b, s]} there), got {pages[b, s]}"
                )
    # Out-of-range traced slots go to an index one past the end, which
    # mode="drop" discards (a negative index would otherwise wrap around).
    pos = jnp.asarray(positions).astype(jnp.int32)
    outside = (pos < 0) | (pos >= smax)
    if paged:
        cols = jnp.clip(pos // page_size, 0, table.shape[1] - 1)
        page = jnp.take_along_axis(jnp.asarray(table).astype(jnp.int32), cols, axis=1)
        outside = outside | (page < 0) | (page >= num_pages)
        index = (jnp.where(outside, num_pages, page), pos % page_size)
    else:
        batch = jnp.arange(shape[0], dtype=jnp.int32)[:, None]
        index = (batch, jnp.where(outside, smax, pos))

    def write(dst, src):
        return dst.at[index].set(src.astype(dst.dtype), mode="drop")

    if not quantized:
        return write(cache, rows)
    new = quantize(rows, cache.fmt)
    return QuantizedKV(write(cache.qs, new.qs), write(cache.d, new.d), cache.fmt)
