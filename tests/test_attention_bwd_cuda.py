"""The CUDA attention backward (jax_mla_flash_attention_bwd on the GPU),
called directly like the CPU one (test_attention_bwd_kernel.py) and through
jax.vjp of flash_attention: dq, dk, dv against the float64 numpy backward
over the (Dk, Dv) pairs the CUDA table lists for the backward, its dtypes,
GQA ratios, causal masks, q_pos, kv_len, rows that see no key and lengths
around the kernels' blocks; bitwise repeatability; and the dispatch rule
(which configurations take the native backward; the CUDA table's rule is in
test_capabilities.py), which runs without a GPU."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mla
from jax_mla import _autodiff, _capabilities, _ffi

from .conftest import GPU_TOL, assert_close, cache, positions, randn, visible_keys
from .test_attention_bwd_kernel import attention_bwd_ffi, numpy_backward

CUDA = _capabilities.cuda() if _ffi.module("gpu") is not None else {}
HALF = [jnp.dtype(d) for d in CUDA.get("dtypes", [])]
BWD_DIMS = [tuple(d) for d in CUDA.get("attention_bwd_head_dims", [])]
# The kernels' blocks (ffi/cuda/attention/attention_bwd_config.h): 64 keys
# per KV block, 32 query rows per step of it, 64 query rows per Q block.
BLOCK = 64


@pytest.fixture
def gpu():
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        devices = []
    if not devices:
        pytest.skip("no GPU")
    if not BWD_DIMS:
        pytest.skip("the CUDA module has no native backward")
    with jax.default_device(devices[0]):
        yield "gpu"


def grad_tol(expected, dtype) -> float:
    """The kernels round P and dS to the inputs' half type before the tensor
    cores multiply them (every flash backward does), each by up to half an
    ulp: a gradient moves by a few such roundings of its largest terms. So
    the tolerance is two ulps of the type (conftest.GPU_TOL) times the
    gradient's magnitude, max(1, max |expected|)."""
    magnitude = max(1.0, float(np.max(np.abs(np.asarray(expected)), initial=0.0)))
    return 2 * GPU_TOL[jnp.dtype(dtype)] * magnitude


def check_cuda_bwd(
    rng,
    *,
    batch,
    seq_q,
    heads_q,
    heads_kv,
    seq_kv,
    dk,
    dv,
    dtype,
    causal=False,
    q_pos=None,
    kv_len=None,
    scale=None,
):
    """The CUDA target's gradients on random q, k, v, dout (k and v NaN past
    kv_len) and a nonzero LSE cotangent against the float64 numpy backward,
    whose LSE and delta the kernel gets; then the contract's exact zeros."""
    q = randn(rng, (batch, seq_q, heads_q, dk), dtype)
    k = cache(rng, (batch, seq_kv, heads_kv, dk), dtype, kv_len)
    v = cache(rng, (batch, seq_kv, heads_kv, dv), dtype, kv_len)
    dout = randn(rng, (batch, seq_q, heads_q, dv), dtype)
    dlse = randn(rng, (batch, heads_q, seq_q), jnp.float32)
    q_pos, kv_len = positions(q_pos, kv_len, batch, seq_q, seq_kv)
    scale = 1.0 / math.sqrt(dk) if scale is None else scale
    lse, delta, want = numpy_backward(
        *(np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v, dout, dlse)),
        q_pos,
        kv_len,
        scale,
        causal,
    )
    pos = (jnp.asarray(q_pos, jnp.int32), jnp.asarray(kv_len, jnp.int32))
    got = attention_bwd_ffi(
        q,
        k,
        v,
        dout,
        jnp.asarray(lse, jnp.float32),
        jnp.asarray(delta, jnp.float32),
        *pos,
        scale=scale,
        causal=causal,
    )
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert g.dtype == jnp.float32, f"{name} dtype {g.dtype}"
        assert np.all(np.isfinite(np.asarray(g))), f"{name} has non-finite elements"
        try:
            assert_close(g, w, jnp.float32, f32_tol=grad_tol(w, dtype))
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from None
    visible = visible_keys(q_pos, kv_len, batch, seq_q, seq_kv, causal)
    dq_, dk_, dv_ = (np.asarray(g) for g in got)
    assert np.all(dq_[visible == 0] == 0.0), "a row that sees no key must get dq = 0"
    for b, n in enumerate(kv_len):
        assert np.all(dk_[b, n:] == 0.0) and np.all(dv_[b, n:] == 0.0), "keys past kv_len"
    return got


