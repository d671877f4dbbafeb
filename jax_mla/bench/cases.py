"""What the benchmark times: DeepSeek attention shapes as Cases, the CPU sweep
of llama-bench-style tests, the GPU shapes, and each case's inputs.

Tests (llama-bench names, one row of the batch shown):
  tg@N     decode: 1 query at the end of N cached tokens.
  ppS@N    prefill chunk: S causal queries that are the last S of N tokens
           (query i sees N - S + i + 1 keys).

Shapes (DeepSeek-V2-Lite / V3 attention): flash_mla over the 576-wide latent
row (kv_lora_rank 512 + rope 64, V = the first 512 columns, one latent KV head);
flash_attention with per-head K 192 (nope 128 + rope 64) and V 128, as many KV
heads as query heads. Scale 1/sqrt(192) for both, as ik_bench and the peers use.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass

import jax
import jax.numpy as jnp

import jax_mla

MLA_DK, MLA_DV = 576, 512
STD_DK, STD_DV = 192, 128
SCALE = 1.0 / math.sqrt(192)
OPS = ("flash_mla", "flash_attention")
# Float caches by dtype, quantized ones by format name (read in place by the kernels).
CACHES = {
    "f16": jnp.float16,
    "bf16": jnp.bfloat16,
    "f32": jnp.float32,
    "q8_0": "q8_0",
    "q8_kv": "q8_kv",
    "q6_0": "q6_0",
    "fp8_e4m3": "fp8_e4m3",
}
QUERY_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}

# CPU: batch 1, DeepSeek-V2-Lite's 16 heads, f32 queries over each cache type.
CPU_HEADS = 16
CPU_QUICK_TESTS = ("tg@1024", "tg@4096", "pp64@1024")
CPU_FULL_TESTS = ("tg@1024", "tg@4096", "tg@16384", "pp512@512", "pp512@4096")

# GPU: bf16 queries and caches. MLA decode at the (B, H, S) configurations the
# FlashInfer and FlashMLA comparisons use; 192/128 causal prefill of S queries
# over S keys, batch 1, at (H, S) where cuDNN's figures were taken, and 192/128
# decode at (B, H, S) (as many KV heads as query heads), each 192/128 row over
# bf16 and over q8_0 K and V; the 8-bit and FP8 latent formats on a
# memory-bound and a compute-bound decode row.
GPU_MLA_DECODE = (
    (1, 16, 16384),
    (64, 16, 4096),
    (64, 16, 16384),
    (128, 128, 4096),
    (128, 128, 8192),
    (32, 128, 32768),
)
GPU_PREFILL = ((16, 4096), (16, 16384), (128, 4096))
GPU_ATTENTION_DECODE = ((64, 16, 4096), (1, 128, 16384))
GPU_ATTENTION_CACHES = ("bf16", "q8_0")
GPU_QUANT_FORMATS = ("q8_0", "q8_kv", "fp8_e4m3")
GPU_QUANT_DECODE = ((64, 16, 16384), (128, 128, 8192))
GPU_QUICK_MLA_DECODE = ((1, 16, 16384), (64, 16, 4096), (128, 128, 4096))
GPU_QUICK_PREFILL = ((16, 1024),)
GPU_QUICK_ATTENTION_DECODE = ((16, 16, 1024),)
GPU_QUICK_QUANT_DECODE = ((64, 16, 4096),)


@dataclass(frozen=True)
class Case:
    """One benchmark configuration (every backend is timed on it)."""

    op: str  # "flash_mla" | "flash_attention"
    seq_q: int  # queries per sequence; 1 = decode
    n_kv: int  # cached tokens per sequence; the queries are the last seq_q of them
    cache: str  # key of CACHES
    batch: int = 1
    heads: int = CPU_HEADS
    query: str = "f32"  # key of QUERY_DTYPES

    @property
    def test(self) -> str:
        return f"tg@{self.n_kv}" if self.seq_q == 1 else f"pp{self.seq_q}@{self.n_kv}"

    @property
    def causal(self) -> bool:
        return self.seq_q > 1

    @property
    def dims(self) -> tuple[int, int]:
        return (MLA_DK, MLA_DV) if self.op == "flash_mla" else (STD_DK, STD_DV)

    @property
    def kv_heads(self) -> int:
        return 1 if self.op == "flash_mla" else self.heads

    @property
    def kv_bytes_per_token(self) -> int:
        """Cache bytes of one token of one sequence (K and V for flash_attention)."""
        fmt = CACHES[self.cache]
        if self.op == "flash_mla":
            return jax_mla.cache_bytes(fmt, (1, 1, MLA_DK))
        return jax_mla.cache_bytes(fmt, (1, 1, self.kv_heads, STD_DK)) + jax_mla.cache_bytes(
            fmt, (1, 1, self.kv_heads, STD_DV)
        )

    @property
    def cache_bytes(self) -> int:
        """Bytes a call reads from the cache (each cached token once)."""
        return self.batch * self.n_kv * self.kv_bytes_per_token

    @property
    def visible_keys(self) -> int:
        """Sum over one sequence's queries of the keys each one sees."""
        if not self.causal:
            return self.seq_q * self.n_kv
        s, n = self.seq_q, self.n_kv
        return s * (n - s) + s * (s + 1) // 2

    @property
    def flops(self) -> int:
        dk, dv = self.dims
        return 2 * self.batch * self.heads * self.visible_keys * (dk + dv)


