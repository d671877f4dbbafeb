"""Shared fixtures and helpers: platforms, which GPU cases run (only under a
-m expression naming gpu, and only those the CUDA capability table takes),
per-test random data with poisoned cache slots, the jitted references, and
the one comparison helper."""

from __future__ import annotations

import math
import os
import re
import zlib

# XLA:CPU's LLVM backend at -O0 for the suite: most of its time is XLA
# compiling small programs (each reference, layer and eager op once per shape),
# which -O0 roughly halves; the kernels are prebuilt C++, and XLA's own
# results move by an ulp at most, far inside the tolerances. Read
# when JAX creates its CPU client, so before any array exists; a level the
# caller set wins.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mla
from jax_mla import _capabilities, _ffi, reference

# Every kernel test also checks that the kernel writes every output element:
# the CPU kernels fill their outputs with NaN before computing (read per call;
# JAX_MLA_DEBUG_NAN_FILL=0 turns it off). Cheap next to the kernels, and it
# spares CI a second pass over the kernel tests.
os.environ.setdefault("JAX_MLA_DEBUG_NAN_FILL", "1")

# Keys per tile of the CPU kernel; lengths are chosen around it.
KV_TILE = _ffi.module("cpu").kv_tile()
# Cache lengths that are not multiples of the tile (docs/design.md, "Tests").
AWKWARD_SKV = sorted({1, KV_TILE - 1, KV_TILE + 1, 77, 300})

# Float dtype combinations (q, k, v): uniform, and float32 queries over a
# half-precision cache (the common CPU case), and one fully mixed.
DTYPES_QKV = [
    (jnp.float32, jnp.float32, jnp.float32),
    (jnp.float16, jnp.float16, jnp.float16),
    (jnp.bfloat16, jnp.bfloat16, jnp.bfloat16),
    (jnp.float32, jnp.float16, jnp.float16),
    (jnp.float32, jnp.bfloat16, jnp.bfloat16),
    (jnp.bfloat16, jnp.float32, jnp.float16),
]


def dtype_id(dtypes) -> str:
    return "-".join(jnp.dtype(d).name for d in dtypes)


def _platforms() -> list:
    params = [pytest.param("cpu", id="cpu")]
    try:
        has_gpu = bool(jax.devices("gpu"))
    except RuntimeError:
        has_gpu = False
    if has_gpu:
        params.append(pytest.param("gpu", id="gpu", marks=pytest.mark.gpu))
    return params


PLATFORMS = _platforms()


@pytest.fixture(params=PLATFORMS)
def platform(request):
    """Runs the test with the platform's first device as the default device."""
    with jax.default_device(jax.devices(request.param)[0]):
        yield request.param


def on_gpu() -> bool:
    """True inside a test running with the GPU as its default device."""
    device = jax.config.jax_default_device
    return device is not None and getattr(device, "platform", device) == "gpu"


# A test's kernel configuration (what the CUDA table decides on): the
# kernel_config markers give the operation and fixed values; test parameters
# of these names, or dict parameters holding them, fill in the rest.
CONFIG_FIELDS = ("dtypes", "dk", "dv", "v_offset", "fmt")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "kernel_config(op, **fields): a native call the test makes, op 'attention' "
        "or 'mla', fields among dtypes, dk, dv, v_offset, fmt (test parameters of "
        "those names complete them); GPU cases the CUDA table does not take are "
        "not run",
    )


def kernel_configs(item) -> list[tuple[str, dict]]:
    """(op, fields) of each native call the test item makes. A case that
    runs the reference (a backend parameter of "reference") makes none; with
    an op parameter, only that op's markers count."""
    params = item.callspec.params if hasattr(item, "callspec") else {}
    if params.get("backend") == "reference":
        return []
    configs = []
    for marker in item.iter_markers("kernel_config"):
        op = marker.args[0]
        if params.get("op", op) != op:
            continue
        fields = dict(marker.kwargs)
        for value in params.values():
            if isinstance(value, dict):
                fields.update((k, v) for k, v in value.items() if k in CONFIG_FIELDS)
        fields.update((k, v) for k, v in params.items() if k in CONFIG_FIELDS)
        configs.append((op, fields))
    return configs


def cuda_takes(
    table: dict, op: str, *, dtypes, dk: int, dv: int, v_offset: int = 0, fmt: str | None = None
) -> bool:
    """Whether the CUDA kernel of `op` takes this configuration, by the
    module's capability table (the rule the op's own check applies)."""
    if op == "attention":
        problem = _capabilities.cuda_attention_problem(table, dict(zip("qkv", dtypes)), dk, dv)
    else:
        names = ("q",) if fmt else ("q", "kv")
        problem = _capabilities.cuda_mla_problem(
            table, dict(zip(names, dtypes)), fmt, dk, dv, v_offset
        )
    return problem is None


