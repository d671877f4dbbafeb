"""Pure-JAX references: the definition of what every jax_mla op computes.

Naive and readable on purpose: scores are materialized, everything is computed
in float32 (inputs are upcast, products at HIGHEST precision), and the result
is cast to q's dtype. The native kernels are tested against these functions
(and these against float64 numpy on small cases). They are not the speed
baseline: the benchmark compares with the best plain-JAX formulation.

Semantics shared by both ops (docs/design.md, "Positions and lengths"):
  * query row i of batch b is at absolute position q_pos[b] + i; q_pos
    defaults to kv_len - Sq (the queries are the last Sq tokens);
  * keys at positions >= kv_len[b] do not exist; kv_len is clamped to
    [0, Skv], as traced values are;
  * causal: the query at position p sees keys j <= p;
  * a query that sees no key gets output 0 and LSE -inf;
  * LSE[b, h, i] = log(sum_j exp(scale * q.k_j)) over the visible keys.
"""

from __future__ import annotations

import inspect
import math

import jax
import jax.numpy as jnp

__all__ = [
    "attention",
    "attention_quantized",
    "gather_pages",
    "mla",
    "mla_quantized",
    "page_mask",
    "round_query_q8",
    "visible_mask",
]


# The public functions are jitted (their static options named): run eagerly, a
# reference of a few hundred ops would dispatch and compile each op on its own,
# several seconds for every new shape.
def _jit(fn):
    static = ("dv", "v_offset", "causal", "round_p")
    names = [n for n in static if n in inspect.signature(fn).parameters]
    return jax.jit(fn, static_argnames=names)


def _per_batch(x, batch: int, default) -> jax.Array:
    """An int32 scalar or [B] value (or None -> default) as an int32 [B] array."""
    x = default if x is None else x
    return jnp.broadcast_to(jnp.asarray(x, jnp.int32), (batch,))


def visible_mask(q_pos, kv_len, seq_q: int, seq_kv: int, causal: bool, key_mask=None) -> jax.Array:
    """[B, Sq, Skv] bool: which keys each query row sees (q_pos, kv_len: int32
    [B]; key_mask: None or [B, Skv] bool, False for keys that do not exist)."""
    mask = _existing_keys(kv_len, seq_kv, key_mask)[:, None, :]
    key = jnp.arange(seq_kv, dtype=jnp.int32)
    if causal:
        # key j <= q_pos + i, written as j - i <= q_pos: q_pos + i may not fit
        # in int32 (q_pos near 2**31 - 1), j - i always does.
        row = jnp.arange(seq_q, dtype=jnp.int32)
        mask = mask & (key[None, None, :] - row[None, :, None] <= q_pos[:, None, None])
    return mask


@_jit
def attention(q, k, v, *, scale=None, causal=False, q_pos=None, kv_len=None, key_mask=None):
    """Reference flash_attention. Returns (out [B, Sq, Hq, Dv] in q.dtype, lse [B, Hq, Sq] f32).

    q [B, Sq, Hq, Dk], k [B, Skv, Hkv, Dk], v [B, Skv, Hkv, Dv], Hq % Hkv == 0;
    query head h uses KV head h // (Hq // Hkv). key_mask: None, or [B, Skv]
    bool with False for keys that do not exist besides those past kv_len (the
    keys of a paged cache's out-of-range pages, page_mask).
    """
    batch, seq_q, heads_q, dk = q.shape
    seq_kv = k.shape[1]
    scale = 1.0 / math.sqrt(dk) if scale is None else scale
    p, m, l, kv_len = _softmax_weights(q, k, scale, causal, q_pos, kv_len, key_mask)
    # Keys past kv_len do not exist: zero them so that whatever the cache holds
    # there (stale rows, NaN poison) cannot leak in through 0 * NaN.
    exists = _existing_keys(kv_len, seq_kv, key_mask)
    vf = jnp.where(exists[:, :, None, None], v.astype(jnp.float32), 0.0)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p, vf, precision=jax.lax.Precision.HIGHEST)
    return _normalized(o, m, l, q.dtype)


