"""Argument checks, position handling, backend choice and vmap folding shared by
the ops (attention.py, mla.py).

Errors follow DESIGN.md: TypeError for a wrong kind of value or dtype,
ValueError for wrong ranks, mismatched dims and out-of-range concrete values,
NotImplementedError for valid configurations a backend does not support yet.
Every message names the argument, what was expected and what was given.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jax_mla import _ffi, quant

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
BACKENDS = (None, "native", "reference")
# CPU kernels take any head dim that is a multiple of 16 up to this (DESIGN.md).
CPU_MAX_HEAD_DIM = 576


def check_float_array(op: str, name: str, x, rank: int, layout: str) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{op}: {name} must be an array {layout}, got {type(x).__name__}")
    if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be float32, float16 or bfloat16, got dtype {jnp.dtype(x.dtype)}")
    if x.ndim != rank:
        raise ValueError(f"{op}: {name} must have rank {rank} {layout}, got shape {tuple(x.shape)}")


def check_cache(op: str, name: str, x, rank: int, layout: str):
    """A K, V or latent cache: a float array or a QuantizedKV. Returns its
    logical shape and its format (None for a float array)."""
    if isinstance(x, quant.QuantizedKV):
        quant.check_quantized(op, name, x)
        if x.ndim != rank:
            raise ValueError(f"{op}: {name} must have rank {rank} {layout}, got a {x.fmt} cache "
                             f"of shape {x.shape}")
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
        raise TypeError(f"{op}: scale must be a static Python or numpy float, got {type(scale).__name__}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"{op}: scale must be finite, got {scale}")
    return float(scale)


def check_static_int(op: str, name: str, value, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be a static int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")
    return int(value)


def per_batch_int32(op: str, name: str, x, batch: int, lo: int | None = None,
                    hi: int | None = None) -> jax.Array | None:
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
        raise TypeError(f"{op}: {name} must be an int32 scalar or [B] array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{op}: {name} must have an integer dtype, got {jnp.dtype(x.dtype)}")
    if x.shape not in ((), (batch,)):
        raise ValueError(f"{op}: {name} must be a scalar or have shape ({batch},), got {tuple(x.shape)}")
    if not isinstance(x, jax.core.Tracer):
        values = np.asarray(x).astype(np.int64)
        i32 = np.iinfo(np.int32)
        lo_ = i32.min if lo is None else lo
        hi_ = i32.max if hi is None else hi
        bad = (values < lo_) | (values > hi_)
        if bad.any():
            raise ValueError(
                f"{op}: {name} must lie in [{lo_}, {hi_}], got {values.reshape(-1)[bad.reshape(-1)][0]}")
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


_warned: set[tuple[str, str]] = set()  # (platform, target) already warned about


def target_platform(*arrays) -> str:
    """The platform the call will run on, as far as trace time can tell: the
    device of a concrete input, else the default device (jax.default_device),
    else JAX's default backend."""
    for x in arrays:
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            return next(iter(x.devices())).platform
    device = jax.config.jax_default_device
    if device is not None:
        return device if isinstance(device, str) else device.platform
    return jax.default_backend()


