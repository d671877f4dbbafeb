"""The DeepSeek-V2/V3 MLA attention layer built on jax_mla's ops.

One attention layer of DeepSeek-V2 / V3 (multi-head latent attention), as the
Hugging Face reference code defines it, over one latent KV cache that all
three execution modes share:

  standard  decompresses the cached latent rows into per-head K (nope 128 +
            rope 64 = 192) and V (128) chunk by chunk and calls
            jax_mla.flash_attention on each chunk, merging the chunks by their
            log-sum-exp (ik_llama.cpp's -mla 0 math; its memory stays bounded
            by the chunk, like ik_llama.cpp's -amb).
  latent    absorbs the K up-projection into the queries (576-wide latent
            queries) and the V up-projection after the output, and calls
            jax_mla.flash_mla over the cache itself (dv 512, v_offset 0)
            (ik_llama.cpp's -mla 1/2).
  hybrid    standard when a call has at least MLAConfig.hybrid_threshold new
            tokens (prefill), latent below it (decode): ik_llama.cpp's -mla 3.

Letters: B batch, S new tokens in a call, Smax cache capacity, H heads,
r kv_lora_rank (512), n qk_nope_head_dim (128), p qk_rope_head_dim (64),
v v_head_dim (128).

Precision: the projections run in the params' dtype (accumulated in
float32, rounded to that dtype), RMSNorm and RoPE in float32; q (and in standard mode the
decompressed K and V) is rounded to the activation dtype, or, for bfloat16
or float16 activations over a float cache of another dtype, to the cache's
(the CUDA kernels take one dtype for q and a float cache); the output has
x's dtype.

The cache row of a token is [c_kv (r, after kv_a_layernorm) | k_pe (p, after
RoPE)], so V in latent space is the first r columns (v_offset = 0).
The cache is contiguous ([B, Smax, r + p]) or paged: a pool of pages shared
by the rows, each row's pages listed in its block table (init_paged_cache,
jax_mla.PageAllocator); every mode reads either.

RoPE follows the released checkpoints: the rope part of q and k holds
interleaved pairs (x[2i], x[2i+1]); like the Hugging Face code, which
de-interleaves before rotate_half, the rotated vector is stored
de-interleaved: [x0', x2', ..., x1', x3', ...]. Queries and keys use the same
layout, so scores do not depend on it. YaRN is the reference's: inverse
frequencies blended between extrapolation and interpolation by a linear ramp
over the correction range, cos/sin multiplied by
mscale(factor, mscale) / mscale(factor, mscale_all_dim), and the softmax
scale by mscale(factor, mscale_all_dim)^2.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

import jax_mla
from jax_mla._checks import PAGE_SIZES
from jax_mla.quant import BLOCK_FORMATS, FORMATS, QuantizedKV, cache_float_dtype

__all__ = [
    "MLAConfig",
    "LatentCache",
    "MODES",
    "attention",
    "self_attention",
    "init_cache",
    "init_paged_cache",
    "init_params",
    "params_from_hf",
    "param_shapes",
    "decode_loop",
    "generate",
    "rope_inv_freq",
    "rope_mscale",
    "yarn_get_mscale",
    "yarn_find_correction_range",
    "yarn_linear_ramp_mask",
    "kv_bytes_per_token",
]

MODES = ("standard", "latent", "hybrid")
# The config.json keys from_hf_config cannot default.
HF_REQUIRED_KEYS = (
    "hidden_size",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
)


# ------------------------------------------------------------------ configuration


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Shapes and RoPE/YaRN settings of one DeepSeek MLA attention layer.

    The defaults are DeepSeek-V2-Lite's; MLAConfig.deepseek_v3() is V3's (and
    R1's). Frozen and hashable, so it can be a static argument of jax.jit.
    hybrid_threshold: hybrid mode runs standard for calls of at least this
    many new tokens, latent below. kv_chunk: keys per chunk that standard mode
    decompresses at a time (its workspace is about kv_chunk * H * (n + p + v)
    floats).
    """

    hidden_size: int = 2048
    num_heads: int = 16
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    yarn_factor: float = 40.0  # 1.0: plain RoPE (no rope_scaling)
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.707
    mscale_all_dim: float = 0.707
    rms_norm_eps: float = 1e-6
    hybrid_threshold: int = 16
    kv_chunk: int = 2048

    def __post_init__(self):
        ints = [
            "hidden_size",
            "num_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "original_max_position_embeddings",
            "hybrid_threshold",
            "kv_chunk",
        ]
        if self.q_lora_rank is not None:
            ints.append("q_lora_rank")
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"MLAConfig: {name} must be a positive int, got {value!r}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"MLAConfig: qk_rope_head_dim must be even (RoPE rotates pairs), "
                f"got {self.qk_rope_head_dim}"
            )
        for name in ("rope_theta", "yarn_factor", "rms_norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or not value > 0:
                raise ValueError(f"MLAConfig: {name} must be a positive number, got {value!r}")

    @classmethod
    def deepseek_v3(cls, **overrides) -> MLAConfig:
        """DeepSeek-V3 / R1: hidden 7168, 128 heads, q LoRA rank 1536, the same
        latent and head dims as V2-Lite, YaRN factor 40 with mscale 1.0."""
        values = dict(
            hidden_size=7168, num_heads=128, q_lora_rank=1536, mscale=1.0, mscale_all_dim=1.0
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_hf_config(cls, config: dict, **overrides) -> MLAConfig:
        """From a Hugging Face DeepSeek-V2/V3 config.json (as a dict)."""
        if not isinstance(config, Mapping):
            raise TypeError(
                f"MLAConfig.from_hf_config: config must be a dict (config.json), "
                f"got {type(config).__name__}"
            )
        missing = [k for k in HF_REQUIRED_KEYS if k not in config]
        if missing:
            raise ValueError(
                f"MLAConfig.from_hf_config: config lacks {', '.join(map(repr, missing))} "
                f"(keys of a DeepSeek-V2/V3 config.json); it has "
                f"{sorted(config) or 'no keys'}"
            )
        rope = config.get("rope_scaling") or {}
        values = dict(
            hidden_size=config["hidden_size"],
            num_heads=config["num_attention_heads"],
            q_lora_rank=config.get("q_lora_rank"),
            kv_lora_rank=config["kv_lora_rank"],
            qk_nope_head_dim=config["qk_nope_head_dim"],
            qk_rope_head_dim=config["qk_rope_head_dim"],
            v_head_dim=config["v_head_dim"],
            rope_theta=float(config.get("rope_theta", 10000.0)),
            yarn_factor=float(rope.get("factor", 1.0)),
            original_max_position_embeddings=rope.get("original_max_position_embeddings", 4096),
            beta_fast=float(rope.get("beta_fast", 32)),
            beta_slow=float(rope.get("beta_slow", 1)),
            mscale=float(rope.get("mscale", 1)),
            mscale_all_dim=float(rope.get("mscale_all_dim", 0)),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        )
        values.update(overrides)
        return cls(**values)

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width in standard mode (192)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_dim(self) -> int:
        """Width of a latent cache row, kv_lora_rank + rope dim (576)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(n + p), times mscale(factor, mscale_all_dim)^2 under YaRN."""
        scale = self.qk_head_dim**-0.5
        if self.mscale_all_dim:
            m = yarn_get_mscale(self.yarn_factor, self.mscale_all_dim)
            scale *= m * m
        return scale


# ------------------------------------------------------------------ YaRN / RoPE


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """0.1 * mscale * ln(scale) + 1 for scale > 1, else 1 (the HF reference)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_find_correction_dim(num_rotations, dim, base, max_position_embeddings) -> float:
    return (dim * math.log(max_position_embeddings / (num_rotations * 2 * math.pi))) / (
        2 * math.log(base)
    )


def yarn_find_correction_range(low_rot, high_rot, dim, base, max_position_embeddings):
    """The (low, high) dims between which YaRN blends (HF's integers)."""
    low = math.floor(_yarn_find_correction_dim(low_rot, dim, base, max_position_embeddings))
    high = math.ceil(_yarn_find_correction_dim(high_rot, dim, base, max_position_embeddings))
    return max(low, 0), min(high, dim - 1)


def yarn_linear_ramp_mask(low, high, dim: int) -> np.ndarray:
    """float32 [dim]: 0 below low, 1 above high, linear in between."""
    if low == high:
        high += 0.001
    ramp = (np.arange(dim, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(ramp, 0, 1).astype(np.float32)


def rope_inv_freq(cfg: MLAConfig) -> np.ndarray:
    """float32 [p/2]: the inverse frequencies, YaRN-corrected as in the HF code
    (with yarn_factor 1 they are plain RoPE's)."""
    dim = cfg.qk_rope_head_dim
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    powers = np.float32(cfg.rope_theta) ** exponents
    freq_extra = (np.float32(1) / powers).astype(np.float32)
    freq_inter = (np.float32(1) / (np.float32(cfg.yarn_factor) * powers)).astype(np.float32)
    low, high = yarn_find_correction_range(
        cfg.beta_fast, cfg.beta_slow, dim, cfg.rope_theta, cfg.original_max_position_embeddings
    )
    extra_weight = np.float32(1) - yarn_linear_ramp_mask(low, high, dim // 2)
    return (freq_inter * (1 - extra_weight) + freq_extra * extra_weight).astype(np.float32)


def rope_mscale(cfg: MLAConfig) -> float:
    """The factor cos and sin are multiplied by: mscale(factor, mscale) /
    mscale(factor, mscale_all_dim)."""
    return yarn_get_mscale(cfg.yarn_factor, cfg.mscale) / yarn_get_mscale(
        cfg.yarn_factor, cfg.mscale_all_dim
    )


def _rope(x, positions, cfg: MLAConfig):
    """RoPE on interleaved pairs. x [B, S, ..., p], positions int [B, S]; returns
    float32, de-interleaved ([even outputs | odd outputs], as HF stores it)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    m = jnp.float32(rope_mscale(cfg))
    cos, sin = jnp.cos(angles) * m, jnp.sin(angles) * m  # [B, S, p/2]
    extra = x.ndim - 3
    cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])
    sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:])
    xf = x.astype(jnp.float32)
    even, odd = xf[..., 0::2], xf[..., 1::2]
    return jnp.concatenate([even * cos - odd * sin, odd * cos + even * sin], -1)


def _rms_norm(x, weight, eps: float):
    """float32, whatever the dtypes of x and weight."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + jnp.float32(eps))
    return weight.astype(jnp.float32) * xf


# The projections run in the params' dtype (x is cast to it) and return
# float32. XLA accumulates half-precision dots in float32 on the CPU and the
# GPU alike but rounds their result to the operands' dtype: asking for a
# float32 result (preferred_element_type) would skip that rounding, but the
# CPU runtime lacks some bf16 x bf16 -> f32 dot layouts (an Unsupported
# element type error from its DotThunk at run time).
def _matmul(x, w):
    """x @ w in w's dtype, as float32."""
    return jnp.matmul(x.astype(w.dtype), w).astype(jnp.float32)


def _einsum(spec: str, x, w):
    """einsum(spec, x, w) in w's dtype, as float32."""
    return jnp.einsum(spec, x.astype(w.dtype), w).astype(jnp.float32)


def _attention_dtype(x, kv) -> jnp.dtype:
    """The dtype of the attention's q, K and V (docs/design.md, "The DeepSeek
    layer"): x's, except that half-precision activations over a float cache of
    another dtype take the cache's, since the CUDA kernels take one dtype for
    q and a float cache (casting q is cheap, casting the cache is a copy)."""
    half = jnp.dtype(x.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if half and kv is not None and not isinstance(kv, QuantizedKV):
        return jnp.dtype(kv.dtype)
    return jnp.dtype(x.dtype)


# ------------------------------------------------------------------ parameters


def param_shapes(cfg: MLAConfig) -> dict[str, tuple[int, ...]]:
    """The layer's parameters (a dict pytree) and their shapes. Matrices are
    [in, out] (HF's Linear weights transposed); the K and V up-projections
    are kept per head in HF's orientation."""
    h, n, p, v, r = (
        cfg.num_heads,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
        cfg.kv_lora_rank,
    )
    shapes = {}
    if cfg.q_lora_rank is None:
        shapes["wq"] = (cfg.hidden_size, h * (n + p))
    else:
        shapes["wq_a"] = (cfg.hidden_size, cfg.q_lora_rank)
        shapes["q_norm"] = (cfg.q_lora_rank,)
        shapes["wq_b"] = (cfg.q_lora_rank, h * (n + p))
    shapes["wkv_a"] = (cfg.hidden_size, r + p)
    shapes["kv_norm"] = (r,)
    shapes["w_uk"] = (h, n, r)  # K up-projection (kv_b_proj's nope rows), per head
    shapes["w_uv"] = (h, v, r)  # V up-projection (kv_b_proj's value rows), per head
    shapes["wo"] = (h * v, cfg.hidden_size)
    return shapes


def init_params(
    key: jax.Array, cfg: MLAConfig, dtype: DTypeLike = jnp.float32
) -> dict[str, jax.Array]:
    """Random parameters: matrices N(0, 1/fan_in), norm weights 1 + N(0, 0.1^2)."""
    return _init_params(key, cfg, jnp.dtype(dtype))


# One compiled program for all the parameters: run op by op, each draw and
# scaling compiled on its own (seconds for a layer).
@functools.partial(jax.jit, static_argnums=(1, 2))
def _init_params(key: jax.Array, cfg: MLAConfig, dtype: np.dtype) -> dict[str, jax.Array]:
    shapes = param_shapes(cfg)
    keys = jax.random.split(key, len(shapes))
    params = {}
    for k, (name, shape) in zip(keys, shapes.items()):
        x = jax.random.normal(k, shape, jnp.float32)
        if name.endswith("norm"):
            x = 1 + 0.1 * x
        else:
            x = x / math.sqrt(shape[-1] if name in ("w_uk", "w_uv") else shape[0])
        params[name] = x.astype(dtype)
    return params


def _hf_tensor(state_dict, name: str):
    """The tensor named `name` (or ending in '.' + name), as float32 numpy, or None."""
    keys = [k for k in state_dict if k == name or k.endswith("." + name)]
    if len(keys) > 1:
        raise ValueError(
            f"params_from_hf: several tensors match {name!r} ({', '.join(keys)}); "
            "pass one attention layer's tensors"
        )
    if not keys:
        return None
    x = state_dict[keys[0]]
    if hasattr(x, "detach"):  # a torch tensor (bfloat16 has no numpy dtype: upcast first)
        x = x.detach().to("cpu").float().numpy()
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(
            f"params_from_hf: {keys[0]!r} must be a numpy array or torch tensor, "
            f"got {type(x).__name__}"
        )
    return np.asarray(x, dtype=np.float32)


def params_from_hf(
    state_dict: Mapping[str, Any], cfg: MLAConfig, dtype: DTypeLike = jnp.float32
) -> dict[str, jax.Array]:
    """Parameters from one attention layer's Hugging Face tensors.

    state_dict maps names to numpy arrays or torch tensors. Names are those of
    the DeepSeek-V2/V3 checkpoints, bare ('kv_b_proj.weight') or with a prefix
    ('model.layers.0.self_attn.kv_b_proj.weight'): q_proj (without q LoRA) or
    q_a_proj, q_a_layernorm, q_b_proj (with it), kv_a_proj_with_mqa,
    kv_a_layernorm, kv_b_proj and o_proj, each '.weight'. Other entries are
    ignored. kv_b_proj [H * (n + v), r] is split per head into the K
    up-projection w_uk [H, n, r] and the V up-projection w_uv [H, v, r].

    Raises ValueError naming the tensor for a missing or mis-shaped one (with
    the expected and actual shapes) and when the q LoRA tensors disagree with
    cfg.q_lora_rank.
    """
    h, n, p, v, r = (
        cfg.num_heads,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
        cfg.kv_lora_rank,
    )
    lora = cfg.q_lora_rank is not None
    present = {
        name: _hf_tensor(state_dict, name) is not None
        for name in ("q_proj.weight", "q_a_proj.weight")
    }
    if lora and present["q_proj.weight"] and not present["q_a_proj.weight"]:
        raise ValueError(
            f"params_from_hf: cfg.q_lora_rank is {cfg.q_lora_rank} but the tensors "
            "have q_proj.weight and no q_a_proj.weight (a checkpoint without q "
            "LoRA, like V2-Lite's): use q_lora_rank=None"
        )
    if not lora and present["q_a_proj.weight"] and not present["q_proj.weight"]:
        raise ValueError(
            "params_from_hf: cfg.q_lora_rank is None but the tensors have "
            "q_a_proj.weight and no q_proj.weight (a checkpoint with q LoRA, like "
            "V3's): set q_lora_rank"
        )

    def get(name, shape):
        x = _hf_tensor(state_dict, name)
        if x is None:
            raise ValueError(f"params_from_hf: missing tensor {name!r} (expected shape {shape})")
        if x.shape != shape:
            raise ValueError(
                f"params_from_hf: tensor {name!r} must have shape {shape}, got {tuple(x.shape)}"
            )
        return x

    out = {}
    if lora:
        out["wq_a"] = get("q_a_proj.weight", (cfg.q_lora_rank, cfg.hidden_size)).T
        out["q_norm"] = get("q_a_layernorm.weight", (cfg.q_lora_rank,))
        out["wq_b"] = get("q_b_proj.weight", (h * (n + p), cfg.q_lora_rank)).T
    else:
        out["wq"] = get("q_proj.weight", (h * (n + p), cfg.hidden_size)).T
    out["wkv_a"] = get("kv_a_proj_with_mqa.weight", (r + p, cfg.hidden_size)).T
    out["kv_norm"] = get("kv_a_layernorm.weight", (r,))
    kv_b = get("kv_b_proj.weight", (h * (n + v), r)).reshape(h, n + v, r)
    out["w_uk"], out["w_uv"] = kv_b[:, :n], kv_b[:, n:]
    out["wo"] = get("o_proj.weight", (cfg.hidden_size, h * v)).T
    return {k: jnp.asarray(np.ascontiguousarray(x), dtype) for k, x in out.items()}


def _check_params(params, cfg: MLAConfig) -> None:
    shapes = param_shapes(cfg)
    if not isinstance(params, dict):
        raise TypeError(
            f"attention: params must be the dict of init_params / params_from_hf, "
            f"got {type(params).__name__}"
        )
    for name, shape in shapes.items():
        if name not in params:
            raise ValueError(
                f"attention: params lack {name!r} (expected shape {shape}; "
                f"q_lora_rank is {cfg.q_lora_rank})"
            )
        if tuple(params[name].shape) != shape:
            raise ValueError(
                f"attention: params[{name!r}] must have shape {shape}, got "
                f"{tuple(params[name].shape)}"
            )
        if not jnp.issubdtype(params[name].dtype, jnp.floating):
            raise TypeError(
                f"attention: params[{name!r}] must be float32, bfloat16 or float16, got "
                f"{params[name].dtype}"
            )


# ------------------------------------------------------------------ cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LatentCache:
    """The latent KV cache of one layer, contiguous or paged.

    Contiguous (block_table None): kv [B, Smax, r + p] (a float array or a
    QuantizedKV) whose row t of sequence b holds its token t's [c_kv | k_pe].
    Paged (init_paged_cache): kv is a pool of pages [num_pages, page_size,
    r + p] and block_table int32 [B, max_pages] lists each sequence's pages,
    so token t of sequence b sits in row t % page_size of page
    block_table[b, t // page_size] and Smax = max_pages * page_size
    (docs/design.md, "Paged caches"); the pool may be shared with other
    batches, each bringing its own block_table, length and overflow.

    length int32 [B]: each row's tokens so far (what attention() last wrote:
    its last position + 1, at most Smax). overflow bool [B]: set for good once
    a row lost a token under jit: it wrote outside [0, Smax), or (paged) a
    token it wrote or reads lies on a table entry that is no page (that token
    was dropped or skipped, so the row's outputs miss it). A pytree, so it
    can be donated to jit and carried by lax.scan.
    """

    kv: Any
    length: jax.Array
    overflow: jax.Array
    block_table: jax.Array | None = None

    @property
    def fmt(self) -> str:
        """The cache's format: a float dtype name or a quantized format name."""
        return self.kv.fmt if isinstance(self.kv, QuantizedKV) else jnp.dtype(self.kv.dtype).name

    @property
    def paged(self) -> bool:
        return self.block_table is not None

    @property
    def page_size(self) -> int | None:
        return self.kv.shape[1] if self.paged else None

    @property
    def max_len(self) -> int:
        """Smax: the most tokens a row can hold."""
        if self.paged:
            return self.block_table.shape[1] * self.kv.shape[1]
        return self.kv.shape[1]


def _positive(op: str, **values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{op}: {name} must be a positive int, got {value!r}")


def _empty_rows(op: str, cfg: MLAConfig, shape: tuple[int, ...], fmt: str | DTypeLike):
    """Zeros of `shape` (last axis the row) stored as fmt."""
    if isinstance(fmt, str) and fmt in FORMATS:
        if fmt in BLOCK_FORMATS and (cfg.cache_dim % 32 or cfg.kv_lora_rank % 32):
            raise ValueError(
                f"{op}: {fmt} needs kv_lora_rank and the row width to be "
                f"multiples of 32 (V starts a block), got kv_lora_rank "
                f"{cfg.kv_lora_rank}, row {cfg.cache_dim}"
            )
        leaves = jax.eval_shape(lambda: jax_mla.quantize(jnp.zeros(shape, jnp.float32), fmt))
        return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), leaves)
    return jnp.zeros(shape, cache_float_dtype(op, fmt))


def init_cache(
    cfg: MLAConfig, batch: int, max_len: int, fmt: str | DTypeLike = jnp.float16
) -> LatentCache:
    """An empty latent cache of `batch` rows of `max_len` tokens; fmt is "f32",
    "f16", "bf16" (or that dtype) or one of "q8_0", "q8_kv", "q6_0", "fp8_e4m3"."""
    _positive("init_cache", batch=batch, max_len=max_len)
    kv = _empty_rows("init_cache", cfg, (batch, max_len, cfg.cache_dim), fmt)
    return LatentCache(kv, jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.bool_))


def init_paged_cache(
    cfg: MLAConfig,
    batch: int,
    num_pages: int,
    page_size: int,
    max_pages: int,
    fmt: str | DTypeLike = jnp.float16,
) -> LatentCache:
    """An empty paged latent cache: a pool of num_pages pages of page_size
    rows (16, 32, 64 or 128, as the ops take), `batch` rows of up to
    max_pages pages each, and a block table of jax_mla.PageAllocator.UNUSED
    (-1): give each row its pages (PageAllocator.block_table) with
    dataclasses.replace(cache, block_table=...) before writing. fmt as
    init_cache's."""
    if page_size not in PAGE_SIZES:
        raise ValueError(
            f"init_paged_cache: page_size must be one of {', '.join(map(str, PAGE_SIZES))} "
            f"(the page sizes the ops read), got {page_size!r}"
        )
    _positive(
        "init_paged_cache",
        batch=batch,
        num_pages=num_pages,
        page_size=page_size,
        max_pages=max_pages,
    )
    kv = _empty_rows("init_paged_cache", cfg, (num_pages, page_size, cfg.cache_dim), fmt)
    table = jnp.full((batch, max_pages), jax_mla.PageAllocator.UNUSED, jnp.int32)
    return LatentCache(kv, jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.bool_), table)


def kv_bytes_per_token(cfg: MLAConfig, fmt: str | DTypeLike) -> int:
    """Bytes one token takes in the latent cache of one layer (all modes share it)."""
    return jax_mla.cache_bytes(fmt, (1, 1, cfg.cache_dim))


def _read_rows(kv, start, size: int):
    """Rows [start, start + size) of a contiguous cache as float32 [B, size, r + p]."""
    if isinstance(kv, QuantizedKV):
        part = QuantizedKV(
            jax.lax.dynamic_slice_in_dim(kv.qs, start, size, axis=1),
            jax.lax.dynamic_slice_in_dim(kv.d, start, size, axis=1),
            kv.fmt,
        )
        return jax_mla.dequantize(part, jnp.float32)
    return jax.lax.dynamic_slice_in_dim(kv, start, size, axis=1).astype(jnp.float32)


def _read_pages(kv, block_table, start, size: int):
    """Positions [start, start + size) of each row of a paged cache (start and
    size multiples of the page size), gathered as float32 [B, size, r + p],
    and the block table [B, size / page_size] of those rows taken as pages of
    their own: entry j of row b is b * n + j, or -1 where the row's table
    holds no page (those rows are read from page 0 and must be skipped)."""
    num_pages, page_size = kv.shape[0], kv.shape[1]
    n = size // page_size
    pages = jax.lax.dynamic_slice_in_dim(block_table, start // page_size, n, axis=1)
    valid = (pages >= 0) & (pages < num_pages)
    index = jnp.where(valid, pages, 0)
    batch = block_table.shape[0]

    def gather(x):
        return x[index].reshape((batch, size) + x.shape[2:])

    if isinstance(kv, QuantizedKV):
        rows = jax_mla.dequantize(QuantizedKV(gather(kv.qs), gather(kv.d), kv.fmt), jnp.float32)
    else:
        rows = gather(kv).astype(jnp.float32)
    local = jnp.arange(batch * n, dtype=jnp.int32).reshape(batch, n)
    return rows, jnp.where(valid, local, -1)


# ------------------------------------------------------------------ the layer


def _check_inputs(params, x, positions, cache, cfg, mode, op="attention"):
    """cache None: self_attention's checks (positions are only RoPE's)."""
    if not isinstance(cfg, MLAConfig):
        raise TypeError(f"{op}: cfg must be an MLAConfig, got {type(cfg).__name__}")
    if mode not in MODES:
        raise ValueError(f"{op}: mode must be one of {', '.join(MODES)}, got {mode!r}")
    _check_params(params, cfg)
    if (
        not hasattr(x, "shape")
        or not hasattr(x, "dtype")
        or not jnp.issubdtype(x.dtype, jnp.floating)
    ):
        raise TypeError(
            f"{op}: x must be a float array [B, S, {cfg.hidden_size}], got "
            f"{getattr(x, 'dtype', type(x).__name__)}"
        )
    if x.ndim != 3 or x.shape[2] != cfg.hidden_size or x.shape[1] < 1:
        raise ValueError(
            f"{op}: x must have shape [B, S >= 1, {cfg.hidden_size}], got {tuple(x.shape)}"
        )
    if cache is not None and not isinstance(cache, LatentCache):
        raise TypeError(
            f"attention: cache must be a LatentCache (init_cache), got {type(cache).__name__}"
        )
    if cache is not None and cache.paged:
        _check_paged_cache(cache, x.shape[0], cfg)
    elif cache is not None and tuple(cache.kv.shape) != (
        x.shape[0],
        cache.kv.shape[1],
        cfg.cache_dim,
    ):
        raise ValueError(
            f"attention: cache must have shape (B, Smax, {cfg.cache_dim}) with B = "
            f"{x.shape[0]} like x, got {tuple(cache.kv.shape)}"
        )
    if not hasattr(positions, "dtype") or not jnp.issubdtype(positions.dtype, jnp.integer):
        raise TypeError(
            f"{op}: positions must be an int32 array [B, S], got "
            f"{getattr(positions, 'dtype', type(positions).__name__)}"
        )
    if tuple(positions.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"{op}: positions must have shape {tuple(x.shape[:2])} (x's "
            f"[B, S]), got {tuple(positions.shape)}"
        )
    if cache is not None and not isinstance(positions, jax.core.Tracer):
        p = np.asarray(positions).astype(np.int64)
        steps = np.diff(p, axis=1)
        if (steps != 1).any():
            raise ValueError(
                "attention: each row's positions must be consecutive (p, p + 1, "
                f"...), got {p[np.nonzero((steps != 1).any(axis=1))[0][0]].tolist()}"
            )
        bad = (p < 0) | (p >= cache.max_len)
        if bad.any():
            raise ValueError(
                f"attention: positions must lie in [0, {cache.max_len}) (the "
                f"cache's max_len), got {p[bad][0]}"
            )
        if cache.paged and not isinstance(cache.block_table, jax.core.Tracer):
            _check_pages_read(np.asarray(cache.block_table), p[:, -1] + 1, cache)


def _check_paged_cache(cache: LatentCache, batch: int, cfg: MLAConfig) -> None:
    table = cache.block_table
    if not hasattr(table, "dtype") or not jnp.issubdtype(table.dtype, jnp.integer):
        raise TypeError(
            f"attention: cache.block_table must be an int32 array [B, max_pages], got "
            f"{getattr(table, 'dtype', type(table).__name__)}"
        )
    if table.ndim != 2 or table.shape[0] != batch:
        raise ValueError(
            f"attention: cache.block_table must have shape ({batch}, max_pages) with B = "
            f"{batch} like x, got {tuple(table.shape)}"
        )
    if len(cache.kv.shape) != 3 or cache.kv.shape[2] != cfg.cache_dim:
        raise ValueError(
            f"attention: a paged cache's kv must have shape (num_pages, page_size, "
            f"{cfg.cache_dim}), got {tuple(cache.kv.shape)}"
        )
    for name in ("length", "overflow"):
        if tuple(getattr(cache, name).shape) != (batch,):
            raise ValueError(
                f"attention: cache.{name} must have shape ({batch},) like the block "
                f"table's rows, got {tuple(getattr(cache, name).shape)}"
            )


def _check_pages_read(table: np.ndarray, kv_len: np.ndarray, cache: LatentCache) -> None:
    """Concrete tables: every page a row writes or reads (positions below its
    kv_len) must be a page of the pool."""
    num_pages, page_size = cache.kv.shape[0], cache.kv.shape[1]
    cols = np.arange(table.shape[1])
    reached = cols[None, :] * page_size < kv_len[:, None]
    bad = reached & ((table < 0) | (table >= num_pages))
    if bad.any():
        b, j = np.argwhere(bad)[0]
        raise ValueError(
            f"attention: cache.block_table[{b}, {j}] must be a page in [0, {num_pages}) "
            f"(row {b} holds positions up to {kv_len[b] - 1}), got {table[b, j]}"
        )


def attention(
    params: dict[str, jax.Array],
    x: jax.Array,
    positions: ArrayLike,
    cache: LatentCache,
    cfg: MLAConfig,
    mode: str = "hybrid",
) -> tuple[jax.Array, LatentCache]:
    """One DeepSeek MLA attention layer over the latent cache.

    Args:
      params: init_params / params_from_hf's dict.
      x: [B, S, hidden] float32, bfloat16 or float16: the layer's input (after
        the model's input norm). The CUDA kernels take bfloat16 and float16
        activations (docs/design.md, "The DeepSeek layer", says which dtype
        each step computes in).
      positions: int32 [B, S]: the absolute positions of the new tokens, p, p+1,
        ... in each row (rows may be at different lengths). They are the RoPE
        positions and the cache rows written (jax_mla.cache_update), and each
        row's new length is its last position + 1, which is the kv_len of the
        attention: earlier cache rows are the context. Concrete positions are
        checked (consecutive, inside the cache); traced ones that fall outside
        the cache are dropped on write and set the row's cache.overflow.
      cache: LatentCache (init_cache, or init_paged_cache with each row's pages
        in its block_table), donated under jit for in-place writes. A paged
        cache's concrete table entries that a row writes or reads must be
        pages of the pool; traced ones that are not are dropped and skipped
        and set the row's cache.overflow.
      cfg: MLAConfig (static under jit).
      mode: "standard", "latent" or "hybrid" (static); see the module doc.
        All three compute the same function.

    Returns:
      (out [B, S, hidden] in x's dtype, the updated LatentCache).
    """
    _check_inputs(params, x, positions, cache, cfg, mode)
    mode = _resolve_mode(mode, x, cfg)
    batch, seq, _ = x.shape
    positions = jnp.asarray(positions).astype(jnp.int32)
    q_nope, q_pe, rows = _project(params, x, positions, cfg)
    table = cache.block_table
    kv = jax_mla.cache_update(cache.kv, rows, positions, block_table=table)

    q_pos = positions[:, 0]
    kv_len = positions[:, -1] + 1
    scale = cfg.softmax_scale
    dtype = _attention_dtype(x, kv)
    if mode == "latent":
        o = _latent(params, q_nope, q_pe, kv, table, q_pos, kv_len, scale, cfg, dtype)
    else:
        q = jnp.concatenate([q_nope, q_pe], -1).astype(dtype)
        o = _standard(params, q, kv, table, q_pos, kv_len, scale, cfg)
    out = _matmul(o.reshape(batch, seq, cfg.num_heads * cfg.v_head_dim), params["wo"])
    # Traced positions outside the cache were dropped by cache_update, and
    # tokens on table entries that are no page were dropped and are skipped
    # by the attention: say so.
    lost = ((positions < 0) | (positions >= cache.max_len)).any(axis=1)
    if table is not None:
        page_size, num_pages = cache.kv.shape[1], cache.kv.shape[0]
        cols = jnp.arange(table.shape[1], dtype=jnp.int32) * page_size
        reached = cols[None, :] < kv_len[:, None]
        lost = lost | (reached & ((table < 0) | (table >= num_pages))).any(axis=1)
    new_cache = LatentCache(kv, jnp.clip(kv_len, 0, cache.max_len), cache.overflow | lost, table)
    return out.astype(x.dtype), new_cache


def self_attention(
    params: dict[str, jax.Array],
    x: jax.Array,
    cfg: MLAConfig,
    mode: str = "standard",
    positions: ArrayLike | None = None,
) -> jax.Array:
    """The layer over x alone, without a cache: the training call.

    Each row of x [B, S, hidden] is one causal sequence: token t attends to
    tokens 0..t of its row. positions (int32 [B, S], default 0..S-1 in every
    row) are the RoPE positions only. Differentiable (jax.grad) in params and x in every mode:
    standard calls jax_mla.flash_attention on the decompressed 192/128 heads
    (the usual training path), latent calls jax_mla.flash_mla on the latent
    rows. Returns out [B, S, hidden] in x's dtype: what attention() returns for
    the same tokens written to an empty cache at those positions.
    """
    if positions is None and hasattr(x, "shape") and len(x.shape) == 3:
        positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
    _check_inputs(params, x, positions, None, cfg, mode, op="self_attention")
    mode = _resolve_mode(mode, x, cfg)
    batch, seq, _ = x.shape
    h, r = cfg.num_heads, cfg.kv_lora_rank
    positions = jnp.asarray(positions).astype(jnp.int32)
    q_nope, q_pe, rows = _project(params, x, positions, cfg)
    # The rows as a cache of x's dtype would hold them.
    dtype = _attention_dtype(x, None)
    rows = rows.astype(dtype)
    causal = dict(scale=cfg.softmax_scale, causal=True, q_pos=0, kv_len=seq)
    if mode == "latent":
        q_lat = _einsum("bshn,hnr->bshr", q_nope, params["w_uk"])
        q = jnp.concatenate([q_lat, q_pe], -1).astype(dtype)
        o_lat = jax_mla.flash_mla(q, rows, dv=r, **causal)
        o = _einsum("bshr,hvr->bshv", o_lat, params["w_uv"])
    else:
        c, k_pe = rows[..., :r], rows[..., r:]
        k_nope = _einsum("bsr,hnr->bshn", c, params["w_uk"]).astype(dtype)
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe[:, :, None], q_pe.shape)], -1)
        v = _einsum("bsr,hvr->bshv", c, params["w_uv"]).astype(dtype)
        q = jnp.concatenate([q_nope, q_pe], -1).astype(dtype)
        o = jax_mla.flash_attention(q, k, v, **causal)
    out = _matmul(o.reshape(batch, seq, h * cfg.v_head_dim), params["wo"])
    return out.astype(x.dtype)


def _resolve_mode(mode: str, x, cfg: MLAConfig) -> str:
    if mode == "hybrid":
        return "standard" if x.shape[1] >= cfg.hybrid_threshold else "latent"
    return mode


def _project(params, x, positions, cfg: MLAConfig):
    """(q_nope [B, S, H, n], q_pe [B, S, H, p] roped, the cache rows
    [B, S, r + p] = [c_kv normalized | k_pe roped]) of the new tokens, all
    float32."""
    batch, seq, _ = x.shape
    n, r = cfg.qk_nope_head_dim, cfg.kv_lora_rank
    if cfg.q_lora_rank is None:
        q = _matmul(x, params["wq"])
    else:
        q_a = _rms_norm(_matmul(x, params["wq_a"]), params["q_norm"], cfg.rms_norm_eps)
        q = _matmul(q_a, params["wq_b"])
    q = q.reshape(batch, seq, cfg.num_heads, cfg.qk_head_dim)
    q_nope, q_pe = q[..., :n], _rope(q[..., n:], positions, cfg)
    kv_a = _matmul(x, params["wkv_a"])
    c_kv = _rms_norm(kv_a[..., :r], params["kv_norm"], cfg.rms_norm_eps)
    k_pe = _rope(kv_a[..., r:], positions, cfg)
    return q_nope, q_pe, jnp.concatenate([c_kv, k_pe], -1)


def _latent(params, q_nope, q_pe, kv, block_table, q_pos, kv_len, scale, cfg, dtype):
    """Absorbed: q_nope . (W_UK c) = (W_UK^T q_nope) . c, and the output's
    W_UV (sum_j p_j c_j) = sum_j p_j (W_UV c_j). The query in dtype; returns
    float32. A paged cache is read in place through its block table."""
    q_lat = _einsum("bshn,hnr->bshr", q_nope, params["w_uk"])
    q_full = jnp.concatenate([q_lat, q_pe], -1).astype(dtype)  # [B, S, H, r + p]
    o_lat = jax_mla.flash_mla(
        q_full,
        kv,
        dv=cfg.kv_lora_rank,
        v_offset=0,
        scale=scale,
        causal=True,
        q_pos=q_pos,
        kv_len=kv_len,
        block_table=block_table,
    )
    return _einsum("bshr,hvr->bshv", o_lat, params["w_uv"])


def _merge(o1, lse1, o2, lse2):
    """Two partial attentions over disjoint keys merged by their LSE.
    o [B, S, H, v] float32, lse [B, H, S] (-inf where a part saw no key)."""
    m = jnp.maximum(lse1, lse2)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w1, w2 = jnp.exp(lse1 - m), jnp.exp(lse2 - m)
    total = w1 + w2
    to_bsh = lambda w: jnp.moveaxis(w, 1, 2)[..., None]  # [B, H, S] -> [B, S, H, 1]
    o = (o1 * to_bsh(w1) + o2 * to_bsh(w2)) / to_bsh(jnp.where(total > 0, total, 1.0))
    return o, jnp.where(total > 0, m + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)


def _standard(params, q, kv, block_table, q_pos, kv_len, scale, cfg):
    """Decompress the cached rows chunk by chunk into per-head K [.., H, n + p]
    and V [.., H, v] in q's dtype (the up-projections in the params' dtype,
    accumulated in float32), attend with flash_attention, merge the chunks by
    LSE. Only chunks below the longest row's length are computed. A paged
    cache's chunks are whole pages, gathered, and attended as pages of their
    own (_read_pages), so a table entry that is no page is skipped as the ops
    skip it. Returns float32."""
    batch, seq, h, _ = q.shape
    if block_table is None:
        smax = kv.shape[1]
        chunk = min(cfg.kv_chunk, smax)
    else:
        page_size = kv.shape[1]
        smax = block_table.shape[1] * page_size
        chunk = min(max(1, cfg.kv_chunk // page_size) * page_size, smax)
    full_chunks, tail = divmod(smax, chunk)
    w_uk, w_uv = params["w_uk"], params["w_uv"]
    r = cfg.kv_lora_rank

    def attend(carry, start, size):
        if block_table is None:
            rows, paged = _read_rows(kv, start, size), {}  # [B, size, r + p]
        else:
            rows, table = _read_pages(kv, block_table, start, size)
            paged = dict(block_table=table)
        c, k_pe = rows[..., :r], rows[..., r:]
        k = jnp.concatenate(
            [
                _einsum("bcr,hnr->bchn", c, w_uk).astype(q.dtype),
                jnp.broadcast_to(k_pe[:, :, None], (batch, size, h, k_pe.shape[-1])).astype(
                    q.dtype
                ),
            ],
            -1,
        )
        v = _einsum("bcr,hvr->bchv", c, w_uv).astype(q.dtype)
        if paged:  # [B, size, ...] as pages [B * size / page_size, page_size, ...]
            k = k.reshape((-1, page_size) + k.shape[2:])
            v = v.reshape((-1, page_size) + v.shape[2:])
        o, lse = jax_mla.flash_attention(
            q,
            k,
            v,
            scale=scale,
            causal=True,
            q_pos=q_pos - start,
            kv_len=jnp.clip(kv_len - start, 0, size),
            return_lse=True,
            **paged,
        )
        return _merge(*carry, o.astype(jnp.float32), lse)

    init = (
        jnp.zeros((batch, seq, h, cfg.v_head_dim), jnp.float32),
        jnp.full((batch, h, seq), -jnp.inf, jnp.float32),
    )
    longest = jnp.max(jnp.clip(kv_len, 0, smax))

    # Every chunk, skipping those past the longest row: a loop over a static
    # range (a scan) differentiates, one with a traced trip count would not.
    def step(i, carry):
        start = i * chunk
        return jax.lax.cond(longest > start, lambda c: attend(c, start, chunk), lambda c: c, carry)

    carry = jax.lax.fori_loop(0, full_chunks, step, init)
    if tail:
        start = full_chunks * chunk
        carry = jax.lax.cond(longest > start, lambda c: attend(c, start, tail), lambda c: c, carry)
    return carry[0]


# ------------------------------------------------------------------ decode loop


def _renorm(out):
    """The default next input: the layer's output RMS-normalized (a stand-in for
    the rest of the model that keeps the values O(1) step after step)."""
    of = out.astype(jnp.float32)
    return (of * jax.lax.rsqrt(jnp.mean(of * of, -1, keepdims=True) + 1e-6)).astype(out.dtype)


def _check_capacity(op: str, cache: LatentCache, tokens: int, what: str | None = None) -> None:
    """Tokens past a cache's capacity would be dropped inside lax.scan, where
    nothing can raise: refuse them here, from the shapes and, when it is
    concrete, from the cache's length."""
    what = what or f"{tokens} steps"
    if tokens > cache.max_len:
        raise ValueError(f"{op}: {what} do not fit a cache of max_len {cache.max_len}")
    if not isinstance(cache.length, jax.core.Tracer):
        longest = int(np.max(np.asarray(cache.length), initial=0))
        if longest + tokens > cache.max_len:
            raise ValueError(
                f"{op}: {what} after the {longest} tokens already in the cache need "
                f"{longest + tokens} rows, more than its max_len {cache.max_len}"
            )


def generate(
    params: dict[str, jax.Array],
    x: jax.Array,
    cache: LatentCache,
    cfg: MLAConfig,
    steps: int,
    *,
    mode: str = "hybrid",
    next_input: Callable[[jax.Array], jax.Array] | None = None,
) -> tuple[jax.Array, LatentCache]:
    """`steps` single-token steps through lax.scan, each at the row's current
    length (cache.length), starting from x [B, 1, hidden]; the input of step
    t + 1 is next_input(output of step t) (default: the output RMS-normalized).

    Steps that would not fit the cache (cache.length + steps > max_len) raise
    ValueError when the shapes or a concrete length show it; under jit with a
    traced length they are dropped and flagged in cache.overflow.

    Returns (outputs [B, steps, hidden], the updated cache). Jit it with
    static_argnames=("cfg", "steps", "mode", "next_input") and the cache
    donated.
    """
    next_input = _renorm if next_input is None else next_input
    if x.ndim != 3 or x.shape[1] != 1:
        raise ValueError(f"generate: x must have shape [B, 1, hidden], got {tuple(x.shape)}")
    _check_capacity("generate", cache, steps)

    def step(carry, _):
        x, cache = carry
        y, cache = attention(params, x, cache.length[:, None], cache, cfg, mode)
        return (next_input(y), cache), y[:, 0]

    (_, cache), ys = jax.lax.scan(step, (x, cache), None, length=steps)
    return jnp.moveaxis(ys, 0, 1), cache


def decode_loop(
    params: dict[str, jax.Array],
    prompt: jax.Array,
    cache: LatentCache,
    cfg: MLAConfig,
    steps: int,
    *,
    mode: str = "hybrid",
    next_input: Callable[[jax.Array], jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array, LatentCache]:
    """Prefill `prompt` [B, S, hidden] at positions cache.length + [0, S), then
    generate `steps` tokens (generate) from next_input(last prompt output).

    Returns (prompt outputs [B, S, hidden], generated outputs [B, steps,
    hidden], the updated cache). Jit as generate.
    """
    next_input = _renorm if next_input is None else next_input
    seq = prompt.shape[1]
    _check_capacity("decode_loop", cache, seq + steps, f"{seq} prompt tokens + {steps} steps")
    positions = cache.length[:, None] + jnp.arange(seq, dtype=jnp.int32)
    out, cache = attention(params, prompt, positions, cache, cfg, mode)
    ys, cache = generate(
        params, next_input(out[:, -1:]), cache, cfg, steps, mode=mode, next_input=next_input
    )
    return out, ys, cache