def unsupported_gpu_cases(items, table: dict) -> list:
    """The gpu-marked items that make a native call the CUDA table does not take."""
    return [
        item
        for item in items
        if item.get_closest_marker("gpu") is not None
        and not all(cuda_takes(table, op, **fields) for op, fields in kernel_configs(item))
    ]


def mentions_gpu(markexpr: str) -> bool:
    return re.search(r"\bgpu\b", markexpr) is not None


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected theirs
def pytest_collection_modifyitems(config, items):
    """GPU tests run only when asked for (-m gpu, or any -m expression that
    names the marker), so a CPU run shows no skips; of those, a GPU case
    whose configuration the CUDA table does not take is not run, and one it
    takes must pass (no NotImplementedError turned into a skip)."""
    if mentions_gpu(config.getoption("markexpr") or ""):
        gpu_cases = [
            item
            for item in items
            if item.get_closest_marker("gpu") is not None and kernel_configs(item)
        ]
        if not gpu_cases:
            return
        if _ffi.module("gpu") is None:
            raise pytest.UsageError(f"GPU tests selected but {_ffi.why_missing('gpu', '')}")
        dropped = unsupported_gpu_cases(gpu_cases, _capabilities.cuda())
    else:
        dropped = [item for item in items if item.get_closest_marker("gpu") is not None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        ids = {id(item) for item in dropped}
        items[:] = [item for item in items if id(item) not in ids]


@pytest.fixture
def cpu():
    """For tests of CPU-only switches (ISA paths): run on the CPU device."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield "cpu"


@pytest.fixture
def rng(request):
    """A numpy Generator seeded from the test's id: fresh data per test, reproducible."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def randn(rng, shape, dtype) -> jax.Array:
    """Standard normal data in `dtype` (never zeros, so a kernel that drops a
    term shows)."""
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32)).astype(dtype)


def per_batch(x, batch: int) -> np.ndarray:
    """An int scalar or [B] value as an int64 numpy [B] array."""
    return np.broadcast_to(np.asarray(x, dtype=np.int64), (batch,)).copy()


def cache(rng, shape, dtype, kv_len=None) -> jax.Array:
    """A random cache [B, Skv, ...] whose slots at positions >= kv_len[b] hold
    NaN (docs/design.md, "Tests"): keys past kv_len do not exist, so a kernel that reads
    them produces NaN and fails."""
    x = rng.standard_normal(shape, dtype=np.float32)
    if kv_len is not None:
        for b, n in enumerate(np.clip(per_batch(kv_len, shape[0]), 0, shape[1])):
            x[b, n:] = np.nan
    return jnp.asarray(x).astype(dtype)


def positions(q_pos, kv_len, batch: int, seq_q: int, seq_kv: int):
    """The contract's (q_pos, kv_len) as int64 numpy [B]: kv_len defaults to
    Skv and is clamped to [0, Skv]; q_pos defaults to kv_len - Sq."""
    kv_len = np.clip(per_batch(seq_kv if kv_len is None else kv_len, batch), 0, seq_kv)
    q_pos = kv_len - seq_q if q_pos is None else per_batch(q_pos, batch)
    return q_pos, kv_len


def visible_keys(q_pos, kv_len, batch: int, seq_q: int, seq_kv: int, causal: bool) -> np.ndarray:
    """[B, Sq] number of keys each query row sees, in Python integers (no
    int32 wrap-around)."""
    q_pos, kv_len = positions(q_pos, kv_len, batch, seq_q, seq_kv)
    counts = np.empty((batch, seq_q), dtype=np.int64)
    for b in range(batch):
        for i in range(seq_q):
            n = int(kv_len[b])
            if causal:
                n = min(n, max(int(q_pos[b]) + i + 1, 0))
            counts[b, i] = n
    return counts


# reference.attention and reference.mla are jitted themselves.
def _reference_attention(q, k, v, q_pos, kv_len, scale, *, causal):
    return reference.attention(q, k, v, scale=scale, causal=causal, q_pos=q_pos, kv_len=kv_len)


def _reference_mla(q, kv, q_pos, kv_len, scale, *, dv, v_offset, causal):
    return reference.mla(
        q, kv, dv=dv, v_offset=v_offset, scale=scale, causal=causal, q_pos=q_pos, kv_len=kv_len
    )


def reference_attention(q, k, v, *, scale=None, causal=False, q_pos=None, kv_len=None):
    """jax_mla.reference.attention, jitted (one compile per shape: positions and
    scale are traced) with the contract's defaults materialized here."""
    batch, seq_q, _, dk = q.shape
    q_pos, kv_len = positions(q_pos, kv_len, batch, seq_q, k.shape[1])
    scale = 1.0 / math.sqrt(dk) if scale is None else scale
    return _reference_attention(
        q,
        k,
        v,
        q_pos.astype(np.int32),
        kv_len.astype(np.int32),
        np.float32(scale),
        causal=bool(causal),
    )


