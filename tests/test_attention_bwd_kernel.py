"""The CPU attention backward kernel (jax_mla_flash_attention_bwd), called
directly: its dq, dk, dv against jax.vjp of the pure-JAX reference and against
a float64 numpy backward, over dtypes, GQA ratios, causal masks, awkward
lengths and positions, on every ISA path and both work plans (fused: dQ added
by the dK/dV items, taken when batch * KV heads >= FUSED_MIN_TASKS; split: dQ
items of their own); and its C++ argument checks."""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_mla import _ffi, reference

from .conftest import F32_TOL, assert_close, cache, positions, randn, visible_keys

# The kernel's blocks (ffi/cpu/kernels.h kBwdRows, kBwdKeys): lengths are
# chosen around them.
BLOCK = 64
# ffi/cpu/flash_bwd.cc kFusedMinTasks: from this many (batch, KV head) pairs
# on, the backward runs the fused plan.
FUSED_MIN_TASKS = 16
SUPPORTED_ISAS = _ffi.module("cpu").supported_isas().split(",")

F16, BF16, F32 = jnp.float16, jnp.bfloat16, jnp.float32


def attention_bwd_ffi(
    q, k, v, dout, lse, delta, q_pos, kv_len, *, scale, causal, shapes=None, kernel=None
):
    """The target called as the contract says: (dq, dk, dv) in float32.
    kernel: the CUDA target's kernel-family attribute (an index into
    capabilities()["attention_kernels"]); None for the CPU one, which takes none."""
    if shapes is None:
        batch, seq_q, heads_q, dk = q.shape
        seq_kv, heads_kv = v.shape[1:3]
        shapes = (batch, seq_q, heads_q, dk), (batch, seq_kv, heads_kv, dk), v.shape
    call = jax.ffi.ffi_call(
        "jax_mla_flash_attention_bwd",
        tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes),
        vmap_method="sequential",
    )
    attrs = dict(scale=np.float32(scale), causal=np.bool_(causal))
    if kernel is not None:
        attrs["kernel"] = np.int32(kernel)
    outs = call(q, k, v, dout, lse, delta, q_pos, kv_len, **attrs)
    return jax.block_until_ready(outs)


@functools.partial(jax.jit, static_argnames=("causal",))
def reference_grads(q, k, v, dout, dlse, q_pos, kv_len, scale, *, causal):
    """(out, lse) of reference.attention and its vjp at (dout, dlse), on
    float32 inputs. A row that sees no key has LSE -inf and no gradient;
    its dlse is dropped (its derivative would be 0 * inf)."""

    def forward(q, k, v):
        return reference.attention(q, k, v, scale=scale, causal=causal, q_pos=q_pos, kv_len=kv_len)

    (out, lse), vjp = jax.vjp(forward, q, k, v)
    return out, lse, vjp((dout, jnp.where(jnp.isneginf(lse), 0.0, dlse)))


def f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


# Tolerances (docs/design.md, "Tests"). Kernel and expected values are
# computed from the same inputs (upcast exactly); the kernel rounds in float32
# (summation order, its vectorized exp within 2 ulps), the numpy backward in
# float64, the reference in float32 in its own order. The rounding of the dot products over Dk
# and Dv (S and dP, relative error ~ sqrt(D) ulps) dominates and carries
# through dS = P (dP - delta), whose terms cancel, into every gradient
# element as a fraction of the gradient's magnitude, not of each element:
# atol and rtol are F32_TOL times max(1, max |expected|) of that gradient,
# times sqrt(max(Dk, Dv) / 64), times the scores' scale as in
# conftest.scaled_tol. Measured: at most 0.11 of this atol over this file's
# cases (3 seeds each), against numpy and the reference.
def grad_tol(expected, scale: float, dk: int, dv: int) -> float:
    magnitude = max(1.0, float(np.max(np.abs(np.asarray(expected)), initial=0.0)))
    dims = math.sqrt(max(dk, dv) / 64)
    return F32_TOL * magnitude * dims * max(1.0, scale * math.sqrt(dk))


