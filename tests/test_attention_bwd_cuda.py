"""The CUDA attention backward (jax_mla_flash_attention_bwd on the GPU),
called directly like the CPU one (test_attention_bwd_kernel.py) and through
jax.vjp of flash_attention: dq, dk, dv against the float64 numpy backward
over the (Dk, Dv) pairs the CUDA table lists for the backward, its dtypes,
GQA ratios, causal masks, q_pos, kv_len, rows that see no key and lengths
around the kernels' blocks; bitwise repeatability; and the dispatch rule
(which configurations take the native backward; the CUDA table's rule is in
test_capabilities.py), which runs without a GPU. Every GPU case runs under
each kernel family the call can force (the `kernel` attribute, the forward's
JAX_MLA_CUDA_ATTENTION_KERNEL): mma_sync everywhere, sm90 (wgmma) on a
compute capability 9.0 card for the pairs it takes, skipped elsewhere with
the reason; forcing sm90 where it cannot run is an error."""

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
SM90_DIMS = [tuple(d) for d in CUDA.get("attention_bwd_sm90_head_dims", [])]
# The kernels' blocks (ffi/cuda/attention/attention_bwd_config.h): 64 keys
# per KV block, 32 query rows per step of it, 64 query rows per Q block. The
# sm90 kernels' (attention_bwd_sm90_kernel.cuh): 128 keys per KV block, 32
# query rows per step of it, 128 query rows per Q block, 64 keys per step of it.
BLOCK = 64
# The families a test forces (auto is tested against them below).
FAMILIES = ["mma_sync", "sm90"]


def is_hopper() -> bool:
    return jax.devices("gpu")[0].compute_capability == "9.0"


