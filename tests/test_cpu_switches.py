"""The CPU kernels' run-time switches, read at every call: JAX_MLA_CPU_ISA
picks the ISA path (each supported one is tested here; an unknown or
unsupported one is an error), and JAX_MLA_DEBUG_NAN_FILL=1 fills outputs with
NaN first, so an element the kernel forgets to write shows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mla
from jax_mla import _ffi, _splits

from .conftest import (
    KV_TILE,
    assert_close,
    cache,
    check_attention,
    check_mla,
    native_attention,
    randn,
    reference_attention,
)
from .test_quant_kernels import check_attention_quant, check_mla_quant
from .test_reference import attention_f64

SUPPORTED_ISAS = _ffi.module("cpu").supported_isas().split(",")
BUILT_ISAS = _ffi.module("cpu").built_isas().split(",")


# The kernel tests run on each path the CPU supports; "auto" is the first of
# them (the test below), so its kernel runs would repeat that path's.
@pytest.fixture(params=SUPPORTED_ISAS)
def isa(request, monkeypatch, cpu):
    monkeypatch.setenv("JAX_MLA_CPU_ISA", request.param)
    return request.param


@pytest.mark.parametrize("requested", ["auto"] + SUPPORTED_ISAS)
def test_isa_switch_is_read_at_run_time(requested, monkeypatch, cpu):
    monkeypatch.setenv("JAX_MLA_CPU_ISA", requested)
    chosen = _ffi.module("cpu").isa()
    assert chosen == (SUPPORTED_ISAS[0] if requested == "auto" else requested)
    assert jax_mla.backends()["cpu"]["isa"] == chosen


ATTENTION_CASES = {
    # lanes path (many rows per block), GQA, causal, kv_len per batch
    "gqa_prefill": dict(
        batch=2,
        seq_q=7,
        heads_q=8,
        heads_kv=2,
        seq_kv=77,
        dk=64,
        dv=64,
        causal=True,
        kv_len=[77, 30],
    ),
    # few rows per block (dot products along Dk), DeepSeek standard dims
    "decode_192x128": dict(
        batch=2,
        seq_q=1,
        heads_q=2,
        heads_kv=2,
        seq_kv=300,
        dk=192,
        dv=128,
        dtypes=(jnp.float16,) * 3,
        kv_len=[300, 1],
    ),
    # MQA, Sq > Skv with empty rows, odd head count and dims
    "mqa_sq_gt_skv": dict(
        batch=2,
        seq_q=40,
        heads_q=5,
        heads_kv=1,
        seq_kv=KV_TILE + 1,
        dk=80,
        dv=48,
        dtypes=(jnp.bfloat16,) * 3,
        causal=True,
        kv_len=[KV_TILE + 1, 3],
    ),
    "mixed_112x208": dict(
        batch=1,
        seq_q=2,
        heads_q=4,
        heads_kv=4,
        seq_kv=KV_TILE - 1,
        dk=112,
        dv=208,
        dtypes=(jnp.float32, jnp.bfloat16, jnp.float16),
    ),
}


@pytest.mark.parametrize("case", ATTENTION_CASES.values(), ids=ATTENTION_CASES.keys())
def test_attention_on_each_isa(rng, isa, case):
    check_attention(rng, **case)


MLA_CASES = {
    "deepseek_decode_split": dict(
        batch=2,
        seq_q=1,
        heads=16,
        seq_kv=300,
        dk=576,
        dv=512,
        dtypes=(jnp.float32, jnp.bfloat16),
        kv_len=[300, 45],
        num_splits=3,
        scale=0.135,
    ),
    "prefill_offset": dict(
        batch=2,
        seq_q=4,
        heads=16,
        seq_kv=77,
        dk=192,
        dv=64,
        v_offset=24,
        dtypes=(jnp.float16, jnp.float16),
        causal=True,
        kv_len=[77, 0],
    ),
}


@pytest.mark.parametrize("case", MLA_CASES.values(), ids=MLA_CASES.keys())
def test_mla_on_each_isa(rng, isa, case):
    check_mla(rng, **case)


@pytest.mark.parametrize(
    "seq_q,heads_q,heads_kv",
    [(17, 2, 2), (18, 2, 2), (7, 3, 1), (19, 3, 1)],
    ids=["17rows", "18rows", "21rows", "30rows"],
)
@pytest.mark.parametrize("causal", [False, True])
def test_tile_row_blocks_and_key_counts_on_each_isa(rng, isa, seq_q, heads_q, heads_kv, causal):
    # The float tile path (blocks of more than 16 rows): P.V's row blocks
    # (AVX2: 4 rows x 3 vectors, then single rows) over 10 vectors of 8 dims
    # (3 + 3 + 3 + 1), Q.K's 6-key blocks with a padded 4-key tail (AVX2: a
    # tile of 23 keys is 6 + 6 + 4 + 4 + 4), visible key counts around both
    # and the 64-key tile; fresh random data.
    kv_len = [KV_TILE + 23, 11, 2 * KV_TILE + 1]
    check_attention(
        rng,
        batch=3,
        seq_q=seq_q,
        heads_q=heads_q,
        heads_kv=heads_kv,
        seq_kv=2 * KV_TILE + 1,
        dk=96,
        dv=80,
        dtypes=(jnp.float32, jnp.float16, jnp.bfloat16),
        causal=causal,
        q_pos=[KV_TILE + 23 - seq_q, 11 - seq_q, 2 * KV_TILE + 1 - seq_q],
        kv_len=kv_len,
    )


# Long prefill: the driver's blocks of kLongRows (128) query rows (at least
# kLongMinItems = 64 work items of them, see test_heuristics), whole to the
# float tile kernel when the head dims fit its L2 budget (96/80), else 32 rows
# at a time (256/256); causal blocks whose diagonal falls inside a key tile at
# an offset that is no multiple of a vector (q_pos 13, 75) or of the 6-key Q.K
# blocks, rows before position 0 (q_pos -50: empty rows), kv_len cutting the
# block (30: most rows end there), and GQA 3 (126-row blocks: 42 positions x 3
# heads, a padded last vector).
LONG_PREFILL_CASES = {
    "mha_causal": dict(
        batch=2,
        seq_q=3 * 128 + 37,
        heads_q=8,
        heads_kv=8,
        seq_kv=3 * 128 + 37 + 75,
        dk=96,
        dv=80,
        causal=True,
        q_pos=[13, 75],
        kv_len=[3 * 128 + 37 + 13, 3 * 128 + 37 + 75],
    ),
    "gqa3_causal_empty_rows": dict(
        batch=1,
        seq_q=16 * 42,
        heads_q=12,
        heads_kv=4,
        seq_kv=16 * 42,
        dk=64,
        dv=48,
        causal=True,
        q_pos=-50,
        kv_len=16 * 42 - 5,
    ),
    "mha_not_causal_short_kv": dict(
        batch=2,
        seq_q=4 * 128,
        heads_q=8,
        heads_kv=8,
        seq_kv=KV_TILE + 3,
        dk=96,
        dv=80,
        kv_len=[KV_TILE + 3, 30],
    ),
    "wide_dims_32_rows_a_call": dict(
        batch=1,
        seq_q=4 * 128 - 1,
        heads_q=16,
        heads_kv=16,
        seq_kv=4 * 128 - 1,
        dk=256,
        dv=256,
        causal=True,
    ),
}


@pytest.mark.parametrize("case", LONG_PREFILL_CASES.values(), ids=LONG_PREFILL_CASES.keys())
def test_long_prefill_blocks_on_each_isa(rng, isa, case):
    # Mixed dtypes against the reference (check_attention: empty rows exact,
    # NaN past kv_len), and the float32 call against float64 numpy.
    check_attention(rng, dtypes=(jnp.float32, jnp.bfloat16, jnp.float16), **case)
    q = randn(rng, (case["batch"], case["seq_q"], case["heads_q"], case["dk"]), jnp.float32)
    k = cache(rng, (case["batch"], case["seq_kv"], case["heads_kv"], case["dk"]), jnp.float32)
    v = cache(rng, (case["batch"], case["seq_kv"], case["heads_kv"], case["dv"]), jnp.float32)
    kw = {key: case.get(key) for key in ("causal", "q_pos", "kv_len")}
    kw["causal"] = bool(kw["causal"])
    out, lse = native_attention(q, k, v, **kw)
    want_out, want_lse = attention_f64(q, k, v, **kw)
    assert_close(lse, want_lse, jnp.float32)
    assert_close(out, want_out, jnp.float32)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_long_prefill_mla_splits_on_each_isa(rng, isa, num_splits):
    # flash_mla's long prefill with small dims (16 heads x 8 positions = 128
    # rows a call, V inside the K rows) and forced key splits: each split's
    # rows start at its first key, so rows before it are done from the start.
    check_mla(
        rng,
        batch=2,
        seq_q=33 * 8 - 3,
        heads=16,
        seq_kv=33 * 8 + 40,
        dk=64,
        dv=48,
        v_offset=16,
        dtypes=(jnp.float32, jnp.bfloat16),
        causal=True,
        kv_len=[33 * 8 + 40, 33 * 8 - 10],
        num_splits=num_splits,
    )


@pytest.mark.parametrize("k_fmt, v_fmt", [("q8_0", "q8_0"), (jnp.float16, "q8_0")])
def test_long_prefill_quantized_on_each_isa(rng, isa, k_fmt, v_fmt):
    # 8-bit caches in long prefill: blocks of 128 rows handed to the 8-bit
    # tile kernels 32 at a time, as blocks of 32 would have been.
    check_attention_quant(
        rng, k_fmt, v_fmt, 1, 4 * 128 - 5, 16, 16, 4 * 128 + 20, True, None, [4 * 128 + 11], 64, 64
    )


@pytest.mark.parametrize("num_splits", [1, 2])
@pytest.mark.parametrize("heads", [4, 5, 6, 7, 8, 9, 12, 13, 14, 15, 16])
def test_mla_direct_row_blocks_and_key_counts_on_each_isa(rng, isa, heads, num_splits):
    # The float cache read in place for blocks of 4 (AVX2) or 8 (AVX-512) to
    # 16 rows (kernels/direct.h; fewer take the GEMV path): P.V's row blocks
    # (AVX2: 6, then 4, 2 and 1, two 4s for 8 and 14 rows; 5, 7, 9, 13, 15
    # rows end in 2- and 1-row blocks), Q.K's 6-key blocks with a padded
    # 4-key tail (17 keys: 6 + 6 + 4 + 4), steps of four tiles where P.V is
    # one pass (4, 6, 16 rows); visible key counts around all of them, f16
    # and bf16, each split count; fresh random data. (Dv 64 keeps a step's
    # scores inside the V tile: kernels.cc's direct-path condition.)
    lens = [1, 5, 7, 17, KV_TILE - 1, KV_TILE + 6, 4 * KV_TILE + 3]
    for dtypes in [(jnp.float32, jnp.float16), (jnp.bfloat16, jnp.bfloat16)]:
        check_mla(
            rng,
            batch=len(lens),
            seq_q=1,
            heads=heads,
            seq_kv=4 * KV_TILE + 3,
            dk=144,
            dv=64,
            v_offset=16,
            dtypes=dtypes,
            kv_len=lens,
            num_splits=num_splits,
        )


@pytest.mark.parametrize("fmt", ["q8_0", "q8_kv", "q6_0", "fp8_e4m3"])
@pytest.mark.parametrize("heads", [16, 2], ids=["tile", "gemv"])
def test_quantized_mla_on_each_isa(rng, isa, fmt, heads):
    # The quantized row conversions (int8 loads, q6_0 unpacking, e4m3) per ISA.
    check_mla_quant(
        rng,
        fmt,
        batch=2,
        seq_q=1,
        heads=heads,
        seq_kv=KV_TILE + 13,
        dk=576,
        dv=512,
        v_offset=64,
        kv_len=[KV_TILE + 13, 20],
        num_splits=2,
    )


@pytest.mark.parametrize("heads", [16, 2], ids=["tile", "gemv"])
def test_fp8_every_byte_on_each_isa(isa, heads):
    # Over one key the output is V's row itself (weight 1), so it shows each
    # converted value: every e4m3 byte (subnormals, -0, +-448, the NaNs at
    # 0x7F and 0xFF) twice in V's 512 columns, times small, large and zero
    # scales: exactly dequantize's d * value. (K and V rows share the
    # conversion. Products are kept normal: XLA flushes subnormals.)
    codes = np.tile(np.tile(np.arange(256, dtype=np.uint8), 2), (4, 1))
    qs = jnp.asarray(codes.view(jnp.float8_e4m3fn)[:, None, None])  # [4, 1, 1, 512]
    d = jnp.asarray([1.0, 2.0**-100, 3e5, 0.0], jnp.float32).reshape(4, 1, 1, 1)
    v = jax_mla.QuantizedKV(qs, d, "fp8_e4m3")
    q = jnp.ones((4, 1, heads, 64), jnp.float32)
    k = jnp.zeros((4, 1, 1, 64), jnp.float32)
    out = np.asarray(jax_mla.flash_attention(q, k, v, backend="native"))
    want = np.asarray(jax_mla.dequantize(v))[:, 0, 0]
    assert np.isnan(want).sum() == 4 * 4 and (want[1] != 0).sum() == 512 - 4  # only +-0 are 0
    for h in range(heads):
        np.testing.assert_array_equal(out[:, 0, h], want)


@pytest.mark.parametrize(
    "k_fmt, v_fmt",
    [("q8_0", "q8_0"), ("q8_kv", "q8_kv"), (jnp.float16, "q8_0"), ("q8_0", jnp.bfloat16)],
    ids=["q8_0", "q8_kv", "f16-q8_0", "q8_0-bf16"],
)
@pytest.mark.parametrize(
    "case",
    [
        # (B, Sq, Hq, Hkv, Skv, causal, q_pos, kv_len): a causal prefill chunk
        # (tile kernel, 40 rows per block) and GQA decode (GEMV kernel).
        (2, 40, 16, 16, KV_TILE * 2 + 7, True, None, [KV_TILE * 2 + 7, 30]),
        (2, 1, 8, 4, KV_TILE + 13, False, None, [KV_TILE + 13, 0]),
    ],
    ids=["prefill", "gqa_decode"],
)
def test_quantized_attention_on_each_isa(rng, isa, k_fmt, v_fmt, case):
    # The rounded query and P (integer or exact float sums) per ISA, 192/128.
    check_attention_quant(rng, k_fmt, v_fmt, *case)


@pytest.mark.parametrize(
    "k_fmt, v_fmt",
    [("q8_0", "q8_0"), ("q8_kv", "q8_kv"), ("q8_kv", "q8_0")],
    ids=["q8_0", "q8_kv", "q8_kv-q8_0"],
)
@pytest.mark.parametrize("num_splits", [1, 2])
@pytest.mark.parametrize(
    "case",
    [
        # (B, Sq, Hq, Hkv, Skv, causal, q_pos, kv_len, dk, dv). Decode over 16
        # KV heads, a row each: key counts around the 4-key P.V steps and the
        # 64-key groups, one batch row empty.
        (
            7,
            1,
            16,
            16,
            2 * KV_TILE + 9,
            False,
            None,
            [1, 3, 6, KV_TILE - 1, KV_TILE + 5, 2 * KV_TILE + 9, 0],
            192,
            128,
        ),
        # GQA 2 over 3 causal positions: 6 rows per KV head with different ends;
        # Dk and Dv 96 (a 32-value tail after whole 64-byte vectors).
        (2, 3, 8, 4, KV_TILE + 13, True, None, [KV_TILE + 13, 2], 96, 96),
        # Dv 160 and 3 KV heads of 3 rows (GQA 3), positions given.
        (2, 1, 9, 3, 2 * KV_TILE + 1, False, [2 * KV_TILE, 40], [2 * KV_TILE + 1, 41], 64, 160),
    ],
    ids=["mha_decode", "gqa_causal_96", "gqa3_160"],
)
def test_quantized_decode_over_kv_heads_on_each_isa(
    rng, isa, monkeypatch, k_fmt, v_fmt, num_splits, case
):
    # Several KV heads with few rows each over 8-bit K and V: the kernel that
    # walks the keys across the heads (attend_heads_q8), per ISA, with the
    # split count forced (flash_attention takes the heuristic's).
    choose = _splits.choose_num_splits
    monkeypatch.setattr(
        _splits, "choose_num_splits", lambda _, *a, **kw: choose(num_splits, *a, **kw)
    )
    *args, dk, dv = case
    check_attention_quant(rng, k_fmt, v_fmt, *args, dk=dk, dv=dv)


@pytest.mark.parametrize("fmt", ["q8_0", "q8_kv"])
def test_quantized_mla_odd_rows_and_partial_v_block_on_each_isa(rng, isa, fmt):
    # 15 rows per block (row tails of every P.V kernel) and dv = 48 (a V block
    # of 16 columns: chunk tails of the integer layouts), several tiles, causal.
    check_mla_quant(
        rng,
        fmt,
        batch=2,
        seq_q=3,
        heads=5,
        seq_kv=2 * KV_TILE + 9,
        dk=96,
        dv=48,
        v_offset=32,
        causal=True,
        kv_len=[2 * KV_TILE + 9, KV_TILE - 3],
        num_splits=2,
    )


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("fmt", ["q8_0", "q8_kv"])
@pytest.mark.parametrize("heads", [9, 24, 32])
def test_quantized_mla_row_blocks_and_key_counts_on_each_isa(rng, isa, fmt, heads, num_splits):
    # The row blocks of the 8-bit tile kernels (AVX2: 16-row Q.K steps, an
    # 8-row tail for 24, row pairs and a single row in P.V) over visible key
    # counts at and around the 8-key sub-tiles and the 64-key tiles (odd
    # counts leave half a key pair), each split count; fresh random data.
    lens = [1, 7, 9, KV_TILE - 1, KV_TILE + 8, 2 * KV_TILE + 9]
    check_mla_quant(
        rng,
        fmt,
        batch=len(lens),
        seq_q=1,
        heads=heads,
        seq_kv=2 * KV_TILE + 9,
        dk=576,
        dv=512,
        v_offset=64,
        kv_len=lens,
        num_splits=num_splits,
    )


@pytest.mark.parametrize("fmt", ["q8_0", "q8_kv"])
@pytest.mark.parametrize("heads", [9, 12, 16])
def test_quantized_mla_v_column_groups_on_each_isa(rng, isa, fmt, heads):
    # P.V over 8-bit V in groups of 64 columns (VNNI: packed per group, an
    # asm step for 4 rows x 4 chunks): dv = 144 is two whole groups and a
    # 16-column tail; 9, 12 and 16 rows (4-row blocks, a 1-row tail); key
    # counts around the 4-key dwords and 8-key sub-tiles; fresh random data.
    lens = [1, 3, 5, 8, 13, KV_TILE + 2, 2 * KV_TILE + 11]
    check_mla_quant(
        rng,
        fmt,
        batch=len(lens),
        seq_q=1,
        heads=heads,
        seq_kv=2 * KV_TILE + 11,
        dk=192,
        dv=144,
        v_offset=32,
        kv_len=lens,
        num_splits=2,
    )


UNSUPPORTED_ISAS = [isa for isa in BUILT_ISAS if isa not in SUPPORTED_ISAS]


@pytest.mark.parametrize("requested", ["bogus"] + UNSUPPORTED_ISAS)
def test_unknown_or_unsupported_isa_is_an_error(rng, cpu, monkeypatch, requested):
    q = randn(rng, (1, 2, 4, 64), jnp.float32)
    kv = randn(rng, (1, 10, 64), jnp.float32)
    k, v = kv[:, :, None], kv[:, :, None, :32]
    why = "is not one of auto," if requested == "bogus" else "this CPU does not support it"
    match = f"JAX_MLA_CPU_ISA={requested} .*{why}"
    monkeypatch.setenv("JAX_MLA_CPU_ISA", requested)
    with pytest.raises(jax.errors.JaxRuntimeError, match=match):
        jax.block_until_ready(jax_mla.flash_attention(q, k, v, backend="native"))
    with pytest.raises(jax.errors.JaxRuntimeError, match=match):
        jax.block_until_ready(jax_mla.flash_mla(q, kv, dv=32, backend="native"))
    assert jax_mla.backends()["cpu"]["isa"].startswith(f"error: JAX_MLA_CPU_ISA={requested}")
    # The same compiled calls run again once the switch is valid.
    monkeypatch.setenv("JAX_MLA_CPU_ISA", "auto")
    out = jax_mla.flash_attention(q, k, v, backend="native")
    assert_close(out, reference_attention(q, k, v)[0], jnp.float32)


@pytest.fixture
def nan_fill(monkeypatch, platform):
    monkeypatch.setenv("JAX_MLA_DEBUG_NAN_FILL", "1")
    # As on a many-core machine: decode calls are split, so the split partials
    # and their merge are checked for unwritten elements too.
    monkeypatch.setattr(_splits, "cpu_workers", lambda: 64)


NAN_FILL_ATTENTION = {
    "empty_rows_gqa": dict(
        batch=3,
        seq_q=5,
        heads_q=8,
        heads_kv=2,
        seq_kv=77,
        dk=64,
        dv=32,
        causal=True,
        q_pos=-2,
        kv_len=[0, 5, 77],
    ),
    "split_decode": dict(
        batch=2, seq_q=1, heads_q=4, heads_kv=4, seq_kv=300, dk=64, dv=64, kv_len=[300, 0]
    ),
    "half_output": dict(
        batch=2,
        seq_q=3,
        heads_q=4,
        heads_kv=1,
        seq_kv=KV_TILE + 1,
        dk=192,
        dv=128,
        dtypes=(jnp.bfloat16,) * 3,
        kv_len=[KV_TILE + 1, 0],
    ),
}


@pytest.mark.kernel_config("attention", dtypes=(jnp.float32,) * 3)  # check_attention's default
@pytest.mark.parametrize("case", NAN_FILL_ATTENTION.values(), ids=NAN_FILL_ATTENTION.keys())
def test_nan_fill_attention(rng, nan_fill, case):
    check_attention(rng, **case)


NAN_FILL_MLA = {
    # splits past kv_len are empty; batch rows 1 and 2 see few or no keys
    "decode_splits": dict(
        batch=3, seq_q=1, heads=16, seq_kv=300, dk=576, dv=512, kv_len=[300, 10, 0], num_splits=7
    ),
    "decode_splits_clamped": dict(
        batch=2,
        seq_q=1,
        heads=16,
        seq_kv=77,
        dk=576,
        dv=512,
        dtypes=(jnp.bfloat16,) * 2,
        kv_len=[77, 0],
        num_splits=64,
    ),
    "prefill_splits_empty_rows": dict(
        batch=2,
        seq_q=6,
        heads=4,
        seq_kv=77,
        dk=96,
        dv=64,
        v_offset=32,
        causal=True,
        q_pos=[-3, 70],
        kv_len=[77, 40],
        num_splits=3,
    ),
    "no_split": dict(
        batch=2,
        seq_q=2,
        heads=16,
        seq_kv=77,
        dk=576,
        dv=512,
        causal=True,
        kv_len=[77, 0],
        num_splits=1,
    ),
}


@pytest.mark.kernel_config("mla", dtypes=(jnp.float32,) * 2, v_offset=0)  # check_mla's defaults
@pytest.mark.parametrize("case", NAN_FILL_MLA.values(), ids=NAN_FILL_MLA.keys())
def test_nan_fill_mla(rng, nan_fill, case):
    check_mla(rng, **case)
