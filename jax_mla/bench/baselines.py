"""The plain-JAX formulations the kernels and the DeepSeek layer are compared
with: what a JAX user without jax_mla would write, not the naive reference.
Einsums in the cache's own dtype with float32 accumulation
(preferred_element_type), masking and a float32 softmax; for MLA, V is the
slice kv[..., :512]. A quantized cache is dequantized to bf16 first (XLA's
bf16 dots are its fast ones on the CPU, and the native type of the GPU rows).
For the layer, the attention decompresses the whole latent cache at every
call (plain_deepseek_attention)."""

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


# ------------------------------------------------------------------ the DeepSeek layer


def plain_deepseek_attention(params, x, positions, cache, cfg):
    """jax_mla.deepseek.attention as JAX model code writes it today on GPUs:
    the same projections and latent cache, but at every call the whole cache
    is decompressed into per-head K_nope and V ([B, Smax, H, 128] each) and
    attended with einsums and a float32 softmax over all Smax keys (masked
    past each query's position). Computes in x's dtype with float32
    accumulation, like the layer; returns (out, the updated LatentCache)."""
    from jax_mla import deepseek

    dtype = x.dtype
    r = cfg.kv_lora_rank
    positions = jnp.asarray(positions).astype(jnp.int32)
    # The layer's own projections, so that the rows differ in the attention only.
    q_nope, q_pe, rows = deepseek._project(params, x, positions, cfg)
    kv = jax_mla.cache_update(cache.kv, rows, positions)
    latent = as_float(kv, dtype).astype(dtype)
    c, k_pe = latent[..., :r], latent[..., r:]

    def up(spec, a, w):
        return jnp.einsum(spec, a, w.astype(dtype), preferred_element_type=jnp.float32).astype(
            dtype
        )

    k_nope = up("bsr,hnr->bshn", c, params["w_uk"])
    v = up("bsr,hvr->bshv", c, params["w_uv"])
    s = jnp.einsum(
        "bqhn,bshn->bhqs", q_nope.astype(dtype), k_nope, preferred_element_type=jnp.float32
    ) + jnp.einsum("bqhp,bsp->bhqs", q_pe.astype(dtype), k_pe, preferred_element_type=jnp.float32)
    keys = jnp.arange(kv.shape[1], dtype=jnp.int32)
    visible = keys[None, None, None, :] <= positions[:, None, :, None]
    p = jax.nn.softmax(jnp.where(visible, s * jnp.float32(cfg.softmax_scale), -jnp.inf), -1)
    o = jnp.einsum("bhqs,bshv->bqhv", p.astype(dtype), v, preferred_element_type=jnp.float32)
    batch, seq, _ = x.shape
    o = o.reshape(batch, seq, cfg.num_heads * cfg.v_head_dim).astype(dtype)
    out = jnp.matmul(o, params["wo"].astype(dtype), preferred_element_type=jnp.float32)
    kv_len = positions[:, -1] + 1
    dropped = ((positions < 0) | (positions >= cache.max_len)).any(axis=1)
    new_cache = deepseek.LatentCache(
        kv, jnp.clip(kv_len, 0, cache.max_len), cache.overflow | dropped
    )
    return out.astype(dtype), new_cache


def plain_deepseek_generate(params, x, cache, cfg, steps: int):
    """deepseek.generate over plain_deepseek_attention."""
    from jax_mla import deepseek

    def step(carry, _):
        x, cache = carry
        y, cache = plain_deepseek_attention(params, x, cache.length[:, None], cache, cfg)
        return (deepseek._renorm(y), cache), y[:, 0]

    (_, cache), ys = jax.lax.scan(step, (x, cache), None, length=steps)
    return jnp.moveaxis(ys, 0, 1), cache


def plain_deepseek_decode_loop(params, prompt, cache, cfg, steps: int):
    """deepseek.decode_loop over plain_deepseek_attention."""
    from jax_mla import deepseek

    positions = cache.length[:, None] + jnp.arange(prompt.shape[1], dtype=jnp.int32)
    out, cache = plain_deepseek_attention(params, prompt, positions, cache, cfg)
    ys, cache = plain_deepseek_generate(params, deepseek._renorm(out[:, -1:]), cache, cfg, steps)
    return out, ys, cache
