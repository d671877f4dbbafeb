"""Layer rows: one DeepSeek-V2-Lite attention layer (jax_mla.deepseek: the
projections, RoPE, the latent cache write and the attention), float32
activations and parameters at batch 1 on the CPU, bfloat16 at batches 1, 16
and 64 on a GPU, in the seeds' terms:
  ppN      prefill of N tokens into an empty cache (one call); tokens/s = N / time.
  tg64@N   64 decode steps (one lax.scan) after N cached tokens; tokens/s = 64 / time.
  pgN      N prompt tokens then N/10 generated (deepseek.decode_loop), the seeds'
           combined figure; tokens/s = (N + N/10) / time.
tokens/s is summed over the batch (times B).
per mode (standard / latent / hybrid: ik_llama.cpp's -mla variants) and cache
format, next to "plain": the same layer as JAX model code writes it today,
decompressing the whole latent cache at every call
(baselines.plain_deepseek_attention; by default on a GPU only, where the
layer's kernels replace it). "vs std" is max |out - out_standard| /
max |out_standard| on the same inputs: the modes must agree. The memory rows
give the latent cache's bytes ("KV self size", one layer: every mode shares
that cache) and each mode's peak workspace ("compute buffer size": XLA's
temporary bytes of the compiled call) for a decode step and for a 512-token
ubatch at the end of long contexts, at batch 1 (in runs that include it).
A row whose call runs out of device memory (the plain layer at long contexts
and large batches) says OOM instead of a time.
"""

from __future__ import annotations

import argparse
import functools
import re
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

import jax_mla
from jax_mla.bench import baselines, timing

PLAIN = "plain"
MODES = ("standard", "latent", "hybrid", PLAIN)
# Modes run unless --modes: the plain layer's per-step decompression of the
# whole cache takes minutes per row on the CPU.
DEFAULT_MODES = {"cpu": ("standard", "latent", "hybrid"), "gpu": MODES}
DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}
DEFAULT_DTYPE = {"cpu": "f32", "gpu": "bf16"}
MODEL_CACHES = {
    "f16": "float16",
    "bf16": "bfloat16",
    "f32": "float32",
    "q8_0": "q8_0",
    "q8_kv": "q8_kv",
    "q6_0": "q6_0",
    "fp8_e4m3": "fp8_e4m3",
}
MODEL_QUICK_TESTS = ("pp512", "tg64@1024", "pg512")
MODEL_FULL_TESTS = ("pp512", "pp2048", "tg64@512", "tg64@4096", "tg64@16384", "pg2048")
MODEL_LONG_TESTS = ("pp8192", "pp16384", "tg64@32768", "tg64@65536", "pg8192", "pg16384")
# On a GPU: the same kinds at batches 1, 16 and 64, contexts up to 64k.
GPU_QUICK_TESTS = ("pp512", "tg64@1024", "pg512")
GPU_FULL_TESTS = ("pp2048", "pp16384", "tg64@4096", "tg64@16384", "tg64@65536", "pg4096")
GPU_LONG_TESTS = ("pp65536", "pg16384")
DEFAULT_BATCHES = {"cpu": (1,), "gpu": (1, 16, 64)}
GPU_QUICK_BATCHES = (1, 16)
# The CUDA kernels take bf16/f16 queries over these caches (an f16 cache under
# bf16 activations: the layer casts q to the cache's dtype).
GPU_CACHES = ("bf16", "f16", "q8_0", "q8_kv")
MEMORY_CONTEXTS = (16384, 65536)
MEMORY_UBATCH = 512
MODEL_TG_STEPS = 64
# Layer calls are long and each needs a fresh (donated) cache: one pass of at
# most this many samples.
MODEL_MAX_SAMPLES = 5
# The modes compute the same function; beyond this they do not ("vs std" FAIL).
# Over 8-bit caches the latent mode's flash_mla rounds the absorbed query to 8
# bits (integer Q.K, docs/formats.md) while standard mode multiplies
# decompressed rows in float32: measured up to 9.3e-3 apart on these rows.
MODEL_AGREEMENT = 1e-3
MODEL_AGREEMENT_8BIT = 3e-2
# bf16/f16 activations: the modes round q, K and V and the attention output
# at different steps, each by up to half an epsilon of the type; as in
# tests/test_deepseek_dtypes.py (measured up to 0.76 eps from the plain math),
# 4 epsilons more.
HALF_AGREEMENT_EPS = 4.0


