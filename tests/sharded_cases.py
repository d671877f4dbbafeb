"""Both ops split over a mesh of 8 CPU devices, run by test_sharding.py in a
process of its own (XLA_FLAGS=--xla_force_host_platform_device_count=8 must
be set before jax starts): batch, heads, queries and the cache's sequence
(context parallelism) on 1-D and 2-D meshes, float and quantized caches,
jit with NamedSharding inputs, shard_map with merge_attention, vmap, the
DeepSeek layer, and `python -m jax_mla --sharded`. Results must equal the
single-device ones at the kernels' tolerances, and the compiled HLO must move
no cache: no collective at all for batch-, head- and query-split calls, and
only the LSE merge's, of O(B * Sq * H * Dv) values, for context-parallel ones.
Gradients (jax.vjp under jit) must equal the single-device ones, their HLO
hold only the all-reduces of the backward's sums, and never a device's slice
of a cache for context splits."""

from __future__ import annotations

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_mla
from jax_mla import deepseek as ds
from jax_mla.bench import cases, cli, ops, sharded

from .conftest import F32_TOL, KV_TILE, assert_close, cache, randn
from .test_grad import assert_grad_close

if jax.device_count() < 8:
    raise RuntimeError(
        "tests/sharded_cases.py needs 8 devices: run it through tests/test_sharding.py, "
        "which sets XLA_FLAGS=--xla_force_host_platform_device_count=8"
    )

AUTO = AxisType.Auto


def mesh(shape, names, axis_types=AUTO):
    return jax.make_mesh(shape, names, axis_types=(axis_types,) * len(shape))


MESH_1D = mesh((8,), ("d",))
MESH_2D = mesh((2, 4), ("x", "y"))


def put(x, m, *spec):
    """x placed on mesh m split by spec (a QuantizedKV leaf by leaf)."""
    return jax.tree_util.tree_map(lambda a: jax.device_put(a, NamedSharding(m, P(*spec))), x)


_COLLECTIVE = re.compile(
    r"=\s*(.*?)\s(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(?:-start)?\("
)


def collectives(f, *args) -> list[tuple[str, int]]:
    """compiled_collectives of jit(f) for *args."""
    return compiled_collectives(jax.jit(f).lower(*args).compile())


def compiled_collectives(compiled) -> list[tuple[str, int]]:
    """(kind, elements of its largest result) for each collective in the
    HLO of a compiled function."""
    text = compiled.as_text()
    found = []
    for types, kind in _COLLECTIVE.findall(text):
        sizes = [
            int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
            for dims in re.findall(r"\w+\[([\d,]*)\]", types)
        ]
        found.append((kind, max(sizes, default=0)))
    return found


def padded(spec, rank: int = 4) -> tuple:
    spec = tuple(spec)
    return spec + (None,) * (rank - len(spec))


def assert_pair(got, want, dtype, f32_tol=F32_TOL):
    assert_close(got[1], want[1], jnp.float32, f32_tol=f32_tol)
    assert_close(got[0], want[0], dtype, f32_tol=f32_tol)


def mla(q, kv, q_pos, kv_len, **kw):
    return jax_mla.flash_mla(
        q, kv, q_pos=q_pos, kv_len=kv_len, return_lse=True, backend="native", **kw
    )


def attention(q, k, v, q_pos, kv_len, **kw):
    return jax_mla.flash_attention(
        q, k, v, q_pos=q_pos, kv_len=kv_len, return_lse=True, backend="native", **kw
    )


def mla_inputs(rng, batch, seq_q, heads, seq_kv, kv_len, dtype=jnp.float32, fmt=None, dk=576):
    q = randn(rng, (batch, seq_q, heads, dk), dtype)
    kv = cache(rng, (batch, seq_kv, dk), dtype if fmt is None else jnp.float32, kv_len)
    if fmt is not None:
        kv = jax_mla.quantize(kv, fmt)
    kv_len = jnp.asarray(kv_len, jnp.int32)
    q_pos = jnp.maximum(kv_len - seq_q, -3)
    return q, kv, q_pos, kv_len


# ------------------------------------------------------------------ no communication

# (mesh, q spec, kv spec, [B, Sq, H], cache format): batch, heads, queries,
# and batch and heads at once.
MLA_SPLITS = {
    "batch-1d": (MESH_1D, ("d",), ("d",), (8, 1, 4), None),
    "heads-1d": (MESH_1D, (None, None, "d"), (), (2, 1, 16), None),
    "queries-1d": (MESH_1D, (None, "d"), (), (2, 16, 2), None),
    "batch-heads-2d": (MESH_2D, ("x", None, "y"), ("x",), (4, 2, 8), None),
    "batch-heads-2d-q8_0": (MESH_2D, ("x", None, "y"), ("x",), (4, 2, 8), "q8_0"),
}


