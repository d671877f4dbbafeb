"""flash_attention: checks, the FFI call, and its vmap rule."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jax_mla import (
    _autodiff,
    _backend,
    _batching,
    _capabilities,
    _checks,
    _sharding,
    _splits,
    reference,
)
from jax_mla.quant import QuantizedKV

_OP = "flash_attention"
_TARGET = "jax_mla_flash_attention"
# K and/or V as QuantizedKV: each cache passed as (values, scales).
_TARGET_QUANT = "jax_mla_flash_attention_quant"
_PAGED = "_paged"  # suffix of the targets over paged caches (block_table before q_pos)


def flash_attention(
    q: jax.Array,
    k: jax.Array | QuantizedKV,
    v: jax.Array | QuantizedKV,
    *,
    scale: float | None = None,
    causal: bool = False,
    q_pos: ArrayLike | None = None,
    kv_len: ArrayLike | None = None,
    block_table: ArrayLike | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Flash attention with independent K and V head dims (DeepSeek: 192 / 128).

    Letters: B batch, Sq queries, Skv keys, Hq query heads, Hkv key/value heads
    (Hq % Hkv == 0: MHA, GQA, MQA; query head h uses KV head h // (Hq // Hkv)),
    Dk query/key head dim, Dv value head dim.

    Args:
      q: [B, Sq, Hq, Dk] float32, float16 or bfloat16.
      k: [B, Skv, Hkv, Dk], any of those float dtypes (need not match q), or
        a QuantizedKV of that logical shape (q8_0, q8_kv, q6_0, fp8_e4m3) read
        in place.
      v: [B, Skv, Hkv, Dv], likewise; k and v need not share a format. Over
        an 8-bit k (q8_0, q8_kv) the kernels round the scaled query rows to 8
        bits per block of 32 so that Q.K runs on integer dot products; over an
        8-bit v the CPU kernels round the softmax weights to 8 bits so that
        P.V does (reference.attention_quantized defines both). The CUDA
        kernel takes quantized k and v both q8_0 or q8_kv (each its own),
        contiguous, and rounds the query only (round_p=False).
      scale: static float multiplying q.k; default 1/sqrt(Dk).
      causal: a bool; the query at absolute position p sees keys j <= p.
      q_pos: int32 scalar or [B]: absolute position of query row 0, so row i
        is at q_pos + i. Default kv_len - Sq (the queries are the last Sq
        tokens). May be negative or run past kv_len.
      kv_len: int32 scalar or [B] (default Skv): keys at positions >= kv_len do
        not exist. Concrete values must lie in [0, Skv]; traced values are
        clamped to it.
      block_table: None, or int32 [B, max_pages]: k and v are then paged
        caches [num_pages, page_size, Hkv, D] (float or QuantizedKV) sharing
        this table, page_size one of 16, 32, 64, 128. Position t of sequence
        b is row t % page_size of page block_table[b, t // page_size]; Skv
        is max_pages * page_size. Pages are read in place, and entries at or
        past kv_len are never read. A concrete table whose entry among the
        pages kv_len reaches lies outside [0, num_pages) raises ValueError;
        under jit the keys of such a page are skipped, as if they did not
        exist.
      return_lse: also return the log-sum-exp of the scaled scores.
      backend: None (the native kernel when built for this platform, else the
        reference with a warning), "native" or "reference".

    Causal alignment, Sq = 3 queries at the end of Skv = 5 keys (q_pos = 2);
    x = visible:
                  key 0 1 2 3 4
        query 0 (p=2) x x x . .
        query 1 (p=3) x x x x .
        query 2 (p=4) x x x x x
    With Sq > kv_len, q_pos is negative and the first queries see no key.

    Returns:
      out [B, Sq, Hq, Dv] in q's dtype (float32 accumulation); with
      return_lse also lse [B, Hq, Sq] float32 (natural log). A query that sees
      no key gets out 0 and lse -inf.

    Differentiation (jax.grad, jax.vjp; first order): gradients with respect
    to q, k and v (the LSE's cotangent included) in each input's dtype,
    float32 accumulation; the forward saves only out and lse, the backward
    recomputes the softmax (docs/design.md, "Autodiff"). A query that sees no
    key, and a key past kv_len, get a zero gradient. Over a QuantizedKV k or
    v the gradient is that of the float attention over the dequantized cache
    (jax.grad of reference.attention(q, dequantize(k), dequantize(v)): the
    8-bit roundings above are not differentiated) and flows to q and a float
    k or v only; differentiating the quantized cache raises TypeError.
    Second order raises NotImplementedError.
    """
    _checks.check_float_array(_OP, "q", q, 4, "[B, Sq, Hq, Dk]")
    paged = block_table is not None
    rows = "num_pages, page_size" if paged else "B, Skv"
    k_shape, k_fmt = _checks.check_cache(_OP, "k", k, 4, f"[{rows}, Hkv, Dk]")
    v_shape, v_fmt = _checks.check_cache(_OP, "v", v, 4, f"[{rows}, Hkv, Dv]")
    batch, seq_q, heads_q, dk = q.shape
    _, seq_kv, heads_kv, _ = k_shape
    dv = v_shape[3]
    if paged:
        num_pages, page_size = _checks.check_pages(_OP, "k", k_shape)
        if v_shape[:2] != k_shape[:2]:
            raise ValueError(
                f"{_OP}: k and v pages must have the same (num_pages, page_size), got "
                f"k {k_shape}, v {v_shape}"
            )
        block_table = _checks.check_block_table(_OP, block_table, batch)
        seq_kv = block_table.shape[1] * page_size
    elif k_shape[0] != batch or v_shape[0] != batch:
        raise ValueError(
            f"{_OP}: k and v must have batch {batch} like q, got k {k_shape}, v {v_shape}"
        )
    if k_shape[3] != dk:
        raise ValueError(f"{_OP}: k head dim must equal q's {dk}, got k {k_shape}")
    if v_shape[2] != heads_kv or (not paged and v_shape[1] != seq_kv):
        raise ValueError(
            f"{_OP}: v must have Skv = {seq_kv} and Hkv = {heads_kv} like k, got v {v_shape}"
        )
    if heads_kv == 0 or heads_q % heads_kv:
        raise ValueError(
            f"{_OP}: the query heads Hq = {heads_q} must be a multiple of the "
            f"KV heads Hkv = {heads_kv}"
        )
    scale = _checks.check_scale(_OP, scale, 1.0 / math.sqrt(dk) if dk else 1.0)
    causal = _checks.check_static_bool(_OP, "causal", causal)
    q_pos, kv_len = _checks.positions(_OP, q_pos, kv_len, batch, seq_q, seq_kv)
    if paged:
        _checks.check_block_table_entries(_OP, block_table, kv_len, num_pages, page_size)

    k_ops, v_ops = _checks.cache_operands(k), _checks.cache_operands(v)
    platform = _backend.target_platform(q, k_ops[0], v_ops[0])
    quantized = k_fmt is not None or v_fmt is not None
    target = (_TARGET_QUANT if quantized else _TARGET) + (_PAGED if paged else "")
    if _backend.resolve_backend(_OP, backend, target, platform) == "reference":
        native_platform = None

        def forward(q, k, v, q_pos, kv_len, *table):
            key_mask = None
            if table:  # paged: the reference may gather (the kernels never do)
                key_mask = reference.page_mask(table[0], num_pages, page_size)
                k, v = (reference.gather_pages(c, table[0]) for c in (k, v))
            return reference.attention(
                q,
                _checks.float_cache(k),
                _checks.float_cache(v),
                scale=scale,
                causal=causal,
                q_pos=q_pos,
                kv_len=kv_len,
                key_mask=key_mask,
            )

    else:
        native_platform = platform
        kernel = None
        if _backend.is_gpu(platform):
            _capabilities.check_cuda_attention(_OP, q, k, v)
            from jax_mla._cuda_kernels import cuda_kernel_attr  # GPU calls only

            kernel = cuda_kernel_attr(_OP)
        else:
            _capabilities.check_cpu_head_dims(_OP, Dk=dk, Dv=dv)
        if paged:
            _capabilities.check_page_size(_OP, platform, page_size)
        # Decode with few query rows per KV head splits the keys across threads
        # (CPU) or thread blocks (CUDA).
        num_splits = _splits.choose_num_splits(
            None, batch, seq_q, heads_q, heads_kv, seq_kv, platform=platform, dk=dk
        )
        codes = (
            (_capabilities.format_code(platform, k_fmt), _capabilities.format_code(platform, v_fmt))
            if quantized
            else None
        )
        call = _native(scale, causal, num_splits, v_fmt == "q6_0", codes, kernel, paged)

        def forward(q, k, v, q_pos, kv_len, *table):
            if quantized:
                return call(
                    q, *_checks.cache_operands(k), *_checks.cache_operands(v), *table, q_pos, kv_len
                )
            return call(q, k, v, *table, q_pos, kv_len)

    # Differentiable in q and the float caches (docs/design.md, "Autodiff").
    out, lse = _autodiff.attention(
        forward,
        q,
        k,
        v,
        q_pos,
        kv_len,
        op=_OP,
        scale=scale,
        causal=causal,
        platform=native_platform,
        block_table=block_table,
    )
    return (out, lse) if return_lse else out