# (B, Sq, Hq, Hkv, Skv): one key; GQA around the blocks; MQA with many heads.
SHAPES = {
    "single": (1, 1, 2, 2, 1),
    "gqa2_blocks": (2, BLOCK + 1, 4, 2, BLOCK + 3),
    "mqa_odd": (1, 19, 6, 1, 2 * BLOCK + 5),
    "sq_gt_skv": (2, 41, 2, 2, 29),
}


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", HALF, ids=lambda d: d.name)
@pytest.mark.parametrize("dims", BWD_DIMS, ids=lambda d: f"{d[0]}x{d[1]}")
def test_matches_float64_numpy(rng, gpu, dims, dtype, shape, causal):
    batch, seq_q, heads_q, heads_kv, seq_kv = shape
    check_cuda_bwd(
        rng,
        batch=batch,
        seq_q=seq_q,
        heads_q=heads_q,
        heads_kv=heads_kv,
        seq_kv=seq_kv,
        dk=dims[0],
        dv=dims[1],
        dtype=dtype,
        causal=causal,
    )


POSITION_CASES = {
    # queries before position 0 (the first rows see nothing), a batch row without keys
    "negative_q_pos_empty_cache": dict(q_pos=[-5, 3], kv_len=[30, 0], causal=True),
    # queries past kv_len see every existing key
    "q_pos_past_kv_len": dict(q_pos=[40, 100], kv_len=[17, BLOCK + 2], causal=True),
    # kv_len per batch row around the key block, not causal
    "kv_len_per_batch": dict(q_pos=[0, 0], kv_len=[BLOCK, 1], causal=False),
    # a block of keys past kv_len, and q_pos far into the cache
    "kv_len_short": dict(q_pos=[BLOCK, 2], kv_len=[BLOCK + 7, 3], causal=True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", POSITION_CASES.values(), ids=POSITION_CASES.keys())
@pytest.mark.parametrize("dims", BWD_DIMS, ids=lambda d: f"{d[0]}x{d[1]}")
def test_positions(rng, gpu, dims, case):
    check_cuda_bwd(
        rng,
        batch=2,
        seq_q=11,
        heads_q=4,
        heads_kv=2,
        seq_kv=2 * BLOCK + 2,
        dk=dims[0],
        dv=dims[1],
        dtype=HALF[-1],
        **case,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("seq_q, seq_kv", [(3, 0), (0, 5)], ids=["no_keys", "no_queries"])
def test_empty_axes(rng, gpu, seq_q, seq_kv):
    dk, dv = BWD_DIMS[0]
    check_cuda_bwd(
        rng,
        batch=2,
        seq_q=seq_q,
        heads_q=4,
        heads_kv=2,
        seq_kv=seq_kv,
        dk=dk,
        dv=dv,
        dtype=HALF[-1],
        causal=True,
    )


@pytest.mark.gpu
def test_results_are_bitwise_repeatable(gpu):
    # Each result element has one writer and a fixed summation order (no atomics).
    dk, dv = BWD_DIMS[0]
    case = dict(
        batch=2, seq_q=3 * BLOCK + 5, heads_q=8, heads_kv=2, seq_kv=3 * BLOCK + 9, dk=dk, dv=dv
    )
    first, again = (
        check_cuda_bwd(np.random.default_rng(7), dtype=HALF[-1], causal=True, **case)
        for _ in range(2)
    )
    for a, b in zip(first, again):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.gpu
@pytest.mark.parametrize("dims", BWD_DIMS, ids=lambda d: f"{d[0]}x{d[1]}")
def test_flash_attention_grad_uses_it(rng, gpu, dims, monkeypatch):
    # jax.vjp of flash_attention on the GPU runs the native backward (the
    # dispatch says so) and agrees with the pure-JAX backward on the same card.
    dk, dv = dims
    dtype = HALF[-1]
    q = randn(rng, (2, 70, 4, dk), dtype)
    k = randn(rng, (2, 90, 2, dk), dtype)
    v = randn(rng, (2, 90, 2, dv), dtype)
    dout = randn(rng, (2, 70, 4, dv), dtype)
    kv_len = jnp.array([90, 40], jnp.int32)
    assert _autodiff.native_backward_problem("gpu", q, k, v, dout) is None

    def grads():
        # A fresh function per call, so the second jit traces again.
        def f(q, k, v):
            return jax_mla.flash_attention(q, k, v, causal=True, kv_len=kv_len, backend="native")

        @jax.jit
        def run(q, k, v, dout):
            out, vjp = jax.vjp(f, q, k, v)
            return vjp(dout)

        return run(q, k, v, dout)

    native = grads()
    monkeypatch.setattr(_autodiff, "has_native_backward", lambda platform: False)
    assert _autodiff.native_backward_problem("gpu", q, k, v, dout) is not None
    pure = grads()
    for name, a, b in zip(("dq", "dk", "dv"), native, pure):
        want = np.asarray(b, np.float32)
        try:
            assert_close(a.astype(jnp.float32), want, jnp.float32, f32_tol=grad_tol(want, dtype))
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from None


# ------------------------------------------------------------------ dispatch (no GPU needed)


def test_cpu_takes_every_float_configuration(cpu):
    x = jnp.zeros((1, 1, 1, 48), jnp.float32)
    want = None if _autodiff.has_native_backward("cpu") else "not"
    got = _autodiff.native_backward_problem("cpu", x, x, x, x)
    assert (got is None) == (want is None)
    assert _autodiff.native_backward_problem(None, x, x, x, x) is not None
