"""Gradients of flash_attention and flash_mla (docs/design.md, "Autodiff").

Each backward path is tested: "reference" (backend="reference": the
reference forward and the pure-JAX blockwise backward), "jax" (the native
forward and the pure-JAX backward, as on platforms without a native backward)
and "native" (the native forward and the native backward kernel; skipped only
when the module lacks jax_mla_flash_attention_bwd). The blockwise backward
runs with blocks of 8 keys here, so the awkward lengths cover several blocks
and a padded last one.

Oracles: a float64 numpy backward (the textbook formulas, itself checked
against finite differences of a float64 forward), and jax.vjp of
jax_mla.reference (plain JAX autodiff).

Tolerance: the gradients are computed in float32 from the same inputs as the
float64 oracle, so they agree to float32 rounding, 1e-5 of the gradient's
largest element (GRAD_TOL; sums over a few dozen keys and queries). With a
half-precision query the forward's output is rounded to that type and enters
delta = rowsum(dout * out), so a gradient moves by up to about one ulp of the
query's type relative to its largest element; the gradient is then rounded to
its own dtype (OUT_ULPS ulps, elementwise).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

import jax_mla
from jax_mla import _autodiff, deepseek, reference

from .conftest import OUT_ULPS, cache, positions, randn
from .test_deepseek import SMALL, hf_attention, hf_state_dict

BWD = ["reference", "jax", "native"]
GRAD_TOL = 1e-5
LOW_PRECISION_TOL = {jnp.dtype(jnp.float16): 2.0**-10, jnp.dtype(jnp.bfloat16): 2.0**-7}


@pytest.fixture(autouse=True)
def _small_blocks(cpu, monkeypatch):
    monkeypatch.setattr(_autodiff, "KEY_BLOCK", 8)


def _backward_path(name: str, monkeypatch) -> str:
    """Sets up the backward path `name`; returns the ops' backend argument."""
    if name == "native" and not _autodiff.has_native_backward("cpu"):
        pytest.skip(f"the CPU module has no {_autodiff.TARGET_BWD}")
    if name == "jax":
        monkeypatch.setattr(_autodiff, "has_native_backward", lambda platform: False)
    return "reference" if name == "reference" else "native"


@pytest.fixture(params=BWD)
def bwd(request, monkeypatch):
    """Every backward path."""
    return _backward_path(request.param, monkeypatch)


@pytest.fixture(params=BWD[1:])
def kernel_bwd(request, monkeypatch):
    """The paths behind the native forward (the reference backend's backward
    is the "jax" path's code, covered with fewer cases)."""
    return _backward_path(request.param, monkeypatch)


# ------------------------------------------------------------------ oracles


def numpy_attention_vjp(q, k, v, dout, dlse, *, scale, causal, q_pos=None, kv_len=None):
    """float64 ((out, lse), (dq, dk, dv)) of flash_attention for cotangents
    (dout, dlse), from the formulas of docs/design.md, "Autodiff"."""
    q, k, v, dout, dlse = (np.asarray(x, np.float64) for x in (q, k, v, dout, dlse))
    batch, seq_q, heads_q, _ = q.shape
    seq_kv, heads_kv = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    q_pos, kv_len = positions(q_pos, kv_len, batch, seq_q, seq_kv)
    exists = np.arange(seq_kv)[None, :] < kv_len[:, None]
    k = np.where(exists[..., None, None], k, 0.0)
    v = np.where(exists[..., None, None], v, 0.0)
    out = np.zeros(q.shape[:3] + (v.shape[3],))
    lse = np.full((batch, heads_q, seq_q), -np.inf)
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    keys, rows = np.arange(seq_kv), np.arange(seq_q)
    for b in range(batch):
        visible = np.broadcast_to(exists[b], (seq_q, seq_kv))
        if causal:
            visible = visible & (keys[None, :] <= q_pos[b] + rows[:, None])
        for h in range(heads_q):
            g = h // group
            s = np.where(visible, scale * q[b, :, h] @ k[b, :, g].T, -np.inf)
            m = s.max(-1, keepdims=True, initial=-np.inf)
            m = np.where(np.isfinite(m), m, 0.0)
            p = np.where(visible, np.exp(s - m), 0.0)
            l = p.sum(-1, keepdims=True)
            prob = np.divide(p, l, out=np.zeros_like(p), where=l > 0)
            out[b, :, h] = prob @ v[b, :, g]
            seen = l[:, 0] > 0
            lse[b, h] = np.where(seen, np.log(np.where(seen, l[:, 0], 1.0)) + m[:, 0], -np.inf)
            delta = (dout[b, :, h] * out[b, :, h]).sum(-1) - dlse[b, h]
            ds = prob * (dout[b, :, h] @ v[b, :, g].T - delta[:, None])
            dq[b, :, h] = scale * ds @ k[b, :, g]
            dk[b, :, g] += scale * ds.T @ q[b, :, h]
            dv[b, :, g] += prob.T @ dout[b, :, h]
    return (out, lse), (dq, dk, dv)


