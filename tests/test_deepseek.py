"""jax_mla.deepseek: the DeepSeek MLA attention layer against the un-absorbed
math written out plainly here in float64 numpy (a transcription of the
Hugging Face DeepSeek-V2 attention, YaRN included), its three modes against
each other, prefill-then-decode against one long prefill, rows at different
lengths, the cache formats, Hugging Face weights, and every error path."""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_mla import deepseek as ds


@pytest.fixture(autouse=True)
def _on_cpu(cpu):
    """These tests run float32 activations, which the CUDA kernels do not take
    (NotImplementedError), on the CPU on every machine; the bf16/f16 layer,
    on the GPU too, is tests/test_deepseek_dtypes.py's."""


# A small layer with every structural feature of V2-Lite: 4 heads, latent rank
# 64, nope 32 + rope 32 (standard Dk 64, Dv 32; latent row 96, V the first 64
# columns, block-aligned for the quantized formats). YaRN with mscale !=
# mscale_all_dim, so the cos/sin factor is not 1, and a KV chunk of 16 so
# standard mode runs several chunks plus a tail on a 40-token cache.
SMALL = ds.MLAConfig(
    hidden_size=64,
    num_heads=4,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=32,
    v_head_dim=32,
    mscale=1.0,
    mscale_all_dim=0.8,
    original_max_position_embeddings=64,
    kv_chunk=16,
)
SMALL_LORA = dataclasses.replace(SMALL, q_lora_rank=48)
MAX_LEN = 40
# The layer jitted, as users run it (eager, standard mode's chunk loop would be
# traced again on every call).
ATTN = jax.jit(ds.attention, static_argnames=("cfg", "mode"))


# ------------------------------------------------------------------ the plain math (float64)


def hf_state_dict(rng, cfg: ds.MLAConfig, prefix: str = "") -> dict[str, np.ndarray]:
    """Random tensors of one attention layer under the Hugging Face names
    (Linear weights [out, in])."""
    h, n, p, v, r = (
        cfg.num_heads,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
        cfg.kv_lora_rank,
    )

    def lin(out, inp):
        return (rng.standard_normal((out, inp)) / math.sqrt(inp)).astype(np.float32)

    def norm(d):
        return (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)

    sd = {}
    if cfg.q_lora_rank is None:
        sd["q_proj.weight"] = lin(h * (n + p), cfg.hidden_size)
    else:
        sd["q_a_proj.weight"] = lin(cfg.q_lora_rank, cfg.hidden_size)
        sd["q_a_layernorm.weight"] = norm(cfg.q_lora_rank)
        sd["q_b_proj.weight"] = lin(h * (n + p), cfg.q_lora_rank)
    sd["kv_a_proj_with_mqa.weight"] = lin(r + p, cfg.hidden_size)
    sd["kv_a_layernorm.weight"] = norm(r)
    sd["kv_b_proj.weight"] = lin(h * (n + v), r)
    sd["o_proj.weight"] = lin(cfg.hidden_size, h * v)
    return {prefix + k: x for k, x in sd.items()}


def hf_yarn(cfg: ds.MLAConfig, seq_len: int):
    """HF's DeepseekV2YarnRotaryEmbedding, transcribed: (inv_freq, cos, sin,
    softmax scale), cos/sin [seq_len, p] for positions 0..seq_len-1."""
    dim, base, factor = cfg.qk_rope_head_dim, cfg.rope_theta, cfg.yarn_factor

    def correction_dim(num_rotations):
        return (
            dim * math.log(cfg.original_max_position_embeddings / (num_rotations * 2 * math.pi))
        ) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
    inv_freq_mask = 1.0 - ramp
    freq_extra = 1.0 / base ** (np.arange(0, dim, 2) / dim)
    freq_inter = 1.0 / (factor * base ** (np.arange(0, dim, 2) / dim))
    inv_freq = freq_inter * (1 - inv_freq_mask) + freq_extra * inv_freq_mask

    def get_mscale(scale, mscale):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    m = get_mscale(factor, cfg.mscale) / get_mscale(factor, cfg.mscale_all_dim)
    freqs = np.outer(np.arange(seq_len), inv_freq)
    emb = np.concatenate([freqs, freqs], -1)
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    if cfg.mscale_all_dim:
        scale *= get_mscale(factor, cfg.mscale_all_dim) ** 2
    return inv_freq, np.cos(emb) * m, np.sin(emb) * m, scale


