"""Reverse-mode autodiff of both ops (docs/design.md, "Autodiff").

Each op's forward (the native kernel or the reference) is wrapped in a
jax.custom_vjp whose forward saves only q, the caches, the positions, the
output and the LSE: never an Sq x Skv matrix. The backward recomputes the
softmax weights from the LSE, FlashAttention's way, for each query row i and
visible key j:

    P_ij = exp(scale q_i.k_j - lse_i)       delta_i = dout_i.out_i - dlse_i
    dS_ij = P_ij (dout_i.v_j - delta_i)
    dq_i = scale sum_j dS_ij k_j    dk_j = scale sum_i dS_ij q_i    dv_j = sum_i P_ij dout_i

(dlse is the LSE's cotangent: d lse_i / d s_ij = P_ij). It runs either as the
native target jax_mla_flash_attention_bwd (float caches, where the platform's
module has it and takes the configuration: native_backward_problem) or as the
pure-JAX blockwise version below (lax.scan over key blocks, float32, memory
O(block x Sq)). flash_mla's backward is attention's with one KV head: K the
latent rows, V their slice, whose gradient is added into the slice's columns
of the kv gradient.

Over a QuantizedKV cache the gradient flows to q (and to a float cache beside
it) only, and is that of the float attention over the dequantized cache, i.e.
jax.grad of reference.attention(q, dequantize(k), dequantize(v)): the 8-bit
roundings of the query and of P that the kernels apply are not differentiated
(a straight-through gradient). The backward recomputes that float attention's
output and LSE blockwise, dequantizing one key block at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_mla import _backend, _batching, _capabilities, _ffi, _sharding, reference
from jax_mla.quant import QuantizedKV, dequantize

TARGET_BWD = "jax_mla_flash_attention_bwd"
# Keys per block of the pure-JAX backward: its workspace is a few
# [B, Hq, Sq, KEY_BLOCK] float32 arrays.
KEY_BLOCK = 256

_HI = jax.lax.Precision.HIGHEST
_SymbolicZero = jax.custom_derivatives.SymbolicZero


def has_native_backward(platform: str) -> bool:
    """Whether `platform`'s native module has the backward kernel."""
    return _ffi.has_target(platform, TARGET_BWD)


def native_backward_problem(platform: str | None, q, k, v, dout) -> str | None:
    """Why the native backward does not take this gradient call (None when it
    does): k and v are caches [B, Skv, Hkv, D]. The CPU target takes every
    float configuration its forward takes; the CUDA one those of its table's
    attention_bwd_head_dims and dtypes (not flash_mla's latent layout, whose
    gradient there is the pure-JAX backward)."""
    if platform is None:
        return "the reference backend has no native backward"
    if _quantized(k, v):
        return "the native backward takes float caches only"
    if not has_native_backward(platform):
        return _ffi.why_missing(platform, TARGET_BWD)
    if not _backend.is_gpu(platform):
        return None
    dtypes = dict(q=q.dtype, k=k.dtype, v=v.dtype, dout=dout.dtype)
    return _capabilities.cuda_attention_bwd_problem(
        _capabilities.cuda(), dtypes, q.shape[-1], v.shape[-1]
    )


# ------------------------------------------------------------------ the custom_vjp