def _softmax_weights(q, k, scale, causal, q_pos, kv_len, key_mask=None):
    """The unnormalized softmax weights of q [B, Sq, Hq, Dk] over k [B, Skv,
    Hkv, Dk] in float32: p = exp(s - m) [B, Hkv, G, Sq, Skv] (0 where masked),
    the row maxima m and sums l ([..., 1]; m = 0 for a row that sees nothing),
    and kv_len materialized per batch row."""
    batch, seq_q, heads_q, dk = q.shape
    seq_kv, heads_kv = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    kv_len = _per_batch(kv_len, batch, seq_kv)
    q_pos = _per_batch(q_pos, batch, jnp.clip(kv_len, 0, seq_kv) - seq_q)
    qf = q.astype(jnp.float32).reshape(batch, seq_q, heads_kv, group, dk)
    s = jnp.einsum(
        "bqhgd,bkhd->bhgqk", qf, k.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    s = s * jnp.float32(scale)
    mask = visible_mask(q_pos, kv_len, seq_q, seq_kv, causal, key_mask)[:, None, None]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, initial=-jnp.inf, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # rows that see nothing: avoid inf - inf
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    return p, m, l, kv_len


def _existing_keys(kv_len, seq_kv, key_mask=None):
    """[B, Skv]: key j exists in batch row b (j < kv_len[b], and key_mask[b, j])."""
    exists = jnp.arange(seq_kv)[None, :] < jnp.clip(kv_len, 0, seq_kv)[:, None]
    return exists if key_mask is None else exists & key_mask


def gather_pages(pages, block_table):
    """A paged cache as a contiguous one: pages [num_pages, page_size, ...]
    (an array or a QuantizedKV) and block_table int32 [B, max_pages] ->
    [B, max_pages * page_size, ...], row t of sequence b being row
    t % page_size of page block_table[b, t // page_size]. Out-of-range
    entries read page 0 instead; page_mask marks their keys."""

    def gather(x):
        rows = x[jnp.clip(block_table, 0, x.shape[0] - 1)]  # [B, max_pages, page_size, ...]
        return rows.reshape((rows.shape[0], -1) + rows.shape[3:])

    return jax.tree_util.tree_map(gather, pages)


def page_mask(block_table, num_pages: int, page_size: int) -> jax.Array:
    """[B, max_pages * page_size] bool: the keys of pages whose index lies in
    [0, num_pages); the others are skipped, as if they did not exist."""
    valid = (block_table >= 0) & (block_table < num_pages)
    return jnp.repeat(valid, page_size, axis=1)


def _normalized(o, m, l, dtype):
    """(out [B, Sq, Hq, Dv] in dtype, lse [B, Hq, Sq] f32) from the unnormalized
    output o [B, Sq, Hkv, G, Dv] and _softmax_weights' m and l."""
    batch, seq_q, heads_kv, group, dv = o.shape
    l_q = jnp.moveaxis(l[..., 0], -1, 1)[..., None]  # [B, Sq, Hkv, G, 1]
    o = jnp.where(l_q > 0, o / jnp.where(l_q > 0, l_q, 1.0), 0.0)
    lse = jnp.where(l[..., 0] > 0, jnp.log(l[..., 0]) + m[..., 0], -jnp.inf)
    out = o.reshape(batch, seq_q, heads_kv * group, dv).astype(dtype)
    return out, lse.reshape(batch, heads_kv * group, seq_q).astype(jnp.float32)


@_jit
def mla(
    q, kv, *, dv=512, v_offset=0, scale=None, causal=False, q_pos=None, kv_len=None, key_mask=None
):
    """Reference flash_mla: attention with one latent KV head.

    q [B, Sq, H, Dk], kv [B, Skv, Dk]; K is the whole row, V is
    kv[..., v_offset:v_offset + dv]. Returns (out [B, Sq, H, dv], lse [B, H, Sq]).
    """
    k = kv[:, :, None, :]
    v = kv[:, :, None, v_offset : v_offset + dv]
    return attention(
        q, k, v, scale=scale, causal=causal, q_pos=q_pos, kv_len=kv_len, key_mask=key_mask
    )


# ---------------------------------------------------------------------------
# Quantized caches: what the CPU kernels compute, exactly up to float32
# summation order. Over 8-bit K (q8_0, q8_kv) the scaled query is rounded to 8
# bits (round_query_q8); over 8-bit V the softmax weights P are rounded to 8
# bits with V's scale folded in (below; ffi/common/quant_format.h). Everything
# else is the float reference over the dequantized cache.

_EIGHT_BIT = ("q8_0", "q8_kv")
P_GROUP = 64  # keys per P-rounding group: absolute positions [64 g, 64 g + 64)
P_LEVELS = 255.0
P_TINY = 2.0**-64  # groups whose largest weight is below this get q = 0


def _exact_div(a, c: float) -> jax.Array:
    """a / c correctly rounded, as the kernels' C++ computes it: XLA rewrites a
    division by a constant into a multiplication by its reciprocal, which is
    not; a divisor computed at run time (a * 0 + c, a finite) keeps it."""
    return a / (a * 0 + jnp.float32(c))


def _is_quantized(x) -> bool:
    return hasattr(x, "fmt") and hasattr(x, "qs")


def round_query_q8(x) -> jax.Array:
    """x (float32 [..., D]) rounded to 8 bits per block of 32 values (the last
    may be shorter) with q8_0's rule and a float32 scale: d = max|x| / 127,
    x -> d * roundf(x * (1 / d)), round half away from zero (0 when d = 0)."""
    x = jnp.asarray(x, jnp.float32)
    dim = x.shape[-1]
    pad = (-dim) % 32
    xb = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]).reshape(x.shape[:-1] + (-1, 32))
    d = _exact_div(jnp.max(jnp.abs(xb), axis=-1, keepdims=True), 127)
    inv = jnp.where(d != 0, jnp.float32(1) / jnp.where(d != 0, d, 1), 0)
    v = xb * inv
    t = jnp.trunc(v)
    r = jnp.where(jnp.abs(v - t) >= 0.5, t + jnp.sign(v), t)  # roundf: half away from zero
    return (d * r).reshape(x.shape[:-1] + (-1,))[..., :dim]