def reference_mla(q, kv, *, dv, v_offset=0, scale=None, causal=False, q_pos=None, kv_len=None):
    """jax_mla.reference.mla, jitted, with the contract's defaults materialized."""
    batch, seq_q, _, dk = q.shape
    q_pos, kv_len = positions(q_pos, kv_len, batch, seq_q, kv.shape[1])
    scale = 1.0 / math.sqrt(dk) if scale is None else scale
    return _reference_mla(
        q,
        kv,
        q_pos.astype(np.int32),
        kv_len.astype(np.int32),
        np.float32(scale),
        dv=dv,
        v_offset=v_offset,
        causal=bool(causal),
    )


# Tolerances (docs/design.md, "Tests"). The kernel and the reference compute in float32
# from the same upcast inputs and differ only in summation order and in the
# kernel's vectorized exp (within 2 float32 ulps). At the default scale the
# scores are O(1), so they differ by a few float32 ulps, and an output (a
# convex combination of O(1) values) by about 1e-6: measured up to 7e-7 for
# Dk = 576, Skv = 300. F32_TOL = 1e-5 (atol and rtol) keeps 10x headroom; the
# error grows with the score magnitude, so a call with a larger scale than
# 1/sqrt(Dk) gets a proportionally larger f32_tol (scaled_tol; DeepSeek's 0.135
# over Dk = 576 is 3.2x: at 1x, an AVX2 machine's reference missed by 1.2e-5).
# Both results are then rounded to the output
# dtype, where float32 values a rounding error apart can land on neighbouring
# representable numbers: add OUT_ULPS ulps of the output dtype (relative).
F32_TOL = 1e-5
OUT_ULPS = 2
# On the GPU the tensor cores multiply P (the softmax weights, in [0, 1]) by V
# in the inputs' half-precision type, as every flash kernel does: each weight
# is rounded by up to half an ulp of that type (2^-11 for float16, 2^-9 for
# bfloat16, relative), so an output moves by up to that fraction of max|v|
# (about 3 for the tests' normal data). The tolerance is one ulp of the type,
# i.e. twice that bound on a value of magnitude 1, as atol and rtol alike.
GPU_TOL = {jnp.dtype(jnp.float16): 2.0**-10, jnp.dtype(jnp.bfloat16): 2.0**-7}


def scaled_tol(scale, dk: int) -> float:
    """F32_TOL for scores `scale * q.k` over Dk dims: proportional to the
    scale's ratio to the default 1/sqrt(Dk), never below F32_TOL."""
    return F32_TOL * max(1.0, (scale or 0.0) * math.sqrt(dk))


def gpu_tol(dtype, f32_tol: float = F32_TOL) -> float:
    """The tolerance of a kernel result for inputs of `dtype` on the current platform."""
    return max(f32_tol, GPU_TOL[jnp.dtype(dtype)]) if on_gpu() else f32_tol


def assert_close(actual, expected, dtype, *, f32_tol: float = F32_TOL) -> None:
    """Requires the NaN, +inf and -inf positions to match, then
    |actual - expected| <= f32_tol + (f32_tol + OUT_ULPS * eps(dtype)) * |expected|
    elementwise; on failure names the worst element, its index and values."""
    a = np.asarray(actual).astype(np.float64)
    e = np.asarray(expected).astype(np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape}"
    for what, test in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        differ = test(a) != test(e)
        if differ.any():
            idx = tuple(int(i) for i in np.argwhere(differ)[0])
            raise AssertionError(
                f"{what} positions differ in {int(differ.sum())} of {a.size} elements; first at "
                f"index {idx}: actual {a[idx]!r}, expected {e[idx]!r}"
            )
    finite = np.isfinite(e)
    err = np.abs(np.where(finite, a, 0.0) - np.where(finite, e, 0.0))
    rtol = f32_tol + OUT_ULPS * float(jnp.finfo(dtype).eps)
    allowed = f32_tol + rtol * np.where(finite, np.abs(e), 0.0)
    excess = err - allowed
    if a.size and excess.max() > 0:
        idx = np.unravel_index(int(np.argmax(excess)), a.shape)
        idx = tuple(int(i) for i in idx)
        raise AssertionError(
            f"{int((excess > 0).sum())} of {a.size} elements differ beyond atol {f32_tol:g}, "
            f"rtol {rtol:g} ({jnp.dtype(dtype).name}); worst at index {idx}: actual {a[idx]!r}, "
            f"expected {e[idx]!r}, |diff| {err[idx]:.3g} > allowed {allowed[idx]:.3g}"
        )


