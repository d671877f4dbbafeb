"""The plain-JAX formulations the kernels are compared with: what a JAX user
without jax_mla would write, not the naive reference. Einsums in the cache's
own dtype with float32 accumulation (preferred_element_type), masking and a
float32 softmax; for MLA, V is the slice kv[..., :512]. A quantized cache is
dequantized to bf16 first (XLA's bf16 dots are its fast ones on the CPU, and
the native type of the GPU rows)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import jax_mla
from jax_mla.bench.cases import MLA_DV, SCALE, Case


def as_float(x, dtype=jnp.float32):
    """A cache as floats: a quantized one dequantized to dtype, a float one as is."""
    return jax_mla.dequantize(x, dtype) if isinstance(x, jax_mla.QuantizedKV) else x


def _softmax_f32(s, causal: bool):
    """Softmax over the last axis of f32 scores [..., Sq, N], causal with the
    queries at the end of the keys."""
    if causal:
        seq_q, n_kv = s.shape[-2:]
        q_pos = jnp.arange(seq_q)[:, None] + (n_kv - seq_q)
        s = jnp.where(jnp.arange(n_kv)[None, :] <= q_pos, s, -jnp.inf)
    return jax.nn.softmax(s, axis=-1)


def plain_mla(q, kv, *, causal: bool):
    """MLA as a JAX user writes it: scores against the whole row, V the slice."""
    s = jnp.einsum(
        "bqhd,bkd->bhqk", q.astype(kv.dtype), kv, preferred_element_type=jnp.float32
    ) * jnp.float32(SCALE)
    p = _softmax_f32(s, causal).astype(kv.dtype)
    out = jnp.einsum("bhqk,bkd->bqhd", p, kv[..., :MLA_DV], preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def plain_attention(q, k, v, *, causal: bool):
    """GQA attention as a JAX user writes it (query head h uses KV head h // group)."""
    batch, seq_q, heads, dk = q.shape
    heads_kv = k.shape[2]
    qg = q.reshape(batch, seq_q, heads_kv, heads // heads_kv, dk).astype(k.dtype)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * jnp.float32(
        SCALE
    )
    p = _softmax_f32(s, causal).astype(v.dtype)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, seq_q, heads, v.shape[-1]).astype(q.dtype)


def plain_fn(case: Case):
    """The jitted plain-JAX formulation of the case's op: fn(q, *caches)."""
    fn = functools.partial(
        plain_mla if case.op == "flash_mla" else plain_attention, causal=case.causal
    )
    return jax.jit(lambda q, *caches: fn(q, *(as_float(c, jnp.bfloat16) for c in caches)))