def parse_test(name: str) -> tuple[int, int]:
    """'tg@N' -> (1, N); 'ppS@N' -> (S, N)."""
    m = re.fullmatch(r"(tg|pp(\d+))@(\d+)", name)
    if not m:
        raise argparse.ArgumentTypeError(f"test {name!r} is not tg@N or ppS@N")
    seq_q, n_kv = (1 if m[1] == "tg" else int(m[2])), int(m[3])
    if not 1 <= seq_q <= n_kv:
        raise argparse.ArgumentTypeError(f"test {name!r}: need 1 <= S <= N")
    return seq_q, n_kv


def cpu_cases(tests, ops=OPS, caches=("f16",)) -> list[Case]:
    """The CPU sweep: every (seq_q, n_kv) test x op x cache, batch 1, 16 heads."""
    return [Case(op, seq_q, n_kv, cache) for seq_q, n_kv in tests for op in ops for cache in caches]


def gpu_cases(quick: bool, ops=OPS) -> list[Case]:
    """The GPU shapes: bf16 MLA decode, the 8-bit latent caches on a few decode
    rows, and 192/128 causal prefill and decode over bf16 and q8_0 caches."""
    decode, quant, prefill, std_decode = (
        (
            GPU_QUICK_MLA_DECODE,
            GPU_QUICK_QUANT_DECODE,
            GPU_QUICK_PREFILL,
            GPU_QUICK_ATTENTION_DECODE,
        )
        if quick
        else (GPU_MLA_DECODE, GPU_QUANT_DECODE, GPU_PREFILL, GPU_ATTENTION_DECODE)
    )
    cases = []
    if "flash_mla" in ops:
        cases += [Case("flash_mla", 1, s, "bf16", b, h, "bf16") for b, h, s in decode]
        cases += [
            Case("flash_mla", 1, s, fmt, b, h, "bf16")
            for b, h, s in quant
            for fmt in GPU_QUANT_FORMATS
        ]
    if "flash_attention" in ops:
        cases += [
            Case("flash_attention", s, s, cache, 1, h, "bf16")
            for h, s in prefill
            for cache in GPU_ATTENTION_CACHES
        ]
        cases += [
            Case("flash_attention", 1, s, cache, b, h, "bf16")
            for b, h, s in std_decode
            for cache in GPU_ATTENTION_CACHES
        ]
    return cases


def make_inputs(case: Case, seed: int = 0) -> tuple:
    """Queries and caches of the case's dtypes and format, N(0, 1) entries, on
    the default device: (q, kv) for flash_mla, (q, k, v) for flash_attention."""
    dk, dv = case.dims
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    fmt = CACHES[case.cache]

    def cache(key, shape):
        x = jax.random.normal(key, shape, jnp.float32)
        return jax_mla.quantize(x, fmt) if isinstance(fmt, str) else x.astype(fmt)

    q = jax.random.normal(
        keys[0], (case.batch, case.seq_q, case.heads, dk), QUERY_DTYPES[case.query]
    )
    if case.op == "flash_mla":
        return q, cache(keys[1], (case.batch, case.n_kv, dk))
    return (
        q,
        cache(keys[1], (case.batch, case.n_kv, case.kv_heads, dk)),
        cache(keys[2], (case.batch, case.n_kv, case.kv_heads, dv)),
    )
