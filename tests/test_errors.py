"""Malformed input: the exception type, and a message that names the argument
and the values (docs/design.md, "Backends and errors"). One test per class; the
C++ handlers' own checks are tested by calling the FFI targets directly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mla

from .conftest import assert_close, randn


def ones(*shape, dtype=jnp.float32):
    # numpy, not jax arrays: module-level inputs would otherwise be committed
    # to the default device at import (a GPU where there is one), and the
    # calls would leave the CPU the tests pin.
    return np.ones(shape, dtype)


Q, K, V = ones(2, 3, 4, 64), ones(2, 10, 2, 64), ones(2, 10, 2, 32)
QM, KV = ones(2, 1, 4, 64), ones(2, 10, 64)


def attention(q=Q, k=K, v=V, **kw):
    return jax_mla.flash_attention(q, k, v, backend=kw.pop("backend", "native"), **kw)


def mla(q=QM, kv=KV, **kw):
    kw.setdefault("dv", 32)
    return jax_mla.flash_mla(q, kv, backend=kw.pop("backend", "native"), **kw)


ATTENTION_ERRORS = {
    "q_not_an_array": (
        lambda: attention(q=np.ones((2, 3, 4, 64)).tolist()),
        TypeError,
        r"q must be an array .* got list",
    ),
    "q_integer": (
        lambda: attention(q=Q.astype(jnp.int32)),
        TypeError,
        r"q must be float32, float16 or bfloat16, got dtype int32",
    ),
    "k_integer": (
        lambda: attention(k=K.astype(jnp.int8)),
        TypeError,
        r"k must be .* got dtype int8",
    ),
    "q_rank": (
        lambda: attention(q=ones(3, 4, 64)),
        ValueError,
        r"q must have rank 4 .* got shape \(3, 4, 64\)",
    ),
    "k_rank": (
        lambda: attention(k=ones(2, 10, 64)),
        ValueError,
        r"k must have rank 4 .* got shape \(2, 10, 64\)",
    ),
    "v_rank": (
        lambda: attention(v=ones(2, 10, 2, 32, 1)),
        ValueError,
        r"v must have rank 4 .* got shape \(2, 10, 2, 32, 1\)",
    ),
    "batch_mismatch": (
        lambda: attention(k=ones(3, 10, 2, 64), v=ones(3, 10, 2, 32)),
        ValueError,
        r"batch 2 .* got k \(3, 10, 2, 64\)",
    ),
    "dk_mismatch": (
        lambda: attention(k=ones(2, 10, 2, 48)),
        ValueError,
        r"k head dim must equal q's 64, got k \(2, 10, 2, 48\)",
    ),
    "v_seq_mismatch": (
        lambda: attention(v=ones(2, 11, 2, 32)),
        ValueError,
        r"v must have Skv = 10 and Hkv = 2 .* got v \(2, 11, 2, 32\)",
    ),
    "v_heads_mismatch": (
        lambda: attention(v=ones(2, 10, 1, 32)),
        ValueError,
        r"v must have Skv = 10 and Hkv = 2 .* got v \(2, 10, 1, 32\)",
    ),
    "heads_not_multiple": (
        lambda: attention(k=ones(2, 10, 3, 64), v=ones(2, 10, 3, 32)),
        ValueError,
        r"Hq = 4 must be a multiple of .* Hkv = 3",
    ),
    "q_pos_float_dtype": (
        lambda: attention(q_pos=jnp.zeros(2)),
        TypeError,
        r"q_pos must have an integer dtype, got float32",
    ),
    "q_pos_python_float": (lambda: attention(q_pos=1.5), TypeError, r"q_pos .* got float"),
    "kv_len_bool": (lambda: attention(kv_len=True), TypeError, r"kv_len .* got bool"),
    "kv_len_float_dtype": (
        lambda: attention(kv_len=np.array([1.0, 2.0])),
        TypeError,
        r"kv_len must have an integer dtype, got float64",
    ),
    "q_pos_shape": (
        lambda: attention(q_pos=jnp.zeros((3,), jnp.int32)),
        ValueError,
        r"q_pos must be a scalar or have shape \(2,\), got \(3,\)",
    ),
    "kv_len_shape": (
        lambda: attention(kv_len=jnp.zeros((2, 1), jnp.int32)),
        ValueError,
        r"kv_len must be a scalar or have shape \(2,\), got \(2, 1\)",
    ),
    "kv_len_above_skv": (
        lambda: attention(kv_len=11),
        ValueError,
        r"kv_len must lie in \[0, 10\], got 11",
    ),
    "kv_len_negative": (
        lambda: attention(kv_len=jnp.array([3, -1], jnp.int32)),
        ValueError,
        r"kv_len must lie in \[0, 10\], got -1",
    ),
    "q_pos_beyond_int32": (
        lambda: attention(q_pos=2**31),
        ValueError,
        r"q_pos must lie in .* got 2147483648",
    ),
    "traced_scale": (
        lambda: jax.jit(lambda s: attention(scale=s))(0.1),
        TypeError,
        r"scale must be a static Python or numpy float",
    ),
    "scale_not_finite": (
        lambda: attention(scale=float("inf")),
        ValueError,
        r"scale must be finite, got inf",
    ),
    "causal_str": (lambda: attention(causal="yes"), TypeError, r"causal must be a bool, got str"),
    "causal_int": (lambda: attention(causal=1), TypeError, r"causal must be a bool, got int"),
    "causal_str_reference": (
        lambda: attention(causal="no", backend="reference"),
        TypeError,
        r"causal must be a bool, got str",
    ),
    "causal_traced": (
        lambda: jax.jit(lambda c: attention(causal=c))(True),
        TypeError,
        r"causal must be a bool, got .*Tracer",
    ),
    "unknown_backend": (
        lambda: attention(backend="cuda"),
        ValueError,
        r"backend must be one of None, 'native', 'reference', got 'cuda'",
    ),
    "cpu_head_dim_not_multiple_of_16": (
        lambda: attention(q=ones(2, 3, 4, 100), k=ones(2, 10, 2, 100)),
        NotImplementedError,
        r"multiples of 16 up to 576; got Dk = 100",
    ),
    "cpu_head_dim_too_large": (
        lambda: attention(v=ones(2, 10, 2, 592)),
        NotImplementedError,
        r"multiples of 16 up to 576; got Dv = 592",
    ),
}


@pytest.mark.parametrize(
    "call, error, match", ATTENTION_ERRORS.values(), ids=ATTENTION_ERRORS.keys()
)
def test_attention_errors(cpu, call, error, match):
    with pytest.raises(error, match=r"flash_attention: .*" + match):
        call()


MLA_ERRORS = {
    "q_not_an_array": (lambda: mla(q="q"), TypeError, r"q must be an array .* got str"),
    "kv_integer": (
        lambda: mla(kv=KV.astype(jnp.uint8)),
        TypeError,
        r"kv must be .* got dtype uint8",
    ),
    "kv_rank": (
        lambda: mla(kv=ones(2, 10, 1, 64)),
        ValueError,
        r"kv must have rank 3 .* got shape \(2, 10, 1, 64\)",
    ),
    "batch_mismatch": (
        lambda: mla(kv=ones(3, 10, 64)),
        ValueError,
        r"kv must have shape \(2, Skv, 64\) .* got \(3, 10, 64\)",
    ),
    "dk_mismatch": (
        lambda: mla(kv=ones(2, 10, 48)),
        ValueError,
        r"kv must have shape \(2, Skv, 64\) .* got \(2, 10, 48\)",
    ),
    "v_past_row": (
        lambda: mla(dv=32, v_offset=40),
        ValueError,
        r"V slice \[v_offset, v_offset \+ dv\) = \[40, 72\) must fit in the row of Dk = 64",
    ),
    "default_dv_past_row": (
        lambda: jax_mla.flash_mla(QM, KV),
        ValueError,
        r"\[0, 512\) .* Dk = 64",
    ),
    "dv_0": (lambda: mla(dv=0), ValueError, r"dv must be >= 1, got 0"),
    "v_offset_negative": (lambda: mla(v_offset=-1), ValueError, r"v_offset must be >= 0, got -1"),
    "dv_float": (lambda: mla(dv=32.0), TypeError, r"dv must be a static int, got float"),
    "num_splits_0": (lambda: mla(num_splits=0), ValueError, r"num_splits must be >= 1, got 0"),
    "num_splits_float": (
        lambda: mla(num_splits=2.0),
        TypeError,
        r"num_splits must be a static int, got float",
    ),
    "num_splits_bool": (
        lambda: mla(num_splits=True),
        TypeError,
        r"num_splits must be a static int, got bool",
    ),
    "kv_len_above_skv": (
        lambda: mla(kv_len=jnp.array([10, 12], jnp.int32)),
        ValueError,
        r"kv_len must lie in \[0, 10\], got 12",
    ),
    "q_pos_float_dtype": (
        lambda: mla(q_pos=jnp.zeros(2, jnp.bfloat16)),
        TypeError,
        r"q_pos must have an integer dtype, got bfloat16",
    ),
    "traced_scale": (
        lambda: jax.jit(lambda s: mla(scale=s))(0.1),
        TypeError,
        r"scale must be a static Python or numpy float",
    ),
    "causal_str": (lambda: mla(causal="yes"), TypeError, r"causal must be a bool, got str"),
    "causal_array": (
        lambda: mla(causal=jnp.array(True)),
        TypeError,
        r"causal must be a bool, got .*Array",
    ),
    "unknown_backend": (
        lambda: mla(backend="gpu"),
        ValueError,
        r"backend must be one of .* got 'gpu'",
    ),
    "cpu_row_not_multiple_of_16": (
        lambda: mla(q=ones(2, 1, 4, 100), kv=ones(2, 10, 100)),
        NotImplementedError,
        r"multiples of 16 up to 576; got Dk = 100",
    ),
    "cpu_dv_not_multiple_of_16": (
        lambda: mla(dv=24),
        NotImplementedError,
        r"multiples of 16 up to 576; got dv = 24",
    ),
}


@pytest.mark.parametrize("call, error, match", MLA_ERRORS.values(), ids=MLA_ERRORS.keys())
def test_mla_errors(cpu, call, error, match):
    with pytest.raises(error, match=r"flash_mla: .*" + match):
        call()


def test_causal_takes_a_numpy_bool(rng, cpu):
    # numpy's bool is a bool (what a config loaded from an array holds). On
    # random data with Sq = 3 causal and full attention differ, so the flag
    # must arrive as given.
    q = randn(rng, Q.shape, jnp.float32)
    k, v, kv = (randn(rng, x.shape, jnp.float32) for x in (K, V, KV))
    calls = {
        "attention": lambda c: attention(q, k, v, causal=c),
        "mla": lambda c: mla(q, kv, causal=c),
    }
    for name, call in calls.items():
        full, causal = (np.asarray(call(c)) for c in (False, True))
        assert not np.array_equal(full, causal), name
        np.testing.assert_array_equal(np.asarray(call(np.bool_(False))), full)
        np.testing.assert_array_equal(np.asarray(call(np.bool_(True))), causal)


def test_unsupported_head_dims_work_with_the_reference(cpu, rng):
    # Dk = 100, Dv = 40: valid, only the CPU kernel lacks them.
    q = randn(rng, (2, 3, 4, 100), jnp.float32)
    k = randn(rng, (2, 10, 2, 100), jnp.float32)
    v = randn(rng, (2, 10, 2, 40), jnp.float32)
    with pytest.raises(NotImplementedError, match="Dk = 100"):
        jax_mla.flash_attention(q, k, v, backend="native")
    out = jax_mla.flash_attention(q, k, v, backend="reference")
    assert out.shape == (2, 3, 4, 40) and np.all(np.isfinite(np.asarray(out)))
    kv = randn(rng, (2, 10, 100), jnp.float32)
    with pytest.raises(NotImplementedError, match="Dk = 100"):
        jax_mla.flash_mla(q, kv, dv=40, v_offset=3, backend="native")
    out, lse = jax_mla.flash_mla(q, kv, dv=40, v_offset=3, return_lse=True, backend="reference")
    want = jax_mla.reference.attention(q, kv[:, :, None], kv[:, :, None, 3:43])
    assert_close(out, want[0], jnp.float32)
    assert_close(lse, want[1], jnp.float32)