def numpy_mla_vjp(q, kv, dout, dlse, *, dv, v_offset, **kw):
    kv64 = np.asarray(kv, np.float64)
    k, v = kv64[:, :, None], kv64[:, :, None, v_offset : v_offset + dv]
    fwd, (dq, dk, dvv) = numpy_attention_vjp(q, k, v, dout, dlse, **kw)
    dkv = dk[:, :, 0].copy()
    dkv[..., v_offset : v_offset + dv] += dvv[:, :, 0]
    return fwd, (dq, dkv)


def assert_grad_close(got, want, q_dtype, what: str) -> None:
    """got (in its dtype) vs the float64 oracle, by the module doc's rule; the
    oracle's non-finite entries (none expected) fail the test."""
    a = np.asarray(got).astype(np.float64)
    e = np.asarray(want, np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    assert np.isfinite(a).all(), f"{what}: non-finite gradient at {np.argwhere(~np.isfinite(a))[0]}"
    big = np.abs(e).max(initial=0.0)
    atol = (GRAD_TOL + LOW_PRECISION_TOL.get(jnp.dtype(q_dtype), 0.0)) * big + 1e-30
    rtol = OUT_ULPS * float(jnp.finfo(got.dtype).eps)
    excess = np.abs(a - e) - (atol + rtol * np.abs(e))
    if a.size and excess.max() > 0:
        idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(excess)), a.shape))
        raise AssertionError(
            f"{what}: {int((excess > 0).sum())} of {a.size} elements beyond atol {atol:.3g}, "
            f"rtol {rtol:.3g}; worst at {idx}: {a[idx]!r} vs {e[idx]!r}"
        )


# Jitted: eager, every operation of these would compile on its own.
quantize = jax.jit(jax_mla.quantize, static_argnums=1)
dequantize = jax.jit(jax_mla.dequantize)


def position_arg(x):
    return jnp.asarray(x, jnp.int32) if isinstance(x, list) else x


# ------------------------------------------------------------------ flash_attention

# (B, Sq, Skv, Hq, Hkv, Dk, Dv), dtypes (q, k, v), and the call's settings.
ATTENTION_CASES = {
    "gqa-causal-kv_len": dict(
        shape=(2, 5, 19, 4, 2, 32, 16), dtypes="fff", causal=True, kv_len=[19, 11], lse=True
    ),
    # Negative q_pos: the first rows of batch row 0 see no key.
    "mqa-causal-q_pos": dict(
        shape=(2, 6, 13, 4, 1, 16, 32), dtypes="fff", causal=True, q_pos=[-3, 2], lse=True
    ),
    # Sq > Skv with the default q_pos (negative); a row whose every key is gone.
    "sq-over-skv-kv_len-0": dict(
        shape=(2, 9, 7, 2, 1, 32, 16), dtypes="fff", causal=True, kv_len=[0, 5], lse=False
    ),
    # q_pos near int32's limit: every query sees every key.
    "q_pos-int32-max": dict(
        shape=(2, 3, 10, 2, 2, 16, 16), dtypes="fff", causal=True, q_pos=2**31 - 4, lse=True
    ),
    "bf16": dict(shape=(1, 4, 17, 4, 2, 32, 32), dtypes="bbb", causal=False, lse=False),
    "f32-over-bf16": dict(shape=(2, 3, 11, 2, 1, 48, 16), dtypes="fbb", causal=True, lse=True),
    "mixed": dict(shape=(1, 3, 11, 4, 4, 32, 16), dtypes="bfh", causal=False, lse=True),
    "192-128": dict(shape=(1, 3, 9, 2, 1, 192, 128), dtypes="fff", causal=True, lse=True),
    # 16 (batch, KV head) pairs: the CPU kernel's fused plan (dQ added by the dK/dV items).
    "gqa-16-pairs": dict(
        shape=(4, 7, 23, 8, 4, 32, 16), dtypes="fbf", causal=True, kv_len=[23, 15, 0, 9], lse=True
    ),
}
DTYPES = {"f": jnp.float32, "h": jnp.float16, "b": jnp.bfloat16}