@pytest.mark.parametrize("split", MLA_SPLITS.values(), ids=MLA_SPLITS.keys())
def test_mla_split_without_communication(rng, split):
    m, q_spec, kv_spec, (batch, seq_q, heads), fmt = split
    lens = [100, 37, 0, 64, 1, 99, 100, 12][:batch]
    q, kv, q_pos, kv_len = mla_inputs(rng, batch, seq_q, heads, 100, lens, fmt=fmt)
    f = lambda *a: mla(*a, causal=True)
    want = jax.jit(f)(q, kv, q_pos, kv_len)
    args = (put(q, m, *q_spec), put(kv, m, *kv_spec), q_pos, kv_len)
    got = jax.jit(f)(*args)
    assert_pair(got, want, q.dtype)
    assert padded(got[0].sharding.spec) == padded(q_spec[:3])  # the result follows q
    assert collectives(f, *args) == []


def test_mla_num_splits_chosen_per_device(rng):
    # num_splits=16 over 1024 keys split 8 ways: each device's call is
    # clamped to its own 128 keys' tiles. Results do not depend on it.
    q, kv, q_pos, kv_len = mla_inputs(rng, 2, 1, 4, 1024, [1024, 333])
    f = lambda *a: mla(*a, num_splits=16)
    args = (q, put(kv, MESH_1D, None, "d"), q_pos, kv_len)
    assert_pair(jax.jit(f)(*args), jax.jit(f)(q, kv, q_pos, kv_len), q.dtype)
    text = jax.jit(f).lower(*args).compile().as_text()
    assert re.findall(r"num_splits = (\d+)", text) == [str(-(-128 // KV_TILE))]


# ------------------------------------------------------------------ context parallelism

# (mesh, q spec, kv spec, [B, Sq, H], Skv, dtype, format): the cache's
# sequence split, alone and with the batch or heads; decode (Sq = 1) and
# causal prefill chunks; device slices of 37 keys (not a multiple of the
# kernel's tile). Over 8-bit caches the kernels round the softmax weights per
# group of 64 keys of the slice they see: slices of a multiple of 64 keys
# group them as one device does (docs/sharding.md).
MLA_CONTEXT = {
    "decode-1d-f32": (MESH_1D, (), (None, "d"), (3, 1, 4), 296, jnp.float32, None),
    "chunk-1d-bf16": (MESH_1D, (), (None, "d"), (2, 5, 2), 296, jnp.bfloat16, None),
    "decode-1d-q8_kv": (MESH_1D, (), (None, "d"), (3, 1, 4), 512, jnp.float32, "q8_kv"),
    "decode-batch-2d-q8_0": (MESH_2D, ("x",), ("x", "y"), (4, 1, 4), 256, jnp.float32, "q8_0"),
    "chunk-heads-2d-f32": (
        MESH_2D,
        (None, None, "x"),
        (None, "y"),
        (1, 3, 4),
        256,
        jnp.float32,
        None,
    ),
}


@pytest.mark.parametrize("split", MLA_CONTEXT.values(), ids=MLA_CONTEXT.keys())
def test_mla_context_parallel(rng, split):
    m, q_spec, kv_spec, (batch, seq_q, heads), seq_kv, dtype, fmt = split
    # Lengths that leave some devices without a visible key, or all of them
    # (assert_close requires the -inf LSEs of the empty rows where expected).
    lens = [seq_kv, 40, 0, seq_kv - 7][:batch]
    q, kv, q_pos, kv_len = mla_inputs(rng, batch, seq_q, heads, seq_kv, lens, dtype, fmt)
    f = lambda *a: mla(*a, causal=True)
    want = jax.jit(f)(q, kv, q_pos, kv_len)
    args = (put(q, m, *q_spec), put(kv, m, *kv_spec), q_pos, kv_len)
    got = jax.jit(f)(*args)
    assert_pair(got, want, dtype)
    # Only the merge communicates: the outputs and their weights, never keys.
    merge = batch * seq_q * heads * (512 + 1)
    found = collectives(f, *args)
    assert found and all(kind == "all-reduce" and n <= merge for kind, n in found), found


def test_mla_context_parallel_default_positions(rng):
    # q_pos defaults to the global kv_len - Sq, not to a device's.
    q, kv, _, kv_len = mla_inputs(rng, 2, 3, 4, 200, [200, 90])
    f = lambda q, kv, kv_len: jax_mla.flash_mla(q, kv, kv_len=kv_len, causal=True, return_lse=True)
    got = jax.jit(f)(q, put(kv, MESH_1D, None, "d"), kv_len)
    assert_pair(got, jax.jit(f)(q, kv, kv_len), q.dtype)


# ------------------------------------------------------------------ flash_attention

# (mesh, q spec, k/v spec, [B, Sq, Hq, Hkv], Skv)
ATTENTION_SPLITS = {
    "batch-1d": (MESH_1D, ("d",), ("d",), (8, 3, 4, 2), 50),
    "mha-heads-1d": (MESH_1D, (None, None, "d"), (None, None, "d"), (1, 3, 8, 8), 50),
    "gqa-heads-with-kv-2d": (MESH_2D, ("y", None, "x"), ("y", None, "x"), (4, 3, 8, 2), 50),
    "gqa-heads-slice-kv-2d": (MESH_2D, (None, None, "y"), (), (2, 3, 8, 2), 50),
    "mqa-heads-1d": (MESH_1D, (None, None, "d"), (), (1, 2, 8, 1), 50),
}


@pytest.mark.parametrize("split", ATTENTION_SPLITS.values(), ids=ATTENTION_SPLITS.keys())
def test_attention_split_without_communication(rng, split):
    m, q_spec, kv_spec, (batch, seq_q, heads_q, heads_kv), seq_kv = split
    lens = jnp.asarray([50, 7, 0, 33, 1, 49, 20, 50][:batch], jnp.int32)
    q = randn(rng, (batch, seq_q, heads_q, 192), jnp.float32)
    k = cache(rng, (batch, seq_kv, heads_kv, 192), jnp.float32, lens)
    v = cache(rng, (batch, seq_kv, heads_kv, 128), jnp.float32, lens)
    q_pos = lens - seq_q
    f = lambda *a: attention(*a, causal=True)
    want = jax.jit(f)(q, k, v, q_pos, lens)
    args = (put(q, m, *q_spec), put(k, m, *kv_spec), put(v, m, *kv_spec), q_pos, lens)
    got = jax.jit(f)(*args)
    assert_pair(got, want, q.dtype)
    assert collectives(f, *args) == []


@pytest.mark.parametrize("heads", ["y", ("x", "y")], ids=["4-way", "8-way"])
def test_attention_gqa_heads_split_inside_jit(rng, heads):
    # K and V computed inside jit, the query heads split 4 or 8 ways over 2 KV
    # heads: each device slices the KV head its query heads read.
    q = randn(rng, (2, 3, 8, 64), jnp.float32)
    k = cache(rng, (2, 20, 2, 64), jnp.float32)
    v = cache(rng, (2, 20, 2, 48), jnp.float32)
    f = lambda q, k, v: attention(q, jnp.sin(k), 2 * v, None, None, causal=True)
    got = jax.jit(constrained(f, (None, None, heads)))(q, k, v)
    assert_pair(got, jax.jit(f)(q, k, v), q.dtype)
    assert collectives(constrained(f, (None, None, heads)), q, k, v) == []


@pytest.mark.parametrize("fmt", [None, "q8_0"], ids=["float", "q8_0-k"])
def test_attention_context_parallel(rng, fmt):
    batch, seq_q, heads_q, heads_kv, seq_kv = 2, 4, 8, 2, 204
    lens = jnp.asarray([204, 61], jnp.int32)
    q = randn(rng, (batch, seq_q, heads_q, 192), jnp.bfloat16)
    k = cache(rng, (batch, seq_kv, heads_kv, 192), jnp.float32, lens)
    v = cache(rng, (batch, seq_kv, heads_kv, 128), jnp.bfloat16, lens)
    if fmt:
        k = jax_mla.quantize(k, fmt)
    q_pos = lens - seq_q
    f = lambda *a: attention(*a, causal=True)
    want = jax.jit(f)(q, k, v, q_pos, lens)
    # Context over y, the KV heads (and their query heads) over x.
    args = (
        put(q, MESH_2D, None, None, "x"),
        put(k, MESH_2D, None, "y", "x"),
        put(v, MESH_2D, None, "y", "x"),
        q_pos,
        lens,
    )
    got = jax.jit(f)(*args)
    assert_pair(got, want, q.dtype)
    merge = batch * seq_q * heads_q * (128 + 1)
    found = collectives(f, *args)
    assert found and all(kind == "all-reduce" and n <= merge for kind, n in found), found


def constrained(f, *specs):
    """f with its inputs constrained to specs on MESH_2D inside jit, where
    (unlike device_put) a split need not divide the dim: XLA pads the last
    device's part."""

    def g(*args):
        specs_ = specs + ((),) * (len(args) - len(specs))
        args = [
            jax.lax.with_sharding_constraint(a, NamedSharding(MESH_2D, P(*s)))
            for a, s in zip(args, specs_)
        ]
        return f(*args)

    return g


def test_uneven_splits(rng):
    # 3 rows over 2 devices and 301 keys over 4: the padded rows and keys
    # are never seen.
    q, kv, q_pos, kv_len = mla_inputs(rng, 3, 2, 4, 301, [301, 80, 226])
    f = lambda *a: mla(*a, causal=True)
    got = jax.jit(constrained(f, ("x",), ("x", "y")))(q, kv, q_pos, kv_len)
    assert_pair(got, jax.jit(f)(q, kv, q_pos, kv_len), q.dtype)
    # 6 query heads over 4 devices: flash_attention gathers the heads.
    q = randn(rng, (2, 3, 6, 64), jnp.float32)
    k = cache(rng, (2, 20, 3, 64), jnp.float32)
    v = cache(rng, (2, 20, 3, 64), jnp.float32)
    pos, lens = jnp.asarray([17, 5], jnp.int32), jnp.asarray([20, 8], jnp.int32)
    f = lambda *a: attention(*a, causal=True)
    got = jax.jit(constrained(f, (None, None, "y")))(q, k, v, pos, lens)
    assert_pair(got, jax.jit(f)(q, k, v, pos, lens), q.dtype)


def test_split_by_a_sub_axis_counts_as_unsplit(rng):
    # q's 2 heads come from a reshape of a dim split over 4 devices: XLA
    # splits the heads by part of the axis, which no mesh axis names. The
    # call takes those heads whole, and is right.
    x = randn(rng, (2, 1, 64), jnp.float32)
    w = randn(rng, (64, 2 * 576), jnp.float32) / 8
    kv = cache(rng, (2, 64, 576), jnp.float32)
    f = lambda x, w, kv: mla((x @ w).reshape(2, 1, 2, 576), kv, None, None)
    got = jax.jit(f)(x, put(w, MESH_2D, None, ("x", "y")), kv)
    assert_pair(got, jax.jit(f)(x, w, kv), jnp.float32)


def test_head_dim_split_is_gathered(rng):
    # Dk is never split: an operand split there is gathered, the result is right.
    q, kv, q_pos, kv_len = mla_inputs(rng, 2, 1, 4, 64, [64, 30])
    f = lambda *a: mla(*a)
    args = (
        put(q, MESH_1D, None, None, None, "d"),
        put(kv, MESH_1D, None, None, "d"),
        q_pos,
        kv_len,
    )
    got = jax.jit(f)(*args)
    assert_pair(got, jax.jit(f)(q, kv, q_pos, kv_len), q.dtype)
    assert any(kind == "all-gather" for kind, _ in collectives(f, *args))


# ------------------------------------------------------------------ other ways in


def test_explicit_mesh_axes_type_the_results(rng):
    # jax.make_mesh's default (explicit axes): out and lse are typed like q.
    m = mesh((2, 4), ("x", "y"), AxisType.Explicit)
    q, kv, q_pos, kv_len = mla_inputs(rng, 4, 1, 8, 128, [128, 5, 0, 77])
    seen = []

    def f(*a):
        out, lse = mla(*a)
        seen.append((jax.typeof(out).sharding.spec, jax.typeof(lse).sharding.spec))
        return out, lse

    args = (put(q, m, "x", None, "y"), put(kv, m, "x"), put(q_pos, m, "x"), put(kv_len, m, "x"))
    got = jax.jit(f)(*args)
    assert seen[0] == (P("x", None, "y", None), P("x", "y", None))
    assert_pair(got, jax.jit(f)(q, kv, q_pos, kv_len), q.dtype)
    assert collectives(f, *args) == []


# Shardy is JAX's default; the GSPMD callbacks serve JAX configured without it
# (for as long as the option exists).
PARTITIONERS = [True] + ([False] if hasattr(jax.config, "jax_use_shardy_partitioner") else [])


@pytest.mark.parametrize("shardy", PARTITIONERS, ids=["shardy", "gspmd"][: len(PARTITIONERS)])
def test_partitioners(rng, shardy):
    q, kv, q_pos, kv_len = mla_inputs(rng, 4, 2, 8, 256, [256, 3, 0, 100])
    f = lambda *a: mla(*a, causal=True)
    want = jax.jit(f)(q, kv, q_pos, kv_len)
    args = (put(q, MESH_2D, "x"), put(kv, MESH_2D, "x", "y"), q_pos, kv_len)
    before = jax.config.jax_use_shardy_partitioner
    jax.config.update("jax_use_shardy_partitioner", shardy)
    try:
        got = jax.jit(f)(*args)
        found = collectives(f, *args)
    finally:
        jax.config.update("jax_use_shardy_partitioner", before)
    assert_pair(got, want, q.dtype)
    assert padded(got[0].sharding.spec) == ("x", None, None, None)
    assert found and all(kind == "all-reduce" and n <= 2 * 2 * 8 * 513 for kind, n in found)


def test_shard_map_with_merge_attention(rng):
    # The recipe of docs/sharding.md: each device attends its slice of the
    # cache with positions relative to it, merge_attention merges.
    q, kv, _, kv_len = mla_inputs(rng, 4, 2, 4, 300, [300, 9, 0, 150])
    m = MESH_2D
    spec = (P("x"), P("x", "y"), P("x"))

    @jax.jit
    @jax.shard_map(mesh=m, in_specs=spec, out_specs=(P("x"), P("x")))
    def f(q, kv, kv_len):
        rows = kv.shape[1]
        start = jax.lax.axis_index("y") * rows
        out, lse = jax_mla.flash_mla(
            q,
            kv,
            causal=True,
            q_pos=kv_len - q.shape[1] - start,  # the global default, made local
            kv_len=jnp.clip(kv_len - start, 0, rows),
            return_lse=True,
        )
        return jax_mla.merge_attention(out, lse, "y")

    got = f(q, kv, kv_len)
    want = jax_mla.flash_mla(q, kv, causal=True, kv_len=kv_len, return_lse=True)
    assert_pair(got, want, q.dtype)


def test_partly_manual_shard_map_is_refused(rng):
    q, kv, _, _ = mla_inputs(rng, 2, 1, 4, 64, [64, 64])
    f = jax.shard_map(
        lambda q, kv: jax_mla.flash_mla(q, kv),
        mesh=MESH_2D,
        in_specs=(P("x"), P("x")),
        out_specs=P("x"),
        axis_names={"x"},
    )
    with pytest.raises(NotImplementedError, match=r"shard_map whose mesh axes \['y'\] are not"):
        jax.jit(f)(q, kv)


# vmap over q alone folds into the heads; over q and kv_len into the batch with
# the cache shared (rows read modulo its batch: the batch is not split then);
# over everything into the batch.
@pytest.mark.parametrize(
    "in_axes", [(0, None, None), (0, None, 0), (0, 0, 0)], ids=["q", "q-kv_len", "all"]
)
def test_vmap_of_a_context_parallel_call(rng, in_axes):
    q = randn(rng, (3, 2, 1, 4, 576), jnp.float32)
    kv = cache(rng, (2, 160, 576), jnp.float32)
    kv_len = jnp.asarray([160, 70], jnp.int32)
    if in_axes[2] == 0:
        kv_len = jnp.stack([kv_len, kv_len // 2, kv_len - 1])
    if in_axes[1] == 0:
        kv = jnp.stack([kv, kv[:, ::-1], kv * 0.5])
    f = jax.vmap(lambda q, kv, n: mla(q, kv, None, n, causal=True), in_axes=in_axes)
    kv_spec = (None, None, "d") if in_axes[1] == 0 else (None, "d")
    got = jax.jit(f)(q, put(kv, MESH_1D, *kv_spec), kv_len)
    assert_pair(got, jax.jit(f)(q, kv, kv_len), q.dtype)


# ------------------------------------------------------------------ the DeepSeek layer

SMALL = ds.MLAConfig(
    hidden_size=64,
    num_heads=4,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=32,
    v_head_dim=32,
    kv_chunk=16,
    hybrid_threshold=8,  # hybrid: the prefill standard, the decode latent
)
# Tensor parallelism: every per-head weight split over "tp" by its heads.
PARAM_SPECS = {
    "wq": (None, "tp"),
    "wkv_a": (),
    "kv_norm": (),
    "w_uk": ("tp",),
    "w_uv": ("tp",),
    "wo": ("tp", None),
}


@pytest.mark.parametrize("mode", ds.MODES)
def test_deepseek_layer_on_a_mesh(rng, mode):
    """Params over tp (heads), the batch over dp, the latent cache over cp:
    a prefill then two decode steps equal the single-device layer."""
    m = mesh((2, 2, 2), ("dp", "tp", "cp"))
    params = ds.init_params(jax.random.PRNGKey(3), SMALL)
    layer = jax.jit(ds.attention, static_argnames=("cfg", "mode"))
    steps = [(0, 9), (9, 1), (10, 1)]
    xs = [jnp.asarray(rng.standard_normal((2, n, 64)), jnp.float32) for _, n in steps]

    def run(params, cache, place):
        outs = []
        for x, (start, n) in zip(xs, steps):
            pos = jnp.broadcast_to(jnp.arange(start, start + n, dtype=jnp.int32), (2, n))
            out, cache = layer(
                params, place(x, "dp"), place(pos, "dp"), cache, cfg=SMALL, mode=mode
            )
            outs.append(out)
        return jnp.concatenate(outs, 1), cache

    want, _ = run(params, ds.init_cache(SMALL, 2, 32, jnp.float32), lambda x, *s: x)
    sharded = {k: put(v, m, *PARAM_SPECS[k]) for k, v in params.items()}
    empty = ds.init_cache(SMALL, 2, 32, jnp.float32)
    cache = ds.LatentCache(
        put(empty.kv, m, "dp", "cp"), put(empty.length, m, "dp"), put(empty.overflow, m, "dp")
    )
    got, cache = run(sharded, cache, lambda x, *s: put(x, m, *s))
    assert padded(cache.kv.sharding.spec, 3) == ("dp", "cp", None)
    assert_close(got, want, jnp.float32, f32_tol=5e-6)


def test_deepseek_latent_decode_moves_no_cache(rng):
    """A latent decode step over the context-parallel cache: its collectives
    are the merge's and the tensor-parallel output projection's, each smaller
    than a device's slice of the cache."""
    m = mesh((2, 2, 2), ("dp", "tp", "cp"))
    params = {
        k: put(v, m, *PARAM_SPECS[k])
        for k, v in ds.init_params(jax.random.PRNGKey(4), SMALL).items()
    }
    empty = ds.init_cache(SMALL, 2, 512, jnp.float32)
    cache = ds.LatentCache(
        put(empty.kv, m, "dp", "cp"), put(empty.length, m, "dp"), put(empty.overflow, m, "dp")
    )
    x = put(jnp.ones((2, 1, 64), jnp.float32), m, "dp")
    pos = put(jnp.full((2, 1), 300, jnp.int32), m, "dp")
    f = lambda p, x, pos, c: ds.attention(p, x, pos, c, SMALL, "latent")
    local_cache = 2 * 512 * SMALL.cache_dim // 8
    found = collectives(f, params, x, pos, cache)
    assert found and all(n < local_cache for _, n in found), found


# ------------------------------------------------------------------ the benchmark


def test_sharded_benchmark_rows(tmp_path):
    """`python -m jax_mla --sharded` at a tiny size: every split of both ops
    agrees with the one-device call, is timed, and communicates only as
    docs/sharding.md says (nothing for batch and heads, the merge for context),
    on the 1-D mesh and on the 2-D ones (2 x 4 devices)."""
    out = tmp_path / "sharded.json"
    argv = ["--sharded", "--quick", "--tests", "tg@60", "--json", str(out)]
    assert cli.main(argv) == 0
    data = json.loads(out.read_text())
    rows = data["sharded_rows"]
    assert data["meta"]["devices"]["count"] == 8 and data["rows"] == []
    want = [(op, s) for op in cases.OPS for s in ("one device", *sharded.SPLITS)]
    assert [(r["op"], r["split"]) for r in rows] == want
    for r in rows:
        # 1 row and 16 heads per device; 60 keys rounded up to a multiple of 8.
        assert (r["batch"], r["heads"], r["n_kv"], r["devices"]) == (
            8,
            16,
            64,
            1 if r["split"] == "one device" else 8,
        )
        assert r["err"] <= r["tolerance"] and math.isfinite(r["ms"]), r
        assert (r["vs_one"] is None) == (r["split"] == "one device")
        if "context" in r["split"]:
            assert re.fullmatch(r"all-reduce x\d+", r["collectives"]), r
        else:
            assert r["collectives"] == "none", r


def test_sharded_benchmark_fails_on_a_failing_check(monkeypatch, capsys):
    monkeypatch.setitem(ops.TOLERANCE["cpu"]["native"], "f16", -1.0)  # no err passes
    argv = ["--sharded", "--quick", "--tests", "tg@8", "--ops", "flash_mla", "--splits", "context"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "FAILED CHECK: tg@8 B=8 H=16 flash_mla f16 split one device" in err
    assert "FAILED CHECK: tg@8 B=8 H=16 flash_mla f16 split context" in err


# ------------------------------------------------------------------ gradients


def vjp_under_jit(f, n_inputs: int):
    """jit of the VJP of f's (out, lse) with respect to its first n_inputs
    arguments, the cotangents as arguments: no loss reduction adds a
    collective of its own to the compiled HLO."""

    def grads(cts, *args):
        diff, rest = args[:n_inputs], args[n_inputs:]
        _, pullback = jax.vjp(lambda *d: f(*d, *rest), *diff)
        return pullback(cts)

    return grads


def cotangents(rng, out, lse):
    return randn(rng, out.shape, out.dtype), randn(rng, lse.shape, jnp.float32)


def assert_grads(got, want, q_dtype, names):
    for g, w, name in zip(got, want, names):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert_grad_close(g, np.asarray(w, np.float64), q_dtype, name)


# (mesh, q spec, kv spec, [B, Sq, H], summed): the gradient of a batch split
# needs no communication, that of a head or query split one all-reduce of
# the cache's gradient (summed: the latent cache is replicated along them).
MLA_GRAD_SPLITS = {
    "batch-1d": (MESH_1D, ("d",), ("d",), (8, 2, 2), False),
    "queries-1d": (MESH_1D, (None, "d"), (), (1, 16, 2), True),
    "batch-heads-2d": (MESH_2D, ("x", None, "y"), ("x",), (2, 3, 4), True),
}


def mla_grads_split_and_whole(rng, m, q_spec, kv_spec, q, kv, q_pos, kv_len):
    """flash_mla's (dq, dkv) under jit with q and kv split as the specs say,
    the same on one device, and the compiled split call (for its HLO)."""
    f = lambda q, kv, q_pos, kv_len: mla(q, kv, q_pos, kv_len, dv=64, causal=True)
    cts = cotangents(rng, *f(q, kv, q_pos, kv_len))
    g = vjp_under_jit(f, 2)
    want = jax.jit(g)(cts, q, kv, q_pos, kv_len)
    args = (cts, put(q, m, *q_spec), put(kv, m, *kv_spec), q_pos, kv_len)
    compiled = jax.jit(g).lower(*args).compile()
    return compiled(*args), want, compiled


@pytest.mark.parametrize("split", MLA_GRAD_SPLITS.values(), ids=MLA_GRAD_SPLITS.keys())
def test_mla_grad_split(rng, split):
    m, q_spec, kv_spec, (batch, seq_q, heads), summed = split
    lens = [70, 37, 0, 64, 1, 69, 70, 12][:batch]
    q, kv, q_pos, kv_len = mla_inputs(rng, batch, seq_q, heads, 70, lens, dk=128)
    got, want, compiled = mla_grads_split_and_whole(rng, m, q_spec, kv_spec, q, kv, q_pos, kv_len)
    assert_grads(got, want, q.dtype, ["dq", "dkv"])
    assert padded(got[0].sharding.spec) == padded(q_spec[:3])  # dq follows q
    assert padded(got[1].sharding.spec, 3) == padded(kv_spec, 3)  # dkv follows kv
    found = compiled_collectives(compiled)
    if summed:  # of the cache's size: inherent, but never a gather
        assert found and all(kind == "all-reduce" for kind, _ in found), found
    else:
        assert found == [], found


# (mesh, q spec, k/v spec, [B, Sq, Hq, Hkv]): MHA and GQA's KV heads split
# with their query heads need no communication; KV heads fewer than the
# devices (each device slices the one its query heads read) or one KV head
# for all sum the caches' gradients in one all-reduce.
ATTENTION_GRAD_SPLITS = {
    "batch-1d": (MESH_1D, ("d",), ("d",), (8, 3, 4, 2)),
    "gqa-heads-with-kv-2d": (MESH_2D, ("y", None, "x"), ("y", None, "x"), (4, 3, 8, 2)),
    "gqa-heads-slice-kv-2d": (MESH_2D, (None, None, "y"), (), (2, 3, 8, 2)),
    "mqa-heads-1d": (MESH_1D, (None, None, "d"), (), (1, 2, 8, 1)),
}


@pytest.mark.parametrize("split", ATTENTION_GRAD_SPLITS.values(), ids=ATTENTION_GRAD_SPLITS.keys())
def test_attention_grad_split(rng, split):
    m, q_spec, kv_spec, (batch, seq_q, heads_q, heads_kv) = split
    lens = jnp.asarray([50, 7, 0, 33, 1, 49, 20, 50][:batch], jnp.int32)
    q = randn(rng, (batch, seq_q, heads_q, 64), jnp.float32)
    k = cache(rng, (batch, 50, heads_kv, 64), jnp.float32, lens)
    v = cache(rng, (batch, 50, heads_kv, 32), jnp.float32, lens)
    q_pos = lens - seq_q
    f = lambda q, k, v, q_pos, kv_len: attention(q, k, v, q_pos, kv_len, causal=True)
    cts = cotangents(rng, *f(q, k, v, q_pos, lens))
    g = vjp_under_jit(f, 3)
    want = jax.jit(g)(cts, q, k, v, q_pos, lens)
    args = (cts, put(q, m, *q_spec), put(k, m, *kv_spec), put(v, m, *kv_spec), q_pos, lens)
    compiled = jax.jit(g).lower(*args).compile()
    got = compiled(*args)
    assert_grads(got, want, q.dtype, ["dq", "dk", "dv"])
    found = compiled_collectives(compiled)
    if kv_spec:  # the caches split with the queries: nothing to sum
        assert found == [], found
    else:
        assert found and all(kind == "all-reduce" for kind, _ in found), found


# (mesh, q spec, kv spec, [B, Sq, H], Skv, dtype): the cache's sequence split,
# alone and with the batch or the heads; slices of 37 keys.
MLA_GRAD_CONTEXT = {
    "decode-1d-f32": (MESH_1D, (), (None, "d"), (3, 1, 4), 296, jnp.float32),
    "chunk-batch-2d-bf16": (MESH_2D, ("x",), ("x", "y"), (2, 5, 2), 148, jnp.bfloat16),
    "chunk-heads-2d-f32": (MESH_2D, (None, None, "x"), (None, "y"), (1, 3, 4), 148, jnp.float32),
}


@pytest.mark.parametrize("split", MLA_GRAD_CONTEXT.values(), ids=MLA_GRAD_CONTEXT.keys())
def test_mla_grad_context_parallel(rng, split):
    m, q_spec, kv_spec, (batch, seq_q, heads), seq_kv, dtype = split
    lens = [seq_kv, 40, 0][:batch]
    q, kv, q_pos, kv_len = mla_inputs(rng, batch, seq_q, heads, seq_kv, lens, dtype, dk=128)
    got, want, compiled = mla_grads_split_and_whole(rng, m, q_spec, kv_spec, q, kv, q_pos, kv_len)
    assert_grads(got, want, dtype, ["dq", "dkv"])
    assert padded(got[1].sharding.spec, 3) == padded(kv_spec, 3)  # dkv stays split
    # The merge's and dq's all-reduces (and, with the heads split, the
    # latent cache gradient's over them): none carries a device's keys.
    local_cache = math.prod(NamedSharding(m, P(*kv_spec)).shard_shape(kv.shape))
    found = compiled_collectives(compiled)
    assert found and all(kind == "all-reduce" and n <= local_cache for kind, n in found), found
    if not q_spec[2:]:
        assert all(n < local_cache for _, n in found), found


def test_attention_grad_context_parallel(rng):
    # Context over y, the KV heads (and their query heads) over x.
    batch, seq_q, heads_q, heads_kv, seq_kv = 2, 4, 8, 2, 204
    lens = jnp.asarray([204, 61], jnp.int32)
    q = randn(rng, (batch, seq_q, heads_q, 64), jnp.float32)
    k = cache(rng, (batch, seq_kv, heads_kv, 64), jnp.float32, lens)
    v = cache(rng, (batch, seq_kv, heads_kv, 32), jnp.float32, lens)
    q_pos = lens - seq_q
    f = lambda q, k, v, q_pos, kv_len: attention(q, k, v, q_pos, kv_len, causal=True)
    cts = cotangents(rng, *f(q, k, v, q_pos, lens))
    g = vjp_under_jit(f, 3)
    want = jax.jit(g)(cts, q, k, v, q_pos, lens)
    kv_spec = (None, "y", "x")
    q_split = put(q, MESH_2D, None, None, "x")
    args = (cts, q_split, put(k, MESH_2D, *kv_spec), put(v, MESH_2D, *kv_spec), q_pos, lens)
    compiled = jax.jit(g).lower(*args).compile()
    got = compiled(*args)
    assert_grads(got, want, q.dtype, ["dq", "dk", "dv"])
    local_cache = math.prod(args[3].sharding.shard_shape(v.shape))  # v's slice, the smaller
    found = compiled_collectives(compiled)
    assert found and all(kind == "all-reduce" and n < local_cache for kind, n in found), found


def test_grad_uneven_splits(rng):
    # 3 queries over 2 devices and 6 heads over 4 around a replicated latent
    # cache. The cotangents are computed inside jit on the padded shards, so
    # XLA's padding holds garbage (cos(0) = 1), which must not add into dkv.
    q, kv, q_pos, kv_len = mla_inputs(rng, 2, 3, 6, 40, [40, 17], dk=64)
    f = lambda q, kv: mla(q, kv, q_pos, kv_len, dv=32, causal=True)

    def g(q, kv):
        outs, pullback = jax.vjp(f, q, kv)
        return pullback(jax.tree_util.tree_map(jnp.cos, outs))

    got = jax.jit(constrained(g, (None, "x", "y")))(q, kv)
    assert_grads(got, jax.jit(g)(q, kv), q.dtype, ["dq", "dkv"])


@pytest.mark.parametrize("check_vma", [True, False], ids=["check_vma", "no-check_vma"])
def test_grad_inside_shard_map(rng, check_vma):
    # The shard_map recipe, differentiated: each device's backward over its
    # slice, merge_attention's transpose, and q's gradient summed over the
    # context axis q does not vary over (by the op under check_vma, by JAX's
    # psum transpose without it).
    q, kv, _, kv_len = mla_inputs(rng, 4, 2, 4, 160, [160, 9, 0, 100], dk=64)

    @jax.shard_map(
        mesh=MESH_2D,
        in_specs=(P("x"), P("x", "y"), P("x")),
        out_specs=P("x"),
        check_vma=check_vma,
    )
    def context(q, kv, kv_len):
        rows = kv.shape[1]
        start = jax.lax.axis_index("y") * rows
        out, lse = mla(
            q,
            kv,
            kv_len - q.shape[1] - start,
            jnp.clip(kv_len - start, 0, rows),
            dv=32,
            causal=True,
        )
        return jax_mla.merge_attention(out, lse, "y")[0]

    unsplit = lambda q, kv, kv_len: mla(q, kv, None, kv_len, dv=32, causal=True)[0]
    grads = lambda f: jax.jit(jax.grad(lambda q, kv: jnp.sum(jnp.sin(f(q, kv, kv_len))), (0, 1)))
    assert_grads(grads(context)(q, kv), grads(unsplit)(q, kv), q.dtype, ["dq", "dkv"])
