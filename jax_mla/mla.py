"""flash_mla: attention over the MLA latent cache (one latent KV head, V a slice
of the same rows), with split-KV decoding."""

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
    _ffi,
    _sharding,
    _splits,
    quant,
    reference,
)

_OP = "flash_mla"
_TARGET = "jax_mla_flash_mla"
_TARGET_QUANT = "jax_mla_flash_mla_quant"  # kv as QuantizedKV: qs and d separately
_PAGED = "_paged"  # suffix of the targets over paged caches (block_table before q_pos)


def flash_mla(
    q: jax.Array,
    kv: jax.Array | quant.QuantizedKV,
    *,
    dv: int = 512,
    v_offset: int = 0,
    scale: float | None = None,
    causal: bool = False,
    q_pos: ArrayLike | None = None,
    kv_len: ArrayLike | None = None,
    block_table: ArrayLike | None = None,
    num_splits: int | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """MLA attention in latent space: all query heads share one latent KV head.

    Letters: B batch, Sq queries, Skv cached tokens, H query heads, Dk latent
    row width (kv_lora_rank + rope dim: 576 for DeepSeek).

    Args:
      q: [B, Sq, H, Dk] float32, float16 or bfloat16 (queries already absorbed
        into latent space).
      kv: [B, Skv, Dk] latent cache, any of those float dtypes, or a
        QuantizedKV of that logical shape (q8_0, q8_kv, q6_0, fp8_e4m3), read
        in place.
        K is the whole row; V is kv[..., v_offset:v_offset + dv] of the same
        rows, read in place: no V copy (and no dequantized copy) is ever made.
        DeepSeek's rows are [c_kv | k_pe], so V is the first 512 columns
        (v_offset=0). In the block formats v_offset must be a multiple of 32.
        Over 8-bit caches (q8_0, q8_kv) the kernels round the scaled query
        rows to 8 bits per block of 32 (q8_0's rule, float32 scale) so that
        Q.K runs on integer dot products, and the CPU kernels also round the
        softmax weights to 8 bits (per row, 64 keys and 32 V columns, V's
        scale folded in) so that P.V does; reference.mla_quantized defines
        both, the README gives the error.
      dv: static width of V (default 512).
      v_offset: static first column of V in the row (default 0).
      scale: static float; default 1/sqrt(Dk) as in FlashMLA. DeepSeek models
        pass 1/sqrt(qk_nope + qk_rope) times YaRN's mscale^2.
      causal, q_pos, kv_len, return_lse, backend: as in flash_attention.
      block_table: None, or int32 [B, max_pages]: kv is then a paged cache
        [num_pages, page_size, Dk] (float or QuantizedKV), read in place, as
        in flash_attention.
      num_splits: static number of KV chunks a call is split into, computed in
        parallel and merged by their LSE. None picks it from B, H, Sq, Skv and
        the CPU's thread count; it is clamped to the number of KV tiles, and
        results do not depend on it beyond rounding. Must be >= 1.

    Returns:
      out [B, Sq, H, dv] in q's dtype; with return_lse also lse [B, H, Sq]
      float32. A query that sees no key gets out 0 and lse -inf.

    Differentiation: as flash_attention's, with respect to q and kv; the V
    gradient is added into columns [v_offset, v_offset + dv) of kv's. Over a
    QuantizedKV kv only q gets a gradient, that of reference.mla over
    dequantize(kv).
    """
    _checks.check_float_array(_OP, "q", q, 4, "[B, Sq, H, Dk]")
    paged = block_table is not None
    layout = "[num_pages, page_size, Dk]" if paged else "[B, Skv, Dk]"
    kv_shape, kv_fmt = _checks.check_cache(_OP, "kv", kv, 3, layout)
    batch, seq_q, heads, dk = q.shape
    seq_kv = kv_shape[1]
    if paged:
        num_pages, page_size = _checks.check_pages(_OP, "kv", kv_shape)
        block_table = _checks.check_block_table(_OP, block_table, batch)
        seq_kv = block_table.shape[1] * page_size
        if kv_shape[2] != dk:
            raise ValueError(
                f"{_OP}: kv pages must have shape (num_pages, page_size, {dk}) to match q "
                f"{tuple(q.shape)}, got {kv_shape}"
            )
    elif kv_shape[0] != batch or kv_shape[2] != dk:
        raise ValueError(
            f"{_OP}: kv must have shape ({batch}, Skv, {dk}) to match q "
            f"{tuple(q.shape)}, got {kv_shape}"
        )
    dv = _checks.check_static_int(_OP, "dv", dv, 1)
    v_offset = _checks.check_static_int(_OP, "v_offset", v_offset, 0)
    if v_offset + dv > dk:
        raise ValueError(
            f"{_OP}: the V slice [v_offset, v_offset + dv) = [{v_offset}, "
            f"{v_offset + dv}) must fit in the row of Dk = {dk}"
        )
    if kv_fmt in ("q8_0", "q6_0") and v_offset % quant.BLOCK:
        raise ValueError(
            f"{_OP}: v_offset must fall on a block boundary (a multiple of "
            f"{quant.BLOCK}) of the {kv_fmt} cache, got {v_offset}"
        )
    if num_splits is not None:
        num_splits = _checks.check_static_int(_OP, "num_splits", num_splits, 1)
    scale = _checks.check_scale(_OP, scale, 1.0 / math.sqrt(dk) if dk else 1.0)
    causal = _checks.check_static_bool(_OP, "causal", causal)
    q_pos, kv_len = _checks.positions(_OP, q_pos, kv_len, batch, seq_q, seq_kv)
    if paged:
        _checks.check_block_table_entries(_OP, block_table, kv_len, num_pages, page_size)

    cache = _checks.cache_operands(kv)
    platform = _backend.target_platform(q, cache[0])
    target = (_TARGET if kv_fmt is None else _TARGET_QUANT) + (_PAGED if paged else "")
    if _backend.resolve_backend(_OP, backend, target, platform) == "reference":
        native_platform = None

        def forward(q, kv, q_pos, kv_len, *table):
            key_mask = None
            if table:  # paged: the reference may gather (the kernels never do)
                key_mask = reference.page_mask(table[0], num_pages, page_size)
                kv = reference.gather_pages(kv, table[0])
            return reference.mla(
                q,
                _checks.float_cache(kv),
                dv=dv,
                v_offset=v_offset,
                scale=scale,
                causal=causal,
                q_pos=q_pos,
                kv_len=kv_len,
                key_mask=key_mask,
            )

    else:
        native_platform = platform
        gpu = _backend.is_gpu(platform)
        if gpu:
            _capabilities.check_cuda_mla(_OP, q, kv, dv, v_offset)
        else:
            _capabilities.check_cpu_head_dims(_OP, Dk=dk, dv=dv)
        if paged:
            _capabilities.check_page_size(_OP, platform, page_size)
        kv_code = _capabilities.format_code(platform, kv_fmt)
        kernel, blocks_per_sm = None, 1
        if gpu:
            from jax_mla._cuda_kernels import cuda_kernel_attr  # GPU calls only

            kernel = cuda_kernel_attr(_OP)
            blocks_per_sm = _ffi.module("gpu").mla_blocks_per_sm(seq_q * heads, kv_code)
        chosen = _splits.choose_num_splits(
            num_splits,
            batch,
            seq_q,
            heads,
            1,
            seq_kv,
            platform=platform,
            dk=dk,
            blocks_per_sm=blocks_per_sm,
        )
        call = _native(dv, v_offset, scale, causal, chosen, kv_code, kernel, num_splits, paged)

        def forward(q, kv, q_pos, kv_len, *table):
            cache = _checks.cache_operands(kv)
            return call(q, *(cache if kv_code else cache[:1]), *table, q_pos, kv_len)

    # Differentiable in q and a float kv (docs/design.md, "Autodiff").
    out, lse = _autodiff.mla(
        forward,
        q,
        kv,
        q_pos,
        kv_len,
        op=_OP,
        dv=dv,
        v_offset=v_offset,
        scale=scale,
        causal=causal,
        platform=native_platform,
        block_table=block_table,
    )
    return (out, lse) if return_lse else out


def _attributes(dv, v_offset, scale, causal, kv_fmt: int, kernel) -> dict:
    """The attributes every flash_mla target takes, in the C++ types of its
    handler; the contiguous calls add num_splits per shard, the paged ones
    once."""
    attrs = dict(
        scale=np.float32(scale),  # C++ float
        causal=np.bool_(causal),  # C++ bool
        dv=np.int64(dv),  # C++ int64_t
        v_offset=np.int64(v_offset),  # C++ int64_t
    )
    if kv_fmt:
        attrs["kv_fmt"] = np.int64(kv_fmt)
    if kernel is not None:
        attrs["kernel"] = kernel  # C++ int32_t
    return attrs


@functools.cache
def _native(
    dv: int,
    v_offset: int,
    scale: float,
    causal: bool,
    num_splits: int,
    kv_fmt: int,
    kernel: np.int32 | None,
    requested: int | None,
    paged: bool = False,
):
    """The FFI call for one static configuration, with its vmap rule and its
    sharding rules (_sharding.partitioned: split over a mesh, each device
    calls it on its shard with num_splits chosen for its shapes). Its
    arguments are (q, kv, q_pos, kv_len) for a float cache and
    (q, kv.qs, kv.d, q_pos, kv_len) for a quantized one (kv_fmt > 0).
    kernel: the CUDA kernel family (None on the CPU, whose handlers take no
    such attribute). requested: the caller's num_splits (None: the
    heuristic's), which a call split over a mesh applies to each device's
    shapes. paged: the cache operands are pages and a block_table comes
    before q_pos (the *_paged targets); such calls are not partitioned (see
    _paged_call)."""
    if paged:
        return _paged_call(dv, v_offset, scale, causal, num_splits, kv_fmt, kernel)
    n_cache = 2 if kv_fmt else 1
    attrs = _attributes(dv, v_offset, scale, causal, kv_fmt, kernel)
    target = _TARGET_QUANT if kv_fmt else _TARGET

    def ffi(splits: int):
        def run(q, *args):
            batch, seq_q, heads, _ = q.shape
            out_sharding, lse_sharding = _sharding.typed_like(q)
            out_types = (
                jax.ShapeDtypeStruct((batch, seq_q, heads, dv), q.dtype, sharding=out_sharding),
                jax.ShapeDtypeStruct((batch, heads, seq_q), jnp.float32, sharding=lse_sharding),
                *_splits.split_partial_types(batch, splits, seq_q, heads, dv),
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

    def resplit(batch, seq_q, heads, heads_kv, seq_kv, dk, platform):
        blocks_per_sm = 1
        if _backend.is_gpu(platform):
            blocks_per_sm = _ffi.module("gpu").mla_blocks_per_sm(seq_q * heads, kv_fmt)
        return _splits.choose_num_splits(
            requested,
            batch,
            seq_q,
            heads,
            heads_kv,
            seq_kv,
            platform=platform,
            dk=dk,
            blocks_per_sm=blocks_per_sm,
        )

    sharded = _sharding.partitioned(_OP, ffi, num_splits, resplit)

    @jax.custom_batching.custom_vmap
    def call(q, *args):
        return sharded(q, *args)

    @call.def_vmap
    def rule(axis_size, in_batched, q, *args):
        if in_batched[0] and not any(in_batched[1:]):
            # Every head reads the same latent rows: the vmapped query sets are
            # just more heads.
            n, batch, seq_q, heads, dk = q.shape
            out, lse = call(q.transpose(1, 2, 0, 3, 4).reshape(batch, seq_q, n * heads, dk), *args)
            out = out.reshape(batch, seq_q, n, heads, dv).transpose(2, 0, 1, 3, 4)
            lse = lse.reshape(batch, n, heads, seq_q).transpose(1, 0, 2, 3)
            return (out, lse), (True, True)
        # qs and d are shared (not copied) only together: the kernel reads both
        # with one batch mapping.
        cache_batched = in_batched[1 : 1 + n_cache]
        caches = tuple(range(1, 1 + n_cache)) if len(set(cache_batched)) == 1 else ()
        outs = _batching.fold_vmap_into_batch(
            call, axis_size, in_batched, (q, *args), caches=caches
        )
        return outs, (True, True)

    return call


def _paged_call(
    dv: int,
    v_offset: int,
    scale: float,
    causal: bool,
    num_splits: int,
    kv_fmt: int,
    kernel: np.int32 | None,
):
    """The FFI call of the *_paged targets: (q, pages[, scales], block_table,
    q_pos, kv_len). It has no sharding rules: split over a mesh, XLA runs it
    on replicated operands. Its vmap rule folds the vmapped axis into the
    batch, and a vmapped cache into the pages (_batching.fold_vmap_paged)."""
    n_cache = 2 if kv_fmt else 1
    attrs = _attributes(dv, v_offset, scale, causal, kv_fmt, kernel)
    attrs["num_splits"] = np.int64(num_splits)  # C++ int64_t
    target = (_TARGET_QUANT if kv_fmt else _TARGET) + _PAGED

    @jax.custom_batching.custom_vmap
    def call(q, *args):
        batch, seq_q, heads, _ = q.shape
        out_types = (
            jax.ShapeDtypeStruct((batch, seq_q, heads, dv), q.dtype),
            jax.ShapeDtypeStruct((batch, heads, seq_q), jnp.float32),
            *_splits.split_partial_types(batch, num_splits, seq_q, heads, dv),
        )
        out, lse, _, _ = jax.ffi.ffi_call(target, out_types, vmap_method="sequential")(
            q, *args, **attrs
        )
        return out, lse

    @call.def_vmap
    def rule(axis_size, in_batched, q, *args):
        return _batching.fold_vmap_paged(call, axis_size, in_batched, (q, *args), n_cache), (
            True,
            True,
        )

    return call