def hf_attention(sd, cfg: ds.MLAConfig, xs):
    """One sequence through HF's DeepseekV2Attention (no cache, causal), in
    float64: xs [T, hidden] at positions 0..T-1 -> (out [T, hidden], the
    roped k_pe [T, p] in HF's layout)."""
    w = {k.split("self_attn.")[-1]: np.asarray(x, np.float64) for k, x in sd.items()}
    h, n, p, v, r = (
        cfg.num_heads,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
        cfg.kv_lora_rank,
    )
    xs = np.asarray(xs, np.float64)
    seq = xs.shape[0]

    def rms(x, weight):
        return weight * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.rms_norm_eps)

    if cfg.q_lora_rank is None:
        q = xs @ w["q_proj.weight"].T
    else:
        q = rms(xs @ w["q_a_proj.weight"].T, w["q_a_layernorm.weight"]) @ w["q_b_proj.weight"].T
    q = q.reshape(seq, h, n + p)
    q_nope, q_pe = q[..., :n], q[..., n:]
    compressed = xs @ w["kv_a_proj_with_mqa.weight"].T
    c, k_pe = compressed[:, :r], compressed[:, r:]
    kv = (rms(c, w["kv_a_layernorm.weight"]) @ w["kv_b_proj.weight"].T).reshape(seq, h, n + v)
    k_nope, value = kv[..., :n], kv[..., n:]

    _, cos, sin, scale = hf_yarn(cfg, seq)

    def deinterleave(x):  # HF: view(..., d // 2, 2).transpose(4, 3).reshape(..., d)
        return x.reshape(x.shape[:-1] + (p // 2, 2)).swapaxes(-1, -2).reshape(x.shape)

    def rotate_half(x):
        return np.concatenate([-x[..., p // 2 :], x[..., : p // 2]], -1)

    q_pe = deinterleave(q_pe)
    q_pe = q_pe * cos[:, None] + rotate_half(q_pe) * sin[:, None]
    k_pe = deinterleave(k_pe)
    k_pe = k_pe * cos + rotate_half(k_pe) * sin
    queries = np.concatenate([q_nope, q_pe], -1)
    keys = np.concatenate([k_nope, np.broadcast_to(k_pe[:, None], (seq, h, p))], -1)
    s = np.einsum("thd,uhd->htu", queries, keys) * scale
    s = np.where(np.tril(np.ones((seq, seq), bool)), s, -np.inf)
    prob = np.exp(s - s.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    o = np.einsum("htu,uhv->thv", prob, value).reshape(seq, h * v)
    return o @ w["o_proj.weight"].T, k_pe


def assert_rel(actual, expected, tol, what=""):
    """max |actual - expected| <= tol * max |expected|, with the worst element named."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    assert np.isfinite(a).all(), f"{what}: non-finite values"
    err = np.abs(a - e)
    rel = err.max() / np.abs(e).max()
    idx = np.unravel_index(int(np.argmax(err)), a.shape)
    assert rel <= tol, (
        f"{what}: max rel error {rel:.3g} > {tol:g}; worst at {idx}: {a[idx]!r} vs {e[idx]!r}"
    )


# ------------------------------------------------------------------ one scenario, every mode

# Three calls on a batch of two rows: an 8-token prefill of both rows; 4 more
# tokens, row 0 continuing at 8 while row 1 rewinds to 2 (its slots 6 and 7
# then hold stale tokens past its length: they must not be read); a 1-token
# decode. Each row's history is then a different sequence, and its outputs
# must be the plain math's on that sequence.
CALLS = [(np.array([0, 0]), 8), (np.array([8, 2]), 4), (np.array([12, 6]), 1)]


def run_scenario(params, sd, cfg, fmt, mode, rng):
    batch = 2
    cache = ds.init_cache(cfg, batch, MAX_LEN, fmt)
    rows = [np.zeros((0, cfg.hidden_size), np.float32) for _ in range(batch)]
    got, want = [], []
    for starts, seq in CALLS:
        x = rng.standard_normal((batch, seq, cfg.hidden_size)).astype(np.float32)
        positions = jnp.asarray(starts[:, None] + np.arange(seq), jnp.int32)
        out, cache = ATTN(params, jnp.asarray(x), positions, cache, cfg=cfg, mode=mode)
        np.testing.assert_array_equal(np.asarray(cache.length), starts + seq)
        for b in range(batch):
            rows[b] = np.concatenate([rows[b][: starts[b]], x[b]])
            got.append(np.asarray(out[b]))
            want.append(hf_attention(sd, cfg, rows[b])[0][-seq:])
    return np.concatenate(got), np.concatenate(want), cache


@pytest.mark.parametrize("mode", ds.MODES)
@pytest.mark.parametrize("cfg", [SMALL, SMALL_LORA], ids=["no-q-lora", "q-lora"])
def test_modes_match_plain_math(rng, cfg, mode):
    sd = hf_state_dict(rng, cfg)
    params = ds.params_from_hf(sd, cfg)
    got, want, _ = run_scenario(params, sd, cfg, jnp.float32, mode, rng)
    # float32 layer vs float64 math: the projections' rounding (~1e-6) and the
    # float32 RoPE angles (position * inv_freq, ~1e-6 at these positions).
    assert_rel(got, want, 2e-5, mode)


def test_modes_agree_with_each_other(rng):
    sd = hf_state_dict(rng, SMALL)
    params = ds.params_from_hf(sd, SMALL)
    outs = {}
    for mode in ds.MODES:
        outs[mode] = run_scenario(params, sd, SMALL, jnp.float32, mode, np.random.default_rng(7))[0]
    # Same float32 inputs, different summation orders only.
    assert_rel(outs["latent"], outs["standard"], 5e-6, "latent vs standard")
    assert_rel(outs["hybrid"], outs["standard"], 5e-6, "hybrid vs standard")


@pytest.mark.parametrize(
    "seq, expected", [(1, "latent"), (3, "latent"), (4, "standard"), (9, "standard")]
)
def test_hybrid_switches_at_the_threshold(seq, expected):
    cfg = dataclasses.replace(SMALL, hybrid_threshold=4)
    params = ds.init_params(jax.random.PRNGKey(0), cfg)
    hlo = ATTN.lower(
        params,
        jnp.zeros((1, seq, cfg.hidden_size)),
        jnp.arange(seq, dtype=jnp.int32)[None],
        ds.init_cache(cfg, 1, 16, jnp.float16),
        cfg=cfg,
        mode="hybrid",
    ).as_text()
    targets = {"jax_mla_flash_mla": "latent", "jax_mla_flash_attention": "standard"}
    assert [mode for target, mode in targets.items() if target in hlo] == [expected]


def test_cache_rows_are_normalized_latent_and_roped_key(rng):
    sd = hf_state_dict(rng, SMALL)
    params = ds.params_from_hf(sd, SMALL)
    x = rng.standard_normal((1, 9, SMALL.hidden_size)).astype(np.float32)
    cache = ds.init_cache(SMALL, 1, MAX_LEN, jnp.float32)
    _, cache = ds.attention(
        params, jnp.asarray(x), jnp.arange(9, dtype=jnp.int32)[None], cache, SMALL, "latent"
    )
    r = SMALL.kv_lora_rank
    compressed = x[0].astype(np.float64) @ sd["kv_a_proj_with_mqa.weight"].T.astype(np.float64)
    c = compressed[:, :r]
    c = sd["kv_a_layernorm.weight"] * c / np.sqrt(np.mean(c * c, -1, keepdims=True) + 1e-6)
    _, k_pe = hf_attention(sd, SMALL, x[0])
    row = np.asarray(cache.kv[0, :9])
    assert_rel(row[:, :r], c, 1e-5, "c_kv")
    assert_rel(row[:, r:], k_pe, 1e-5, "k_pe (HF's de-interleaved layout)")
    assert not np.asarray(cache.kv[0, 9:]).any(), "rows past the written ones must stay empty"


def test_prefill_then_decode_equals_one_long_prefill(rng):
    cfg = SMALL
    params = ds.init_params(jax.random.PRNGKey(1), cfg)
    x = jnp.asarray(rng.standard_normal((2, 24, cfg.hidden_size)).astype(np.float32))
    positions = jnp.broadcast_to(jnp.arange(24, dtype=jnp.int32), (2, 24))
    # One prefill of 24 tokens: hybrid runs standard (24 >= 16).
    long, _ = ATTN(params, x, positions, ds.init_cache(cfg, 2, MAX_LEN, jnp.float32), cfg=cfg)
    # 20 tokens, then 4 decode steps: standard, then latent.
    cache = ds.init_cache(cfg, 2, MAX_LEN, jnp.float32)
    head, cache = ATTN(params, x[:, :20], positions[:, :20], cache, cfg=cfg)
    steps = []
    for t in range(20, 24):
        out, cache = ATTN(params, x[:, t : t + 1], positions[:, t : t + 1], cache, cfg=cfg)
        steps.append(out)
    assert_rel(jnp.concatenate([head] + steps, 1), long, 5e-6, "prefill + decode vs prefill")


# Cache formats: max |out - plain| / max |plain| allowed. Measured on this
# scenario over three seeds, standard mode: float32 4e-7, float16 2.6e-4,
# bfloat16 2.3e-3, q8_0 8e-3, q8_kv 1.0e-2, q6_0 3.7e-2; latent mode over the
# quantized kernels (a trial merge with the quant-kernels branch at 8b1d915,
# whose q8 kernels also round the queries to 8 bits): q8_0 9.0e-3, q8_kv
# 1.15e-2, q6_0 3.7e-2; fp8_e4m3 (every mode, seeds 0-2) 2.9e-2 to 3.8e-2.
# The bounds keep 2.6-8x headroom. The error comes from
# rounding the cached rows: c_kv is
# RMS-normalized, so its values are O(1) and each format's relative step
# (2^-11, 2^-8, 1/127 of the block's or row's max, 1/32 of the block's, 2^-4)
# sets it.
FORMAT_TOL = {
    "float16": 2e-3,
    "bfloat16": 1.5e-2,
    "q8_0": 3e-2,
    "q8_kv": 3e-2,
    "q6_0": 1e-1,
    "fp8_e4m3": 1e-1,
}


@pytest.mark.parametrize("fmt", list(FORMAT_TOL))
def test_cache_formats_within_tolerance(rng, fmt):
    sd = hf_state_dict(rng, SMALL)
    params = ds.params_from_hf(sd, SMALL)
    for mode in ds.MODES:
        got, want, cache = run_scenario(params, sd, SMALL, fmt, mode, np.random.default_rng(3))
        assert cache.fmt == fmt
        assert_rel(got, want, FORMAT_TOL[fmt], f"{fmt} {mode}")


def test_v2_lite_dims(rng):
    """The default config (V2-Lite: hidden 2048, 16 heads, latent 512, 192/128
    heads, the 576-wide row), a 16-token prefill and a decode step."""
    cfg = ds.MLAConfig()
    sd = hf_state_dict(rng, cfg)
    params = ds.params_from_hf(sd, cfg)
    x = rng.standard_normal((1, 17, cfg.hidden_size)).astype(np.float32)
    want = hf_attention(sd, cfg, x[0])[0]
    pos = jnp.arange(17, dtype=jnp.int32)[None]
    for mode in ("standard", "latent"):
        cache = ds.init_cache(cfg, 1, 32, jnp.float32)
        head, cache = ATTN(params, jnp.asarray(x[:, :16]), pos[:, :16], cache, cfg=cfg, mode=mode)
        tail, cache = ATTN(params, jnp.asarray(x[:, 16:]), pos[:, 16:], cache, cfg=cfg, mode=mode)
        assert_rel(np.concatenate([head[0], tail[0]]), want, 2e-5, mode)


def test_v3_preset_small_scale(rng):
    v3 = ds.MLAConfig.deepseek_v3()
    assert (
        v3.hidden_size,
        v3.num_heads,
        v3.q_lora_rank,
        v3.kv_lora_rank,
        v3.qk_nope_head_dim,
        v3.qk_rope_head_dim,
        v3.v_head_dim,
    ) == (7168, 128, 1536, 512, 128, 64, 128)
    assert (
        v3.yarn_factor,
        v3.original_max_position_embeddings,
        v3.beta_fast,
        v3.beta_slow,
        v3.mscale,
        v3.mscale_all_dim,
    ) == (40, 4096, 32, 1, 1.0, 1.0)
    cfg = dataclasses.replace(
        v3,
        hidden_size=96,
        num_heads=4,
        q_lora_rank=48,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=32,
        v_head_dim=32,
        kv_chunk=16,
    )
    sd = hf_state_dict(rng, cfg)
    params = ds.params_from_hf(sd, cfg)
    for mode in ds.MODES:
        got, want, _ = run_scenario(params, sd, cfg, jnp.float32, mode, np.random.default_rng(5))
        assert_rel(got, want, 2e-5, mode)


# ------------------------------------------------------------------ YaRN


def test_softmax_scales_match_the_models():
    # docs/design.md: about 0.115 for V2-Lite and 0.135 for V3.
    v2 = 192**-0.5 * (0.1 * 0.707 * math.log(40) + 1) ** 2
    v3 = 192**-0.5 * (0.1 * 1.0 * math.log(40) + 1) ** 2
    assert ds.MLAConfig().softmax_scale == pytest.approx(v2, rel=1e-12)
    assert ds.MLAConfig.deepseek_v3().softmax_scale == pytest.approx(v3, rel=1e-12)
    assert round(v2, 3) == 0.115 and round(v3, 3) == 0.135
    # Without YaRN (factor 1) the scale is 1/sqrt(192).
    assert ds.MLAConfig(yarn_factor=1.0).softmax_scale == pytest.approx(192**-0.5)


@pytest.mark.parametrize(
    "cfg",
    [ds.MLAConfig(), ds.MLAConfig.deepseek_v3(), SMALL, ds.MLAConfig(yarn_factor=1.0)],
    ids=["v2-lite", "v3", "small", "no-yarn"],
)
def test_yarn_matches_hf_formulas(cfg):
    inv_freq, cos, sin, scale = hf_yarn(cfg, 5000)
    np.testing.assert_allclose(ds.rope_inv_freq(cfg), inv_freq, rtol=1e-6)
    assert cfg.softmax_scale == pytest.approx(scale, rel=1e-12)
    assert ds.rope_mscale(cfg) == pytest.approx(cos[0, 0], rel=1e-12)
    # The rotation at a few positions, on interleaved pairs, against
    # de-interleave + rotate_half with HF's tables.
    positions = np.array([[0, 1, 17, 4095, 4999]])
    x = np.random.default_rng(0).standard_normal((1, 5, cfg.qk_rope_head_dim)).astype(np.float32)
    got = ds._rope(jnp.asarray(x), jnp.asarray(positions, jnp.int32), cfg)
    half = cfg.qk_rope_head_dim // 2
    xd = x.astype(np.float64).reshape(1, 5, half, 2).swapaxes(-1, -2).reshape(x.shape)
    rot = np.concatenate([-xd[..., half:], xd[..., :half]], -1)
    want = xd * cos[positions] + rot * sin[positions]
    # float32 angles at position 5000: about 5000 * 2^-24 rad of error.
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-3, rtol=0)


def test_yarn_correction_range_of_v2_lite():
    # dim 64, base 10000, 4096 original positions: dims 10..23 are blended.
    assert ds.yarn_find_correction_range(32, 1, 64, 10000, 4096) == (10, 23)
    ramp = ds.yarn_linear_ramp_mask(10, 23, 32)
    assert ramp[10] == 0 and ramp[23] == 1 and 0 < ramp[16] < 1
    np.testing.assert_array_equal(ds.yarn_linear_ramp_mask(3, 3, 6), [0, 0, 0, 0, 1, 1])
    assert ds.yarn_get_mscale(1.0, 0.707) == 1.0


# ------------------------------------------------------------------ jit, donation, decode loop


def test_jit_with_donated_cache_and_one_compile(rng):
    cfg = SMALL
    params = ds.init_params(jax.random.PRNGKey(0), cfg)
    step = jax.jit(ds.attention, static_argnames=("cfg", "mode"), donate_argnames=("cache",))
    cache = ds.init_cache(cfg, 2, MAX_LEN, "q8_kv")
    x = jnp.asarray(rng.standard_normal((2, 20, cfg.hidden_size)).astype(np.float32))
    undonated, _ = ATTN(
        params,
        x[:, :18],
        jnp.arange(18, dtype=jnp.int32)[None].repeat(2, 0),
        ds.init_cache(cfg, 2, MAX_LEN, "q8_kv"),
        cfg=cfg,
        mode="standard",
    )
    out, cache = step(
        params,
        x[:, :18],
        jnp.arange(18, dtype=jnp.int32)[None].repeat(2, 0),
        cache,
        cfg=cfg,
        mode="standard",
    )
    assert_rel(out, undonated, 1e-6, "donated vs not")
    old = cache
    for t in (18, 19):
        _, cache = step(
            params, x[:, t : t + 1], jnp.full((2, 1), t, jnp.int32), cache, cfg=cfg, mode="standard"
        )
    assert old.kv.qs.is_deleted(), "the donated cache must be reused, not copied"
    assert step._cache_size() == 2  # the prefill shape and the decode shape
    np.testing.assert_array_equal(np.asarray(cache.length), [20, 20])


def test_decode_loop_matches_step_by_step(rng):
    cfg = SMALL
    params = ds.init_params(jax.random.PRNGKey(2), cfg)
    prompt = jnp.asarray(rng.standard_normal((2, 17, cfg.hidden_size)).astype(np.float32))
    loop = jax.jit(
        ds.decode_loop,
        static_argnames=("cfg", "steps", "mode", "next_input"),
        donate_argnames=("cache",),
    )
    head, ys, cache = loop(params, prompt, ds.init_cache(cfg, 2, MAX_LEN, jnp.float32), cfg, 5)
    assert ys.shape == (2, 5, cfg.hidden_size)
    np.testing.assert_array_equal(np.asarray(cache.length), [22, 22])
    # The same by hand: prefill, then each step's input the renormalized output.
    c = ds.init_cache(cfg, 2, MAX_LEN, jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(17, dtype=jnp.int32), (2, 17))
    out, c = ATTN(params, prompt, pos, c, cfg=cfg)
    assert_rel(head, out, 1e-6, "prefill")
    x = out[:, -1:]
    for t in range(5):
        x = x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
        x, c = ATTN(params, x, jnp.full((2, 1), 17 + t, jnp.int32), c, cfg=cfg)
        # Fed back through 5 steps: float32 rounding of differently fused code.
        assert_rel(ys[:, t], x[:, 0], 1e-4, f"step {t}")


def test_generate_continues_each_row_at_its_length(rng):
    cfg = SMALL
    params = ds.init_params(jax.random.PRNGKey(3), cfg)
    cache = ds.init_cache(cfg, 2, MAX_LEN, jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, 4, cfg.hidden_size)).astype(np.float32))
    _, cache = ds.attention(
        params, x, jnp.asarray([[0, 1, 2, 3], [5, 6, 7, 8]], jnp.int32), cache, cfg
    )
    ys, cache = ds.generate(params, x[:, :1], cache, cfg, 3, next_input=lambda y: y)
    np.testing.assert_array_equal(np.asarray(cache.length), [7, 12])
    assert np.isfinite(np.asarray(ys)).all()


@pytest.mark.parametrize("mode", ["standard", "latent"])
def test_workspace_does_not_grow_with_the_cache(mode):
    """Standard mode decompresses kv_chunk rows at a time and latent mode reads
    the cache in place (no V slice, no upcast copy): the compiled decode's
    temporary memory is the same for a 4x longer cache, and smaller than the
    cache."""
    cfg = dataclasses.replace(SMALL, kv_chunk=64)
    params = ds.init_params(jax.random.PRNGKey(0), cfg)

    def temp_bytes(max_len):
        cache = jax.eval_shape(lambda: ds.init_cache(cfg, 1, max_len, jnp.float16))
        fn = jax.jit(ds.attention, static_argnames=("cfg", "mode"), donate_argnames=("cache",))
        compiled = fn.lower(
            params,
            jax.ShapeDtypeStruct((1, 1, cfg.hidden_size), jnp.float32),
            jax.ShapeDtypeStruct((1, 1), jnp.int32),
            cache,
            cfg=cfg,
            mode=mode,
        ).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(4096), temp_bytes(16384)
    assert small == large
    assert large < ds.kv_bytes_per_token(cfg, "float16") * 4096


# ------------------------------------------------------------------ Hugging Face weights


@pytest.mark.parametrize("cfg", [SMALL, SMALL_LORA], ids=["no-q-lora", "q-lora"])
def test_params_from_hf_layout(rng, cfg):
    sd = hf_state_dict(rng, cfg, prefix="model.layers.3.self_attn.")
    sd["model.layers.3.mlp.gate_proj.weight"] = np.zeros((8, 8), np.float32)  # ignored
    params = ds.params_from_hf(sd, cfg)
    assert set(params) == set(ds.param_shapes(cfg))
    kv_b = sd["model.layers.3.self_attn.kv_b_proj.weight"].reshape(
        cfg.num_heads, -1, cfg.kv_lora_rank
    )
    n = cfg.qk_nope_head_dim
    np.testing.assert_array_equal(params["w_uk"], kv_b[:, :n])
    np.testing.assert_array_equal(params["w_uv"], kv_b[:, n:])
    np.testing.assert_array_equal(params["wo"], sd["model.layers.3.self_attn.o_proj.weight"].T)


def test_params_from_hf_torch_tensors(rng):
    """torch tensors (bfloat16 included) load like numpy arrays. Runs only
    where torch is installed; CI has none, the GPU machine does."""
    try:
        import torch
    except ImportError:
        return
    sd = hf_state_dict(rng, SMALL_LORA)
    from_numpy = ds.params_from_hf(sd, SMALL_LORA)
    from_torch = ds.params_from_hf({k: torch.from_numpy(x) for k, x in sd.items()}, SMALL_LORA)
    for name in from_numpy:
        np.testing.assert_array_equal(from_torch[name], from_numpy[name])
    bf16 = ds.params_from_hf({k: torch.from_numpy(x).bfloat16() for k, x in sd.items()}, SMALL_LORA)
    assert_rel(bf16["wq_b"], from_numpy["wq_b"], 1e-2, "bfloat16 tensors")


def _without(sd, name):
    return {k: x for k, x in sd.items() if k != name}


def test_params_from_hf_errors(rng):
    sd = hf_state_dict(rng, SMALL)
    lora_sd = hf_state_dict(rng, SMALL_LORA)
    with pytest.raises(
        ValueError,
        match=r"missing tensor 'kv_b_proj.weight' \(expected shape "
        r"\(256, 64\)\)",
    ):
        ds.params_from_hf(_without(sd, "kv_b_proj.weight"), SMALL)
    with pytest.raises(ValueError, match="missing tensor 'q_a_layernorm.weight'"):
        ds.params_from_hf(_without(lora_sd, "q_a_layernorm.weight"), SMALL_LORA)
    bad = dict(sd, **{"o_proj.weight": np.zeros((64, 100), np.float32)})
    with pytest.raises(
        ValueError,
        match=r"'o_proj.weight' must have shape \(64, 128\), got "
        r"\(64, 100\)",
    ):
        ds.params_from_hf(bad, SMALL)
    with pytest.raises(
        ValueError, match="have q_proj.weight and no q_a_proj.weight.*q_lora_rank=None"
    ):
        ds.params_from_hf(sd, SMALL_LORA)
    with pytest.raises(ValueError, match="q_lora_rank is None but the tensors have q_a_proj"):
        ds.params_from_hf(lora_sd, SMALL)
    two = dict(sd, **{"layers.1.kv_b_proj.weight": sd["kv_b_proj.weight"]})
    with pytest.raises(ValueError, match="several tensors match 'kv_b_proj.weight'"):
        ds.params_from_hf(two, SMALL)
    with pytest.raises(
        TypeError, match="'o_proj.weight' must be a numpy array or torch tensor, got list"
    ):
        ds.params_from_hf(dict(sd, **{"o_proj.weight": [[0.0]]}), SMALL)


# ------------------------------------------------------------------ error paths


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_heads", 0, "num_heads must be a positive int, got 0"),
        ("kv_lora_rank", 1.5, "kv_lora_rank must be a positive int, got 1.5"),
        ("q_lora_rank", 0, "q_lora_rank must be a positive int, got 0"),
        ("qk_rope_head_dim", 33, "qk_rope_head_dim must be even"),
        ("yarn_factor", 0.0, "yarn_factor must be a positive number, got 0.0"),
        ("hybrid_threshold", True, "hybrid_threshold must be a positive int, got True"),
    ],
)
def test_config_errors(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ds.MLAConfig(**{field: value})


def test_from_hf_config():
    # DeepSeek-V2-Lite's config.json, attention fields.
    config = {
        "hidden_size": 2048,
        "num_attention_heads": 16,
        "q_lora_rank": None,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "rope_theta": 10000,
        "rms_norm_eps": 1e-6,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
    }
    assert ds.MLAConfig.from_hf_config(config) == ds.MLAConfig()
    plain = ds.MLAConfig.from_hf_config(dict(config, rope_scaling=None))
    assert plain.yarn_factor == 1.0 and plain.softmax_scale == pytest.approx(192**-0.5)


def test_from_hf_config_names_what_is_missing():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "from_hf_config: config lacks 'hidden_size', 'num_attention_heads', 'kv_lora_rank', "
            "'qk_nope_head_dim', 'qk_rope_head_dim', 'v_head_dim' (keys of a DeepSeek-V2/V3 "
            "config.json); it has no keys"
        ),
    ):
        ds.MLAConfig.from_hf_config({})
    config = dict(
        hidden_size=2048,
        num_attention_heads=16,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
    )
    with pytest.raises(
        ValueError,
        match=re.escape(
            "config lacks 'v_head_dim' (keys of a DeepSeek-V2/V3 config.json); it has ['hidden"
        ),
    ):
        ds.MLAConfig.from_hf_config(config)
    with pytest.raises(TypeError, match="config must be a dict .*, got str"):
        ds.MLAConfig.from_hf_config("config.json")


def test_init_cache_errors_and_sizes():
    cfg = ds.MLAConfig()
    for fmt, per_token in (
        ("float16", 1152),
        ("bfloat16", 1152),
        ("float32", 2304),
        ("q8_0", 612),
        ("q8_kv", 580),
        ("q6_0", 468),
        ("fp8_e4m3", 580),
    ):
        assert ds.kv_bytes_per_token(cfg, fmt) == per_token
        cache = ds.init_cache(cfg, 2, 8, fmt)
        assert cache.fmt == fmt and cache.max_len == 8
        assert cache.length.dtype == jnp.int32 and not cache.length.any()
        leaves = jax.tree_util.tree_leaves(cache.kv)
        assert sum(x.nbytes for x in leaves) == 2 * 8 * per_token
    for short, dtype in (("f16", "float16"), ("bf16", "bfloat16"), ("f32", "float32")):
        assert ds.kv_bytes_per_token(cfg, short) == ds.kv_bytes_per_token(cfg, dtype)
        assert ds.init_cache(cfg, 1, 8, short).fmt == dtype
    with pytest.raises(
        ValueError,
        match=re.escape(
            "init_cache: fmt must be a float dtype (f32, "
            "f16, bf16 or that numpy dtype) or one of q8_0, "
            "q8_kv, q6_0, fp8_e4m3, got 'q4_0'"
        ),
    ):
        ds.init_cache(cfg, 1, 8, "q4_0")
    for bad in (np.int8, "f64", np.float64):
        with pytest.raises(
            ValueError, match=f"fmt must be a float dtype .* got {re.escape(repr(bad))}"
        ):
            ds.init_cache(cfg, 1, 8, bad)
    with pytest.raises(ValueError, match="max_len must be a positive int, got 0"):
        ds.init_cache(cfg, 1, 0, "q8_0")
    odd = dataclasses.replace(SMALL, kv_lora_rank=48)
    with pytest.raises(
        ValueError, match="q6_0 needs kv_lora_rank and the row width to be multiples of 32"
    ):
        ds.init_cache(odd, 1, 8, "q6_0")
    ds.init_cache(odd, 1, 8, "q8_kv")  # one scale per row: any width


def _call(**changes):
    cfg = changes.pop("cfg", SMALL)
    args = dict(
        params=ds.init_params(jax.random.PRNGKey(0), SMALL),
        x=jnp.zeros((2, 3, SMALL.hidden_size)),
        positions=jnp.asarray([[0, 1, 2], [4, 5, 6]], jnp.int32),
        cache=ds.init_cache(SMALL, 2, 8, jnp.float32),
        mode="hybrid",
    )
    args.update(changes)
    return ds.attention(
        args["params"], args["x"], args["positions"], args["cache"], cfg, args["mode"]
    )


def test_attention_errors():
    params = ds.init_params(jax.random.PRNGKey(0), SMALL)
    cases = [
        (dict(cfg=dict(hidden_size=64)), TypeError, "cfg must be an MLAConfig, got dict"),
        (
            dict(mode="absorbed"),
            ValueError,
            "mode must be one of standard, latent, hybrid, got 'absorbed'",
        ),
        (dict(params=[1]), TypeError, "params must be the dict of init_params"),
        (
            dict(params={k: x for k, x in params.items() if k != "w_uv"}),
            ValueError,
            "params lack 'w_uv' (expected shape (4, 32, 64)",
        ),
        (
            dict(params=dict(params, wo=params["wo"][:64])),
            ValueError,
            "params['wo'] must have shape (128, 64), got (64, 64)",
        ),
        (dict(cfg=SMALL_LORA), ValueError, "params lack 'wq_a'"),
        (
            dict(x=jnp.zeros((2, 3, 64), jnp.int32)),
            TypeError,
            "x must be a float array [B, S, 64], got int32",
        ),
        (
            dict(x=jnp.zeros((2, 3, 32))),
            ValueError,
            "x must have shape [B, S >= 1, 64], got (2, 3, 32)",
        ),
        (
            dict(cache=jnp.zeros((2, 8, 96))),
            TypeError,
            "cache must be a LatentCache (init_cache), got ArrayImpl",
        ),
        (
            dict(cache=ds.init_cache(SMALL, 1, 8, jnp.float32)),
            ValueError,
            "cache must have shape (B, Smax, 96) with B = 2 like x, got (1, 8, 96)",
        ),
        (
            dict(positions=jnp.zeros((2, 3))),
            TypeError,
            "positions must be an int32 array [B, S], got float32",
        ),
        (
            dict(positions=jnp.zeros((2, 1), jnp.int32)),
            ValueError,
            "positions must have shape (2, 3) (x's [B, S]), got (2, 1)",
        ),
        (
            dict(positions=jnp.asarray([[0, 1, 2], [4, 6, 7]], jnp.int32)),
            ValueError,
            "each row's positions must be consecutive (p, p + 1, ...), got [4, 6, 7]",
        ),
        (
            dict(positions=jnp.asarray([[0, 1, 2], [6, 7, 8]], jnp.int32)),
            ValueError,
            "positions must lie in [0, 8) (the cache's max_len), got 8",
        ),
    ]
    for changes, error, message in cases:
        with pytest.raises(error, match=re.escape(message)):
            _call(**changes)
    with pytest.raises(
        ValueError, match=re.escape("x must have shape [B, 1, hidden], got (2, 3, 64)")
    ):
        ds.generate(
            params, jnp.zeros((2, 3, 64)), ds.init_cache(SMALL, 2, 8, jnp.float32), SMALL, 2
        )


def test_traced_positions_outside_the_cache_are_dropped(rng):
    """Under jit positions cannot be checked: writes outside the cache are
    dropped (cache_update's rule) and never wrap around."""
    params = ds.init_params(jax.random.PRNGKey(0), SMALL)
    step = jax.jit(ds.attention, static_argnames=("cfg", "mode"))
    cache = ds.init_cache(SMALL, 1, 8, jnp.float32)
    x = jnp.asarray(rng.standard_normal((1, 2, SMALL.hidden_size)).astype(np.float32))
    out, cache = step(params, x, jnp.asarray([[7, 8]], jnp.int32), cache, cfg=SMALL, mode="latent")
    kv = np.asarray(cache.kv)
    assert kv[0, 7].any() and not kv[0, :7].any()
    assert np.isfinite(np.asarray(out)).all()
    # ... and never silently: the row is flagged, its length stays inside the cache.
    assert cache.overflow.tolist() == [True] and cache.length.tolist() == [8]
    _, fine = step(
        params,
        x,
        jnp.asarray([[3, 4]], jnp.int32),
        ds.init_cache(SMALL, 1, 8, "f32"),
        cfg=SMALL,
        mode="latent",
    )
    assert fine.overflow.tolist() == [False] and fine.length.tolist() == [5]


def test_decode_past_the_cache_capacity_is_never_silent(rng):
    """decode_loop / generate refuse steps that cannot fit (the shapes or a
    concrete length say so); with a traced length, the row is flagged."""
    params = ds.init_params(jax.random.PRNGKey(0), SMALL)
    prompt = jnp.asarray(rng.standard_normal((1, 4, SMALL.hidden_size)).astype(np.float32))
    loop = jax.jit(ds.decode_loop, static_argnames=("cfg", "steps", "mode", "next_input"))
    with pytest.raises(
        ValueError,
        match=re.escape("decode_loop: 4 prompt tokens + 5 steps do not fit a cache of max_len 8"),
    ):
        loop(params, prompt, ds.init_cache(SMALL, 1, 8, "f32"), SMALL, 5)
    _, cache = ds.attention(
        params,
        prompt,
        jnp.arange(4, dtype=jnp.int32)[None],
        ds.init_cache(SMALL, 1, 8, "f32"),
        SMALL,
    )
    with pytest.raises(
        ValueError,
        match=re.escape(
            "generate: 5 steps after the 4 tokens already "
            "in the cache need 9 rows, more than its "
            "max_len 8"
        ),
    ):
        ds.generate(params, prompt[:, :1], cache, SMALL, 5)
    # Under jit the length is traced: the step past the end is dropped and flagged.
    gen = jax.jit(ds.generate, static_argnames=("cfg", "steps", "mode", "next_input"))
    _, full = gen(params, prompt[:, :1], cache, SMALL, 4)
    assert full.length.tolist() == [8] and full.overflow.tolist() == [False]
    _, over = gen(params, prompt[:, :1], full, SMALL, 1)
    assert over.length.tolist() == [8] and over.overflow.tolist() == [True]