def attention_vjp(q, k, v, dout, dlse, *, lse, backend, **kw):
    """(primal outputs, (dq, dk, dv)) of flash_attention by jax.vjp."""

    def f(q, k, v):
        return jax_mla.flash_attention(q, k, v, return_lse=lse, backend=backend, **kw)

    @jax.jit
    def run(q, k, v, dout, dlse):
        primal, vjp = jax.vjp(f, q, k, v)
        return primal, vjp((dout, dlse) if lse else dout)

    return run(q, k, v, dout, dlse)


@pytest.mark.parametrize("case", ATTENTION_CASES.values(), ids=ATTENTION_CASES.keys())
def test_attention_grad(rng, kernel_bwd, case):
    batch, seq_q, seq_kv, heads_q, heads_kv, dk, dv = case["shape"]
    q_dtype, k_dtype, v_dtype = (DTYPES[c] for c in case["dtypes"])
    q_pos, kv_len = case.get("q_pos"), case.get("kv_len")
    q = randn(rng, (batch, seq_q, heads_q, dk), q_dtype)
    k = cache(rng, (batch, seq_kv, heads_kv, dk), k_dtype, kv_len)  # NaN past kv_len
    v = cache(rng, (batch, seq_kv, heads_kv, dv), v_dtype, kv_len)
    dout = randn(rng, (batch, seq_q, heads_q, dv), q_dtype)
    dlse = randn(rng, (batch, heads_q, seq_q), jnp.float32)
    if not case["lse"]:
        dlse = jnp.zeros_like(dlse)
    scale = 0.3
    kw = dict(scale=scale, causal=case["causal"], q_pos=position_arg(q_pos))
    kw["kv_len"] = position_arg(kv_len)
    _, grads = attention_vjp(q, k, v, dout, dlse, lse=case["lse"], backend=kernel_bwd, **kw)
    (_, lse64), want = numpy_attention_vjp(
        q, k, v, dout, dlse, scale=scale, causal=case["causal"], q_pos=q_pos, kv_len=kv_len
    )
    for name, got, x, w in zip(("dq", "dk", "dv"), grads, (q, k, v), want):
        assert got.dtype == x.dtype, f"{name} dtype {got.dtype}, expected {x.dtype}"
        assert_grad_close(got, w, q_dtype, name)
    # Keys past kv_len get exactly 0; queries that see no key get exactly 0.
    _, kv_lens = positions(q_pos, kv_len, batch, seq_q, seq_kv)
    for b, n in enumerate(kv_lens):
        assert not np.asarray(grads[1][b, n:], np.float32).any()
        assert not np.asarray(grads[2][b, n:], np.float32).any()
    empty = np.isneginf(lse64)  # [B, Hq, Sq]
    assert not np.asarray(grads[0], np.float32).transpose(0, 2, 1, 3)[empty].any()