def model_agreement(cache: str, dtype: str = "float32") -> float:
    base = MODEL_AGREEMENT_8BIT if cache in ("q8_0", "q8_kv") else MODEL_AGREEMENT
    if jnp.dtype(dtype) != jnp.float32:
        base += HALF_AGREEMENT_EPS * float(jnp.finfo(jnp.dtype(dtype)).eps)
    return base


@dataclass
class ModelRow:
    """One layer-level timing (table and JSON)."""

    test: str
    mode: str
    cache: str
    batch: int
    dtype: str  # activations and parameters
    ms: float  # NaN when the call ran out of memory (error)
    tokens_per_s: float
    vs_std: float | None  # max |out - standard's| / max |standard's|
    samples: int
    other_load: float | None
    context: int  # tokens in the cache at the end
    kv_bytes_per_token: int  # latent cache, one layer
    workspace_bytes: int  # XLA temporary bytes of the timed call
    error: str | None = None  # "OOM": the call did not fit the device


@dataclass
class MemoryRow:
    """KV cache and workspace of one mode at one context (table and JSON)."""

    context: int
    cache: str
    mode: str
    kv_bytes_per_token: int
    kv_bytes: int
    workspace_decode_bytes: int
    workspace_ubatch_bytes: int


def parse_model_test(name: str) -> tuple[str, int]:
    """'ppN' -> ('pp', N); 'tg64@N' -> ('tg', N); 'pgN' -> ('pg', N)."""
    m = re.fullmatch(rf"pp(\d+)|tg{MODEL_TG_STEPS}@(\d+)|pg(\d+)", name)
    if not m or int(next(g for g in m.groups() if g is not None)) < 1:
        raise argparse.ArgumentTypeError(
            f"model test {name!r} is not ppN, tg{MODEL_TG_STEPS}@N or pgN (N >= 1)"
        )
    return name[:2], int(next(g for g in m.groups() if g is not None))


def model_cfg():
    from jax_mla import deepseek

    return deepseek.MLAConfig()


def model_params(cfg, dtype: str = "float32"):
    from jax_mla import deepseek

    return deepseek.init_params(jax.random.PRNGKey(0), cfg, dtype)


def _filled_cache(cfg, fmt: str, batch: int, max_len: int, n: int):
    """A cache of max_len rows whose first n hold random rows (as a prefill leaves them)."""
    from jax_mla import deepseek

    cache = deepseek.init_cache(cfg, batch, max_len, fmt)
    if n == 0:
        return cache
    # bf16 rows: at batch 64 and 64k tokens float32 ones would take 9.7 GB.
    rows = jax.random.normal(jax.random.PRNGKey(7), (batch, n, cfg.cache_dim), jnp.bfloat16)
    positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
    kv = jax.jit(jax_mla.cache_update, donate_argnums=0)(cache.kv, rows, positions)
    return deepseek.LatentCache(
        kv=kv, length=jnp.full((batch,), n, jnp.int32), overflow=jnp.zeros((batch,), bool)
    )


def _layer_fns(mode: str, cfg, steps: int):
    """(attention, generate, decode_loop) of the mode, each taking the arrays only."""
    from jax_mla import deepseek

    if mode == PLAIN:
        return (
            functools.partial(baselines.plain_deepseek_attention, cfg=cfg),
            functools.partial(baselines.plain_deepseek_generate, cfg=cfg, steps=steps),
            functools.partial(baselines.plain_deepseek_decode_loop, cfg=cfg, steps=steps),
        )
    return (
        functools.partial(deepseek.attention, cfg=cfg, mode=mode),
        functools.partial(deepseek.generate, cfg=cfg, steps=steps, mode=mode),
        functools.partial(deepseek.decode_loop, cfg=cfg, steps=steps, mode=mode),
    )