def attention(
    forward: Callable,
    q: jax.Array,
    k: jax.Array | QuantizedKV,
    v: jax.Array | QuantizedKV,
    q_pos: jax.Array,
    kv_len: jax.Array,
    *,
    op: str,
    scale: float,
    causal: bool,
    platform: str | None,
    block_table: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """forward(q, k, v, q_pos, kv_len[, block_table]) -> (out, lse),
    differentiable in q and the float caches. platform: where the native
    forward runs (its native backward is used when it exists and no cache is
    quantized), or None for the reference backend (pure-JAX backward).
    block_table: the caches are paged (see _paged_backward)."""

    def backward(q, caches, out, lse, dout, dlse, q_pos, kv_len, *table):
        k, v = caches
        if table:
            return _paged_backward(
                q, caches, table[0], None, out, lse, dout, dlse, q_pos, kv_len, scale, causal
            )
        if native_backward_problem(platform, q, k, v, dout) is None:
            delta = _delta(out, dout, dlse)
            dq, dk, dv = _native_backward(op, scale, causal, _backward_kernel(platform))(
                q, k, v, dout, lse, delta, q_pos, kv_len
            )
        else:
            dq, dk, dv = _blockwise_backward(
                q, k, v, out, lse, dout, dlse, q_pos, kv_len, scale, causal
            )
        return dq.astype(q.dtype), (_cast(dk, k), _cast(dv, v))

    def forward_caches(q, caches, *positions):
        return forward(q, *caches, *positions)

    positions = (q_pos, kv_len) if block_table is None else (q_pos, kv_len, block_table)
    return _differentiable(op, forward_caches, backward, q, (k, v), positions)


def mla(
    forward: Callable,
    q: jax.Array,
    kv: jax.Array | QuantizedKV,
    q_pos: jax.Array,
    kv_len: jax.Array,
    *,
    op: str,
    dv: int,
    v_offset: int,
    scale: float,
    causal: bool,
    platform: str | None,
    block_table: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """flash_mla's counterpart of `attention`: forward(q, kv, q_pos, kv_len[, block_table])."""

    def backward(q, caches, out, lse, dout, dlse, q_pos, kv_len, *table):
        (kv,) = caches
        if table:
            return _paged_backward(
                q,
                caches,
                table[0],
                (v_offset, dv),
                out,
                lse,
                dout,
                dlse,
                q_pos,
                kv_len,
                scale,
                causal,
            )
        if isinstance(kv, QuantizedKV):
            k = QuantizedKV(kv.qs[:, :, None], kv.d[:, :, None], kv.fmt)
        else:
            k = kv[:, :, None]
        v = None if isinstance(kv, QuantizedKV) else kv[:, :, None, v_offset : v_offset + dv]
        if native_backward_problem(platform, q, k, v, dout) is None:
            delta = _delta(out, dout, dlse)
            dq, dk, dvv = _native_backward(op, scale, causal, _backward_kernel(platform))(
                q, k, v, dout, lse, delta, q_pos, kv_len
            )
        else:
            dq, dk, dvv = _blockwise_backward(
                q, k, (v_offset, dv), out, lse, dout, dlse, q_pos, kv_len, scale, causal
            )
        if dk is None:
            return dq.astype(q.dtype), (None,)
        dkv = dk[:, :, 0].at[..., v_offset : v_offset + dv].add(dvv[:, :, 0])
        return dq.astype(q.dtype), (dkv.astype(kv.dtype),)

    def forward_caches(q, caches, *positions):
        return forward(q, caches[0], *positions)

    positions = (q_pos, kv_len) if block_table is None else (q_pos, kv_len, block_table)
    return _differentiable(op, forward_caches, backward, q, (kv,), positions)


def _paged_backward(
    q, caches, block_table, sliced, out, lse, dout, dlse, q_pos, kv_len, scale, causal
):
    """The pure-JAX backward over paged caches ([num_pages, page_size, ...]
    with one KV head axis added for flash_mla's, whose V is `sliced` =
    (v_offset, dv)): the pages are gathered into contiguous caches (the
    backward may copy; the forward kernels read pages in place), keys of
    out-of-range pages masked as the forward skips them, and each key's
    gradient added back into its page (nothing into out-of-range ones)."""
    num_pages, page_size = _leaf(caches[0]).shape[:2]
    key_mask = reference.page_mask(block_table, num_pages, page_size)
    flat = [reference.gather_pages(c, block_table) for c in caches]
    if sliced is not None:
        kv = flat[0]
        k = (
            QuantizedKV(kv.qs[:, :, None], kv.d[:, :, None], kv.fmt)
            if _quantized(kv)
            else kv[:, :, None]
        )
        dq, dk, dvv = _blockwise_backward(
            q, k, sliced, out, lse, dout, dlse, q_pos, kv_len, scale, causal, key_mask
        )
        if dk is not None:
            v_offset, dv = sliced
            dk = dk[:, :, 0].at[..., v_offset : v_offset + dv].add(dvv[:, :, 0])
        grads = (dk,)
    else:
        dq, dk, dv = _blockwise_backward(
            q, *flat, out, lse, dout, dlse, q_pos, kv_len, scale, causal, key_mask
        )
        grads = (dk, dv)
    # Out-of-range entries scatter to index num_pages, which mode="drop" drops.
    index = jnp.where((block_table >= 0) & (block_table < num_pages), block_table, num_pages)

    def scatter(grad, pages):
        if grad is None:
            return None
        grad = grad.reshape((-1, page_size) + grad.shape[2:])
        zeros = jnp.zeros(pages.shape, jnp.float32)
        return zeros.at[index.reshape(-1)].add(grad, mode="drop").astype(pages.dtype)

    return dq.astype(q.dtype), tuple(scatter(g, c) for g, c in zip(grads, caches))


def _leaf(cache):
    return cache.qs if isinstance(cache, QuantizedKV) else cache


def _differentiable(op, forward, backward, q, caches, positions):
    """forward(q, caches, *positions) -> (out, lse) as a custom_vjp whose
    backward is backward(q, caches, out, lse, dout, dlse, *positions) ->
    (dq, dcaches), None for a quantized cache's. positions: (q_pos, kv_len),
    and a paged cache's block_table: integer arrays, not differentiated.
    Caches travel as leaves (a
    QuantizedKV as its (qs, d), its format static) so that custom_vjp sees
    arrays only."""
    fmts = tuple(c.fmt if isinstance(c, QuantizedKV) else None for c in caches)
    leaves = tuple((c.qs, c.d) if isinstance(c, QuantizedKV) else (c,) for c in caches)

    def rebuild(leaves):
        return tuple(
            QuantizedKV(*parts, fmt) if fmt else parts[0] for parts, fmt in zip(leaves, fmts)
        )

    def call(q, leaves, positions):
        out, lse = forward(q, rebuild(leaves), *positions)
        axes = _varying_axes(q, leaves, positions)
        return _vary(out, axes), _vary(lse, axes)

    def run_backward(q, leaves, out, lse, dout, dlse, positions):
        dq, dcaches = backward(q, rebuild(leaves), out, lse, dout, dlse, *positions)
        axes = _varying_axes(q, leaves, positions)
        dq = _input_gradient(dq, q, axes)
        dcaches = tuple(
            None if d is None else _input_gradient(d, parts[0], axes)
            for d, parts in zip(dcaches, leaves)
        )
        # A placeholder for a quantized cache's gradient keeps the outputs arrays.
        return dq, tuple(jnp.zeros((0,), jnp.float32) if d is None else d for d in dcaches)

    # Differentiating the rules themselves (second order) reaches these
    # custom_jvp rules, which raise, instead of JAX's FFI-call message.
    primal = _first_order_only(op, call)
    run_backward = _first_order_only(op, run_backward)
    f = jax.custom_vjp(call)

    def fwd(q, leaves, positions):
        for fmt, parts in zip(fmts, leaves):
            if fmt and any(p.perturbed for p in parts):
                raise TypeError(
                    f"{op}: cannot differentiate with respect to a {fmt} QuantizedKV cache: over "
                    "a quantized cache the gradient flows to the queries (and float caches) "
                    "only. Differentiate a float cache, or stop_gradient the quantized one"
                )
        values = jax.tree_util.tree_map(lambda p: p.value, (q, leaves, positions))
        out, lse = primal(*values)
        wanted = tuple(not fmt and parts[0].perturbed for fmt, parts in zip(fmts, leaves))
        return (out, lse), (values, out, lse, wanted)

    def bwd(res, cts):
        (q, leaves, positions), out, lse, wanted = res
        dout, dlse = cts
        dout = jnp.zeros(out.shape, out.dtype) if isinstance(dout, _SymbolicZero) else dout
        dlse = jnp.zeros(lse.shape, lse.dtype) if isinstance(dlse, _SymbolicZero) else dlse
        dq, dcaches = run_backward(q, leaves, out, lse, dout, dlse, positions)
        dleaves = tuple(
            (None, None) if fmt else (d if w else None,) for fmt, d, w in zip(fmts, dcaches, wanted)
        )
        return dq, dleaves, (None,) * len(positions)

    f.defvjp(fwd, bwd, symbolic_zeros=True)
    return f(q, leaves, tuple(positions))


# Inside shard_map (check_vma), JAX types each value by the manual axes it
# varies over. An FFI call's results are typed as varying over none, so the
# op's results are cast to vary over every axis their inputs vary over (else
# JAX transposes the collectives after them wrongly), and each gradient is
# summed over the axes its input does not vary over, as the transpose of
# JAX's own implicit cast would. Outside shard_map there are no such axes.


def _varying_axes(*inputs) -> frozenset:
    axes: set = set()
    for a in jax.tree_util.tree_leaves(inputs):
        axes |= set(jax.typeof(a).mat.varying)
    return frozenset(axes)


def _vary(x, axes: frozenset):
    missing = tuple(sorted(axes - set(jax.typeof(x).mat.varying)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _input_gradient(grad, x, axes: frozenset):
    """grad (computed on each device) as the gradient of input x."""
    summed = tuple(sorted(axes - set(jax.typeof(x).mat.varying)))
    grad = _vary(grad, axes)
    return jax.lax.psum(grad, summed) if summed else grad


def _first_order_only(op: str, fn: Callable) -> Callable:
    """fn as a custom_jvp whose rule raises."""
    fn = jax.custom_jvp(fn)

    @fn.defjvp
    def _(primals, tangents):
        raise NotImplementedError(
            f"{op}: second-order differentiation (grad of grad, jvp of a gradient, hessian) is "
            "not supported: the backward pass has no derivative of its own"
        )

    return fn


def _cast(grad, cache):
    return None if grad is None else grad.astype(cache.dtype)


def _quantized(*caches) -> bool:
    return any(isinstance(c, QuantizedKV) for c in caches)


def _delta(out, dout, dlse) -> jax.Array:
    """rowsum(dout * out) - dlse, float32 [B, Hq, Sq]."""
    d = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    return jnp.swapaxes(d, 1, 2) - dlse.astype(jnp.float32)


# ------------------------------------------------------------------ native backward


def _backward_kernel(platform: str) -> np.int32 | None:
    """The CUDA backward's `kernel` attribute: flash_attention's family
    (JAX_MLA_CUDA_ATTENTION_KERNEL, read when the backward is traced), whose
    names the backward shares; None on the CPU, whose handler takes none."""
    if not _backend.is_gpu(platform):
        return None
    from jax_mla._cuda_kernels import cuda_kernel_attr  # GPU calls only

    return cuda_kernel_attr("flash_attention")


@functools.cache
def _native_backward(op: str, scale: float, causal: bool, kernel: np.int32 | None = None):
    """The FFI call of jax_mla_flash_attention_bwd (the contract is in
    docs/design.md, "Autodiff"): (q, k, v, dout, lse, delta, q_pos, kv_len)
    -> (dq, dk, dv) float32 (the callers cast them to the inputs' dtypes),
    with sharding rules like the forward's (_sharding.partitioned_backward).
    kernel: the CUDA kernel family (_backward_kernel), None on the CPU."""
    attrs = dict(scale=np.float32(scale), causal=np.bool_(causal))  # C++ float, bool
    if kernel is not None:
        attrs["kernel"] = np.int32(kernel)  # C++ int32_t

    def ffi(q, k, v, dout, lse, delta, q_pos, kv_len):
        out_types = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
        # vmap never reaches the FFI call: custom_vmap's rule below folds it.
        return jax.ffi.ffi_call(TARGET_BWD, out_types, vmap_method="sequential")(
            q, k, v, dout, lse, delta, q_pos, kv_len, **attrs
        )

    sharded = _sharding.partitioned_backward(op, ffi)

    @jax.custom_batching.custom_vmap
    def call(q, k, v, dout, lse, delta, q_pos, kv_len):
        # The contract's range over the global keys (C++ clamps again); a
        # context split's keys past it are then past every device's kv_len.
        kv_len = jnp.clip(kv_len, 0, k.shape[1])
        return sharded(q, k, v, dout, lse, delta, q_pos, kv_len)

    @call.def_vmap
    def rule(axis_size, in_batched, *args):
        # Every gradient is per example, so nothing is shared: fold the vmapped
        # axis into the batch, broadcasting what is not mapped.
        return _batching.fold_vmap_into_batch(call, axis_size, in_batched, args), (True,) * 3

    return call


# ------------------------------------------------------------------ pure-JAX blockwise


def _key_blocks(x, block: int, n: int):
    """A cache (array or QuantizedKV) as [n, B, block, ...] key blocks, zero-padded."""

    def split(a):
        a = jnp.pad(a, [(0, 0), (0, n * block - a.shape[1])] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a.reshape((a.shape[0], n, block) + a.shape[2:]), 1, 0)

    return jax.tree_util.tree_map(split, x)


def _read_block(x, exists) -> jax.Array:
    """One key block as float32, zero for keys that do not exist (whatever the
    cache holds there, NaN included, must not reach the arithmetic)."""
    x = dequantize(x, jnp.float32) if isinstance(x, QuantizedKV) else x.astype(jnp.float32)
    return jnp.where(exists[:, :, None, None], x, 0.0)


def _blocking(seq_kv: int) -> tuple[int, int]:
    block = max(1, min(KEY_BLOCK, seq_kv))
    return block, -(-seq_kv // block)


def _visible(j0, block, q_pos, kv_len, seq_q, causal, key_mask=None):
    """([B, 1, 1, Sq or 1, block] visible, [B, block] exists) for keys j0 + [0, block)
    (key_mask: None or this block's [B, block] of the caller's)."""
    keys = j0 + jnp.arange(block, dtype=jnp.int32)
    exists = keys[None, :] < kv_len[:, None]
    if key_mask is not None:
        exists = exists & key_mask
    mask = exists[:, None, :]
    if causal:
        # j <= q_pos + i as j - i <= q_pos (no int32 overflow), as the reference.
        rows = jnp.arange(seq_q, dtype=jnp.int32)
        mask = mask & (keys[None, None, :] - rows[None, :, None] <= q_pos[:, None, None])
    return mask[:, None, None], exists


def _blockwise(q, k, v, q_pos, kv_len, causal, body, init, key_mask=None):
    """Scans body(carry, (qf, kb, vb, visible)) over key blocks; v is an array,
    a QuantizedKV, or (v_offset, dv): the slice of k's rows (flash_mla).
    key_mask: None or [B, Skv] bool, False for keys that do not exist."""
    batch, seq_q, heads_q, dk = q.shape
    seq_kv, heads_kv = k.shape[1], k.shape[2]
    block, n = _blocking(seq_kv)
    kv_len = jnp.clip(kv_len, 0, seq_kv)
    qf = q.astype(jnp.float32).reshape(batch, seq_q, heads_kv, heads_q // heads_kv, dk)
    sliced = isinstance(v, tuple)
    xs = (_key_blocks(k, block, n), None if sliced else _key_blocks(v, block, n))
    masks = None if key_mask is None else _key_blocks(key_mask, block, n)

    def step(carry, x):
        i, (kb, vb), mb = x
        visible, exists = _visible(i * block, block, q_pos, kv_len, seq_q, causal, mb)
        kf = _read_block(kb, exists)
        vf = kf[..., v[0] : v[0] + v[1]] if sliced else _read_block(vb, exists)
        return body(carry, qf, kf, vf, visible)

    return jax.lax.scan(step, init, (jnp.arange(n, dtype=jnp.int32), xs, masks))


def _blockwise_forward(q, k, v, q_pos, kv_len, scale, causal, key_mask=None):
    """(out float32 [B, Sq, Hq, Dv], lse [B, Hq, Sq]) with an online softmax
    over key blocks: the float attention the reference defines."""
    batch, seq_q, heads_q, _ = q.shape
    heads_kv = k.shape[2]
    dv = v[1] if isinstance(v, tuple) else v.shape[3]
    group = heads_q // heads_kv

    def body(carry, qf, kf, vf, visible):
        m, l, acc = carry  # [B, Hkv, G, Sq] x2, [B, Hkv, G, Sq, Dv]
        s = jnp.einsum("bqhgd,bkhd->bhgqk", qf, kf, precision=_HI) * jnp.float32(scale)
        s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1, initial=-jnp.inf))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.where(visible, jnp.exp(s - m_safe[..., None]), 0.0)
        alpha = jnp.exp(m - m_safe)  # 0 while the row has seen nothing (m = -inf)
        acc = acc * alpha[..., None] + jnp.einsum("bhgqk,bkhd->bhgqd", p, vf, precision=_HI)
        return (m_new, l * alpha + jnp.sum(p, axis=-1), acc), None

    shape = (batch, heads_kv, group, seq_q)
    init = (
        jnp.full(shape, -jnp.inf, jnp.float32),
        jnp.zeros(shape, jnp.float32),
        jnp.zeros(shape + (dv,), jnp.float32),
    )
    (m, l, acc), _ = _blockwise(q, k, v, q_pos, kv_len, causal, body, init, key_mask)
    seen = l > 0
    out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, jnp.log(jnp.where(seen, l, 1.0)) + m, -jnp.inf)
    out = jnp.moveaxis(out, 3, 1).reshape(batch, seq_q, heads_q, dv)
    return out, lse.reshape(batch, heads_q, seq_q)


def _blockwise_backward(q, k, v, out, lse, dout, dlse, q_pos, kv_len, scale, causal, key_mask=None):
    """(dq, dk, dv) float32 (None for a quantized cache's),
    accumulated in float32 over key blocks. Over a quantized cache, out and
    lse are first recomputed as the float attention's (see the module doc)."""
    batch, seq_q, heads_q, dk_ = q.shape
    seq_kv, heads_kv = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    sliced = isinstance(v, tuple)
    if _quantized(k, v):
        out, lse = _blockwise_forward(q, k, v, q_pos, kv_len, scale, causal, key_mask)
    delta = _delta(out, dout, dlse).reshape(batch, heads_kv, group, seq_q)
    lse = lse.reshape(batch, heads_kv, group, seq_q)
    dof = dout.astype(jnp.float32).reshape(batch, seq_q, heads_kv, group, -1)
    scale = jnp.float32(scale)

    def body(dq, qf, kf, vf, visible):
        s = jnp.einsum("bqhgd,bkhd->bhgqk", qf, kf, precision=_HI) * scale
        # lse is -inf only for rows that see no key, where nothing is visible.
        p = jnp.where(visible, jnp.exp(s - lse[..., None]), 0.0)
        dp = jnp.einsum("bqhgd,bkhd->bhgqk", dof, vf, precision=_HI)
        ds = p * (dp - delta[..., None])
        dq = dq + scale * jnp.einsum("bhgqk,bkhd->bqhgd", ds, kf, precision=_HI)
        dkb = scale * jnp.einsum("bhgqk,bqhgd->bkhd", ds, qf, precision=_HI)
        dvb = jnp.einsum("bhgqk,bqhgd->bkhd", p, dof, precision=_HI)
        return dq, (dkb, dvb)

    init = jnp.zeros((batch, seq_q, heads_kv, group, dk_), jnp.float32)
    dq, (dk, dv) = _blockwise(q, k, v, q_pos, kv_len, causal, body, init, key_mask)

    def unblock(x, cache):
        if isinstance(cache, QuantizedKV):
            return None
        x = jnp.moveaxis(x, 0, 1)
        return x.reshape((batch, x.shape[1] * x.shape[2]) + x.shape[3:])[:, :seq_kv]

    return dq.reshape(q.shape), unblock(dk, k), unblock(dv, k if sliced else v)