def test_oracle_matches_finite_differences(rng):
    """The numpy backward against central differences of its own float64
    forward, along a random direction (GQA, causal, an empty row, the LSE)."""
    shape_q, shape_k, shape_v = (2, 4, 4, 8), (2, 6, 2, 8), (2, 6, 2, 5)
    q, k, v = (rng.standard_normal(s) for s in (shape_q, shape_k, shape_v))
    dout, dlse = rng.standard_normal((2, 4, 4, 5)), rng.standard_normal((2, 4, 4))
    kw = dict(scale=0.7, causal=True, q_pos=[-1, 1], kv_len=[6, 4])
    (out, lse), grads = numpy_attention_vjp(q, k, v, dout, dlse, **kw)
    finite = np.isfinite(lse)
    assert not finite.all(), "the case must hold an empty row"

    def loss(q, k, v):
        (o, l), _ = numpy_attention_vjp(q, k, v, dout, dlse, **kw)
        return (o * dout).sum() + (np.where(finite, l, 0.0) * dlse).sum()

    dirs = [rng.standard_normal(x.shape) for x in (q, k, v)]
    eps = 1e-6
    plus = loss(*(x + eps * d for x, d in zip((q, k, v), dirs)))
    minus = loss(*(x - eps * d for x, d in zip((q, k, v), dirs)))
    numeric = (plus - minus) / (2 * eps)
    analytic = sum((g * d).sum() for g, d in zip(grads, dirs))
    assert abs(numeric - analytic) <= 1e-7 * max(1.0, abs(analytic)), (numeric, analytic)


def test_attention_grad_matches_reference_autodiff(rng, bwd):
    """Against jax.grad of jax_mla.reference (plain autodiff) on rows that all
    see keys: a loss on both outputs."""
    q = randn(rng, (2, 7, 4, 32), jnp.float32)
    k = randn(rng, (2, 23, 2, 32), jnp.float32)
    v = randn(rng, (2, 23, 2, 16), jnp.float32)
    w_out, w_lse = randn(rng, (2, 7, 4, 16), jnp.float32), randn(rng, (2, 4, 7), jnp.float32)

    def loss(attend):
        def f(q, k, v):
            out, lse = attend(q, k, v)
            return jnp.sum(out * w_out) + jnp.sum(lse * w_lse)

        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)

    kw = dict(causal=True, kv_len=jnp.asarray([23, 17], jnp.int32))
    got = loss(lambda *a: jax_mla.flash_attention(*a, return_lse=True, backend=bwd, **kw))
    want = loss(lambda *a: reference.attention(*a, **kw))
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_grad_close(g, w, jnp.float32, name)


