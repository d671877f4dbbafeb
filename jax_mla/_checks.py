"""Argument checks shared by the ops (attention.py, mla.py): arrays, caches,
static values, per-batch positions.

Errors follow docs/design.md: TypeError for a wrong kind of value or dtype,
ValueError for wrong ranks, mismatched dims and out-of-range concrete values.
Every message names the argument, what was expected and what was given.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jax_mla import quant

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def check_float_array(op: str, name: str, x, rank: int, layout: str) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{op}: {name} must be an array {layout}, got {type(x).__name__}")
    if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be float32, float16 or bfloat16, got dtype {jnp.dtype(x.dtype)}"
        )
    if x.ndim != rank:
        raise ValueError(f"{op}: {name} must have rank {rank} {layout}, got shape {tuple(x.shape)}")


def check_cache(op: str, name: str, x, rank: int, layout: str):
    """A K, V or latent cache: a float array or a QuantizedKV. Returns its
    logical shape and its format (None for a float array)."""
    if isinstance(x, quant.QuantizedKV):
        quant.check_quantized(op, name, x)
        if x.ndim != rank:
            raise ValueError(
                f"{op}: {name} must have rank {rank} {layout}, got a {x.fmt} cache "
                f"of shape {x.shape}"
            )
        return tuple(x.shape), x.fmt
    check_float_array(op, name, x, rank, layout)
    return tuple(x.shape), None


def cache_operands(x) -> tuple:
    """The arrays a native call takes for a cache: (qs, d) for a QuantizedKV;
    for a float array, the array and an unused placeholder for the scales."""
    if isinstance(x, quant.QuantizedKV):
        return x.qs, x.d
    return x, jnp.zeros((0,), jnp.float32)


def float_cache(x):
    """The values a cache stands for (the reference backend's view of it)."""
    return quant.dequantize(x) if isinstance(x, quant.QuantizedKV) else x


def check_scale(op: str, scale, default: float) -> float:
    if scale is None:
        return default
    if isinstance(scale, jax.core.Tracer) or not isinstance(scale, numbers.Real):
        raise TypeError(
            f"{op}: scale must be a static Python or numpy float, got {type(scale).__name__}"
        )
    if not math.isfinite(float(scale)):
        raise ValueError(f"{op}: scale must be finite, got {scale}")
    return float(scale)


def check_static_int(op: str, name: str, value, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be a static int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")
    return int(value)


def check_static_bool(op: str, name: str, value) -> bool:
    # Truthiness would take "yes", 0.5 or an array for True.
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")
    return bool(value)


def per_batch_int32(
    op: str, name: str, x, batch: int, lo: int | None = None, hi: int | None = None
) -> jax.Array | None:
    """q_pos / kv_len: None, or an integer scalar or [B] -> int32 [B].

    Concrete values are range-checked (ValueError); traced ones cannot be and
    follow the documented rules instead (kv_len clamped to [0, Skv]).
    """
    if x is None:
        return None
    if isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{op}: {name} must be an int32 scalar or [B] array, got bool")
    if isinstance(x, numbers.Integral):
        x = np.asarray(x)
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(
            f"{op}: {name} must be an int32 scalar or [B] array, got {type(x).__name__}"
        )
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{op}: {name} must have an integer dtype, got {jnp.dtype(x.dtype)}")
    if x.shape not in ((), (batch,)):
        raise ValueError(
            f"{op}: {name} must be a scalar or have shape ({batch},), got {tuple(x.shape)}"
        )
    if not isinstance(x, jax.core.Tracer):
        values = np.asarray(x).astype(np.int64)
        i32 = np.iinfo(np.int32)
        lo_ = i32.min if lo is None else lo
        hi_ = i32.max if hi is None else hi
        bad = (values < lo_) | (values > hi_)
        if bad.any():
            first = values.reshape(-1)[bad.reshape(-1)][0]
            raise ValueError(f"{op}: {name} must lie in [{lo_}, {hi_}], got {first}")
    return jnp.broadcast_to(jnp.asarray(x).astype(jnp.int32), (batch,))


def positions(op: str, q_pos, kv_len, batch: int, seq_q: int, seq_kv: int):
    """Materialized (q_pos, kv_len), both int32 [B], with the contract's defaults."""
    kv_len = per_batch_int32(op, "kv_len", kv_len, batch, 0, seq_kv)
    if kv_len is None:
        kv_len = jnp.full((batch,), seq_kv, jnp.int32)
    q_pos = per_batch_int32(op, "q_pos", q_pos, batch)
    if q_pos is None:
        # Clamp first, as the kernels do with a traced kv_len.
        q_pos = jnp.clip(kv_len, 0, seq_kv) - seq_q
    return q_pos, kv_len


# ------------------------------------------------------------------ paged caches

PAGE_SIZES = (16, 32, 64, 128)


def check_pages(op: str, name: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """(num_pages, page_size) of a paged cache of logical shape [num_pages,
    page_size, ...]: page_size is static and one of PAGE_SIZES."""
    num_pages, page_size = shape[0], shape[1]
    if page_size not in PAGE_SIZES:
        raise ValueError(
            f"{op}: the page size ({name}.shape[1]) must be one of "
            f"{', '.join(map(str, PAGE_SIZES))}, got {page_size} (shape {shape})"
        )
    return num_pages, page_size


def check_block_table(op: str, block_table, batch: int) -> jax.Array:
    """block_table: an integer [B, max_pages] array -> int32."""
    if not hasattr(block_table, "dtype") or not hasattr(block_table, "shape"):
        raise TypeError(
            f"{op}: block_table must be an int32 [B, max_pages] array, got "
            f"{type(block_table).__name__}"
        )
    if not jnp.issubdtype(block_table.dtype, jnp.integer):
        raise TypeError(
            f"{op}: block_table must have an integer dtype, got {jnp.dtype(block_table.dtype)}"
        )
    if block_table.ndim != 2 or block_table.shape[0] != batch:
        raise ValueError(
            f"{op}: block_table must have shape ({batch}, max_pages) to match q's batch, got "
            f"{tuple(block_table.shape)}"
        )
    if not isinstance(block_table, jax.core.Tracer):
        values = np.asarray(block_table)
        i32 = np.iinfo(np.int32)
        if values.size and (values.min() < i32.min or values.max() > i32.max):
            raise ValueError(f"{op}: block_table entries must fit in int32")
    return jnp.asarray(block_table).astype(jnp.int32)


def check_block_table_entries(op: str, block_table, kv_len, num_pages: int, page_size: int):
    """Concrete block_table and kv_len: every page a sequence's kv_len reaches
    must lie in [0, num_pages) (ValueError naming b, j and the value). Traced
    ones cannot be checked: the kernels skip the keys of such pages."""
    if isinstance(block_table, jax.core.Tracer) or isinstance(kv_len, jax.core.Tracer):
        return
    table = np.asarray(block_table)
    reached = -(-np.asarray(kv_len).astype(np.int64) // page_size)  # pages holding keys
    used = np.arange(table.shape[1])[None, :] < reached[:, None]
    bad = used & ((table < 0) | (table >= num_pages))
    if bad.any():
        b, j = (int(i[0]) for i in np.nonzero(bad))
        raise ValueError(
            f"{op}: block_table[{b}, {j}] = {int(table[b, j])} must lie in [0, {num_pages}) "
            f"(num_pages): sequence {b}'s kv_len = {int(np.asarray(kv_len)[b])} reaches page {j}"
        )
