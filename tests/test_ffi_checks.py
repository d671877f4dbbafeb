"""The C++ handlers validate their arguments on their own (docs/design.md, "Backends and errors"):
calling the FFI targets directly with inconsistent shapes or attributes gives
a runtime error naming the argument and the values, never a crash."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from .conftest import assert_close, randn, reference_attention, reference_mla

B, SQ, H, SKV, DK = 2, 3, 4, 40, 64


def split_partials(batch, num_splits, seq_q, heads, dv):
    """The split-KV partial results' shapes (out, lse); empty with one split."""
    if num_splits <= 1:
        return (0,), (0,)
    return (batch, num_splits, seq_q, heads, dv), (batch, num_splits, seq_q, heads)


def flash_mla_ffi(
    q,
    kv,
    *,
    dv=32,
    v_offset=0,
    num_splits=1,
    q_pos=None,
    kv_len=None,
    out_shape=None,
    part_shapes=None,
):
    batch, seq_q, heads = q.shape[:3]
    q_pos = jnp.zeros((batch,), jnp.int32) if q_pos is None else q_pos
    kv_len = jnp.full((batch,), kv.shape[1], jnp.int32) if kv_len is None else kv_len
    parts = part_shapes or split_partials(batch, num_splits, seq_q, heads, dv)
    out_types = (
        jax.ShapeDtypeStruct(out_shape or (batch, seq_q, heads, dv), q.dtype),
        jax.ShapeDtypeStruct((batch, heads, seq_q), jnp.float32),
        jax.ShapeDtypeStruct(parts[0], jnp.float32),
        jax.ShapeDtypeStruct(parts[1], jnp.float32),
    )
    call = jax.ffi.ffi_call("jax_mla_flash_mla", out_types, vmap_method="sequential")
    outs = call(
        q,
        kv,
        q_pos,
        kv_len,
        scale=np.float32(0.125),
        causal=np.bool_(False),
        dv=np.int64(dv),
        v_offset=np.int64(v_offset),
        num_splits=np.int64(num_splits),
    )
    return jax.block_until_ready(outs)


def flash_attention_ffi(
    q, k, v, *, num_splits=1, q_pos=None, kv_len=None, out_dtype=None, part_shapes=None
):
    batch, seq_q, heads = q.shape[:3]
    dv = v.shape[-1]
    q_pos = jnp.zeros((batch,), jnp.int32) if q_pos is None else q_pos
    kv_len = jnp.full((batch,), k.shape[1], jnp.int32) if kv_len is None else kv_len
    parts = part_shapes or split_partials(batch, num_splits, seq_q, heads, dv)
    out_types = (
        jax.ShapeDtypeStruct((batch, seq_q, heads, dv), out_dtype or q.dtype),
        jax.ShapeDtypeStruct((batch, heads, seq_q), jnp.float32),
        jax.ShapeDtypeStruct(parts[0], jnp.float32),
        jax.ShapeDtypeStruct(parts[1], jnp.float32),
    )
    call = jax.ffi.ffi_call("jax_mla_flash_attention", out_types, vmap_method="sequential")
    outs = call(
        q,
        k,
        v,
        q_pos,
        kv_len,
        scale=np.float32(0.125),
        causal=np.bool_(False),
        num_splits=np.int64(num_splits),
    )
    return jax.block_until_ready(outs)


def ones(*shape, dtype=jnp.float32):
    # numpy, not jax arrays: module-level inputs would otherwise be committed
    # to the default device at import (a GPU where there is one), and the
    # calls would leave the CPU the tests pin.
    return np.ones(shape, dtype)


QM, KV = ones(B, SQ, H, DK), ones(B, SKV, DK)
Q, K, V = ones(B, SQ, H, DK), ones(B, SKV, 2, DK), ones(B, SKV, 2, 32)

MLA_CASES = {
    "kv_dk": (
        lambda: flash_mla_ffi(QM, ones(B, SKV, 48)),
        "INVALID_ARGUMENT",
        r"kv's logical shape \[2, 40, 48\] must be \[2, Skv, 64\]",
    ),
    "kv_batch": (
        lambda: flash_mla_ffi(QM, ones(3, SKV, DK)),
        "INVALID_ARGUMENT",
        r"kv's logical shape \[3, 40, 64\] must be \[2, Skv, 64\]",
    ),
    "v_past_row": (
        lambda: flash_mla_ffi(QM, KV, dv=32, v_offset=48),
        "INVALID_ARGUMENT",
        r"V slice \[v_offset, v_offset \+ dv\) = \[48, 80\) must lie inside the row of 64",
    ),
    "v_offset_negative": (
        lambda: flash_mla_ffi(QM, KV, v_offset=-16),
        "INVALID_ARGUMENT",
        r"\[-16, 16\)",
    ),
    "num_splits_0": (
        lambda: flash_mla_ffi(QM, KV, num_splits=0),
        "INVALID_ARGUMENT",
        r"num_splits must be >= 1, got 0",
    ),
    "q_pos_shape": (
        lambda: flash_mla_ffi(QM, KV, q_pos=jnp.zeros((3,), jnp.int32)),
        "INVALID_ARGUMENT",
        r"q_pos and kv_len must have shape \[2\], got \[3\] and \[2\]",
    ),
    "q_rank": (
        lambda: flash_mla_ffi(ones(B, SQ, H, DK, 1), KV),
        "INVALID_ARGUMENT",
        r"q must have rank 4 .* got shape \[2, 3, 4, 64, 1\]",
    ),
    "integer_q": (
        lambda: flash_mla_ffi(ones(B, SQ, H, DK, dtype=jnp.int32), KV),
        "INVALID_ARGUMENT",
        r"q must be float32, float16 or bfloat16",
    ),
    "output_shape": (
        lambda: flash_mla_ffi(QM, KV, out_shape=(B, SQ, H, 16)),
        "INVALID_ARGUMENT",
        r"output must be \[2, 3, 4, 32\] .* got \[2, 3, 4, 16\]",
    ),
    "split_partials": (
        lambda: flash_mla_ffi(QM, KV, num_splits=2, part_shapes=((0,), (0,))),
        "INVALID_ARGUMENT",
        r"split partials must be \[2, 2, 3, 4, 32\]",
    ),
    "dv_not_multiple_of_16": (
        lambda: flash_mla_ffi(QM, KV, dv=24),
        "UNIMPLEMENTED",
        r"Dk = 64, dv = 24",
    ),
}