def assert_grads(got, want, scale, *, kv_len, visible) -> None:
    """dq, dk, dv against the expected ones, then the contract's exact zeros:
    dq of a row that sees no key, dk and dv of keys past kv_len."""
    dims = got[0].shape[-1], got[2].shape[-1]
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert g.dtype == jnp.float32, f"{name} dtype {g.dtype}"
        assert np.all(np.isfinite(np.asarray(g))), f"{name} has non-finite elements"
        try:
            assert_close(g, w, jnp.float32, f32_tol=grad_tol(w, scale, *dims))
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from None
    dq, dk_, dv_ = (np.asarray(g) for g in got)
    assert np.all(dq[np.asarray(visible) == 0] == 0.0), "a row that sees no key must get dq = 0"
    for b, n in enumerate(kv_len):
        assert np.all(dk_[b, n:] == 0.0) and np.all(dv_[b, n:] == 0.0), "keys past kv_len"


def check_bwd(
    rng,
    *,
    batch,
    seq_q,
    heads_q,
    heads_kv,
    seq_kv,
    dk,
    dv,
    dtypes=(F32,) * 4,
    causal=False,
    q_pos=None,
    kv_len=None,
    scale=None,
    against="numpy",
):
    """The kernel's gradients on random q, k, v, dout (k and v NaN past
    kv_len) and a nonzero LSE cotangent, against the float64 numpy backward
    or (against="reference") jax.vjp of the reference; the kernel gets the
    LSE and delta of the one it is compared with."""
    q_dtype, k_dtype, v_dtype, o_dtype = dtypes
    q = randn(rng, (batch, seq_q, heads_q, dk), q_dtype)
    k = cache(rng, (batch, seq_kv, heads_kv, dk), k_dtype, kv_len)
    v = cache(rng, (batch, seq_kv, heads_kv, dv), v_dtype, kv_len)
    dout = randn(rng, (batch, seq_q, heads_q, dv), o_dtype)
    dlse = randn(rng, (batch, heads_q, seq_q), F32)
    q_pos, kv_len = positions(q_pos, kv_len, batch, seq_q, seq_kv)
    scale = 1.0 / math.sqrt(dk) if scale is None else scale
    pos = (jnp.asarray(q_pos, jnp.int32), jnp.asarray(kv_len, jnp.int32))
    if against == "numpy":
        lse, delta, want = numpy_backward(
            *(np.asarray(f32(x), np.float64) for x in (q, k, v, dout, dlse)),
            q_pos,
            kv_len,
            scale,
            causal,
        )
        lse, delta = f32(lse), f32(delta)
    else:
        # The reference gets the poison zeroed: its dq would be 0 * NaN there.
        k0, v0 = (jnp.where(jnp.isnan(f32(x)), 0.0, f32(x)) for x in (k, v))
        out, lse, want = reference_grads(
            f32(q), k0, v0, f32(dout), dlse, *pos, np.float32(scale), causal=bool(causal)
        )
        # delta as the Python side computes it; rows that see no key keep
        # their dlse here, which the kernel must ignore.
        delta = jnp.moveaxis(jnp.sum(f32(dout) * out, axis=-1), 1, 2) - dlse
    got = attention_bwd_ffi(q, k, v, dout, lse, delta, *pos, scale=scale, causal=causal)
    visible = visible_keys(q_pos, kv_len, batch, seq_q, seq_kv, causal)
    assert_grads(got, want, scale, kv_len=kv_len, visible=visible)
    return got


