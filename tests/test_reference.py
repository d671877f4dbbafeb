"""The pure-JAX references (jax_mla.reference) against an independent float64
numpy implementation of the contract (docs/design.md), on small cases."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_mla import reference

from .conftest import assert_close, cache, per_batch, randn

# Jitted (one compile per case instead of one per primitive); the references'
# own defaults for q_pos and kv_len are still what is tested.
ref_attention = jax.jit(reference.attention, static_argnames=("scale", "causal"))
ref_mla = jax.jit(reference.mla, static_argnames=("dv", "v_offset", "scale", "causal"))


def attention_f64(q, k, v, *, scale=None, causal=False, q_pos=None, kv_len=None):
    """float64 attention with the contract's semantics, one query row at a time.

    Query row i of batch b is at position q_pos[b] + i (q_pos defaults to
    kv_len - Sq); keys at positions >= kv_len[b] (clamped to [0, Skv]) do not
    exist; causal rows at position p see keys j <= p; query head h reads KV
    head h // (Hq // Hkv); a row that sees no key gets output 0 and LSE -inf.
    """
    q, k, v = (np.asarray(x).astype(np.float64) for x in (q, k, v))
    batch, seq_q, heads_q, dk = q.shape
    seq_kv, heads_kv = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    scale = 1.0 / math.sqrt(dk) if scale is None else scale
    kv_len = np.clip(per_batch(seq_kv if kv_len is None else kv_len, batch), 0, seq_kv)
    q_pos = kv_len - seq_q if q_pos is None else per_batch(q_pos, batch)
    out = np.zeros((batch, seq_q, heads_q, v.shape[3]))
    lse = np.full((batch, heads_q, seq_q), -np.inf)
    for b in range(batch):
        for i in range(seq_q):
            n = int(kv_len[b])
            if causal:
                n = min(n, max(int(q_pos[b]) + i + 1, 0))
            if n == 0:
                continue
            for h in range(heads_q):
                s = scale * (k[b, :n, h // group] @ q[b, i, h])
                m = s.max()
                p = np.exp(s - m)
                out[b, i, h] = p @ v[b, :n, h // group] / p.sum()
                lse[b, h, i] = m + math.log(p.sum())
    return out, lse


CASES = {
    # name: (B, Sq, Hq, Hkv, Skv, Dk, Dv, causal, q_pos, kv_len)
    "mha": (2, 3, 2, 2, 9, 16, 16, False, None, None),
    "gqa_causal": (2, 4, 6, 2, 11, 32, 16, True, None, None),
    "mqa_dk_ne_dv": (1, 2, 4, 1, 7, 48, 24, True, None, None),
    "kv_len_per_batch": (3, 2, 2, 1, 8, 16, 16, False, None, [8, 3, 1]),
    "empty_rows": (3, 3, 2, 2, 6, 16, 16, True, None, [0, 2, 6]),
    "q_pos_negative": (2, 4, 2, 1, 5, 16, 16, True, -2, None),
    "q_pos_past_kv_len": (2, 2, 2, 2, 9, 16, 16, True, [20, 5], [4, 9]),
    "sq_gt_skv_default_q_pos": (2, 7, 2, 1, 4, 16, 16, True, None, [4, 2]),
    "not_causal_ignores_q_pos": (2, 3, 2, 2, 5, 16, 16, False, [-10, 50], [5, 2]),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_attention_matches_float64(rng, case):
    batch, seq_q, heads_q, heads_kv, seq_kv, dk, dv, causal, q_pos, kv_len = case
    q = randn(rng, (batch, seq_q, heads_q, dk), jnp.float32)
    k = cache(rng, (batch, seq_kv, heads_kv, dk), jnp.float32, kv_len)
    v = cache(rng, (batch, seq_kv, heads_kv, dv), jnp.float32, kv_len)
    pos = None if q_pos is None else jnp.asarray(per_batch(q_pos, batch), jnp.int32)
    length = None if kv_len is None else jnp.asarray(per_batch(kv_len, batch), jnp.int32)
    out, lse = ref_attention(q, k, v, causal=causal, q_pos=pos, kv_len=length)
    want_out, want_lse = attention_f64(q, k, v, causal=causal, q_pos=q_pos, kv_len=kv_len)
    assert out.dtype == jnp.float32 and lse.dtype == jnp.float32
    assert_close(lse, want_lse, jnp.float32)
    assert_close(out, want_out, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_attention_low_precision_matches_float64(rng, dtype):
    q = randn(rng, (2, 3, 4, 32), dtype)
    k = cache(rng, (2, 10, 2, 32), dtype, [10, 4])
    v = cache(rng, (2, 10, 2, 16), dtype, [10, 4])
    kv_len = jnp.array([10, 4], jnp.int32)
    out, lse = ref_attention(q, k, v, causal=True, kv_len=kv_len, scale=0.3)
    want_out, want_lse = attention_f64(q, k, v, causal=True, kv_len=[10, 4], scale=0.3)
    assert out.dtype == dtype
    assert_close(lse, want_lse, jnp.float32)
    assert_close(out, want_out, dtype)


@pytest.mark.parametrize("v_offset, dv", [(0, 16), (8, 24), (16, 32)])
def test_mla_matches_float64(rng, v_offset, dv):
    kv_len = [12, 0, 5]
    q = randn(rng, (3, 2, 4, 48), jnp.float32)
    kv = cache(rng, (3, 12, 48), jnp.float32, kv_len)
    out, lse = ref_mla(
        q, kv, dv=dv, v_offset=v_offset, causal=True, scale=0.2, kv_len=jnp.array(kv_len, jnp.int32)
    )
    k = kv[:, :, None, :]
    v = kv[:, :, None, v_offset : v_offset + dv]
    want_out, want_lse = attention_f64(q, k, v, causal=True, scale=0.2, kv_len=kv_len)
    assert_close(lse, want_lse, jnp.float32)
    assert_close(out, want_out, jnp.float32)


def test_empty_rows_are_zero_and_minus_inf_not_nan(rng):
    q = randn(rng, (2, 3, 2, 16), jnp.float32)
    k = cache(rng, (2, 4, 1, 16), jnp.float32, [0, 4])
    v = cache(rng, (2, 4, 1, 16), jnp.float32, [0, 4])
    out, lse = ref_attention(
        q,
        k,
        v,
        causal=True,
        q_pos=jnp.array([0, -2], jnp.int32),
        kv_len=jnp.array([0, 4], jnp.int32),
    )
    out, lse = np.asarray(out), np.asarray(lse)
    # Batch 0 has no keys; in batch 1 the rows at positions -2 and -1 see none.
    assert np.all(out[0] == 0) and np.all(np.isneginf(lse[0]))
    assert np.all(out[1, :2] == 0) and np.all(np.isneginf(lse[1, :, :2]))
    assert np.all(np.isfinite(lse[1, :, 2])) and np.any(out[1, 2] != 0)


def test_q_pos_near_int32_max(rng):
    # q_pos may run past kv_len; row i is at q_pos + i, so with q_pos = 2**31 - 1
    # the second row is at 2**31: far past every key, it sees all of them.
    q = randn(rng, (1, 2, 2, 16), jnp.float32)
    k = randn(rng, (1, 5, 1, 16), jnp.float32)
    v = randn(rng, (1, 5, 1, 16), jnp.float32)
    q_pos = 2**31 - 1
    out, lse = ref_attention(q, k, v, causal=True, q_pos=jnp.array([q_pos], jnp.int32))
    want_out, want_lse = attention_f64(q, k, v, causal=True, q_pos=q_pos)
    assert_close(lse, want_lse, jnp.float32)
    assert_close(out, want_out, jnp.float32)
