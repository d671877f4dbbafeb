"""The ops under JAX transformations: vmap (each folding rule), nested vmap,
many native calls in one jit, traced positions (clamping, one trace)."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mla

from .conftest import assert_close, cache, randn, reference_attention, reference_mla

N = 3  # vmapped examples
B, SQ, HQ, HKV, SKV, DK, DV, V_OFFSET = 2, 3, 4, 2, 40, 64, 32, 16


def attention_native(q, k, v, kv_len):
    return jax_mla.flash_attention(
        q, k, v, kv_len=kv_len, causal=True, return_lse=True, backend="native"
    )


def attention_reference(q, k, v, kv_len):
    return reference_attention(q, k, v, kv_len=np.asarray(kv_len), causal=True)


def mla_native(q, kv, kv_len):
    return jax_mla.flash_mla(
        q,
        kv,
        dv=DV,
        v_offset=V_OFFSET,
        kv_len=kv_len,
        causal=True,
        num_splits=2,
        return_lse=True,
        backend="native",
    )


def mla_reference(q, kv, kv_len):
    return reference_mla(q, kv, dv=DV, v_offset=V_OFFSET, kv_len=np.asarray(kv_len), causal=True)


def vmap_args(rng, specs, in_axes):
    """Arguments for vmap from (shape, dtype, is_cache) specs plus a trailing
    kv_len; batched ones get a leading axis of N. A cache shared by all
    examples is poisoned past the largest kv_len that reads it."""
    kv_lens = rng.integers(0, SKV + 1, size=(N, B))
    if in_axes[-1] is None:
        kv_lens[:] = kv_lens[0]

    def one(shape, dtype, is_cache, lens):
        return cache(rng, shape, dtype, lens) if is_cache else randn(rng, shape, dtype)

    args = []
    for (shape, dtype, is_cache), axis in zip(specs, in_axes):
        if axis is None:
            args.append(one(shape, dtype, is_cache, kv_lens.max(axis=0)))
        else:
            args.append(jnp.stack([one(shape, dtype, is_cache, kv_lens[j]) for j in range(N)]))
    args.append(jnp.asarray(kv_lens if in_axes[-1] == 0 else kv_lens[0], jnp.int32))
    return args


def loop(fn, args, in_axes):
    """fn on each example in turn, (out, lse) stacked."""
    outs = [fn(*[a if ax is None else a[j] for a, ax in zip(args, in_axes)]) for j in range(N)]
    return tuple(np.stack([np.asarray(o[i]) for o in outs]) for i in range(2))


def assert_pair_close(got, want):
    assert_close(got[1], want[1], jnp.float32)
    assert_close(got[0], want[0], jnp.float32)


ATTENTION_SPECS = [
    ((B, SQ, HQ, DK), jnp.float32, False),
    ((B, SKV, HKV, DK), jnp.bfloat16, True),
    ((B, SKV, HKV, DV), jnp.bfloat16, True),
]
ATTENTION_CONFIG = pytest.mark.kernel_config(
    "attention", dtypes=[dtype for _, dtype, _ in ATTENTION_SPECS], dk=DK, dv=DV
)
# in_axes for (q, k, v, kv_len)
ATTENTION_AXES = {
    "q": (0, None, None, None),
    "all": (0, 0, 0, 0),
    "q_and_kv_len": (0, None, None, 0),
    "kv_len": (None, None, None, 0),
    "k_and_v": (None, 0, 0, None),
}


@ATTENTION_CONFIG
@pytest.mark.parametrize("in_axes", ATTENTION_AXES.values(), ids=ATTENTION_AXES.keys())
def test_vmap_attention(rng, platform, in_axes):
    args = vmap_args(rng, ATTENTION_SPECS, in_axes)
    got = jax.vmap(attention_native, in_axes=in_axes)(*args)
    assert_pair_close(got, loop(attention_reference, args, in_axes))


@ATTENTION_CONFIG
def test_vmap_attention_inner_axis(rng, platform):
    # vmap over an axis of q that is not its leading one.
    q, k, v, kv_len = vmap_args(rng, ATTENTION_SPECS, (0, None, None, None))
    got = jax.vmap(attention_native, in_axes=(2, None, None, None))(
        jnp.moveaxis(q, 0, 2), k, v, kv_len
    )
    assert_pair_close(got, loop(attention_reference, [q, k, v, kv_len], (0, None, None, None)))


@ATTENTION_CONFIG
def test_vmap_attention_nested(rng, platform):
    # Outer vmap over every argument, inner over the queries only.
    _, k, v, kv_len = vmap_args(rng, ATTENTION_SPECS, (0, 0, 0, 0))
    q = randn(rng, (N, 2, B, SQ, HQ, DK), jnp.float32)
    got = jax.vmap(jax.vmap(attention_native, in_axes=(0, None, None, None)))(q, k, v, kv_len)
    for j in range(N):
        want = [attention_reference(q[j, i], k[j], v[j], kv_len[j]) for i in range(2)]
        assert_pair_close(
            (got[0][j], got[1][j]),
            tuple(np.stack([np.asarray(w[n]) for w in want]) for n in range(2)),
        )


MLA_SPECS = [((B, SQ, HQ, DK), jnp.float32, False), ((B, SKV, DK), jnp.float16, True)]
MLA_CONFIG = pytest.mark.kernel_config(
    "mla", dtypes=[dtype for _, dtype, _ in MLA_SPECS], dk=DK, dv=DV, v_offset=V_OFFSET
)
# in_axes for (q, kv, kv_len)
MLA_AXES = {
    "q": (0, None, None),
    "all": (0, 0, 0),
    "q_and_kv_len": (0, None, 0),
    "kv_len": (None, None, 0),
    "kv": (None, 0, None),
}


@MLA_CONFIG
@pytest.mark.parametrize("in_axes", MLA_AXES.values(), ids=MLA_AXES.keys())
def test_vmap_mla(rng, platform, in_axes):
    args = vmap_args(rng, MLA_SPECS, in_axes)
    got = jax.vmap(mla_native, in_axes=in_axes)(*args)
    assert_pair_close(got, loop(mla_reference, args, in_axes))


@MLA_CONFIG
def test_vmap_mla_nested(rng, platform):
    # Outer vmap over the queries only, inner over every argument.
    _, kv, kv_len = vmap_args(rng, MLA_SPECS, (0, 0, 0))
    q = randn(rng, (2, N, B, SQ, HQ, DK), jnp.float32)
    got = jax.vmap(jax.vmap(mla_native), in_axes=(0, None, None))(q, kv, kv_len)
    for i in range(2):
        want = loop(mla_reference, [q[i], kv, kv_len], (0, 0, 0))
        assert_pair_close((got[0][i], got[1][i]), want)


@pytest.mark.kernel_config(
    "attention", dtypes=(jnp.float32, jnp.float16, jnp.float16), dk=DK, dv=DV
)
@pytest.mark.kernel_config("mla", dtypes=(jnp.float32, jnp.bfloat16), dk=DK, dv=DV)
def test_many_native_calls_in_one_jit(rng, platform):
    # Eight independent native calls in one executable may run concurrently on
    # the FFI thread pool: a handler that blocked on tasks it scheduled there
    # would deadlock, so the call runs in a thread with a deadline.
    q = randn(rng, (B, 1, HQ, DK), jnp.float32)
    k = cache(rng, (B, 300, HKV, DK), jnp.float16)
    v = cache(rng, (B, 300, HKV, DV), jnp.float16)
    kv = cache(rng, (B, 300, DK), jnp.bfloat16)

    @jax.jit
    def many(q, k, v, kv):
        att = sum(jax_mla.flash_attention(q * (i + 1), k, v, backend="native") for i in range(4))
        mla = sum(
            jax_mla.flash_mla(q * (i + 1), kv, dv=DV, num_splits=4, backend="native")
            for i in range(4)
        )
        return att, mla

    result = {}

    def run():
        # jax.default_device is thread-local: the platform fixture's setting
        # does not reach this thread by itself.
        with jax.default_device(jax.devices(platform)[0]):
            try:
                result["out"] = jax.block_until_ready(many(q, k, v, kv))
            except Exception as e:  # re-raised below, in the test's thread
                result["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=300)
    assert not worker.is_alive(), "8 native calls in one jit did not finish (deadlock?)"
    if "error" in result:
        raise result["error"]
    att, mla = result["out"]
    want_att = sum(np.asarray(reference_attention(q * (i + 1), k, v)[0]) for i in range(4))
    want_mla = sum(np.asarray(reference_mla(q * (i + 1), kv, dv=DV)[0]) for i in range(4))
    assert_close(att, want_att, jnp.float32, f32_tol=4e-5)
    assert_close(mla, want_mla, jnp.float32, f32_tol=4e-5)


def ops(rng):
    """(name, native call taking kv_len, reference call taking kv_len)."""
    q = randn(rng, (B, SQ, HQ, DK), jnp.float32)
    k = randn(rng, (B, SKV, HKV, DK), jnp.float32)
    v = randn(rng, (B, SKV, HKV, DV), jnp.float32)
    kv = randn(rng, (B, SKV, DK), jnp.float32)
    return {
        "attention": (
            lambda n, **kw: jax_mla.flash_attention(
                q, k, v, kv_len=n, causal=True, return_lse=True, **kw
            )
        ),
        "mla": (
            lambda n, **kw: jax_mla.flash_mla(
                q, kv, dv=DV, kv_len=n, causal=True, num_splits=2, return_lse=True, **kw
            )
        ),
    }


# The native calls ops() makes.
OPS_CONFIG_ATTENTION = pytest.mark.kernel_config(
    "attention", dtypes=(jnp.float32,) * 3, dk=DK, dv=DV
)
OPS_CONFIG_MLA = pytest.mark.kernel_config("mla", dtypes=(jnp.float32,) * 2, dk=DK, dv=DV)


@OPS_CONFIG_ATTENTION
@OPS_CONFIG_MLA
@pytest.mark.parametrize("op", ["attention", "mla"])
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_traced_kv_len_is_clamped(rng, platform, op, backend):
    # Traced kv_len cannot be checked: it is clamped to [0, Skv]. Compared
    # within one executable, so the results must be identical.
    call = ops(rng)[op]
    jitted = jax.jit(lambda n: call(n, backend=backend))

    def assert_same(a, b):
        np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
        np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))

    assert_same(jitted(jnp.int32(SKV + 5)), jitted(jnp.int32(SKV)))
    out, lse = jitted(jnp.int32(-3))
    assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))

    full = jitted(jnp.array([SKV, SKV], jnp.int32))
    assert_same(jitted(jnp.array([SKV + 5, 2**31 - 1], jnp.int32)), full)
    out, lse = jitted(jnp.array([SKV + 5, -3], jnp.int32))
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(full[0][0]))
    np.testing.assert_array_equal(np.asarray(lse[0]), np.asarray(full[1][0]))
    assert np.all(np.asarray(out[1]) == 0) and np.all(np.isneginf(np.asarray(lse[1])))


@OPS_CONFIG_ATTENTION
@OPS_CONFIG_MLA
@pytest.mark.parametrize("op", ["attention", "mla"])
def test_traced_positions_compile_once(rng, platform, op):
    call = ops(rng)[op]
    traces = []

    @jax.jit
    def jitted(kv_len):
        traces.append(1)
        return call(kv_len, backend="native")

    for kv_len in ([SKV, 7], [0, SKV], [3, 1]):
        got = jitted(jnp.asarray(kv_len, jnp.int32))
        eager = call(jnp.asarray(kv_len, jnp.int32), backend="native")
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(eager[0]))
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(eager[1]))
    assert len(traces) == 1
    assert jitted._cache_size() == 1
