"""jax_mla.deepseek in bfloat16 and float16 (activations, parameters, caches),
on the CPU and, under pytest -m gpu, on a CUDA device: every mode over float
and 8-bit caches through prefill, decode and rows at different lengths,
decode_loop, self_attention and its gradient, against the float64 plain math
of tests/test_deepseek.py evaluated on the same rounded parameters and inputs
(so only the layer's own roundings count)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_mla import deepseek as ds

from .conftest import PLATFORMS
from .test_deepseek import ATTN, CALLS, MAX_LEN, assert_rel, hf_attention, hf_state_dict

# DeepSeek's own head dims, which the CUDA kernels take (latent row 576 with
# V its first 512 columns; standard 192/128), at a small width: 2 heads,
# hidden 64. YaRN with mscale != mscale_all_dim as in tests/test_deepseek.py,
# a KV chunk of 16 (standard mode: two chunks and a tail on a 40-token cache)
# and a hybrid threshold of 4 (hybrid runs CALLS' 8- and 4-token calls in
# standard mode, the 1-token call in latent mode).
CFG = ds.MLAConfig(
    hidden_size=64,
    num_heads=2,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    mscale=1.0,
    mscale_all_dim=0.8,
    original_max_position_embeddings=64,
    kv_chunk=16,
    hybrid_threshold=4,
)
HALF = ["bfloat16", "float16"]


def on_platforms(cases: list[tuple], on_cpu: list[tuple]) -> list:
    """(platform, *case) parameters: every case on the GPU (marked gpu, when one
    is visible), the on_cpu ones on the CPU too, whose kernels' half-precision
    paths tests/test_attention.py and tests/test_mla.py cover (CI time)."""
    params = []
    for platform in PLATFORMS:
        name = platform.values[0]
        for case in cases if name != "cpu" else on_cpu:
            case_id = "-".join(map(str, case))
            params.append(pytest.param(name, *case, marks=platform.marks, id=f"{name}-{case_id}"))
    return params


# Tolerances, as multiples of the machine epsilon of the lowest precision in
# the call (2^-7 for bfloat16, 2^-10 for float16), relative to the largest
# element of the result. The layer rounds the projections' results, q, the
# cache rows, K and V (standard mode) and the attention's output to that type,
# each by up to half an epsilon; the score error that q and K carry moves the
# softmax weights by about as much again, and on the GPU the kernel also
# rounds P (half an epsilon more). Measured on the CPU over two seeds: up to
# 0.76 eps over float caches, 0.51 for decode_loop, 0.5 for self_attention;
# gradients up to 1.46 eps from the float32 layer's. EPS_TOL = 4 keeps 2.7x
# headroom over the largest.
EPS_TOL = 4.0
# 8-bit caches add their own rounding of the cached rows, which dominates:
# tests/test_deepseek.py's FORMAT_TOL bound, 3e-2 (measured here up to
# 1.33e-2 for bf16 over q8_0 and 1.55e-2 for f16 over q8_kv), on top.
FORMAT_TOL = {"q8_0": 3e-2, "q8_kv": 3e-2}


def eps(*dtypes) -> float:
    return max(float(jnp.finfo(jnp.dtype(d)).eps) for d in dtypes)


def rounded(x, dtype) -> np.ndarray:
    """x rounded to dtype, as float64."""
    return np.asarray(jnp.asarray(x).astype(dtype).astype(jnp.float32), np.float64)


def half_params(rng, dtype):
    """(params in dtype, the Hugging Face tensors they hold, as float64)."""
    sd = hf_state_dict(rng, CFG)
    return ds.params_from_hf(sd, CFG, dtype), {k: rounded(v, dtype) for k, v in sd.items()}


# (activations, parameters, cache): uniform half precision over float and
# 8-bit caches; and float32 parameters with bfloat16 activations over a
# float16 cache, where the attention's q takes the cache's dtype.
CASES = [
    ("bfloat16", "bfloat16", "bfloat16"),
    ("float16", "float16", "float16"),
    ("bfloat16", "float32", "float16"),
    ("bfloat16", "bfloat16", "q8_0"),
    ("float16", "float16", "q8_kv"),
]


@pytest.mark.parametrize(
    "platform, x_dtype, p_dtype, fmt",
    on_platforms(CASES, [CASES[0], CASES[2], CASES[3]]),
    indirect=["platform"],
)
def test_every_mode_matches_plain_math(platform, rng, x_dtype, p_dtype, fmt):
    """CALLS (tests/test_deepseek.py): an 8-token prefill of two rows, 4 more
    tokens with row 1 rewound over stale slots, a 1-token decode. Hybrid mode
    runs the same calls as the other two, so on the CPU (CI time) it is left to
    tests/test_deepseek.py's float32 tests."""
    params, sd = half_params(rng, p_dtype)
    float_fmt = fmt not in FORMAT_TOL
    tol = EPS_TOL * eps(x_dtype, fmt if float_fmt else x_dtype) + FORMAT_TOL.get(fmt, 0.0)
    for mode in ds.MODES if platform != "cpu" else ("standard", "latent"):
        cache = ds.init_cache(CFG, 2, MAX_LEN, fmt)
        history = [np.zeros((0, CFG.hidden_size)) for _ in range(2)]
        got, want = [], []
        for starts, seq in CALLS:
            x = jnp.asarray(rng.standard_normal((2, seq, CFG.hidden_size)), x_dtype)
            positions = jnp.asarray(starts[:, None] + np.arange(seq), jnp.int32)
            out, cache = ATTN(params, x, positions, cache, cfg=CFG, mode=mode)
            assert out.dtype == jnp.dtype(x_dtype) and cache.fmt == fmt
            for b in range(2):
                history[b] = np.concatenate([history[b][: starts[b]], rounded(x[b], x_dtype)])
                got.append(np.asarray(out[b].astype(jnp.float32)))
                want.append(hf_attention(sd, CFG, history[b])[0][-seq:])
        np.testing.assert_array_equal(np.asarray(cache.length), [13, 7])
        assert_rel(np.concatenate(got), np.concatenate(want), tol, f"{fmt} {mode}")