@functools.cache
def _native(
    scale: float,
    causal: bool,
    num_splits: int,
    v_packed: bool,
    formats: tuple[int, int] | None,
    kernel: np.int32 | None,
    paged: bool = False,
):
    """The FFI call for one static configuration, with its vmap rule and its
    sharding rules (_sharding.partitioned: split over a mesh, each device
    calls it on its shard with num_splits chosen for its shapes). Its
    arguments are (q, k, v, q_pos, kv_len) for float caches, and
    (q, k, k_scales, v, v_scales, q_pos, kv_len) when either is quantized
    (formats: the k and v format codes, 0 for a float cache, whose scales are
    an unused placeholder). v_packed: v is q6_0, 4 values in 3 bytes. kernel:
    the CUDA kernel family (None on the CPU, whose handlers take no such
    attribute). paged: the caches are pages and a block_table comes before
    q_pos (the *_paged targets, not partitioned: split over a mesh, XLA runs
    them on replicated operands)."""
    quantized = formats is not None
    attrs = dict(
        scale=np.float32(scale),  # C++ float
        causal=np.bool_(causal),  # C++ bool
    )
    if quantized:
        attrs.update(k_fmt=np.int64(formats[0]), v_fmt=np.int64(formats[1]))
    if kernel is not None:
        attrs["kernel"] = kernel  # C++ int32_t
    target = (_TARGET_QUANT if quantized else _TARGET) + (_PAGED if paged else "")
    n_cache = 4 if quantized else 2

    def ffi(splits: int):
        def run(q, *args):
            batch, seq_q, heads_q, _ = q.shape
            v = args[2] if quantized else args[1]
            dv = v.shape[3] * 4 // 3 if v_packed else v.shape[3]
            out_sharding, lse_sharding = _sharding.typed_like(q)
            out_types = (
                jax.ShapeDtypeStruct((batch, seq_q, heads_q, dv), q.dtype, sharding=out_sharding),
                jax.ShapeDtypeStruct((batch, heads_q, seq_q), jnp.float32, sharding=lse_sharding),
                *_splits.split_partial_types(batch, splits, seq_q, heads_q, dv),
            )
            # vmap never reaches the FFI call: custom_vmap's rule below folds it.
            out, lse, _, _ = jax.ffi.ffi_call(target, out_types, vmap_method="sequential")(
                q,
                *args,
                **attrs,
                num_splits=np.int64(splits),  # C++ int64_t
            )
            return out, lse

        return run

    def resplit(batch, seq_q, heads_q, heads_kv, seq_kv, dk, platform):
        return _splits.choose_num_splits(
            None, batch, seq_q, heads_q, heads_kv, seq_kv, platform=platform, dk=dk
        )

    sharded = ffi(num_splits) if paged else _sharding.partitioned(_OP, ffi, num_splits, resplit)

    @jax.custom_batching.custom_vmap
    def call(q, *args):
        return sharded(q, *args)

    @call.def_vmap
    def rule(axis_size, in_batched, q, *args):
        if paged:
            # A float cache's scales placeholder has no page axis: never batched.
            outs = _batching.fold_vmap_paged(call, axis_size, in_batched, (q, *args), n_cache)
            return outs, (True, True)
        if in_batched[0] and not any(in_batched[1:]):
            return (_fold_vmap_into_heads(call, axis_size, q, args, n_cache, formats), (True, True))
        # The caches are shared (not copied) only all together: the kernel
        # reads them with one batch mapping. A float cache's scales
        # placeholder has no batch axis and is never batched.
        cache_idx = [i for i in range(1, 1 + n_cache) if args[i - 1].ndim == 4]
        shared = len({in_batched[i] for i in cache_idx}) == 1
        placeholders = tuple(i for i in range(1, 1 + n_cache) if args[i - 1].ndim != 4)
        outs = _batching.fold_vmap_into_batch(
            call,
            axis_size,
            in_batched,
            (q, *args),
            caches=(tuple(cache_idx) if shared else ()) + placeholders,
        )
        return outs, (True, True)

    return call


def _fold_vmap_into_heads(call, n, q, args, n_cache, formats):
    """vmap over q alone: the n query sets share every KV head, which is just
    more query heads per KV head ("this is just a GQA")."""
    _, batch, seq_q, heads_q, dk = q.shape
    heads_kv = args[0].shape[2]
    group = heads_q // heads_kv
    # Query head index h = hkv * group + g; make it hkv * (n * group) + j * group + g.
    qf = q.reshape(n, batch, seq_q, heads_kv, group, dk).transpose(1, 2, 3, 0, 4, 5)
    out, lse = call(qf.reshape(batch, seq_q, heads_kv * n * group, dk), *args)
    dv = out.shape[-1]
    out = out.reshape(batch, seq_q, heads_kv, n, group, dv).transpose(3, 0, 1, 2, 4, 5)
    lse = lse.reshape(batch, heads_kv, n, group, seq_q).transpose(2, 0, 1, 3, 4)
    return (out.reshape(n, batch, seq_q, heads_q, dv), lse.reshape(n, batch, heads_q, seq_q))