def test_check_grads(bwd):
    """jax.test_util.check_grads (finite differences in float32) on a tiny case."""
    rng = np.random.default_rng(0)
    q = randn(rng, (1, 3, 2, 16), jnp.float32)
    k = randn(rng, (1, 5, 1, 16), jnp.float32)
    v = randn(rng, (1, 5, 1, 16), jnp.float32)

    def f(q, k, v):
        out, lse = jax_mla.flash_attention(
            q, k, v, causal=True, q_pos=1, return_lse=True, backend=bwd
        )
        return out, lse

    jax.test_util.check_grads(jax.jit(f), (q, k, v), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------ flash_mla

MLA_CASES = {
    "f32-slice": dict(shape=(2, 3, 19, 4, 64), dv=32, v_offset=16, dtypes="ff", causal=True),
    "whole-row": dict(shape=(1, 4, 13, 2, 32), dv=32, v_offset=0, dtypes="ff", causal=False),
    "bf16-kv_len": dict(
        shape=(2, 2, 17, 4, 64), dv=48, v_offset=0, dtypes="bb", causal=True, kv_len=[0, 9]
    ),
    "f32-over-f16": dict(
        shape=(2, 5, 11, 2, 48), dv=16, v_offset=32, dtypes="fh", causal=True, q_pos=[-2, 3]
    ),
    # 16 batch rows of the one KV head: the CPU kernel's fused plan.
    "batch-16": dict(shape=(16, 3, 9, 2, 32), dv=16, v_offset=16, dtypes="ff", causal=True),
}


@pytest.mark.parametrize("case", MLA_CASES.values(), ids=MLA_CASES.keys())
def test_mla_grad(rng, kernel_bwd, case):
    batch, seq_q, seq_kv, heads, dk = case["shape"]
    q_dtype, kv_dtype = (DTYPES[c] for c in case["dtypes"])
    dv, v_offset = case["dv"], case["v_offset"]
    q_pos, kv_len = case.get("q_pos"), case.get("kv_len")
    q = randn(rng, (batch, seq_q, heads, dk), q_dtype)
    kv = cache(rng, (batch, seq_kv, dk), kv_dtype, kv_len)
    dout = randn(rng, (batch, seq_q, heads, dv), q_dtype)
    dlse = randn(rng, (batch, heads, seq_q), jnp.float32)
    kw = dict(scale=0.2, causal=case["causal"])

    def f(q, kv):
        return jax_mla.flash_mla(
            q,
            kv,
            dv=dv,
            v_offset=v_offset,
            q_pos=position_arg(q_pos),
            kv_len=position_arg(kv_len),
            return_lse=True,
            backend=kernel_bwd,
            **kw,
        )

    dq, dkv = jax.jit(lambda *a: jax.vjp(f, *a)[1]((dout, dlse)))(q, kv)
    _, (want_dq, want_dkv) = numpy_mla_vjp(
        q, kv, dout, dlse, dv=dv, v_offset=v_offset, q_pos=q_pos, kv_len=kv_len, **kw
    )
    assert dq.dtype == q.dtype and dkv.dtype == kv.dtype
    assert_grad_close(dq, want_dq, q_dtype, "dq")
    assert_grad_close(dkv, want_dkv, q_dtype, "dkv")
    for b, n in enumerate(positions(q_pos, kv_len, batch, seq_q, seq_kv)[1]):
        assert not np.asarray(dkv[b, n:], np.float32).any()


# ------------------------------------------------------------------ quantized caches


def test_quantized_cache_grad_is_the_dequantized_float_one(rng):
    """Over a QuantizedKV the gradient w.r.t. q is jax.grad of the float
    reference over the dequantized cache (the 8-bit roundings are not
    differentiated); a float k beside a quantized v gets its gradient too;
    flash_mla likewise over a quantized latent cache. The backward over a
    quantized cache is always the pure-JAX one, whatever the forward."""
    kw = dict(causal=True, kv_len=jnp.asarray([21, 9], jnp.int32))
    q = randn(rng, (2, 3, 4, 32), jnp.float32)
    k = randn(rng, (2, 21, 2, 32), jnp.float32)
    v = quantize(randn(rng, (2, 21, 2, 32), jnp.float32), "q8_0")
    lat = quantize(randn(rng, (2, 21, 64), jnp.float32), "q6_0")
    w = randn(rng, (2, 3, 4, 32), jnp.float32)

    @jax.jit
    def ours(q, k, v, lat):
        def loss(q, k):
            o1 = jax_mla.flash_attention(q, k, v, backend="native", **kw)
            o2 = jax_mla.flash_mla(
                q[..., :2, :].repeat(2, -1), lat, dv=32, v_offset=32, backend="native", **kw
            )
            return jnp.sum(o1 * w) + jnp.sum(o2 * w[..., :2, :])

        return jax.grad(loss, argnums=(0, 1))(q, k)

    @jax.jit
    def plain(q, k, v, lat):
        def loss(q, k):
            o1 = reference.attention(q, k, v, **kw)[0]
            o2 = reference.mla(q[..., :2, :].repeat(2, -1), lat, dv=32, v_offset=32, **kw)[0]
            return jnp.sum(o1 * w) + jnp.sum(o2 * w[..., :2, :])

        return jax.grad(loss, argnums=(0, 1))(q, k)

    got = ours(q, k, v, lat)
    want = plain(q, k, dequantize(v), dequantize(lat))
    for name, g, e in zip(("dq", "dk"), got, want):
        assert_grad_close(g, e, jnp.float32, name)


def test_quantized_cache_gradient_is_refused(rng):
    q = randn(rng, (1, 2, 2, 32), jnp.float32)
    kv = quantize(randn(rng, (1, 8, 32), jnp.float32), "q8_0")

    def f(q, kv):
        return jax_mla.flash_mla(q, kv, dv=32).sum()

    with pytest.raises(TypeError, match="flash_mla: cannot differentiate with respect to a q8_0"):
        jax.vjp(f, q, kv)
    # Quantizing a differentiated value makes the cache depend on it.
    x = randn(rng, (1, 8, 1, 32), jnp.float32)
    with pytest.raises(TypeError, match="flash_attention: cannot differentiate .* q8_kv"):
        jax.eval_shape(
            jax.grad(lambda x: jax_mla.flash_attention(q, jax_mla.quantize(x, "q8_kv"), x).sum()),
            x,
        )


# ------------------------------------------------------------------ what cannot be differentiated


def test_integer_arguments_get_no_gradient(rng):
    q = randn(rng, (2, 3, 2, 16), jnp.float32)
    kv = randn(rng, (2, 7, 16), jnp.float32)
    q_pos, kv_len = jnp.asarray([1, 4], jnp.int32), jnp.asarray([5, 7], jnp.int32)

    def f(q, kv, q_pos, kv_len):
        return jax_mla.flash_mla(q, kv, dv=16, causal=True, q_pos=q_pos, kv_len=kv_len)

    dq, dkv, dq_pos, dkv_len = jax.jit(lambda *a: jax.vjp(f, *a)[1](jnp.ones((2, 3, 2, 16))))(
        q, kv, q_pos, kv_len
    )
    assert dq.shape == q.shape and dkv.shape == kv.shape
    assert dq_pos.dtype == jax.dtypes.float0 and dkv_len.dtype == jax.dtypes.float0


def test_second_order_raises(rng):
    q = randn(rng, (1, 2, 2, 16), jnp.float32)
    k = randn(rng, (1, 5, 1, 16), jnp.float32)

    def f(q):
        return jnp.sum(jax_mla.flash_attention(q, k, k) ** 2)

    match = "flash_attention: second-order differentiation"
    with pytest.raises(NotImplementedError, match=match):
        jax.grad(lambda q: jnp.sum(jax.grad(f)(q)))(q)
    with pytest.raises(NotImplementedError, match=match):
        jax.hessian(f)(q)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(f, (q,), (q,))


def test_forward_saves_no_score_matrix(rng):
    """The residuals jax.vjp keeps are the inputs, the output and the LSE:
    none as large as the Sq x Skv scores of one head."""
    seq = 96
    q = randn(rng, (1, seq, 1, 16), jnp.float32)
    kv = randn(rng, (1, seq, 16), jnp.float32)
    _, vjp = jax.vjp(lambda q, kv: jax_mla.flash_mla(q, kv, dv=16, causal=True), q, kv)
    sizes = [x.size for x in jax.tree_util.tree_leaves(vjp)]
    assert max(sizes) < seq * seq, sizes


# ------------------------------------------------------------------ transformations


def test_grad_under_vmap_and_checkpoint(rng, kernel_bwd):
    """Per-example gradients over a shared cache (vmap of grad), grad of a
    vmapped loss (the caches' gradients summed over the examples) and
    jax.checkpoint, against a loop of plain grads."""
    n = 3
    q = randn(rng, (n, 2, 3, 4, 32), jnp.float32)
    k = randn(rng, (2, 11, 2, 32), jnp.float32)
    v = randn(rng, (2, 11, 2, 16), jnp.float32)

    def loss(q, k, v):
        return jnp.sum(jnp.sin(jax_mla.flash_attention(q, k, v, causal=True, backend=kernel_bwd)))

    grad = jax.grad(loss, argnums=(0, 1, 2))
    one = jax.jit(grad)
    loop = [one(q[i], k, v) for i in range(n)]
    stacked = [np.stack([np.asarray(g[j]) for g in loop]) for j in range(3)]
    per_example = jax.jit(jax.vmap(grad, in_axes=(0, None, None)))(q, k, v)
    summed = jax.jit(jax.grad(lambda *a: jnp.sum(jax.vmap(loss, (0, None, None))(*a)), (0, 1, 2)))
    remat = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2)))
    for what, got, want in (
        ("vmap", per_example, stacked),
        ("grad of vmap", summed(q, k, v), [stacked[0], *(x.sum(0) for x in stacked[1:])]),
        ("checkpoint", remat(q[0], k, v), [x[0] for x in stacked]),
    ):
        for name, g, w in zip(("dq", "dk", "dv"), got, want):
            assert_grad_close(g, w, jnp.float32, f"{what}: {name}")