@_jit
def attention_quantized(
    q, k, v, *, scale=None, causal=False, q_pos=None, kv_len=None, round_p=True, key_mask=None
):
    """flash_attention as the CPU kernels compute it; k and v are float arrays or
    QuantizedKV. Returns (out, lse) like `attention`.

    * 8-bit k: the query is taken as round_query_q8(q * scale) at scale 1.
    * 8-bit v (and round_p): the softmax weights are rounded. For each query
      row, group of 64 keys (positions [64 g, 64 g + 64)) and block j of 32 V
      columns: x_t = p_t * dv[t, j] with p_t = exp(s_t - m) (float32; q8_kv's
      per-key scale serves every block), d = max_t x_t / 255, q_t =
      round_half_even(x_t / d) computed as x_t * (1 / d) (q = 0 when
      max_t x_t < 2^-64), and block j of the output is
      sum_g d_g * sum_{t in g} q_t * vq[t] / l, vq the int8 values and l the
      float sum of p_t. q_t does not depend on m, so any running max gives the
      same q. The LSE is unchanged.
    """
    from jax_mla import quant  # imported here: quant is loaded after this module

    out_dtype = q.dtype
    q, scale = _query_as_computed(q, k, scale)
    kf = quant.dequantize(k) if _is_quantized(k) else k
    kw = dict(scale=scale, causal=causal, q_pos=q_pos, kv_len=kv_len, key_mask=key_mask)
    if not (round_p and _is_quantized(v) and v.fmt in _EIGHT_BIT):
        vf = quant.dequantize(v) if _is_quantized(v) else v
        out, lse = attention(q, kf, vf, **kw)
    else:
        out, lse = _attention_rounded_p(q, kf, v.qs, v.d, **kw)
    return out.astype(out_dtype), lse


