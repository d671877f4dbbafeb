"""CUDA-specific cases: the shared tests' GPU cases run only where the CUDA
kernels take their configuration (float32 and odd head dims are not
generated; conftest filters them by the capability table), so these repeat
the position, split-KV, head-count and vmap coverage in the configurations
the CUDA module's capabilities() lists: its dtypes, flash_mla's latent
layouts and quantized formats, flash_attention's (Dk, Dv) pairs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mla
from jax_mla import _capabilities, _ffi

from .conftest import (
    assert_attention,
    assert_close,
    cache,
    check_attention,
    check_mla,
    gpu_tol,
    native_attention,
    native_mla,
    randn,
    reference_attention,
    reference_mla,
    visible_keys,
)

pytestmark = pytest.mark.gpu


@pytest.fixture
def gpu():
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        devices = []
    if not devices:
        pytest.skip("no GPU")
    with jax.default_device(devices[0]):
        yield "gpu"


# What the CUDA kernels take, from the module's table (nothing where the
# module is not built: then these tests have no parameters).
CUDA = _capabilities.cuda() if _ffi.module("gpu") is not None else {}
HALF = [jnp.dtype(d) for d in CUDA.get("dtypes", [])]
MLA_LAYOUTS = [tuple(layout) for layout in CUDA.get("mla_layouts", [])]
HEAD_DIMS = [tuple(dims) for dims in CUDA.get("attention_head_dims", [])]
CUDA_QUANT = list(CUDA.get("mla_formats", {}))
HEAD_DIMS_IDS = [f"{a}x{b}" for a, b in HEAD_DIMS]


@pytest.fixture(params=MLA_LAYOUTS, ids=lambda t: "dk{}-dv{}-off{}".format(*t))
def layout(request):
    """(Dk, dv, v_offset): a latent row the CUDA flash_mla kernel takes."""
    return request.param


POSITIONS = {
    "kv_len_0": (None, 0),
    "kv_len_1": (None, 1),
    "kv_len_full": (None, None),
    "kv_len_per_batch": (None, [0, 1, 33, 77]),
    "q_pos_negative": (-2, None),
    "q_pos_all_before_0": (-10, [77, 5, 0, 30]),
    "q_pos_past_kv_len": (100, [77, 5, 0, 30]),
    "q_pos_per_batch": ([-2, 0, 40, 100], [77, 5, 77, 50]),
}


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("q_pos, kv_len", POSITIONS.values(), ids=POSITIONS.keys())
def test_mla_positions(rng, gpu, layout, q_pos, kv_len, causal, num_splits):
    dk, dv, v_offset = layout
    check_mla(
        rng,
        batch=4,
        seq_q=3,
        heads=16,
        seq_kv=77,
        dk=dk,
        dv=dv,
        v_offset=v_offset,
        dtypes=(jnp.bfloat16,) * 2,
        causal=causal,
        q_pos=q_pos,
        kv_len=kv_len,
        num_splits=num_splits,
        scale=0.135,
    )


# (B, Sq, H, Skv, kv_len): 16-row blocks (H = 16 decode), 64-row blocks, rows
# that do not fill a block, many KV tiles.
MLA_SHAPES = [
    (2, 1, 16, 1000, [1000, 517]),
    (2, 1, 128, 300, [300, 1]),
    (2, 2, 16, 77, None),
    (1, 5, 20, 129, None),
    (3, 1, 1, 64, [64, 0, 33]),
    (2, 33, 16, 300, [300, 150]),
]


@pytest.mark.parametrize("num_splits", [None, 1, 4])
@pytest.mark.parametrize("dtype", HALF, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize(
    "shape", MLA_SHAPES, ids=[f"b{s[0]}-sq{s[1]}-h{s[2]}-skv{s[3]}" for s in MLA_SHAPES]
)
def test_mla_shapes(rng, gpu, layout, shape, dtype, num_splits):
    batch, seq_q, heads, seq_kv, kv_len = shape
    dk, dv, v_offset = layout
    check_mla(
        rng,
        batch=batch,
        seq_q=seq_q,
        heads=heads,
        seq_kv=seq_kv,
        dk=dk,
        dv=dv,
        v_offset=v_offset,
        dtypes=(dtype, dtype),
        causal=True,
        kv_len=kv_len,
        num_splits=num_splits,
        scale=0.135,
    )


def test_mla_results_do_not_depend_on_num_splits(rng, gpu, layout):
    dk, dv, v_offset = layout
    q = randn(rng, (3, 1, 16, dk), jnp.bfloat16)
    kv = cache(rng, (3, 300, dk), jnp.bfloat16, [300, 0, 150])
    kw = dict(dv=dv, v_offset=v_offset, kv_len=[300, 0, 150])
    base = native_mla(q, kv, num_splits=1, **kw)
    for num_splits in (2, 3, 7, 64):
        out, lse = native_mla(q, kv, num_splits=num_splits, **kw)
        assert_close(lse, base[1], jnp.float32, f32_tol=1e-5)
        assert_close(out, base[0], jnp.bfloat16, f32_tol=gpu_tol(jnp.bfloat16))


# The combine gives each column chunk 1, 2, 4 or 8 warps that share the splits
# (more with more splits) and walks them 8 at a time: counts below and above
# those steps, with a row whose keys fill only some splits and a row with none.
@pytest.mark.parametrize("num_splits", [5, 8, 16, 33, 119, 125])
def test_mla_many_splits(rng, gpu, layout, num_splits):
    dk, dv, v_offset = layout
    check_mla(
        rng,
        batch=3,
        seq_q=1,
        heads=16,
        seq_kv=4000,
        dk=dk,
        dv=dv,
        v_offset=v_offset,
        dtypes=(jnp.float16,) * 2,
        kv_len=[4000, 1500, 0],
        num_splits=num_splits,
        scale=0.135,
    )


@pytest.mark.parametrize("dk, dv", HEAD_DIMS, ids=HEAD_DIMS_IDS)
def test_attention_many_splits(rng, gpu, dk, dv):
    # 2 x 4 MQA decode rows over 5000 keys: two blocks, so the heuristic splits
    # the keys 27 (64-key tiles) or 53 (32-key tiles) ways: 4 or 8 warps per
    # column chunk in the combine. Dv of 64 fills half a warp's 128 columns,
    # 128 one warp, 256 two. (flash_attention takes no num_splits.)
    from jax_mla import _splits

    assert _splits.choose_num_splits(None, 2, 1, 4, 1, 5000, platform="gpu", dk=dk) >= 16
    check_attention(
        rng,
        batch=2,
        seq_q=1,
        heads_q=4,
        heads_kv=1,
        seq_kv=5000,
        dk=dk,
        dv=dv,
        dtypes=(jnp.bfloat16,) * 3,
        kv_len=[5000, 1200],
        scale=0.1,
    )


def test_mla_q_pos_near_int32_max(rng, gpu, layout):
    dk, dv, v_offset = layout
    q = randn(rng, (2, 4, 16, dk), jnp.bfloat16)
    kv = cache(rng, (2, 77, dk), jnp.bfloat16, [77, 30])
    kv_len = jnp.array([77, 30], jnp.int32)
    got = native_mla(
        q, kv, dv=dv, v_offset=v_offset, causal=True, q_pos=2**31 - 3, kv_len=kv_len, num_splits=2
    )
    want = reference_mla(q, kv, dv=dv, v_offset=v_offset, causal=False, kv_len=kv_len)
    assert_attention(
        got,
        want,
        jnp.bfloat16,
        visible_keys(None, kv_len, 2, 4, 77, False),
        f32_tol=gpu_tol(jnp.bfloat16),
    )


@pytest.mark.parametrize(
    "in_axes", [(0, None, None), (0, 0, 0), (0, None, 0)], ids=["q", "all", "q_and_kv_len"]
)
def test_mla_vmap(rng, gpu, layout, in_axes):
    n, batch = 3, 2
    dk, dv, v_offset = layout
    q = randn(rng, (n, batch, 1, 16, dk), jnp.bfloat16)
    kv = cache(rng, (n, batch, 100, dk), jnp.bfloat16)
    kv_len = jnp.asarray(rng.integers(1, 101, (n, batch)), jnp.int32)
    args = [q, kv[0] if in_axes[1] is None else kv, kv_len[0] if in_axes[2] is None else kv_len]

    def op(q, kv, kv_len):
        return jax_mla.flash_mla(
            q, kv, dv=dv, v_offset=v_offset, kv_len=kv_len, return_lse=True, backend="native"
        )

    got = jax.vmap(op, in_axes=in_axes)(*args)
    for j in range(n):
        one = [a if ax is None else a[j] for a, ax in zip(args, in_axes)]
        want = reference_mla(one[0], one[1], dv=dv, v_offset=v_offset, kv_len=one[2])
        assert_close(got[1][j], want[1], jnp.float32, f32_tol=gpu_tol(jnp.bfloat16))
        assert_close(got[0][j], want[0], jnp.bfloat16, f32_tol=gpu_tol(jnp.bfloat16))


HEADS = {"gqa4": (8, 2), "mqa": (5, 1)}
LENGTHS = [(1, 300), (3, 65), (130, 130), (70, 33)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seq_q, seq_kv", LENGTHS, ids=[f"sq{a}-skv{b}" for a, b in LENGTHS])
@pytest.mark.parametrize("heads_q, heads_kv", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("dk, dv", HEAD_DIMS, ids=HEAD_DIMS_IDS)
def test_attention_dims_heads_lengths(rng, gpu, dk, dv, heads_q, heads_kv, seq_q, seq_kv, causal):
    dtype = jnp.bfloat16 if (dk + seq_q) % 2 else jnp.float16  # both dtypes across the grid
    check_attention(
        rng,
        batch=2,
        seq_q=seq_q,
        heads_q=heads_q,
        heads_kv=heads_kv,
        seq_kv=seq_kv,
        dk=dk,
        dv=dv,
        dtypes=(dtype,) * 3,
        causal=causal,
        kv_len=[seq_kv, max(1, seq_kv // 3)],
    )


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("q_pos, kv_len", POSITIONS.values(), ids=POSITIONS.keys())
@pytest.mark.parametrize("dk, dv", HEAD_DIMS, ids=HEAD_DIMS_IDS)
def test_attention_positions(rng, gpu, dk, dv, q_pos, kv_len, causal):
    check_attention(
        rng,
        batch=4,
        seq_q=5,
        heads_q=4,
        heads_kv=2,
        seq_kv=77,
        dk=dk,
        dv=dv,
        dtypes=(jnp.float16,) * 3,
        causal=causal,
        q_pos=q_pos,
        kv_len=kv_len,
    )


def test_attention_split_kv_decode(rng, gpu):
    # 2 x 16 decode rows over 1000 keys: fewer blocks than SMs, so the keys are split.
    from jax_mla import _splits

    assert _splits.choose_num_splits(None, 2, 1, 16, 16, 1000, platform="gpu", dk=192) > 1
    check_attention(
        rng,
        batch=2,
        seq_q=1,
        heads_q=16,
        heads_kv=16,
        seq_kv=1000,
        dk=192,
        dv=128,
        dtypes=(jnp.bfloat16,) * 3,
        causal=True,
        kv_len=[1000, 0],
        scale=0.1147,
    )


@pytest.mark.parametrize("in_axes", [(0, None, None, None), (0, 0, 0, 0)], ids=["q", "all"])
def test_attention_vmap(rng, gpu, in_axes):
    n = 3
    q = randn(rng, (n, 2, 3, 8, 128), jnp.float16)
    k = cache(rng, (n, 2, 90, 2, 128), jnp.float16)
    v = cache(rng, (n, 2, 90, 2, 128), jnp.float16)
    kv_len = jnp.asarray(rng.integers(1, 91, (n, 2)), jnp.int32)
    args = [x if ax is not None else x[0] for x, ax in zip([q, k, v, kv_len], in_axes)]

    def op(q, k, v, kv_len):
        return jax_mla.flash_attention(
            q, k, v, kv_len=kv_len, causal=True, return_lse=True, backend="native"
        )

    got = jax.vmap(op, in_axes=in_axes)(*args)
    for j in range(n):
        one = [a if ax is None else a[j] for a, ax in zip(args, in_axes)]
        want = reference_attention(*one[:3], causal=True, kv_len=one[3])
        assert_close(got[1][j], want[1], jnp.float32, f32_tol=gpu_tol(jnp.float16))
        assert_close(got[0][j], want[0], jnp.float16, f32_tol=gpu_tol(jnp.float16))


UNSUPPORTED = {
    "mla_f32": ("mla", (jnp.float32, jnp.float32), 576, "float16 or all bfloat16"),
    "mla_mixed": ("mla", (jnp.float16, jnp.bfloat16), 576, "float16 or all bfloat16"),
    "mla_dk": ("mla", (jnp.bfloat16, jnp.bfloat16), 192, "576"),
    "attention_f32": ("attention", (jnp.float32,) * 3, 64, "float16 or all bfloat16"),
    "attention_dims": ("attention", (jnp.bfloat16,) * 3, 80, r"\(192, 128\)"),
}


@pytest.mark.parametrize("op, dtypes, dk, match", UNSUPPORTED.values(), ids=UNSUPPORTED.keys())
def test_unsupported_is_not_implemented(rng, gpu, op, dtypes, dk, match):
    # Never a wrong answer or a silent fallback: NotImplementedError at trace time.
    q = randn(rng, (1, 1, 4, dk), dtypes[0])
    with pytest.raises(NotImplementedError, match=match):
        if op == "mla":
            jax_mla.flash_mla(q, randn(rng, (1, 10, dk), dtypes[1]), dv=dk - 64, backend="native")
        else:
            jax_mla.flash_attention(
                q,
                randn(rng, (1, 10, 4, dk), dtypes[1]),
                randn(rng, (1, 10, 4, dk), dtypes[2]),
                backend="native",
            )
    # backend=None also raises: the native kernel exists, only this config is missing.
    with pytest.raises(NotImplementedError):
        if op == "mla":
            jax_mla.flash_mla(q, randn(rng, (1, 10, dk), dtypes[1]), dv=dk - 64)
        else:
            jax_mla.flash_attention(
                q, randn(rng, (1, 10, 4, dk), dtypes[1]), randn(rng, (1, 10, 4, dk), dtypes[2])
            )


def test_many_native_calls_in_one_jit(rng, gpu, layout):
    dk, dv, v_offset = layout
    q = randn(rng, (2, 1, 16, dk), jnp.bfloat16)
    kv = cache(rng, (2, 300, dk), jnp.bfloat16)

    @jax.jit
    def many(q, kv):
        return sum(
            jax_mla.flash_mla(
                q * (i + 1), kv, dv=dv, v_offset=v_offset, num_splits=4, backend="native"
            ).astype(jnp.float32)
            for i in range(4)
        )

    want = sum(
        np.asarray(reference_mla(q * (i + 1), kv, dv=dv, v_offset=v_offset)[0]).astype(np.float32)
        for i in range(4)
    )
    assert_close(many(q, kv), want, jnp.float32, f32_tol=4 * gpu_tol(jnp.bfloat16))


# ---------------------------------------------------------------- quantized latent caches
# q8_0, q8_kv and fp8_e4m3 caches read in place (ffi/cuda/mla_quant_kernel.cuh).
# Expected values over the 8-bit caches: the reference over the dequantized
# cache with the query rounded to 8 bits per block of 32 as the kernels take it
# (reference.round_query_q8). The kernel's Q.K is exact integer arithmetic
# scaled in float32; V = d * q is rounded to the query's type, like P, so the
# float kernels' GPU tolerance holds. Over fp8_e4m3 the kernel is the float
# kernel over the cache dequantized to the query's type (K and V = d * value
# rounded to it): the reference over dequantize(kv, dtype), same tolerance.
def rounded_query(q, scale=None) -> np.ndarray:
    """The query as the 8-bit kernels take it: reference.round_query_q8(q *
    scale) (scale None: 1/sqrt(Dk)), float32. Rounded on the CPU, whose values
    are the kernels' (and numpy's): run by XLA:GPU the same function gave a
    reference that 14 flash_mla cases missed by up to 2.5e-3 (H100, 5742033;
    an FMA contraction moving ties is the suspect, not confirmed)."""
    s = np.float32(1 / np.sqrt(q.shape[-1]) if scale is None else scale)
    with jax.default_device(jax.devices("cpu")[0]):
        return np.asarray(
            jax_mla.reference.round_query_q8(jnp.asarray(np.asarray(q, np.float32)) * s)
        )


def check_mla_quant_gpu(
    rng,
    fmt,
    layout,
    *,
    batch,
    seq_q,
    heads,
    seq_kv,
    dtype,
    causal=False,
    q_pos=None,
    kv_len=None,
    num_splits=None,
    scale=None,
):
    from .test_quant_kernels import quantized_cache

    dk, dv, v_offset = layout
    q = randn(rng, (batch, seq_q, heads, dk), dtype)
    kv = quantized_cache(rng, (batch, seq_kv, dk), fmt, kv_len)  # scales NaN past kv_len
    kw = dict(dv=dv, v_offset=v_offset, causal=causal, q_pos=q_pos, kv_len=kv_len)
    got = native_mla(q, kv, num_splits=num_splits, scale=scale, **kw)
    visible = visible_keys(q_pos, kv_len, batch, seq_q, seq_kv, causal)
    if fmt == "fp8_e4m3":
        want = reference_mla(q, jax_mla.dequantize(kv, dtype), scale=scale, **kw)
        assert_attention(got, want, dtype, visible, f32_tol=gpu_tol(dtype))
        return got
    # The 8-bit kernels round the query but not P (P.V on f16/bf16 tensor cores).
    want = reference_mla(rounded_query(q, scale), jax_mla.dequantize(kv), scale=1.0, **kw)
    assert_attention(got, want, dtype, visible, f32_tol=gpu_tol(dtype))
    return got


@pytest.mark.parametrize("num_splits", [None, 4])
@pytest.mark.parametrize("dtype", HALF, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize(
    "shape", MLA_SHAPES, ids=[f"b{s[0]}-sq{s[1]}-h{s[2]}-skv{s[3]}" for s in MLA_SHAPES]
)
@pytest.mark.parametrize("fmt", CUDA_QUANT)
def test_mla_quant_shapes(rng, gpu, layout, fmt, shape, dtype, num_splits):
    batch, seq_q, heads, seq_kv, kv_len = shape
    check_mla_quant_gpu(
        rng,
        fmt,
        layout,
        batch=batch,
        seq_q=seq_q,
        heads=heads,
        seq_kv=seq_kv,
        dtype=dtype,
        causal=True,
        kv_len=kv_len,
        num_splits=num_splits,
        scale=0.135,
    )


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("q_pos, kv_len", POSITIONS.values(), ids=POSITIONS.keys())
@pytest.mark.parametrize("fmt", CUDA_QUANT)
def test_mla_quant_positions(rng, gpu, layout, fmt, q_pos, kv_len, causal):
    # Split in 3 (the splits' partials and the combine see the edge rows too).
    check_mla_quant_gpu(
        rng,
        fmt,
        layout,
        batch=4,
        seq_q=3,
        heads=16,
        seq_kv=77,
        dtype=jnp.bfloat16,
        causal=causal,
        q_pos=q_pos,
        kv_len=kv_len,
        num_splits=3,
    )


@pytest.mark.parametrize("fmt", CUDA_QUANT)
def test_mla_quant_results_do_not_depend_on_num_splits(rng, gpu, layout, fmt):
    from .test_quant_kernels import quantized_cache

    dk, dv, v_offset = layout
    q = randn(rng, (3, 1, 16, dk), jnp.bfloat16)
    kv = quantized_cache(rng, (3, 300, dk), fmt, [300, 0, 150])
    kw = dict(dv=dv, v_offset=v_offset, kv_len=[300, 0, 150])
    base = native_mla(q, kv, num_splits=1, **kw)
    for num_splits in (2, 7, 64):
        out, lse = native_mla(q, kv, num_splits=num_splits, **kw)
        assert_close(lse, base[1], jnp.float32, f32_tol=1e-5)
        assert_close(out, base[0], jnp.bfloat16, f32_tol=gpu_tol(jnp.bfloat16))


@pytest.mark.parametrize("fmt", CUDA_QUANT)
def test_mla_quant_is_close_to_the_float_cache(rng, gpu, layout, fmt):
    # End to end, as test_quant_kernels does on the CPU: 8-bit rows keep
    # outputs within about 1e-2 of float64 attention over the float values,
    # fp8_e4m3's (3 mantissa bits) within about 4e-2.
    dk, dv, v_offset = layout
    q = randn(rng, (1, 1, 16, dk), jnp.float32) * 0.5
    x = randn(rng, (1, 500, dk), jnp.float32)
    out = jax_mla.flash_mla(
        q.astype(jnp.bfloat16), jax_mla.quantize(x, fmt), dv=dv, v_offset=v_offset, backend="native"
    )
    out = np.asarray(out.astype(jnp.float32))
    qn = np.asarray(q.astype(jnp.bfloat16).astype(jnp.float32), np.float64)[0, 0]
    xn = np.asarray(x, np.float64)[0]
    s = qn @ xn.T / np.sqrt(dk)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    want = (p / p.sum(axis=-1, keepdims=True)) @ xn[:, v_offset : v_offset + dv]
    err = np.abs(out[0, 0] - want).max() / np.abs(want).max()
    assert err < (4e-2 if fmt == "fp8_e4m3" else 1e-2), f"{fmt}: relative error {err:.3g}"


@pytest.mark.parametrize("fmt", CUDA_QUANT)
def test_mla_quant_vmap_shares_the_cache(rng, gpu, layout, fmt):
    from .test_quant_kernels import quantized_cache

    dk, dv, v_offset = layout
    q = randn(rng, (3, 2, 1, 16, dk), jnp.bfloat16)
    kv = quantized_cache(rng, (2, 100, dk), fmt)
    kv_len = jnp.array([[100, 50], [10, 1], [0, 64]], jnp.int32)
    op = lambda q, kv, n: jax_mla.flash_mla(
        q, kv, dv=dv, v_offset=v_offset, kv_len=n, backend="native"
    )
    got = jax.vmap(op, in_axes=(0, None, 0))(q, kv, kv_len)
    for i in range(3):
        np.testing.assert_array_equal(
            np.asarray(got[i], np.float32), np.asarray(op(q[i], kv, kv_len[i]), np.float32)
        )


@pytest.mark.parametrize("what", ["q6_0", "f32_query"])
def test_mla_quant_unsupported_is_not_implemented(rng, gpu, layout, what):
    # A latent layout the kernel takes, so only the format or q's dtype is missing.
    dk, dv, v_offset = layout
    fmt, dtype = ("q6_0", jnp.bfloat16) if what == "q6_0" else ("q8_0", jnp.float32)
    q = randn(rng, (1, 1, 16, dk), dtype)
    kv = jax_mla.quantize(randn(rng, (1, 40, dk), jnp.float32), fmt)
    match = "q8_0, q8_kv, fp8_e4m3; got q6_0" if what == "q6_0" else "float16 or bfloat16"
    for backend in ("native", None):
        with pytest.raises(NotImplementedError, match=match):
            jax_mla.flash_mla(q, kv, dv=dv, v_offset=v_offset, backend=backend)


@pytest.mark.parametrize(
    "fmt_code, match",
    [
        (3, r"q8_0, q8_kv and fp8_e4m3 are supported, got q6_0"),
        (0, r"needs a quantized format"),
        (7, r"unknown cache format code 7"),
    ],
)
def test_mla_quant_cpp_checks(gpu, fmt_code, match):
    # The CUDA handler checks again when called directly (no Python checks).
    qs = jnp.ones((1, 8, 432 if fmt_code == 3 else 576), jnp.uint8 if fmt_code == 3 else jnp.int8)
    d = jnp.ones((1, 8, 18), jnp.float16)
    with pytest.raises(Exception, match=match):
        direct_mla_call("jax_mla_flash_mla_quant", qs, d, kv_fmt=np.int64(fmt_code))


def direct_mla_call(target, *cache, kernel=0, **attrs):
    """One decode row (B 1, H 16, 576/512 over 8 keys) through the CUDA
    target itself, bypassing the Python checks, so the handler's own checks
    are what answers."""
    out_types = (
        jax.ShapeDtypeStruct((1, 1, 16, 512), jnp.bfloat16),
        jax.ShapeDtypeStruct((1, 16, 1), jnp.float32),
        jax.ShapeDtypeStruct((0,), jnp.float32),
        jax.ShapeDtypeStruct((0,), jnp.float32),
    )
    call = jax.ffi.ffi_call(target, out_types, vmap_method="sequential")
    q = jnp.ones((1, 1, 16, 576), jnp.bfloat16)
    positions = (jnp.zeros((1,), jnp.int32), jnp.full((1,), 8, jnp.int32))
    return jax.block_until_ready(
        call(
            q,
            *cache,
            *positions,
            scale=np.float32(0.1),
            causal=np.bool_(False),
            dv=np.int64(512),
            v_offset=np.int64(0),
            num_splits=np.int64(1),
            kernel=np.int32(kernel),
            **attrs,
        )
    )


# ---------------------------------------------------------------- kernel families
# Every kernel family the CUDA module lists (capabilities()), forced per call
# through JAX_MLA_CUDA_MLA_KERNEL / JAX_MLA_CUDA_ATTENTION_KERNEL, which are
# read when a call is traced (ffi/cuda/kernel_family.h): one GPU run covers
# mma.sync everywhere and, on Hopper, the key-split sm90 and the seesaw MLA
# kernels and the sm90 attention kernel. The key-split kernel is reached this
# way only: auto takes it on Hopper when the cache's strides do not suit TMA,
# and the dense buffers XLA passes always do.
def cuda_families(key: str) -> list[str]:
    module = jax_mla._ffi.module("gpu")
    return list(module.capabilities()[key]) if module is not None else []


def runs_sm90a() -> bool:
    return jax.devices("gpu")[0].compute_capability == "9.0"


def check_family(family: str, call, want, dtype, visible):
    """The call's result against the reference, or, for an sm90 family on a
    card without sm_90a, the error saying so (never another kernel)."""
    if family.startswith("sm90") and not runs_sm90a():
        with pytest.raises(Exception, match="needs a compute capability 9.0 device"):
            jax.block_until_ready(call())
        return
    assert_attention(call(), want, dtype, visible, f32_tol=gpu_tol(dtype))


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("family", cuda_families("mla_kernels"))
def test_mla_kernel_family(rng, gpu, monkeypatch, family, num_splits):
    # 64 heads of decode: 64-row blocks, where the families differ (16-row
    # blocks run mma.sync in every family).
    monkeypatch.setenv("JAX_MLA_CUDA_MLA_KERNEL", family)
    batch, seq_q, heads, seq_kv, kv_len = 2, 1, 64, 300, [300, 77]
    q = randn(rng, (batch, seq_q, heads, 576), jnp.bfloat16)
    kv = cache(rng, (batch, seq_kv, 576), jnp.bfloat16, kv_len)
    kw = dict(dv=512, causal=True, kv_len=kv_len, scale=0.135)
    check_family(
        family,
        lambda: native_mla(q, kv, num_splits=num_splits, **kw),
        reference_mla(q, kv, **kw),
        jnp.bfloat16,
        visible_keys(None, kv_len, batch, seq_q, seq_kv, True),
    )


@pytest.mark.parametrize("family", cuda_families("attention_kernels"))
def test_attention_kernel_family(rng, gpu, monkeypatch, family):
    # DeepSeek's 192/128 prefill, GQA, a ragged kv_len: a pair every family
    # takes. flash_attention chooses its own split count (no num_splits).
    monkeypatch.setenv("JAX_MLA_CUDA_ATTENTION_KERNEL", family)
    batch, seq_q, heads_q, heads_kv, seq_kv, kv_len = 2, 130, 8, 2, 200, [200, 150]
    q = randn(rng, (batch, seq_q, heads_q, 192), jnp.bfloat16)
    k = cache(rng, (batch, seq_kv, heads_kv, 192), jnp.bfloat16, kv_len)
    v = cache(rng, (batch, seq_kv, heads_kv, 128), jnp.bfloat16, kv_len)
    kw = dict(causal=True, q_pos=70, kv_len=kv_len)
    check_family(
        family,
        lambda: native_attention(q, k, v, **kw),
        reference_attention(q, k, v, **kw),
        jnp.bfloat16,
        visible_keys(70, kv_len, batch, seq_q, seq_kv, True),
    )


@pytest.mark.parametrize(
    "op, variable",
    [
        ("flash_mla", "JAX_MLA_CUDA_MLA_KERNEL"),
        ("flash_attention", "JAX_MLA_CUDA_ATTENTION_KERNEL"),
    ],
)
def test_kernel_family_switch(gpu, monkeypatch, op, variable):
    from jax_mla._cuda_kernels import cuda_kernel_attr

    names = cuda_families("mla_kernels" if op == "flash_mla" else "attention_kernels")
    assert names[0] == "auto" and "mma_sync" in names
    monkeypatch.delenv(variable, raising=False)
    assert cuda_kernel_attr(op) == np.int32(0)
    for i, name in enumerate(names):
        monkeypatch.setenv(variable, name)
        attr = cuda_kernel_attr(op)
        assert attr == i and attr.dtype == np.int32
    monkeypatch.setenv(variable, "wgmma_please")
    with pytest.raises(ValueError, match=f"{variable}.*'wgmma_please'"):
        cuda_kernel_attr(op)


@pytest.mark.parametrize("kernel", [-1, 99])
def test_kernel_attribute_out_of_range_is_an_error(gpu, kernel):
    # The CUDA handler checks the attribute itself (called directly, no Python checks).
    with pytest.raises(Exception, match=rf"kernel must be in \[0, \d+\), got {kernel}"):
        direct_mla_call("jax_mla_flash_mla", jnp.ones((1, 8, 576), jnp.bfloat16), kernel=kernel)