def assert_attention(got, want, out_dtype, visible, *, f32_tol: float = F32_TOL) -> None:
    """Compares (out, lse) of a kernel with the reference's, and checks the
    contract's empty rows exactly: a query row that sees no key (visible == 0,
    [B, Sq]) has output exactly 0 and LSE -inf in every head, and every other
    row a finite LSE."""
    out, lse = got
    want_out, want_lse = want
    assert out.dtype == jnp.dtype(out_dtype), f"out dtype {out.dtype}, expected {out_dtype}"
    assert lse.dtype == jnp.float32, f"lse dtype {lse.dtype}, expected float32"
    assert_close(lse, want_lse, jnp.float32, f32_tol=f32_tol)
    assert_close(out, want_out, out_dtype, f32_tol=f32_tol)
    out = np.asarray(out).astype(np.float32)
    lse = np.asarray(lse)
    empty = np.asarray(visible) == 0
    lse_bsq = np.moveaxis(lse, 1, 2)  # [B, Sq, H]
    assert np.all(out[empty] == 0.0), "a query that sees no key must have output exactly 0"
    assert np.all(np.isneginf(lse_bsq[empty])), "a query that sees no key must have LSE -inf"
    assert np.all(np.isfinite(lse_bsq[~empty])), "a query that sees keys must have a finite LSE"


def position_arg(x):
    """A test's q_pos / kv_len as the ops take it: lists become int32 [B] arrays;
    None, Python ints and arrays pass through unchanged."""
    return jnp.asarray(x, jnp.int32) if isinstance(x, list) else x


def native_attention(q, k, v, *, q_pos=None, kv_len=None, **kw):
    return jax_mla.flash_attention(
        q,
        k,
        v,
        q_pos=position_arg(q_pos),
        kv_len=position_arg(kv_len),
        return_lse=True,
        backend="native",
        **kw,
    )


def native_mla(q, kv, *, q_pos=None, kv_len=None, **kw):
    return jax_mla.flash_mla(
        q,
        kv,
        q_pos=position_arg(q_pos),
        kv_len=position_arg(kv_len),
        return_lse=True,
        backend="native",
        **kw,
    )


def check_attention(
    rng,
    *,
    batch,
    seq_q,
    heads_q,
    heads_kv,
    seq_kv,
    dk,
    dv,
    dtypes=(jnp.float32,) * 3,
    causal=False,
    q_pos=None,
    kv_len=None,
    scale=None,
    f32_tol=None,
):
    """flash_attention's kernel vs the reference on random q, k, v (k and v
    poisoned past kv_len), with the contract's empty rows checked exactly."""
    q_dtype, k_dtype, v_dtype = dtypes
    q = randn(rng, (batch, seq_q, heads_q, dk), q_dtype)
    k = cache(rng, (batch, seq_kv, heads_kv, dk), k_dtype, kv_len)
    v = cache(rng, (batch, seq_kv, heads_kv, dv), v_dtype, kv_len)
    kw = dict(scale=scale, causal=causal, q_pos=q_pos, kv_len=kv_len)
    got = native_attention(q, k, v, **kw)
    want = reference_attention(q, k, v, **kw)
    visible = visible_keys(q_pos, kv_len, batch, seq_q, seq_kv, causal)
    f32_tol = scaled_tol(scale, dk) if f32_tol is None else f32_tol
    assert_attention(got, want, q_dtype, visible, f32_tol=gpu_tol(q_dtype, f32_tol))


def check_mla(
    rng,
    *,
    batch,
    seq_q,
    heads,
    seq_kv,
    dk,
    dv,
    v_offset=0,
    dtypes=(jnp.float32,) * 2,
    causal=False,
    q_pos=None,
    kv_len=None,
    num_splits=None,
    scale=None,
):
    """flash_mla's kernel vs the reference on random q and a latent cache
    poisoned past kv_len, with the contract's empty rows checked exactly."""
    q = randn(rng, (batch, seq_q, heads, dk), dtypes[0])
    kv = cache(rng, (batch, seq_kv, dk), dtypes[1], kv_len)
    kw = dict(dv=dv, v_offset=v_offset, scale=scale, causal=causal, q_pos=q_pos, kv_len=kv_len)
    got = native_mla(q, kv, num_splits=num_splits, **kw)
    want = reference_mla(q, kv, **kw)
    visible = visible_keys(q_pos, kv_len, batch, seq_q, seq_kv, causal)
    assert_attention(
        got, want, dtypes[0], visible, f32_tol=gpu_tol(dtypes[0], scaled_tol(scale, dk))
    )