def test_training_step_scans_layers_with_donation(rng, kernel_bwd):
    """A jitted SGD step with donated parameters over a lax.scan of layers,
    each an MLA attention over its own latent rows: the step's gradients
    match the same step with plain JAX autodiff of the reference."""
    layers, batch, seq, heads, dk, dv = 2, 2, 9, 2, 32, 16
    x = randn(rng, (batch, seq, dk), jnp.float32)
    params = {
        "wq": randn(rng, (layers, dk, heads * dk), jnp.float32) * 0.2,
        "wkv": randn(rng, (layers, dk, dk), jnp.float32) * 0.2,
        "wo": randn(rng, (layers, heads * dv, dk), jnp.float32) * 0.2,
    }

    def model(attend):
        def loss(params, x):
            def layer(h, p):
                q = (h @ p["wq"]).reshape(batch, seq, heads, dk)
                o = attend(q, h @ p["wkv"])
                return h + o.reshape(batch, seq, heads * dv) @ p["wo"], None

            h, _ = jax.lax.scan(layer, x, params)
            return jnp.mean(h**2)

        return loss

    ours = model(lambda q, kv: jax_mla.flash_mla(q, kv, dv=dv, causal=True, backend=kernel_bwd))
    plain = model(lambda q, kv: reference.mla(q, kv, dv=dv, causal=True)[0])

    @jax.jit
    def reference_grads(params, x):
        return jax.grad(plain)(params, x)

    want = reference_grads(params, x)
    step = jax.jit(
        lambda p, x: jax.tree_util.tree_map(lambda w, g: w - 0.1 * g, p, jax.grad(ours)(p, x)),
        donate_argnums=0,
    )
    expected = jax.tree_util.tree_map(lambda w, g: np.asarray(w - 0.1 * g), params, want)
    new = step(params, x)
    for name in params:
        assert params[name].is_deleted(), f"{name} was not donated"
        assert_grad_close(new[name], expected[name], jnp.float32, name)