def resolve_backend(op: str, backend, target: str, platform: str) -> str:
    """'native' or 'reference' for this call on `platform` (DESIGN.md,
    "Backends and errors")."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of None, 'native', 'reference', got {backend!r}")
    if backend == "reference":
        return "reference"
    if _ffi.has_target(platform, target):
        return "native"
    why = _ffi.why_missing(platform, target)
    if _ffi.module(platform) is not None:
        # The module is built but lacks this kernel (quantized caches on CUDA,
        # say): a valid configuration it does not support yet, never a silent
        # fallback, whatever `backend` says.
        raise NotImplementedError(f"{op}: no native kernel on {platform} for this call: {why} "
                                  "(backend='reference' runs the pure-JAX reference)")
    if backend == "native":
        raise RuntimeError(
            f"{op}: backend='native' but {why}. Build it with "
            "`pip install -Ccmake.define.JAX_MLA_CUDA=ON .` for CUDA, or reinstall jax_mla "
            "with a C++ compiler for the CPU module")
    if (platform, target) not in _warned:
        _warned.add((platform, target))
        warnings.warn(f"{op}: using the pure-JAX reference on {platform} because {why}",
                      RuntimeWarning, stacklevel=3)
    return "reference"


def check_cpu_head_dims(op: str, **dims: int) -> None:
    for name, d in dims.items():
        if d <= 0 or d % 16 or d > CPU_MAX_HEAD_DIM:
            raise NotImplementedError(
                f"{op}: the CPU kernel supports head dims that are multiples of 16 up to "
                f"{CPU_MAX_HEAD_DIM}; got {name} = {d} (backend='reference' takes any)")


# What the CUDA kernels take (DESIGN.md): one half-precision dtype for all
# inputs; flash_attention's explicit (Dk, Dv) pairs; MLA's DeepSeek latent row.
CUDA_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
CUDA_ATTENTION_HEAD_DIMS = ((192, 128), (64, 64), (128, 128), (256, 256))
CUDA_MLA_LAYOUT = (576, 512, 0)  # (Dk, dv, v_offset)


def is_gpu(platform: str) -> bool:
    return _ffi._platform_key(platform) == "gpu"


def check_cuda_dtypes(op: str, **arrays) -> None:
    dtypes = {name: jnp.dtype(x.dtype) for name, x in arrays.items()}
    if len(set(dtypes.values())) != 1 or next(iter(dtypes.values())) not in CUDA_DTYPES:
        got = ", ".join(f"{name} {d}" for name, d in dtypes.items())
        raise NotImplementedError(
            f"{op}: the CUDA kernel takes {', '.join(dtypes)} all float16 or all bfloat16; "
            f"got {got} (backend='reference' takes any)")


def check_cuda_attention(op: str, q, k, v) -> None:
    check_cuda_dtypes(op, q=q, k=k, v=v)
    dims = (q.shape[-1], v.shape[-1])
    if dims not in CUDA_ATTENTION_HEAD_DIMS:
        raise NotImplementedError(
            f"{op}: the CUDA kernel supports (Dk, Dv) in {CUDA_ATTENTION_HEAD_DIMS}; got {dims} "
            "(backend='reference' takes any)")


# Quantized latent caches the CUDA flash_mla kernel reads (q6_0 is CPU-only for now).
CUDA_MLA_FORMATS = ("q8_0", "q8_kv")


def check_cuda_mla(op: str, q, kv, dv: int, v_offset: int) -> None:
    if isinstance(kv, quant.QuantizedKV):
        if kv.fmt not in CUDA_MLA_FORMATS:
            raise NotImplementedError(
                f"{op}: the CUDA kernel supports quantized caches in {', '.join(CUDA_MLA_FORMATS)}; "
                f"got {kv.fmt} (backend='reference' takes any, the CPU kernel takes {kv.fmt})")
        if jnp.dtype(q.dtype) not in CUDA_DTYPES:
            raise NotImplementedError(
                f"{op}: the CUDA kernel takes q float16 or bfloat16 over a quantized cache; got "
                f"q {jnp.dtype(q.dtype)} (backend='reference' takes any)")
    else:
        check_cuda_dtypes(op, q=q, kv=kv)
    layout = (q.shape[-1], dv, v_offset)
    if layout != CUDA_MLA_LAYOUT:
        raise NotImplementedError(
            f"{op}: the CUDA kernel supports (Dk, dv, v_offset) = {CUDA_MLA_LAYOUT}; got "
            f"{layout} (backend='reference' takes any)")


def fold_vmap_into_batch(call, axis_size: int, in_batched, args, caches=()):
    """Batching rule for ops whose every argument leads with B (args[0] is q):
    merge the vmap axis into B (index v * B + b), call, and split it back.

    Unbatched arguments are broadcast, except the caches (indices in
    `caches`): the kernels let a K/V batch that divides q's serve query batch
    b from cache row b % kv_batch, so an unbatched cache is passed as it is
    and never copied per vmapped example. A batched cache whose batch is
    already smaller than q's (shared by an inner vmap) is tiled up to q's
    batch first, since the modulo rule only holds for the outermost axis.
    """
    q_batch = args[0].shape[1] if in_batched[0] else args[0].shape[0]
    merged = []
    for i, (x, batched) in enumerate(zip(args, in_batched)):
        if i in caches and not batched:
            merged.append(x)
            continue
        if not batched:
            x = jnp.broadcast_to(x, (axis_size,) + x.shape)
        elif i in caches and x.shape[1] != q_batch:
            x = jnp.tile(x, (1, q_batch // x.shape[1]) + (1,) * (x.ndim - 2))
        merged.append(x.reshape((axis_size * x.shape[1],) + x.shape[2:]))
    outs = call(*merged)
    return tuple(o.reshape((axis_size, -1) + o.shape[1:]) for o in outs)


def num_splits_heuristic(items: int, seq_kv: int, *, kv_tile: int, workers: int) -> int:
    """How many KV chunks to split a call into (a pure function, so testable).

    `items` is how many work items the native driver makes of the call
    without splitting (the module's work_items(), so its plan is the only
    one). When they already give every worker something to do, splitting
    only adds the LSE merge. Otherwise split the keys so that there are about
    as many items as workers, keeping at least two KV tiles per chunk so each
    item stays GEMM-shaped.
    """
    tiles = -(-seq_kv // kv_tile)
    if tiles < 4 or items <= 0 or items >= workers:
        return 1
    return max(1, min(-(-workers // items), tiles // 2))


def cpu_workers() -> int:
    """Threads the CPU kernels can use: the cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def gpu_num_splits_heuristic(items: int, seq_kv: int, *, kv_tile: int, sms: int) -> int:
    """num_splits for a CUDA call (a pure function); 1 when the blocks already
    fill the GPU. First the wave count: that of the fewest splits that fill at
    least 90% of the last wave of thread blocks (`sms` blocks per wave), with
    at least two KV tiles per split. Then, within that many waves, the fewest
    splits that give each block the fewest tiles: a block of split s takes
    ceil(tiles / ns) tiles, so ns = 119 over 512 tiles runs 103 blocks of 5
    (and 16 empty ones) where 128 blocks of 4 take the same wave."""
    tiles = -(-seq_kv // kv_tile)
    if tiles < 4 or items <= 0 or sms <= 0 or items >= sms:
        return 1
    first, best_fill = 1, 0.0
    for ns in range(1, tiles // 2 + 1):
        blocks = items * ns
        fill = blocks / (-(-blocks // sms) * sms)
        if fill > best_fill:
            first, best_fill = ns, fill
        if fill >= 0.9:
            break
    waves = -(-items * first // sms)
    most = min(waves * sms // items, tiles // 2)  # splits that still fit those waves
    per = -(-tiles // most)                        # the fewest tiles per block there
    return -(-tiles // per)


def choose_num_splits(num_splits, batch: int, seq_q: int, heads_q: int, heads_kv: int,
                      seq_kv: int, *, platform: str = "cpu", dk: int = 0,
                      blocks_per_sm: int = 1) -> int:
    """num_splits for a native call: the caller's value or the heuristic's,
    clamped to the number of KV tiles of the platform's kernel. On the GPU
    the heuristic fills `blocks_per_sm` thread blocks per SM (the kernel's
    occupancy, from the native module)."""
    if is_gpu(platform):
        module = _ffi.module("gpu")
        kv_tile = module.kv_tile(dk)
        if num_splits is None:
            items = module.work_items(batch, seq_q, heads_q, heads_kv, dk)
            num_splits = gpu_num_splits_heuristic(items, seq_kv, kv_tile=kv_tile,
                                                  sms=_gpu_sm_count() * blocks_per_sm)
        return max(1, min(num_splits, -(-seq_kv // kv_tile)))
    module = _ffi.module("cpu")
    kv_tile = module.kv_tile()
    if num_splits is None:
        items = module.work_items(batch, seq_q, heads_q, heads_kv)
        num_splits = num_splits_heuristic(items, seq_kv, kv_tile=kv_tile, workers=cpu_workers())
    return max(1, min(num_splits, -(-seq_kv // kv_tile)))


_sm_counts: dict[int, int] = {}


def _gpu_sm_count(device: int = 0) -> int:
    if device not in _sm_counts:
        _sm_counts[device] = _ffi.module("gpu").sm_count(device)
    return _sm_counts[device]


def split_partial_types(batch: int, num_splits: int, seq_q: int, heads: int, dv: int):
    """The split-KV partial results (out, lse) an FFI call declares. They are
    results rather than allocations in the handler; with one split the kernel
    writes the output directly and they are empty."""
    if num_splits == 1:
        shapes = ((0,), (0,))
    else:
        shapes = ((batch, num_splits, seq_q, heads, dv), (batch, num_splits, seq_q, heads))
    return tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)
