"""flash_attention's native kernel against the reference: dtypes x head dims,
head ratios x lengths x causal, position edge cases, DeepSeek sizes.

Every cache slot past kv_len holds NaN (conftest.cache), and empty rows are
checked exactly (conftest.assert_attention)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jax_mla import _splits

from .conftest import (
    AWKWARD_SKV,
    DTYPES_QKV,
    KV_TILE,
    assert_attention,
    cache,
    check_attention,
    dtype_id,
    native_attention,
    randn,
    reference_attention,
    visible_keys,
)

HEAD_DIMS = [(64, 64), (128, 128), (192, 128), (576, 512), (80, 48), (112, 208)]


@pytest.mark.kernel_config("attention")
@pytest.mark.parametrize("dk, dv", HEAD_DIMS, ids=[f"{a}x{b}" for a, b in HEAD_DIMS])
@pytest.mark.parametrize("dtypes", DTYPES_QKV, ids=dtype_id)
def test_dtypes_and_head_dims(rng, platform, dtypes, dk, dv):
    check_attention(
        rng,
        batch=2,
        seq_q=3,
        heads_q=4,
        heads_kv=2,
        seq_kv=77,
        dk=dk,
        dv=dv,
        dtypes=dtypes,
        causal=True,
        kv_len=[77, 40],
    )


HEADS = {"mha": (4, 4), "gqa4": (8, 2), "gqa16": (32, 2), "mqa": (5, 1)}
# (Sq, Skv): decode and prefill, lengths around the kernel tile, Sq > Skv.
LENGTHS = [(1, 1), (1, KV_TILE + 1), (2, KV_TILE - 1), (7, 77), (40, KV_TILE + 1), (33, 300)]


@pytest.mark.kernel_config("attention", dtypes=(jnp.float32,) * 3, dk=64, dv=64)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seq_q, seq_kv", LENGTHS, ids=[f"sq{a}-skv{b}" for a, b in LENGTHS])
@pytest.mark.parametrize("heads_q, heads_kv", HEADS.values(), ids=HEADS.keys())
def test_heads_and_lengths(rng, platform, heads_q, heads_kv, seq_q, seq_kv, causal):
    kv_len = [seq_kv, max(1, seq_kv // 3)]
    check_attention(
        rng,
        batch=2,
        seq_q=seq_q,
        heads_q=heads_q,
        heads_kv=heads_kv,
        seq_kv=seq_kv,
        dk=64,
        dv=64,
        causal=causal,
        kv_len=kv_len,
    )


@pytest.mark.kernel_config(
    "attention", dtypes=(jnp.float32, jnp.bfloat16, jnp.bfloat16), dk=64, dv=32
)
@pytest.mark.parametrize("seq_kv", AWKWARD_SKV + [KV_TILE, 2 * KV_TILE])
def test_cache_lengths(rng, platform, seq_kv):
    check_attention(
        rng,
        batch=1,
        seq_q=3,
        heads_q=2,
        heads_kv=1,
        seq_kv=seq_kv,
        dk=64,
        dv=32,
        dtypes=(jnp.float32, jnp.bfloat16, jnp.bfloat16),
        causal=True,
    )


# name: (q_pos, kv_len) for B = 4, Sq = 5, Skv = 77.
POSITIONS = {
    "kv_len_0": (None, 0),
    "kv_len_1": (None, 1),
    "kv_len_full": (None, None),
    "kv_len_full_explicit": (None, 77),
    "kv_len_per_batch": (None, [0, 1, KV_TILE, 77]),
    "q_pos_negative": (-3, None),
    "q_pos_all_before_0": (-10, [77, 5, 0, 30]),
    "q_pos_past_kv_len": (100, [77, 5, 0, 30]),
    "q_pos_per_batch": ([-2, 0, 40, 100], [77, 5, 77, 50]),
    "q_pos_0_kv_len_per_batch": (0, [3, 77, 1, 0]),
    "q_pos_int32_min": (-(2**31), None),
    "numpy_arrays": (np.array([1, 2, 3, 4], np.int32), np.array([10, 20, 30, 40], np.int32)),
    "jax_arrays": (jnp.array([1, -2, 3, 4], jnp.int32), jnp.array([10, 2, 30, 77], jnp.int32)),
}


@pytest.mark.kernel_config(
    "attention", dtypes=(jnp.float32, jnp.float16, jnp.float16), dk=64, dv=32
)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("q_pos, kv_len", POSITIONS.values(), ids=POSITIONS.keys())
def test_positions(rng, platform, q_pos, kv_len, causal):
    check_attention(
        rng,
        batch=4,
        seq_q=5,
        heads_q=4,
        heads_kv=2,
        seq_kv=77,
        dk=64,
        dv=32,
        dtypes=(jnp.float32, jnp.float16, jnp.float16),
        causal=causal,
        q_pos=q_pos,
        kv_len=kv_len,
    )


# name: (B, Sq, Hq, Hkv, Skv, causal, kv_len): decode-like calls with fewer
# work items than workers, whose keys flash_attention splits across threads.
SPLIT_CASES = {
    "mha_decode": (1, 1, 16, 16, 300, False, None),
    "gqa_decode_empty_row": (2, 1, 8, 2, 300, True, [300, 0]),
    "mqa_few_rows": (1, 3, 4, 1, 300, True, [200]),
}


@pytest.mark.kernel_config(
    "attention", dtypes=(jnp.float32, jnp.float16, jnp.float16), dk=128, dv=64
)
@pytest.mark.parametrize("workers", [4, 64])
@pytest.mark.parametrize("case", SPLIT_CASES.values(), ids=SPLIT_CASES.keys())
def test_split_kv(rng, platform, monkeypatch, case, workers):
    # The split count follows the worker count; pretend to have more cores.
    batch, seq_q, heads_q, heads_kv, seq_kv, causal, kv_len = case
    monkeypatch.setattr(_splits, "cpu_workers", lambda: workers)
    assert _splits.choose_num_splits(None, batch, seq_q, heads_q, heads_kv, seq_kv) > 1
    check_attention(
        rng,
        batch=batch,
        seq_q=seq_q,
        heads_q=heads_q,
        heads_kv=heads_kv,
        seq_kv=seq_kv,
        dk=128,
        dv=64,
        dtypes=(jnp.float32, jnp.float16, jnp.float16),
        causal=causal,
        kv_len=kv_len,
    )


@pytest.mark.kernel_config("attention", dtypes=(jnp.float32,) * 3, dk=64, dv=64)
def test_q_pos_near_int32_max(rng, platform):
    # Rows at q_pos + i up to 2**31 + 1 (past int32) are far past every key:
    # causal or not, each sees the whole cache.
    q = randn(rng, (2, 4, 4, 64), jnp.float32)
    k = cache(rng, (2, 77, 2, 64), jnp.float32, [77, 30])
    v = cache(rng, (2, 77, 2, 64), jnp.float32, [77, 30])
    kv_len = jnp.array([77, 30], jnp.int32)
    got = native_attention(q, k, v, causal=True, q_pos=2**31 - 3, kv_len=kv_len)
    want = reference_attention(q, k, v, causal=False, q_pos=2**31 - 3, kv_len=kv_len)
    assert_attention(got, want, jnp.float32, visible_keys(None, kv_len, 2, 4, 77, False))


@pytest.mark.kernel_config("attention", dk=192, dv=128)
@pytest.mark.parametrize("seq_q", [1, 16])
@pytest.mark.parametrize(
    "dtypes", [(jnp.bfloat16,) * 3, (jnp.float32, jnp.bfloat16, jnp.bfloat16)], ids=dtype_id
)
def test_deepseek_prefill_shapes(rng, platform, dtypes, seq_q):
    # DeepSeek standard (decompressed) attention: 16 heads, Dk 192, Dv 128,
    # with the model's own scale.
    check_attention(
        rng,
        batch=2,
        seq_q=seq_q,
        heads_q=16,
        heads_kv=16,
        seq_kv=300,
        dk=192,
        dv=128,
        dtypes=dtypes,
        causal=True,
        kv_len=[300, 123],
        scale=0.1147,
    )


@pytest.mark.kernel_config("attention", dtypes=(jnp.float32,) * 3, dk=128, dv=64)
@pytest.mark.parametrize("sharpness", [4.0, 16.0, 100.0])
def test_large_scores(rng, platform, sharpness):
    # A scale several times 1/sqrt(Dk) makes the softmax peaked and exercises
    # exp far from 0 and the online rescaling. Score rounding errors grow with
    # the score magnitude, hence check_attention's proportional tolerance.
    check_attention(
        rng,
        batch=2,
        seq_q=7,
        heads_q=4,
        heads_kv=2,
        seq_kv=300,
        dk=128,
        dv=64,
        causal=True,
        kv_len=[300, 100],
        scale=sharpness / math.sqrt(128),
    )


SIZES = {
    "batch_0": (0, 3, 4, 2, 10),
    "sq_0": (2, 0, 4, 2, 10),
    "hq_0": (2, 3, 0, 1, 10),
    "skv_0": (2, 3, 4, 2, 0),
}


@pytest.mark.kernel_config("attention", dtypes=(jnp.float32,) * 3, dk=64, dv=32)
@pytest.mark.parametrize(
    "batch, seq_q, heads_q, heads_kv, seq_kv", SIZES.values(), ids=SIZES.keys()
)
def test_empty_dimensions(rng, platform, batch, seq_q, heads_q, heads_kv, seq_kv):
    check_attention(
        rng,
        batch=batch,
        seq_q=seq_q,
        heads_q=heads_q,
        heads_kv=heads_kv,
        seq_kv=seq_kv,
        dk=64,
        dv=32,
        causal=True,
    )