def family_attr(family: str, dims) -> np.int32:
    """The `kernel` attribute that forces `family` on pair `dims`; skips,
    saying why, where the family cannot run (test_forced_sm90_it_cannot_run
    checks that such a call is an error)."""
    if family == "sm90":
        if not is_hopper():
            pytest.skip("the sm90 backward needs a compute capability 9.0 device")
        if tuple(dims) not in SM90_DIMS:
            pytest.skip(f"the sm90 backward takes {SM90_DIMS}, not {tuple(dims)}")
    return np.int32(list(CUDA["attention_kernels"]).index(family))


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
    family,
    causal=False,
    q_pos=None,
    kv_len=None,
    scale=None,
):
    """The CUDA target's gradients, kernel family `family` forced, on random
    q, k, v, dout (k and v NaN past kv_len) and a nonzero LSE cotangent
    against the float64 numpy backward, whose LSE and delta the kernel gets;
    then the contract's exact zeros. A failure names the family and case."""
    kernel = family_attr(family, (dk, dv))
    what = (
        f"[{family} {jnp.dtype(dtype).name} {dk}/{dv} B={batch} Sq={seq_q} Hq={heads_q} "
        f"Hkv={heads_kv} Skv={seq_kv} causal={causal} q_pos={q_pos} kv_len={kv_len}]"
    )
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
        kernel=kernel,
    )
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert g.dtype == jnp.float32, f"{what} {name} dtype {g.dtype}"
        bad = np.argwhere(~np.isfinite(np.asarray(g)))
        assert bad.size == 0, f"{what} {name}: {len(bad)} non-finite elements, first at {bad[0]}"
        try:
            assert_close(g, w, jnp.float32, f32_tol=grad_tol(w, dtype))
        except AssertionError as err:
            raise AssertionError(f"{what} {name}: {err}") from None
    visible = visible_keys(q_pos, kv_len, batch, seq_q, seq_kv, causal)
    dq_, dk_, dv_ = (np.asarray(g) for g in got)
    assert np.all(dq_[visible == 0] == 0.0), f"{what} a row that sees no key must get dq = 0"
    for b, n in enumerate(kv_len):
        assert np.all(dk_[b, n:] == 0.0), f"{what} dk of batch {b}'s keys past kv_len {n}"
        assert np.all(dv_[b, n:] == 0.0), f"{what} dv of batch {b}'s keys past kv_len {n}"
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
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_float64_numpy(rng, gpu, family, dims, dtype, shape, causal):
    batch, seq_q, heads_q, heads_kv, seq_kv = shape
    check_cuda_bwd(
        rng,
        family=family,
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
@pytest.mark.parametrize("family", FAMILIES)
def test_positions(rng, gpu, family, dims, case):
    check_cuda_bwd(
        rng,
        family=family,
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
@pytest.mark.parametrize("family", FAMILIES)
def test_empty_axes(rng, gpu, family, seq_q, seq_kv):
    dk, dv = BWD_DIMS[0]
    check_cuda_bwd(
        rng,
        family=family,
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
@pytest.mark.parametrize("family", FAMILIES)
def test_results_are_bitwise_repeatable(gpu, family):
    # Each result element has one writer and a fixed summation order (no atomics).
    dk, dv = BWD_DIMS[0]
    case = dict(
        batch=2,
        seq_q=3 * BLOCK + 5,
        heads_q=8,
        heads_kv=2,
        seq_kv=3 * BLOCK + 9,
        dk=dk,
        dv=dv,
        family=family,
    )
    first, again = (
        check_cuda_bwd(np.random.default_rng(7), dtype=HALF[-1], causal=True, **case)
        for _ in range(2)
    )
    for a, b in zip(first, again):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.gpu
@pytest.mark.parametrize("dims", BWD_DIMS, ids=lambda d: f"{d[0]}x{d[1]}")
@pytest.mark.parametrize("family", ["auto"] + FAMILIES)
def test_flash_attention_grad_uses_it(rng, gpu, family, dims, monkeypatch):
    # jax.vjp of flash_attention on the GPU runs the native backward (the
    # dispatch says so) and agrees with the pure-JAX backward on the same
    # card, the family forced through the forward's variable (the forward
    # runs it too).
    if family != "auto":
        family_attr(family, dims)
    monkeypatch.setenv("JAX_MLA_CUDA_ATTENTION_KERNEL", family)
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
            raise AssertionError(f"[{family} {dk}/{dv}] {name}: {err}") from None


# (B, Sq, Hq, Hkv, Skv) and positions aimed at the sm90 kernels' tiles (128
# keys per KV block, 32 query rows per step, 128 query rows per Q block, 64
# keys per step), run under both families.
TILING_CASES = {
    # Sq and Skv past whole tiles of every kind
    "ragged_tiles": dict(shape=(1, 133, 2, 2, 261), causal=True),
    # GQA 8:1: a KV block's 32-row steps hold 4 positions x 8 heads
    "gqa8": dict(shape=(2, 45, 8, 1, 150), causal=True, kv_len=[150, 97]),
    # queries before the cache: batch row 1 sees no key at all (dq = 0)
    "q_pos_negative": dict(shape=(2, 70, 4, 2, 140), causal=True, q_pos=[-33, -70]),
    # queries deep into the cache, one batch row past its kv_len
    "q_pos_positive": dict(
        shape=(2, 70, 4, 2, 300), causal=True, q_pos=[129, 230], kv_len=[300, 255]
    ),
    # an empty cache and one ending inside the second KV block (NaN past it)
    "kv_len_zero_and_short": dict(shape=(2, 50, 4, 2, 260), causal=False, kv_len=[0, 131]),
    # decode: one query row, kv_len on a block edge and of one key
    "sq_1": dict(shape=(3, 1, 16, 2, 390), causal=True, kv_len=[390, 128, 1]),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", TILING_CASES.values(), ids=TILING_CASES.keys())
@pytest.mark.parametrize("dims", BWD_DIMS, ids=lambda d: f"{d[0]}x{d[1]}")
@pytest.mark.parametrize("family", FAMILIES)
def test_tiling(rng, gpu, family, dims, case):
    batch, seq_q, heads_q, heads_kv, seq_kv = case["shape"]
    check_cuda_bwd(
        rng,
        family=family,
        batch=batch,
        seq_q=seq_q,
        heads_q=heads_q,
        heads_kv=heads_kv,
        seq_kv=seq_kv,
        dk=dims[0],
        dv=dims[1],
        dtype=HALF[-1],
        **{k: v for k, v in case.items() if k != "shape"},
    )


def bwd_call(rng, dims, kernel, seq_q=70, seq_kv=90):
    """One causal backward call with the `kernel` attribute as given."""
    dk, dv = dims
    dtype = HALF[-1]
    q, dout = (randn(rng, (2, seq_q, 4, d), dtype) for d in (dk, dv))
    k, v = (randn(rng, (2, seq_kv, 2, d), dtype) for d in (dk, dv))
    lse = jnp.zeros((2, 4, seq_q), jnp.float32)
    pos = (jnp.zeros((2,), jnp.int32), jnp.full((2,), seq_kv, jnp.int32))
    return attention_bwd_ffi(
        q, k, v, dout, lse, lse, *pos, scale=0.1, causal=True, kernel=np.int32(kernel)
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dims", BWD_DIMS, ids=lambda d: f"{d[0]}x{d[1]}")
def test_auto_picks_sm90_on_hopper(gpu, dims):
    # auto runs the sm90 kernels exactly where they can run, else mma.sync:
    # both are deterministic, so auto's result is bitwise the chosen one's.
    names = list(CUDA["attention_kernels"])
    chosen = "sm90" if is_hopper() and dims in SM90_DIMS else "mma_sync"
    auto = bwd_call(np.random.default_rng(3), dims, names.index("auto"))
    want = bwd_call(np.random.default_rng(3), dims, names.index(chosen))
    for name, a, b in zip(("dq", "dk", "dv"), auto, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{name} ({chosen})")


@pytest.mark.gpu
@pytest.mark.parametrize("dims", BWD_DIMS, ids=lambda d: f"{d[0]}x{d[1]}")
def test_forced_sm90_it_cannot_run(rng, gpu, dims):
    # A forced family the device or the pair cannot run is an error, never
    # another kernel.
    if is_hopper() and dims in SM90_DIMS:
        pytest.skip("the sm90 backward runs here (tested above)")
    why = "takes \\(Dk, Dv\\)" if is_hopper() else "needs a compute capability 9.0 device"
    with pytest.raises(jax.errors.JaxRuntimeError, match=f"kernel sm90 {why}"):
        bwd_call(rng, dims, list(CUDA["attention_kernels"]).index("sm90"))


@pytest.mark.gpu
def test_kernel_attribute_out_of_range(rng, gpu):
    n = len(CUDA["attention_kernels"])
    with pytest.raises(jax.errors.JaxRuntimeError, match="kernel must be in"):
        bwd_call(rng, BWD_DIMS[0], n)


# ------------------------------------------------------------------ dispatch (no GPU needed)


def test_cpu_takes_every_float_configuration(cpu):
    x = jnp.zeros((1, 1, 1, 48), jnp.float32)
    want = None if _autodiff.has_native_backward("cpu") else "not"
    got = _autodiff.native_backward_problem("cpu", x, x, x, x)
    assert (got is None) == (want is None)
    assert _autodiff.native_backward_problem(None, x, x, x, x) is not None