def _query_as_computed(q, k, scale):
    """(query, scale) as the kernels take them over k: rounded at scale 1 over 8-bit k."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if _is_quantized(k) and k.fmt in _EIGHT_BIT:
        return round_query_q8(q.astype(jnp.float32) * jnp.float32(scale)), 1.0
    return q, scale


def _attention_rounded_p(q, kf, v_qs, v_d, *, scale, causal, q_pos, kv_len, key_mask=None):
    """attention over float K and 8-bit V (int8 values v_qs [B, Skv, Hkv, Dv],
    scales v_d [B, Skv, Hkv, ceil(Dv / 32) or 1]) with P rounded."""
    batch, seq_q = q.shape[:2]
    seq_kv, heads_kv = kf.shape[1], kf.shape[2]
    dv = v_qs.shape[-1]
    hi = jax.lax.Precision.HIGHEST
    p, m, l, kv_len = _softmax_weights(q, kf, scale, causal, q_pos, kv_len, key_mask)

    # V's int8 values and per-(key, block) scales; keys past kv_len zeroed.
    nbv = -(-dv // 32)
    exists = _existing_keys(kv_len, seq_kv, key_mask)[..., None, None]
    vq = jnp.where(exists, v_qs.astype(jnp.float32), 0.0)  # [B, Skv, Hkv, Dv]
    vd = jnp.broadcast_to(v_d.astype(jnp.float32), (batch, seq_kv, heads_kv, nbv))
    vd = jnp.where(exists, vd, 0.0)
    n_groups = -(-seq_kv // P_GROUP)
    pad_k = n_groups * P_GROUP - seq_kv
    p = jnp.pad(p, [(0, 0)] * 4 + [(0, pad_k)])
    vd = jnp.pad(vd, [(0, 0), (0, pad_k), (0, 0), (0, 0)])
    vq = jnp.pad(vq, [(0, 0), (0, pad_k), (0, 0), (0, nbv * 32 - dv)])

    # The (G, Sq) rows of a KV head are folded into one axis R: XLA:CPU (jax
    # 0.10) crashes running some fusions of arrays of rank 7 (the einsum below
    # with G and Sq apart), so nothing here goes past rank 6.
    group = p.shape[2]
    rows = group * p.shape[3]
    p = p.reshape(batch, heads_kv, rows, n_groups, P_GROUP)
    vd_t = jnp.moveaxis(vd, 2, 1).reshape(batch, heads_kv, 1, n_groups, P_GROUP, nbv)
    x = p[..., None] * vd_t  # [B, Hkv, R, n_groups, P_GROUP, nbv]
    amax = jnp.max(x, axis=4, keepdims=True)
    d = _exact_div(amax, P_LEVELS)
    inv = jnp.where(amax < P_TINY, 0.0, jnp.float32(1) / jnp.where(amax < P_TINY, 1.0, d))
    pq = jnp.round(x * inv)  # half to even
    vqg = vq.reshape(batch, n_groups, P_GROUP, heads_kv, nbv, 32)
    # Exact integer sums per group (each < 2^24), then the group scales.
    inner = jnp.einsum("bhrnkj,bnkhjc->bhrnjc", pq, vqg, precision=hi)
    o = jnp.sum(d[..., 0, :, None] * inner, axis=3)  # [B, Hkv, R, nbv, 32]
    o = o.reshape(batch, heads_kv, group, seq_q, nbv * 32)[..., :dv]
    o = jnp.moveaxis(o, 3, 1)  # [B, Sq, Hkv, G, Dv]
    return _normalized(o, m, l, q.dtype)


@_jit
def mla_quantized(
    q,
    kv,
    *,
    dv=512,
    v_offset=0,
    scale=None,
    causal=False,
    q_pos=None,
    kv_len=None,
    round_p=True,
    key_mask=None,
):
    """flash_mla as the CPU kernels compute it over a float or QuantizedKV
    latent cache: attention_quantized with K the rows and V their slice."""
    from jax_mla import quant

    if not _is_quantized(kv):
        return mla(
            q,
            kv,
            dv=dv,
            v_offset=v_offset,
            scale=scale,
            causal=causal,
            q_pos=q_pos,
            kv_len=kv_len,
            key_mask=key_mask,
        )
    k = quant.QuantizedKV(kv.qs[:, :, None], kv.d[:, :, None], kv.fmt)
    out_dtype = q.dtype
    q, scale = _query_as_computed(q, k, scale)
    kf = quant.dequantize(k)
    kw = dict(scale=scale, causal=causal, q_pos=q_pos, kv_len=kv_len, key_mask=key_mask)
    if not (round_p and kv.fmt in _EIGHT_BIT):
        out, lse = attention(q, kf, kf[..., v_offset : v_offset + dv], **kw)
    else:
        v_qs = kv.qs[:, :, None, v_offset : v_offset + dv]
        if kv.fmt == "q8_kv":
            v_d = kv.d[:, :, None]
        else:
            v_d = kv.d[:, :, None, v_offset // 32 : v_offset // 32 + -(-dv // 32)]
        out, lse = _attention_rounded_p(q, kf, v_qs, v_d, **kw)
    return out.astype(out_dtype), lse
