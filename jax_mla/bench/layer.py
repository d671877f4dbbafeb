"""Layer rows: one DeepSeek-V2-Lite attention layer (jax_mla.deepseek: the
projections, RoPE, the latent cache write and the attention), batch 1, f32
activations, in the seeds' terms:
  ppN      prefill of N tokens into an empty cache (one call); tokens/s = N / time.
  tg64@N   64 decode steps (one lax.scan) after N cached tokens; tokens/s = 64 / time.
  pgN      N prompt tokens then N/10 generated (deepseek.decode_loop), the seeds'
           combined figure; tokens/s = (N + N/10) / time.
per mode (standard / latent / hybrid: ik_llama.cpp's -mla variants) and cache
format. "vs std" is max |out - out_standard| / max |out_standard| on the same
inputs: the modes must agree. The memory rows give the latent cache's bytes
("KV self size", one layer: every mode shares that cache) and each mode's peak
workspace ("compute buffer size": XLA's temporary bytes of the compiled call)
for a decode step and for a 512-token ubatch at the end of long contexts.
CPU only for now: the layer does not take bf16 on CUDA yet.
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
from jax_mla.bench import timing

MODES = ("standard", "latent", "hybrid")
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


def model_agreement(cache: str) -> float:
    return MODEL_AGREEMENT_8BIT if cache in ("q8_0", "q8_kv") else MODEL_AGREEMENT


@dataclass
class ModelRow:
    """One layer-level timing (table and JSON)."""

    test: str
    mode: str
    cache: str
    ms: float
    tokens_per_s: float
    vs_std: float | None  # max |out - standard's| / max |standard's|
    samples: int
    other_load: float | None
    context: int  # tokens in the cache at the end
    kv_bytes_per_token: int  # latent cache, one layer
    workspace_bytes: int  # XLA temporary bytes of the timed call


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


def model_params(cfg):
    from jax_mla import deepseek

    return deepseek.init_params(jax.random.PRNGKey(0), cfg)


def _filled_cache(cfg, fmt: str, max_len: int, n: int):
    """A cache of max_len rows whose first n hold random rows (as a prefill leaves them)."""
    from jax_mla import deepseek

    cache = deepseek.init_cache(cfg, 1, max_len, fmt)
    if n == 0:
        return cache
    rows = jax.random.normal(jax.random.PRNGKey(7), (1, n, cfg.cache_dim), jnp.float32)
    kv = jax.jit(jax_mla.cache_update)(cache.kv, rows, jnp.arange(n, dtype=jnp.int32)[None])
    return deepseek.LatentCache(
        kv=kv, length=jnp.full((1,), n, jnp.int32), overflow=jnp.zeros((1,), bool)
    )


def _model_call(kind: str, n: int, mode: str, fmt: str, cfg, params):
    """(jitted function, a maker of fresh arguments, tokens the call produces, context)."""
    from jax_mla import deepseek

    x = jax.random.normal(jax.random.PRNGKey(3), (1, n if kind != "tg" else 1, cfg.hidden_size))
    if kind == "pp":
        fn = jax.jit(
            functools.partial(deepseek.attention, cfg=cfg, mode=mode), donate_argnames=("cache",)
        )
        pos = jnp.arange(n, dtype=jnp.int32)[None]
        return fn, lambda: (params, x, pos, deepseek.init_cache(cfg, 1, n, fmt)), n, n
    if kind == "tg":
        steps = MODEL_TG_STEPS
        fn = jax.jit(
            functools.partial(deepseek.generate, cfg=cfg, steps=steps, mode=mode),
            donate_argnames=("cache",),
        )
        return (fn, lambda: (params, x, _filled_cache(cfg, fmt, n + steps, n)), steps, n + steps)
    steps = max(1, n // 10)
    fn = jax.jit(
        functools.partial(deepseek.decode_loop, cfg=cfg, steps=steps, mode=mode),
        donate_argnames=("cache",),
    )
    return (
        fn,
        lambda: (params, x, deepseek.init_cache(cfg, 1, n + steps, fmt)),
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
    return np.concatenate([np.asarray(o, np.float64).reshape(-1) for o in parts])


def run_model_case(
    kind: str, n: int, cache: str, modes, cfg, params, budget_s: float
) -> list[ModelRow]:
    fmt = MODEL_CACHES[cache]
    rows, outputs = [], {}
    test = f"tg{MODEL_TG_STEPS}@{n}" if kind == "tg" else f"{kind}{n}"
    for mode in modes:
        fn, make_args, tokens, context = _model_call(kind, n, mode, fmt, cfg, params)
        compiled = fn.lower(*make_args()).compile()
        last = []

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
        outputs[mode] = _model_output(kind, last[0])
        rows.append(
            ModelRow(
                test=test,
                mode=mode,
                cache=cache,
                ms=t.seconds * 1e3,
                tokens_per_s=tokens / t.seconds,
                vs_std=None,
                samples=t.samples,
                other_load=load.cores,
                context=context,
                kv_bytes_per_token=jax_mla.cache_bytes(fmt, (1, 1, cfg.cache_dim)),
                workspace_bytes=int(compiled.memory_analysis().temp_size_in_bytes),
            )
        )
    if "standard" in outputs:
        ref = outputs["standard"]
        for row in rows:
            row.vs_std = float(
                np.max(np.abs(outputs[row.mode] - ref)) / max(np.max(np.abs(ref)), 1e-30)
            )
    return rows


def memory_rows(cfg, params, caches, modes, contexts=MEMORY_CONTEXTS) -> list[MemoryRow]:
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
                    fn = jax.jit(
                        functools.partial(deepseek.attention, cfg=cfg, mode=mode),
                        donate_argnames=("cache",),
                    )
                    x = jax.ShapeDtypeStruct((1, seq, cfg.hidden_size), jnp.float32)
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
    return row.vs_std is not None and not row.vs_std <= model_agreement(row.cache)