def renorm(y):
    """The next step's input: the output RMS-normalized in float32, in y's dtype."""
    yf = y.astype(jnp.float32)
    return (yf * jax.lax.rsqrt(jnp.mean(yf * yf, -1, keepdims=True) + 1e-6)).astype(y.dtype)


@pytest.mark.parametrize(
    "platform, dtype", on_platforms([(d,) for d in HALF], [("bfloat16",)]), indirect=["platform"]
)
def test_decode_loop_matches_plain_math(platform, rng, dtype):
    """decode_loop (hybrid: a standard prefill, latent steps in lax.scan) against
    the plain math on the inputs the loop fed itself."""
    params, sd = half_params(rng, dtype)
    loop = jax.jit(
        ds.decode_loop,
        static_argnames=("cfg", "steps", "mode", "next_input"),
        donate_argnames=("cache",),
    )
    prompt = jnp.asarray(rng.standard_normal((2, 6, CFG.hidden_size)), dtype)
    steps = 3
    head, ys, cache = loop(
        params, prompt, ds.init_cache(CFG, 2, 16, dtype), CFG, steps, next_input=renorm
    )
    assert head.dtype == ys.dtype == cache.kv.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(cache.length), [9, 9])
    inputs = jnp.concatenate(
        [prompt, jax.jit(renorm)(head[:, -1:]), jax.jit(renorm)(ys[:, :-1])], 1
    )
    got = np.concatenate([np.asarray(head, np.float64), np.asarray(ys, np.float64)], 1)
    for b in range(2):
        want = hf_attention(sd, CFG, rounded(inputs[b], dtype))[0]
        assert_rel(got[b], want, EPS_TOL * eps(dtype), f"row {b}")


SELF_CASES = [(d, m) for d in HALF for m in ("standard", "latent")]


@pytest.mark.parametrize(
    "platform, dtype, mode",
    on_platforms(SELF_CASES, [("bfloat16", "standard"), ("float16", "latent")]),
    indirect=["platform"],
)
def test_self_attention_and_its_gradient(platform, rng, dtype, mode):
    """self_attention against the plain math, and its gradient in params and x
    against the float32 layer's at the same (rounded) values."""
    params, sd = half_params(rng, dtype)
    x = jnp.asarray(rng.standard_normal((1, 9, CFG.hidden_size)), dtype)
    w = jnp.asarray(rng.standard_normal((1, 9, CFG.hidden_size)), jnp.float32)
    out = jax.jit(ds.self_attention, static_argnames=("cfg", "mode"))(params, x, cfg=CFG, mode=mode)
    assert out.dtype == jnp.dtype(dtype)
    assert_rel(out, hf_attention(sd, CFG, rounded(x[0], dtype))[0][None], EPS_TOL * eps(dtype))

    @jax.jit
    def grads(params, x, w):
        def loss(params, x):
            return jnp.sum(ds.self_attention(params, x, CFG, mode).astype(jnp.float32) * w)

        return jax.grad(loss, argnums=(0, 1))(params, x)

    got = grads(params, x, w)
    # The float32 layer on the CPU: the CUDA kernels take no float32 queries.
    cpu = jax.devices("cpu")[0]
    f32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), (params, x, w))
    with jax.default_device(cpu):
        want = grads(*jax.device_put(f32, cpu))
    for (path, g), (_, ref) in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves_with_path(want)
    ):
        name = jax.tree_util.keystr(path)
        assert g.dtype == jnp.dtype(dtype), name
        assert_rel(g, ref, EPS_TOL * eps(dtype), f"d{name}")


def test_integer_params_are_refused():
    params = ds.init_params(jax.random.PRNGKey(0), CFG, jnp.bfloat16)
    params["wo"] = params["wo"].astype(jnp.int32)
    x = jnp.zeros((1, 1, CFG.hidden_size), jnp.bfloat16)
    cache = ds.init_cache(CFG, 1, 4, jnp.bfloat16)
    with pytest.raises(TypeError, match=r"params\['wo'\] must be float32, bfloat16 or float16"):
        ds.attention(params, x, jnp.zeros((1, 1), jnp.int32), cache, CFG)
