"""flash_mla's native kernel against the reference: dtypes x latent layouts
(v_offset, dv), split-KV (num_splits), positions, head counts; and no copy of
the latent cache."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mla

from .conftest import (
    KV_TILE,
    assert_close,
    cache,
    check_mla,
    dtype_id,
    native_mla,
    randn,
    reference_mla,
)


def make_inputs(rng, *, batch, seq_q, heads, seq_kv, dk, dtypes=(jnp.float32,) * 2, kv_len=None):
    q = randn(rng, (batch, seq_q, heads, dk), dtypes[0])
    kv = cache(rng, (batch, seq_kv, dk), dtypes[1], kv_len)
    return q, kv


MLA_DTYPES = [
    (jnp.float32, jnp.float32),
    (jnp.float16, jnp.float16),
    (jnp.bfloat16, jnp.bfloat16),
    (jnp.float32, jnp.float16),
    (jnp.float32, jnp.bfloat16),
    (jnp.bfloat16, jnp.float32),
]
# (Dk, dv, v_offset): DeepSeek's latent row ([c_kv 512 | k_pe 64], V first),
# V as the row's tail, V narrower than the row at an offset that is not a
# multiple of 16, and a small odd-multiple-of-16 row.
LAYOUTS = [(576, 512, 0), (576, 512, 64), (192, 64, 24), (80, 48, 0)]


@pytest.mark.kernel_config("mla")
@pytest.mark.parametrize(
    "dk, dv, v_offset", LAYOUTS, ids=[f"{a}-dv{b}-off{c}" for a, b, c in LAYOUTS]
)
@pytest.mark.parametrize("dtypes", MLA_DTYPES, ids=dtype_id)
def test_dtypes_and_layouts(rng, platform, dtypes, dk, dv, v_offset):
    check_mla(
        rng,
        batch=2,
        seq_q=2,
        heads=16,
        seq_kv=77,
        dk=dk,
        dv=dv,
        v_offset=v_offset,
        dtypes=dtypes,
        causal=True,
        kv_len=[77, 40],
        num_splits=3,
        scale=0.135,
    )


NUM_SPLITS = [None, 1, 2, 3, 7, 64]
# name: (B, Sq, H, Skv, causal, kv_len)
SPLIT_CASES = {
    "decode": (3, 1, 16, 300, False, [300, 0, 150]),
    "decode_short": (2, 1, 16, KV_TILE + 1, True, [KV_TILE + 1, 1]),
    "prefill": (3, 4, 4, 77, True, [77, 20, 1]),
}


@pytest.mark.kernel_config("mla", dtypes=(jnp.float32, jnp.bfloat16), dk=576, dv=512)
@pytest.mark.parametrize("num_splits", NUM_SPLITS)
@pytest.mark.parametrize("case", SPLIT_CASES.values(), ids=SPLIT_CASES.keys())
def test_num_splits_matches_reference(rng, platform, case, num_splits):
    batch, seq_q, heads, seq_kv, causal, kv_len = case
    check_mla(
        rng,
        batch=batch,
        seq_q=seq_q,
        heads=heads,
        seq_kv=seq_kv,
        dk=576,
        dv=512,
        dtypes=(jnp.float32, jnp.bfloat16),
        causal=causal,
        kv_len=kv_len,
        num_splits=num_splits,
    )


@pytest.mark.kernel_config("mla", dtypes=(jnp.float32,) * 2, dk=576, dv=512)
@pytest.mark.parametrize("case", SPLIT_CASES.values(), ids=SPLIT_CASES.keys())
def test_results_do_not_depend_on_num_splits(rng, platform, case):
    batch, seq_q, heads, seq_kv, causal, kv_len = case
    q, kv = make_inputs(
        rng, batch=batch, seq_q=seq_q, heads=heads, seq_kv=seq_kv, dk=576, kv_len=kv_len
    )
    kw = dict(dv=512, causal=causal, kv_len=kv_len)
    base_out, base_lse = native_mla(q, kv, num_splits=1, **kw)
    for num_splits in NUM_SPLITS[2:]:
        out, lse = native_mla(q, kv, num_splits=num_splits, **kw)
        # Splitting only reorders float32 sums: the same tolerance as vs the reference.
        assert_close(lse, base_lse, jnp.float32)
        assert_close(out, base_out, jnp.float32)


@pytest.mark.parametrize(
    "num_splits, expected", [(1, [1]), (2, [2]), (7, [3]), (64, [3]), (None, [1, 2, 3])]
)
def test_num_splits_is_clamped_to_tiles(rng, cpu, num_splits, expected):
    # The lowered call shows the split count the kernel gets: at most the
    # number of KV tiles, whether given or picked by the heuristic.
    seq_kv = 2 * KV_TILE + 1  # three tiles
    q, kv = make_inputs(rng, batch=1, seq_q=1, heads=16, seq_kv=seq_kv, dk=64)
    f = jax.jit(
        lambda q, kv: jax_mla.flash_mla(q, kv, dv=32, num_splits=num_splits, backend="native")
    )
    splits = [int(n) for n in re.findall(r"num_splits = (\d+)", f.lower(q, kv).as_text())]
    assert len(splits) == 1 and splits[0] in expected, splits
    want = reference_mla(q, kv, dv=32)
    assert_close(f(q, kv), want[0], jnp.float32)


# name: (q_pos, kv_len) for B = 4, Sq = 3, Skv = 77.
POSITIONS = {
    "kv_len_0": (None, 0),
    "kv_len_1": (None, 1),
    "kv_len_full": (None, None),
    "kv_len_per_batch": (None, [0, 1, KV_TILE, 77]),
    "q_pos_negative": (-2, None),
    "q_pos_all_before_0": (-10, [77, 5, 0, 30]),
    "q_pos_past_kv_len": (100, [77, 5, 0, 30]),
    "q_pos_per_batch": ([-2, 0, 40, 100], [77, 5, 77, 50]),
}


@pytest.mark.kernel_config("mla", dtypes=(jnp.float32, jnp.float16), dk=96, dv=64, v_offset=16)
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("q_pos, kv_len", POSITIONS.values(), ids=POSITIONS.keys())
def test_positions(rng, platform, q_pos, kv_len, causal, num_splits):
    check_mla(
        rng,
        batch=4,
        seq_q=3,
        heads=8,
        seq_kv=77,
        dk=96,
        dv=64,
        v_offset=16,
        dtypes=(jnp.float32, jnp.float16),
        causal=causal,
        q_pos=q_pos,
        kv_len=kv_len,
        num_splits=num_splits,
    )


@pytest.mark.kernel_config("mla", dtypes=(jnp.bfloat16,) * 2, dk=576, dv=512)
@pytest.mark.parametrize(
    "heads, seq_q, seq_kv",
    [(1, 1, 77), (128, 1, 77), (128, 3, 40), (16, 40, KV_TILE + 1), (16, 33, 300)],
)
def test_head_counts_and_lengths(rng, platform, heads, seq_q, seq_kv):
    check_mla(
        rng,
        batch=2,
        seq_q=seq_q,
        heads=heads,
        seq_kv=seq_kv,
        dk=576,
        dv=512,
        dtypes=(jnp.bfloat16, jnp.bfloat16),
        causal=True,
        kv_len=[seq_kv, seq_kv // 2 + 1],
        scale=0.135,
    )


@pytest.mark.kernel_config("mla", dtypes=(jnp.float32,) * 2, dk=576, dv=512)
def test_q_pos_near_int32_max(rng, platform):
    # Rows past int32 positions see every key, causal or not.
    q, kv = make_inputs(rng, batch=2, seq_q=4, heads=16, seq_kv=77, dk=576, kv_len=[77, 30])
    kv_len = jnp.array([77, 30], jnp.int32)
    got = native_mla(q, kv, dv=512, causal=True, q_pos=2**31 - 3, kv_len=kv_len, num_splits=2)
    out, lse = reference_mla(q, kv, dv=512, causal=False, kv_len=kv_len)
    assert_close(got[1], lse, jnp.float32)
    assert_close(got[0], out, jnp.float32)


@pytest.mark.kernel_config("mla", dtypes=(jnp.float32,) * 2, dk=64, dv=32)
def test_empty_cache(rng, platform):
    check_mla(rng, batch=2, seq_q=2, heads=4, seq_kv=0, dk=64, dv=32, causal=True, num_splits=4)


@pytest.mark.parametrize("mode", ["call", "vmap_q", "vmap_q_kv_len"])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_no_copy_of_the_latent_cache(cpu, num_splits, mode):
    # V is read in place from the latent rows: the executable's scratch holds
    # at most the split partials, never a V slice or a copy of the cache, also
    # when vmap maps queries and lengths over one shared cache.
    q = jnp.ones((1, 1, 16, 576) if mode == "call" else (3, 1, 1, 16, 576), jnp.float32)
    kv = jnp.ones((1, 4096, 576), jnp.bfloat16)
    kv_len = jnp.array([[4096], [4000], [1]], jnp.int32)

    def op(q, kv, kv_len=None):
        return jax_mla.flash_mla(
            q, kv, dv=512, kv_len=kv_len, num_splits=num_splits, backend="native"
        )

    if mode == "call":
        fn = jax.jit(op)
        args = (q, kv)
    elif mode == "vmap_q":
        fn = jax.jit(jax.vmap(op, in_axes=(0, None)))
        args = (q, kv)
    else:
        fn = jax.jit(jax.vmap(op, in_axes=(0, None, 0)))
        args = (q, kv, kv_len)
    lowered = fn.lower(*args)
    assert "stablehlo.slice" not in lowered.as_text()
    temp = lowered.compile().memory_analysis().temp_size_in_bytes
    assert temp < kv.nbytes // 8, f"{temp} bytes of scratch for a {kv.nbytes}-byte cache"
    # Equal scores and V rows of ones: every output is the mean of ones.
    np.testing.assert_allclose(np.asarray(fn(*args)), 1.0, rtol=1e-6)