@pytest.mark.parametrize("call, code, match", MLA_CASES.values(), ids=MLA_CASES.keys())
def test_flash_mla_handler_checks(cpu, call, code, match):
    with pytest.raises(jax.errors.JaxRuntimeError, match=f"{code}: flash_mla.*{match}"):
        call()


ATTENTION_CASES = {
    "heads_not_multiple": (
        lambda: flash_attention_ffi(Q, ones(B, SKV, 3, DK), ones(B, SKV, 3, 32)),
        "INVALID_ARGUMENT",
        r"Hq = 4 must be a multiple of Hkv = 3",
    ),
    "k_dk": (
        lambda: flash_attention_ffi(Q, ones(B, SKV, 2, 48), V),
        "INVALID_ARGUMENT",
        r"k head dim 48 must equal q's 64",
    ),
    "v_shape": (
        lambda: flash_attention_ffi(Q, K, ones(B, SKV + 1, 2, 32)),
        "INVALID_ARGUMENT",
        r"v shape \[2, 41, 2, 32\] must match k \[2, 40, 2, 64\] in Skv and Hkv",
    ),
    "batch": (
        lambda: flash_attention_ffi(Q, ones(3, SKV, 2, DK), ones(3, SKV, 2, 32)),
        "INVALID_ARGUMENT",
        r"batch of k 3 and v 3 must equal q's 2",
    ),
    "kv_len_shape": (
        lambda: flash_attention_ffi(Q, K, V, kv_len=jnp.zeros((), jnp.int32)),
        "INVALID_ARGUMENT",
        r"q_pos and kv_len must have shape \[2\], got \[2\] and \[\]",
    ),
    "out_dtype": (
        lambda: flash_attention_ffi(Q, K, V, out_dtype=jnp.float16),
        "INVALID_ARGUMENT",
        r"output must be \[2, 3, 4, 32\] in q's dtype",
    ),
    "head_dim": (
        lambda: flash_attention_ffi(ones(B, SQ, H, 100), ones(B, SKV, 2, 100), V),
        "UNIMPLEMENTED",
        r"Dk = 100, Dv = 32",
    ),
    "num_splits_0": (
        lambda: flash_attention_ffi(Q, K, V, num_splits=0),
        "INVALID_ARGUMENT",
        r"num_splits must be >= 1, got 0",
    ),
    "split_partials": (
        lambda: flash_attention_ffi(
            Q, K, V, num_splits=3, part_shapes=((B, 2, SQ, H, 32), (B, 2, SQ, H))
        ),
        "INVALID_ARGUMENT",
        r"split partials must be \[2, 3, 3, 4, 32\] and \[2, 3, 3, 4\], got \[2, 2, 3, 4, 32\]",
    ),
}


@pytest.mark.parametrize("call, code, match", ATTENTION_CASES.values(), ids=ATTENTION_CASES.keys())
def test_flash_attention_handler_checks(cpu, call, code, match):
    with pytest.raises(jax.errors.JaxRuntimeError, match=f"{code}: flash_attention.*{match}"):
        call()


def test_direct_calls_are_well_formed(cpu, rng):
    # The helpers above, with consistent arguments, compute the ops: so the
    # errors come from the inconsistency each case introduces.
    q = randn(rng, (B, SQ, H, DK), jnp.float32)
    kv = randn(rng, (B, SKV, DK), jnp.float32)
    out, lse, _, _ = flash_mla_ffi(q, kv, dv=32, v_offset=16, num_splits=2)
    want = reference_mla(q, kv, dv=32, v_offset=16, scale=0.125, q_pos=0)
    assert_close(lse, want[1], jnp.float32)
    assert_close(out, want[0], jnp.float32)
    k, v = kv[:, :, None], kv[:, :, None, :32]
    out, lse, _, _ = flash_attention_ffi(q, k, v, num_splits=3)
    want = reference_attention(q, k, v, scale=0.125, q_pos=0)
    assert_close(lse, want[1], jnp.float32)
    assert_close(out, want[0], jnp.float32)
