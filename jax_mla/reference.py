"""Pure-JAX references: the definition of what every jax_mla op computes.

Naive and readable on purpose: scores are materialized, everything is computed
in float32 (inputs are upcast, products at HIGHEST precision), and the result
is cast to q's dtype. The native kernels are tested against these functions
(and these against float64 numpy on small cases). They are not the speed
baseline: the benchmark compares with the best plain-JAX formulation.

Semantics shared by both ops (DESIGN.md):
  * query row i of batch b is at absolute position q_pos[b] + i; q_pos
    defaults to kv_len - Sq (the queries are the last Sq tokens);
  * keys at positions >= kv_len[b] do not exist; kv_len is clamped to
    [0, Skv], as traced values are;
  * causal: the query at position p sees keys j <= p;
  * a query that sees no key gets output 0 and LSE -inf;
  * LSE[b, h, i] = log(sum_j exp(scale * q.k_j)) over the visible keys.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["attention", "mla", "visible_mask"]


def _per_batch(x, batch: int, default) -> jax.Array:
    """An int32 scalar or [B] value (or None -> default) as an int32 [B] array."""
    x = default if x is None else x
    return jnp.broadcast_to(jnp.asarray(x, jnp.int32), (batch,))


def visible_mask(q_pos, kv_len, seq_q: int, seq_kv: int, causal: bool) -> jax.Array:
    """[B, Sq, Skv] bool: which keys each query row sees (q_pos, kv_len: int32 [B])."""
    kv_len = jnp.clip(kv_len, 0, seq_kv)
    key = jnp.arange(seq_kv, dtype=jnp.int32)
    mask = key[None, None, :] < kv_len[:, None, None]
    if causal:
        # key j <= q_pos + i, written as j - i <= q_pos: q_pos + i may not fit
        # in int32 (q_pos near 2**31 - 1), j - i always does.
        row = jnp.arange(seq_q, dtype=jnp.int32)
        mask = mask & (key[None, None, :] - row[None, :, None] <= q_pos[:, None, None])
    return mask


def attention(q, k, v, *, scale=None, causal=False, q_pos=None, kv_len=None):
    """Reference flash_attention. Returns (out [B, Sq, Hq, Dv] in q.dtype, lse [B, Hq, Sq] f32).

    q [B, Sq, Hq, Dk], k [B, Skv, Hkv, Dk], v [B, Skv, Hkv, Dv], Hq % Hkv == 0;
    query head h uses KV head h // (Hq // Hkv).
    """
    batch, seq_q, heads_q, dk = q.shape
    seq_kv, heads_kv = k.shape[1], k.shape[2]
    dv = v.shape[-1]
    group = heads_q // heads_kv
    scale = 1.0 / math.sqrt(dk) if scale is None else scale
    kv_len = _per_batch(kv_len, batch, seq_kv)
    q_pos = _per_batch(q_pos, batch, jnp.clip(kv_len, 0, seq_kv) - seq_q)

    hi = jax.lax.Precision.HIGHEST
    qf = q.astype(jnp.float32).reshape(batch, seq_q, heads_kv, group, dk)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qf, k.astype(jnp.float32), precision=hi)
    s = s * jnp.float32(scale)
    mask = visible_mask(q_pos, kv_len, seq_q, seq_kv, causal)[:, None, None]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, initial=-jnp.inf, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # rows that see nothing: avoid inf - inf
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    # Keys past kv_len do not exist: zero them so that whatever the cache holds
    # there (stale rows, NaN poison) cannot leak in through 0 * NaN.
    exists = jnp.arange(seq_kv)[None, :] < jnp.clip(kv_len, 0, seq_kv)[:, None]
    vf = jnp.where(exists[:, :, None, None], v.astype(jnp.float32), 0.0)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p, vf, precision=hi)
    l_q = jnp.moveaxis(l[..., 0], -1, 1)[..., None]  # [B, Sq, Hkv, G, 1]
    o = jnp.where(l_q > 0, o / jnp.where(l_q > 0, l_q, 1.0), 0.0)
    lse = jnp.where(l[..., 0] > 0, jnp.log(l[..., 0]) + m[..., 0], -jnp.inf)
    out = o.reshape(batch, seq_q, heads_q, dv).astype(q.dtype)
    return out, lse.reshape(batch, heads_q, seq_q).astype(jnp.float32)


def mla(q, kv, *, dv=512, v_offset=0, scale=None, causal=False, q_pos=None, kv_len=None):
    """Reference flash_mla: attention with one latent KV head.

    q [B, Sq, H, Dk], kv [B, Skv, Dk]; K is the whole row, V is
    kv[..., v_offset:v_offset + dv]. Returns (out [B, Sq, H, dv], lse [B, H, Sq]).
    """
    k = kv[:, :, None, :]
    v = kv[:, :, None, v_offset:v_offset + dv]
    return attention(q, k, v, scale=scale, causal=causal, q_pos=q_pos, kv_len=kv_len)