# ------------------------------------------------------------------ the DeepSeek layer


@pytest.mark.parametrize("mode", ["standard", "latent"])
@pytest.mark.parametrize("call", ["self_attention", "float-cache"])
def test_deepseek_layer_gradient_matches_finite_differences(rng, mode, call):
    """The loss and jax.grad of the layer (through flash_attention 64/32 in
    standard mode, flash_mla in latent mode) against the float64 Hugging
    Face math and its central differences along a random direction of the
    parameters."""
    cfg = dataclasses.replace(SMALL, kv_chunk=8)  # standard mode: two chunks
    sd = hf_state_dict(rng, cfg)
    params = deepseek.params_from_hf(sd, cfg)
    seq = 11
    x = rng.standard_normal((seq, cfg.hidden_size)).astype(np.float32)
    w = rng.standard_normal((seq, cfg.hidden_size))

    def loss(params):
        xs = jnp.asarray(x)[None]
        if call == "self_attention":
            out = deepseek.self_attention(params, xs, cfg, mode)
        else:
            cache = deepseek.init_cache(cfg, 1, 16, jnp.float32)
            pos = jnp.arange(seq, dtype=jnp.int32)[None]
            out = deepseek.attention(params, xs, pos, cache, cfg, mode)[0]
        return jnp.sum(out[0] * jnp.asarray(w, jnp.float32))

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    direction = {name: rng.standard_normal(np.shape(t)) for name, t in sd.items()}
    dparams = deepseek.params_from_hf(direction, cfg)  # linear: transposes and splits
    analytic = sum(float(jnp.vdot(grads[name], dparams[name])) for name in params)
    eps = 1e-5

    def hf_loss(sign):
        shifted = {
            name: np.asarray(t, np.float64) + sign * eps * direction[name] for name, t in sd.items()
        }
        return float((hf_attention(shifted, cfg, x)[0] * w).sum())

    assert abs(float(value) - hf_loss(0)) <= 2e-5 * np.abs(w).sum(), (float(value), hf_loss(0))
    numeric = (hf_loss(1) - hf_loss(-1)) / (2 * eps)
    # float32 layer (rounding ~1e-6 relative per term, summed over the
    # parameters) against float64 differences.
    assert abs(analytic - numeric) <= 1e-4 * abs(numeric), (analytic, numeric)