def _model_call(kind: str, n: int, mode: str, fmt: str, cfg, params, batch: int, dtype: str):
    """(jitted function, a maker of fresh arguments, tokens the call produces, context)."""
    from jax_mla import deepseek

    seq = n if kind != "tg" else 1
    x = jax.random.normal(jax.random.PRNGKey(3), (batch, seq, cfg.hidden_size), dtype)
    steps = MODEL_TG_STEPS if kind == "tg" else max(1, n // 10)
    attention, generate, decode_loop = _layer_fns(mode, cfg, steps)
    if kind == "pp":
        fn = jax.jit(attention, donate_argnums=3)
        pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
        return fn, lambda: (params, x, pos, deepseek.init_cache(cfg, batch, n, fmt)), n, n
    if kind == "tg":
        fn = jax.jit(generate, donate_argnums=2)
        return (
            fn,
            lambda: (params, x, _filled_cache(cfg, fmt, batch, n + steps, n)),
            steps,
            n + steps,
        )
    fn = jax.jit(decode_loop, donate_argnums=2)
    return (
        fn,
        lambda: (params, x, deepseek.init_cache(cfg, batch, n + steps, fmt)),
        n + steps,
        n + steps,
    )


def _model_output(kind: str, out):
    """The part of a call's result the modes must agree on: the prefill's outputs and
    the first generated token's. Later tokens are not compared: each step's input is
    the previous output, and this random layer fed its own output doubles a
    difference every step or two (1e-6 at the first token, O(1) by the 40th)."""
    if kind == "pp":
        parts = [out[0]]
    elif kind == "tg":
        parts = [out[0][:, 0]]
    else:
        parts = [out[0], out[1][:, 0]]
    return np.concatenate(
        [np.asarray(o.astype(jnp.float32), np.float64).reshape(-1) for o in parts]
    )


def out_of_memory(error: Exception) -> bool:
    """Whether a compile or a call failed for lack of device memory."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def run_model_case(
    kind: str,
    n: int,
    cache: str,
    modes,
    cfg,
    params,
    budget_s: float,
    batch: int = 1,
    dtype: str = "float32",
) -> list[ModelRow]:
    fmt = MODEL_CACHES[cache]
    rows, outputs = [], {}
    test = f"tg{MODEL_TG_STEPS}@{n}" if kind == "tg" else f"{kind}{n}"
    for mode in modes:
        fn, make_args, tokens, context = _model_call(kind, n, mode, fmt, cfg, params, batch, dtype)
        row = ModelRow(
            test=test,
            mode=mode,
            cache=cache,
            batch=batch,
            dtype=dtype,
            ms=float("nan"),
            tokens_per_s=float("nan"),
            vs_std=None,
            samples=0,
            other_load=None,
            context=context,
            kv_bytes_per_token=jax_mla.cache_bytes(fmt, (1, 1, cfg.cache_dim)),
            workspace_bytes=0,
        )
        rows.append(row)
        last = []
        try:
            compiled = fn.lower(*make_args()).compile()
            row.workspace_bytes = int(compiled.memory_analysis().temp_size_in_bytes)

            def call(*args):
                last[:] = [compiled(*args)]
                return last[0]

            with timing.OtherLoad() as load:
                t = timing.time_calls(
                    call,
                    lambda i: make_args(),
                    budget_s=budget_s,
                    passes=1,
                    samples=(1, MODEL_MAX_SAMPLES),
                )
        except Exception as e:
            if not out_of_memory(e):
                raise
            row.error = "OOM"
            continue
        outputs[mode] = _model_output(kind, last[0])
        last.clear()
        row.ms = t.seconds * 1e3
        row.tokens_per_s = batch * tokens / t.seconds
        row.samples = t.samples
        row.other_load = load.cores
    if "standard" in outputs:
        ref = outputs["standard"]
        for row in rows:
            if row.mode in outputs:
                row.vs_std = float(
                    np.max(np.abs(outputs[row.mode] - ref)) / max(np.max(np.abs(ref)), 1e-30)
                )
    return rows


def memory_rows(
    cfg, params, caches, modes, dtype: str = "float32", contexts=MEMORY_CONTEXTS
) -> list[MemoryRow]:
    """KV bytes and each mode's compiled workspace (compile only: nothing is allocated)."""
    from jax_mla import deepseek

    rows = []
    for context in contexts:
        for cache in caches:
            fmt = MODEL_CACHES[cache]
            abstract = jax.eval_shape(lambda: deepseek.init_cache(cfg, 1, context, fmt))
            for mode in modes:
                workspace = []
                for seq in (1, MEMORY_UBATCH):
                    fn = jax.jit(_layer_fns(mode, cfg, 1)[0], donate_argnums=3)
                    x = jax.ShapeDtypeStruct((1, seq, cfg.hidden_size), jnp.dtype(dtype))
                    pos = jax.ShapeDtypeStruct((1, seq), jnp.int32)
                    analysis = fn.lower(params, x, pos, abstract).compile().memory_analysis()
                    workspace.append(int(analysis.temp_size_in_bytes))
                per_token = jax_mla.cache_bytes(fmt, (1, 1, cfg.cache_dim))
                rows.append(
                    MemoryRow(
                        context=context,
                        cache=cache,
                        mode=mode,
                        kv_bytes_per_token=per_token,
                        kv_bytes=per_token * context,
                        workspace_decode_bytes=workspace[0],
                        workspace_ubatch_bytes=workspace[1],
                    )
                )
    return rows


def model_failed(row: ModelRow) -> bool:
    return row.vs_std is not None and not row.vs_std <= model_agreement(row.cache, row.dtype)