def numpy_backward(q, k, v, dout, dlse, q_pos, kv_len, scale, causal):
    """The contract's backward in float64: (lse, delta) as the kernel takes
    them (delta keeps dlse on rows that see no key) and (dq, dk, dv)."""
    batch, seq_q, heads_q, _ = q.shape
    seq_kv, heads_kv = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    seen = visible_keys(q_pos, kv_len, batch, seq_q, seq_kv, causal)  # [B, Sq]
    mask = (np.arange(seq_kv)[None, None, :] < seen[:, :, None])[:, None]  # [B, 1, Sq, Skv]
    kk = np.repeat(np.where(np.isnan(k), 0.0, k), group, axis=2)
    vv = np.repeat(np.where(np.isnan(v), 0.0, v), group, axis=2)

    def einsum(spec, a, b):
        return np.einsum(spec, a, b, optimize=True)

    s = np.where(mask, scale * einsum("bqhd,bkhd->bhqk", q, kk), -np.inf)
    m = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
    m = np.where(np.isfinite(m), m, 0.0)
    total = np.sum(np.exp(s - m), axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        lse = np.where(total > 0, m + np.log(total), -np.inf)
    p = np.where(mask, np.exp(s - np.where(np.isfinite(lse), lse, 0.0)), 0.0)
    out = einsum("bhqk,bkhd->bqhd", p, vv)
    delta = einsum("bqhd,bqhd->bhq", dout, out) - dlse
    ds = p * (einsum("bqhd,bkhd->bhqk", dout, vv) - delta[..., None])
    dq = scale * einsum("bhqk,bkhd->bqhd", ds, kk)
    dk = scale * einsum("bhqk,bqhd->bkhd", ds, q)
    dv = einsum("bhqk,bqhd->bkhd", p, dout)
    dk = dk.reshape(batch, seq_kv, heads_kv, group, q.shape[-1]).sum(3)
    dv = dv.reshape(batch, seq_kv, heads_kv, group, v.shape[-1]).sum(3)
    return lse[..., 0], delta, (dq, dk, dv)


CASES = {
    # MHA, non-causal, one query and one key
    "single": dict(batch=1, seq_q=1, heads_q=2, heads_kv=2, seq_kv=1, dk=64, dv=64),
    # GQA 2, causal prefill over one key past a block, DeepSeek's dims
    "gqa_192x128_causal": dict(
        batch=2,
        seq_q=BLOCK + 1,
        heads_q=4,
        heads_kv=2,
        seq_kv=BLOCK + 1,
        dk=192,
        dv=128,
        causal=True,
        kv_len=[BLOCK + 1, 37],
    ),
    # MQA, primes, f16 everywhere
    "mqa_f16": dict(
        batch=1,
        seq_q=13,
        heads_q=3,
        heads_kv=1,
        seq_kv=67,
        dk=80,
        dv=48,
        dtypes=(F16,) * 4,
    ),
    # bf16 with a float32 query, Sq > Skv, causal: leading rows see nothing
    "bf16_sq_gt_skv": dict(
        batch=2,
        seq_q=41,
        heads_q=2,
        heads_kv=2,
        seq_kv=29,
        dk=32,
        dv=96,
        dtypes=(F32, BF16, BF16, BF16),
        causal=True,
    ),
    # every input of its own dtype, two key blocks and a row block past one
    "mixed_two_blocks": dict(
        batch=1,
        seq_q=BLOCK + 3,
        heads_q=6,
        heads_kv=3,
        seq_kv=2 * BLOCK + 1,
        dk=112,
        dv=208,
        dtypes=(BF16, F32, F16, F16),
        kv_len=[2 * BLOCK - 5],
    ),
    # the MLA backward's shape: one KV head of 576 (V 512), DeepSeek's scale
    "mla_576x512": dict(
        batch=2,
        seq_q=3,
        heads_q=8,
        heads_kv=1,
        seq_kv=BLOCK + 6,
        dk=576,
        dv=512,
        dtypes=(F32, BF16, BF16, F32),
        causal=True,
        kv_len=[BLOCK + 6, 20],
        scale=0.135,
    ),
    # DeepSeek's training shape on one KV head (the MLA path with 192/128)
    "mqa_192x128": dict(
        batch=1, seq_q=19, heads_q=4, heads_kv=1, seq_kv=23, dk=192, dv=128, causal=True
    ),
}


# Shapes with batch * heads_kv >= FUSED_MIN_TASKS: the fused plan.
FUSED_CASES = {
    # GQA 2, causal, bf16, a partial last key block and a short kv_len
    "fused_gqa_causal_bf16": dict(
        batch=2,
        seq_q=BLOCK + 3,
        heads_q=16,
        heads_kv=8,
        seq_kv=2 * BLOCK + 5,
        dk=64,
        dv=32,
        dtypes=(BF16,) * 4,
        causal=True,
        kv_len=[2 * BLOCK + 5, 37],
    ),
    # MQA over 16 batch rows of their own kv_len and q_pos: empty caches,
    # queries before position 0 (rows that see nothing), Sq > Skv
    "fused_mqa_positions": dict(
        batch=16,
        seq_q=BLOCK + 7,
        heads_q=3,
        heads_kv=1,
        seq_kv=BLOCK + 2,
        dk=48,
        dv=16,
        causal=True,
        q_pos=[-9, 0, 3, -70, 40, 100, 0, 1, -1, 5, 60, 2, -3, 7, 0, 11],
        kv_len=[30, 0, BLOCK + 2, 5, 17, BLOCK + 2, 1, BLOCK, 2, 9, BLOCK + 1, 0, 40, 3, 64, 8],
    ),
    # one query row, f16, not causal, MHA
    "fused_sq1_f16": dict(
        batch=4,
        seq_q=1,
        heads_q=4,
        heads_kv=4,
        seq_kv=BLOCK + 7,
        dk=80,
        dv=48,
        dtypes=(F16,) * 4,
    ),
    # DeepSeek's dims and 16 heads at batch 1, odd lengths, negative q_pos
    "fused_192x128_odd": dict(
        batch=1,
        seq_q=BLOCK + 1,
        heads_q=16,
        heads_kv=16,
        seq_kv=BLOCK + 9,
        dk=192,
        dv=128,
        dtypes=(F32, BF16, BF16, F32),
        causal=True,
        q_pos=[-2],
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_float64_numpy(cpu, rng, case):
    check_bwd(rng, **case)


@pytest.mark.parametrize("case", FUSED_CASES.values(), ids=FUSED_CASES.keys())
def test_fused_plan_matches_float64_numpy(cpu, rng, case):
    assert case["batch"] * case["heads_kv"] >= FUSED_MIN_TASKS
    check_bwd(rng, **case)


def test_plans_agree(cpu, rng):
    # The same problem through both plans: batch 4 of 4 KV heads (fused)
    # against each batch row alone (split). Different summation orders, so
    # equal to float32 rounding, not bitwise.
    batch, seq_q, heads_q, heads_kv, seq_kv, dk, dv = 4, BLOCK + 5, 8, 4, 2 * BLOCK + 3, 64, 32
    assert batch * heads_kv >= FUSED_MIN_TASKS > heads_kv
    kv_len = np.array([seq_kv, BLOCK + 1, 9, 0])
    q_pos = np.array([seq_kv - seq_q, -4, 20, 0])
    q = randn(rng, (batch, seq_q, heads_q, dk), F32)
    k = cache(rng, (batch, seq_kv, heads_kv, dk), BF16, kv_len)
    v = cache(rng, (batch, seq_kv, heads_kv, dv), BF16, kv_len)
    dout = randn(rng, (batch, seq_q, heads_q, dv), F32)
    lse, delta, _ = numpy_backward(
        *(np.asarray(f32(x), np.float64) for x in (q, k, v, dout)),
        rng.standard_normal((batch, heads_q, seq_q)),
        q_pos,
        kv_len,
        0.125,
        True,
    )
    lse, delta = f32(lse), f32(delta)
    args = (
        q,
        k,
        v,
        dout,
        lse,
        delta,
        jnp.asarray(q_pos, jnp.int32),
        jnp.asarray(kv_len, jnp.int32),
    )
    fused = attention_bwd_ffi(*args, scale=0.125, causal=True)
    split = [
        attention_bwd_ffi(*(x[b : b + 1] for x in args), scale=0.125, causal=True)
        for b in range(batch)
    ]
    for name, f, parts in zip(("dq", "dk", "dv"), fused, zip(*split)):
        want = np.concatenate([np.asarray(x) for x in parts])
        try:
            assert_close(f, want, jnp.float32, f32_tol=grad_tol(want, 0.125, dk, dv))
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from None


@pytest.mark.parametrize("case", ["gqa_192x128_causal", "bf16_sq_gt_skv"])
def test_matches_reference_vjp(cpu, rng, case):
    # jax.vjp of the reference (its LSE and delta as the custom_vjp computes
    # them); fewer cases, each a compile of the reference's backward.
    check_bwd(rng, **CASES[case], against="reference")


POSITION_CASES = {
    # queries before position 0 (causal: the first rows see nothing), one
    # batch row with no keys at all
    "negative_q_pos_empty_cache": dict(q_pos=[-5, 3], kv_len=[30, 0], causal=True),
    # queries past kv_len see every existing key
    "q_pos_past_kv_len": dict(q_pos=[40, 100], kv_len=[17, BLOCK + 2], causal=True),
    # kv_len per batch row around the key block, not causal
    "kv_len_per_batch": dict(q_pos=[0, 0], kv_len=[BLOCK, 1], causal=False),
}


@pytest.mark.parametrize("case", POSITION_CASES.values(), ids=POSITION_CASES.keys())
def test_positions(cpu, rng, case):
    check_bwd(rng, batch=2, seq_q=11, heads_q=4, heads_kv=2, seq_kv=BLOCK + 2, dk=48, dv=32, **case)


@pytest.fixture(params=SUPPORTED_ISAS)
def isa(request, monkeypatch, cpu):
    monkeypatch.setenv("JAX_MLA_CPU_ISA", request.param)
    return request.param


ALL_CASES = CASES | FUSED_CASES


@pytest.mark.parametrize(
    "case",
    ["gqa_192x128_causal", "mixed_two_blocks", "mla_576x512", "fused_gqa_causal_bf16"],
)
def test_each_isa(rng, isa, case):
    # Each ISA's GEMM blocks and their tails: rows in blocks of 6 (4 in the
    # generic copy) with 1-5 left over, lanes in 4 (AVX-512) or 2 vectors
    # with single vectors after (a block's 1-64 keys; Dv 208 = 13 x 16);
    # the fused plan's dQ product.
    assert _ffi.module("cpu").isa() == isa
    check_bwd(rng, **ALL_CASES[case])


@pytest.mark.parametrize("case", ["mixed_two_blocks", "fused_gqa_causal_bf16"])
def test_results_do_not_depend_on_threads(cpu, case):
    # Many work items over the pool's threads: the same inputs, the same bits.
    first, again = (check_bwd(np.random.default_rng(7), **ALL_CASES[case]) for _ in range(2))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


ONE_THREAD = """
import os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
import jax, jax.numpy as jnp, numpy as np
import jax_mla._ffi  # registers the targets
args = np.load(sys.argv[1])
args = [args[f"a{i}"] for i in range(8)]
call = jax.ffi.ffi_call(
    "jax_mla_flash_attention_bwd",
    tuple(jax.ShapeDtypeStruct(args[i].shape, jnp.float32) for i in range(3)),
)
with jax.default_device(jax.devices("cpu")[0]):
    grads = call(*args, scale=np.float32(0.125), causal=np.bool_(True))
np.savez(sys.argv[2], *(np.asarray(g) for g in grads))
"""


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs CPU affinity (Linux) and two CPUs to compare with one",
)
@pytest.mark.parametrize("batch, heads_kv", [(2, 8), (1, 2)], ids=["fused", "split"])
def test_results_do_not_depend_on_thread_count(cpu, rng, tmp_path, batch, heads_kv):
    # The same call in a process pinned to one CPU (XLA sizes its CPU thread
    # pools from the process's CPU affinity, and whatever threads it has take
    # turns on that CPU): the same bits as with this process's pool.
    seq_q, heads_q, seq_kv, dk, dv = 2 * BLOCK + 3, 2 * heads_kv, 3 * BLOCK + 1, 64, 32
    args = [
        randn(rng, (batch, seq_q, heads_q, dk), F32),
        randn(rng, (batch, seq_kv, heads_kv, dk), F32),
        randn(rng, (batch, seq_kv, heads_kv, dv), F32),
        randn(rng, (batch, seq_q, heads_q, dv), F32),
        f32(rng.uniform(3.0, 5.0, (batch, heads_q, seq_q))),
        randn(rng, (batch, heads_q, seq_q), F32),
        jnp.full((batch,), seq_kv - seq_q, jnp.int32),
        jnp.full((batch,), seq_kv, jnp.int32),
    ]
    here = attention_bwd_ffi(*args, scale=0.125, causal=True)
    np.savez(tmp_path / "args.npz", **{f"a{i}": np.asarray(x) for i, x in enumerate(args)})
    subprocess.run(
        [sys.executable, "-P", "-c", ONE_THREAD, tmp_path / "args.npz", tmp_path / "grads.npz"],
        check=True,
        cwd=tmp_path,
    )
    there = np.load(tmp_path / "grads.npz")
    for i, g in enumerate(here):
        np.testing.assert_array_equal(np.asarray(g), there[f"arr_{i}"])


@pytest.mark.parametrize("heads_kv", [1, 8], ids=["split", "fused"])
def test_every_result_element_is_written(cpu, rng, monkeypatch, heads_kv):
    # JAX_MLA_DEBUG_NAN_FILL=1 fills dq, dk and dv with NaN first: an element
    # no work item writes stays NaN and fails check_bwd's finiteness check
    # (keys past kv_len, rows past the last block, an empty batch row).
    monkeypatch.setenv("JAX_MLA_DEBUG_NAN_FILL", "1")
    check_bwd(
        rng,
        batch=2,
        seq_q=BLOCK + 5,
        heads_q=2 * heads_kv,
        heads_kv=heads_kv,
        seq_kv=2 * BLOCK + 3,
        dk=64,
        dv=32,
        causal=True,
        q_pos=[-3, 0],
        kv_len=[BLOCK + 9, 0],
    )


@pytest.mark.parametrize("heads_kv", [2, 8], ids=["split", "fused"])
@pytest.mark.parametrize("seq_q, seq_kv", [(3, 0), (0, 5)], ids=["no_keys", "no_queries"])
def test_empty_axes(cpu, rng, monkeypatch, seq_q, seq_kv, heads_kv):
    # No keys: dq is 0; no queries: dk and dv are 0; written, not left as
    # the NaN fill put them.
    monkeypatch.setenv("JAX_MLA_DEBUG_NAN_FILL", "1")
    check_bwd(
        rng,
        batch=2,
        seq_q=seq_q,
        heads_q=2 * heads_kv,
        heads_kv=heads_kv,
        seq_kv=seq_kv,
        dk=32,
        dv=16,
        causal=True,
    )


# Argument checks: consistent inputs (B, Sq, Hq, Hkv, Skv, Dk, Dv) = (2, 3, 4,
# 2, 40, 64, 32), each case breaking one thing.
B, SQ, HQ, HKV, SKV, DK, DV = 2, 3, 4, 2, 40, 64, 32


def ones(*shape, dtype=np.float32):
    return np.ones(shape, dtype)


def bwd_call(**changes):
    """A call of the target on consistent all-ones arguments with `changes`;
    the results' shapes are the base ones, or the inputs' with shapes=None."""
    args = dict(
        q=ones(B, SQ, HQ, DK),
        k=ones(B, SKV, HKV, DK),
        v=ones(B, SKV, HKV, DV),
        dout=ones(B, SQ, HQ, DV),
        lse=np.full((B, HQ, SQ), 0.125 * DK + math.log(SKV), np.float32),
        delta=np.zeros((B, HQ, SQ), np.float32),
        q_pos=np.zeros((B,), np.int32),
        kv_len=np.full((B,), SKV, np.int32),
    )
    shapes = changes.pop("shapes", ((B, SQ, HQ, DK), (B, SKV, HKV, DK), (B, SKV, HKV, DV)))
    args.update(changes)
    return lambda: attention_bwd_ffi(**args, scale=0.125, causal=False, shapes=shapes)


CHECK_CASES = {
    "q_rank": (bwd_call(q=ones(B, SQ, HQ * DK)), "INVALID_ARGUMENT", r"q must have rank 4"),
    "dout_rank": (bwd_call(dout=ones(B, SQ, HQ)), "INVALID_ARGUMENT", r"dout must have rank 4"),
    "lse_rank": (
        bwd_call(lse=np.zeros((B, HQ), np.float32)),
        "INVALID_ARGUMENT",
        r"lse and delta must have rank 3 \[B, Hq, Sq\], got shapes \[2, 4\] and \[2, 4, 3\]",
    ),
    "integer_q": (
        bwd_call(q=ones(B, SQ, HQ, DK, dtype=np.int32)),
        "INVALID_ARGUMENT",
        r"q must be float32, float16 or bfloat16",
    ),
    "integer_dout": (
        bwd_call(dout=ones(B, SQ, HQ, DV, dtype=np.int32)),
        "INVALID_ARGUMENT",
        r"dout must be float32, float16 or bfloat16",
    ),
    "integer_k": (
        bwd_call(k=ones(B, SKV, HKV, DK, dtype=np.int8)),
        "INVALID_ARGUMENT",
        r"k must be float32, float16 or bfloat16",
    ),
    "k_rank": (
        bwd_call(k=ones(B, SKV, DK)),
        "INVALID_ARGUMENT",
        r"k must have rank 4 \[B, Skv, Hkv, D\], got shape \[2, 40, 64\]",
    ),
    "batch": (
        bwd_call(k=ones(1, SKV, HKV, DK), v=ones(1, SKV, HKV, DV)),
        "INVALID_ARGUMENT",
        r"batch of k 1 and v 1 must equal q's 2",
    ),
    "k_dk": (
        bwd_call(k=ones(B, SKV, HKV, 48)),
        "INVALID_ARGUMENT",
        r"k head dim 48 must equal q's 64",
    ),
    "v_shape": (
        bwd_call(v=ones(B, SKV + 1, HKV, DV)),
        "INVALID_ARGUMENT",
        r"v shape \[2, 41, 2, 32\] must match k \[2, 40, 2, 64\] in Skv and Hkv",
    ),
    "heads_not_multiple": (
        bwd_call(k=ones(B, SKV, 3, DK), v=ones(B, SKV, 3, DV)),
        "INVALID_ARGUMENT",
        r"Hq = 4 must be a multiple of Hkv = 3",
    ),
    "dout_shape": (
        bwd_call(dout=ones(B, SQ, HQ, DV + 16)),
        "INVALID_ARGUMENT",
        r"dout must be \[2, 3, 4, 32\] .*got \[2, 3, 4, 48\]",
    ),
    "delta_shape": (
        bwd_call(delta=np.zeros((B, SQ, HQ), np.float32)),
        "INVALID_ARGUMENT",
        r"lse and delta must be \[2, 4, 3\], got \[2, 4, 3\] and \[2, 3, 4\]",
    ),
    "kv_len_shape": (
        bwd_call(kv_len=np.zeros((), np.int32)),
        "INVALID_ARGUMENT",
        r"q_pos and kv_len must have shape \[2\], got \[2\] and \[\]",
    ),
    "result_shape": (
        bwd_call(shapes=((B, SQ, HQ, DK), (B, SKV, HKV, DK), (B, SKV, HKV, DK))),
        "INVALID_ARGUMENT",
        r"results must be dq \[2, 3, 4, 64\], dk \[2, 40, 2, 64\], dv \[2, 40, 2, 32\] float32, "
        r"got \[2, 3, 4, 64\], \[2, 40, 2, 64\], \[2, 40, 2, 64\]",
    ),
    "head_dim": (
        bwd_call(q=ones(B, SQ, HQ, 100), k=ones(B, SKV, HKV, 100), shapes=None),
        "UNIMPLEMENTED",
        r"head dims must be multiples of 16 up to 576, got Dk = 100, Dv = 32",
    ),
    "head_dim_too_large": (
        bwd_call(v=ones(B, SKV, HKV, 592), dout=ones(B, SQ, HQ, 592), shapes=None),
        "UNIMPLEMENTED",
        r"got Dk = 64, Dv = 592",
    ),
}


@pytest.mark.parametrize("call, code, match", CHECK_CASES.values(), ids=CHECK_CASES.keys())
def test_handler_checks(cpu, call, code, match):
    with pytest.raises(jax.errors.JaxRuntimeError, match=f"{code}: flash_attention_bwd.*{match}"):
        call()


def test_well_formed_call_runs(cpu):
    # The checks' base arguments are consistent, so the errors above come from
    # the one thing each case breaks. All ones, and the LSE of Skv equal
    # scores of scale * Dk: P = 1 / Skv, dP = Dv, dS = P Dv (delta 0), so
    # dq = scale Skv dS, dk = scale Sq G dS, dv = Sq G P with G = Hq / Hkv.
    dq, dk, dv = bwd_call()()
    p, group, scale = 1.0 / SKV, HQ // HKV, 0.125
    for got, want in ((dq, scale * DV), (dk, scale * SQ * group * p * DV), (dv, SQ * group * p)):
        assert_close(got, np.full(got.shape, want), jnp.float32)
