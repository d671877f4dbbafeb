"""What each cache format costs in accuracy, end to end: MLA decode (16 heads,
4096 keys, standard-normal 576-wide rows, f32 queries, scale 1/sqrt(192))
through the native kernel over a cache stored in each format, against float64
attention over the unrounded rows. Prints the relative L2 error of the output,
and for the 8-bit formats how it builds up, from jax_mla.reference over the
same cache: the cache's rounding alone (the float reference over the
dequantized rows), plus the 8-bit query, plus the 8-bit P (the kernels'
definition, reference.mla_quantized).

    python -P benchmarks/cpu/quant_error.py
"""

import jax.numpy as jnp
import numpy as np

import jax_mla
from jax_mla import reference

SCALE = 1 / np.sqrt(192)


def main():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 1, 16, 576)).astype(np.float32)
    x = rng.standard_normal((1, 4096, 576)).astype(np.float32)
    s = np.einsum("hd,td->ht", q[0, 0].astype(np.float64), x[0].astype(np.float64)) * SCALE
    p = np.exp(s - s.max(-1, keepdims=True))
    want = (p / p.sum(-1, keepdims=True)) @ x[0, :, :512].astype(np.float64)
    for fmt in ["float16", "bfloat16", *jax_mla.quant.FORMATS]:
        kv = jnp.asarray(x, fmt) if fmt in ("float16", "bfloat16") else jax_mla.quantize(x, fmt)
        out = np.asarray(jax_mla.flash_mla(jnp.asarray(q), kv, scale=SCALE, backend="native"))
        rel = lambda o: (
            np.linalg.norm(np.asarray(o, np.float64)[0, 0] - want) / np.linalg.norm(want)
        )
        line = f"{fmt:>9}: relative L2 error vs float64 {rel(out):.2e}"
        if fmt in ("q8_0", "q8_kv"):
            qj = jnp.asarray(q)
            cache_only = reference.mla(qj, jax_mla.dequantize(kv), scale=SCALE)[0]
            with_query = reference.mla_quantized(qj, kv, scale=SCALE, round_p=False)[0]
            with_p = reference.mla_quantized(qj, kv, scale=SCALE)[0]
            line += (
                f" (reference: cache {rel(cache_only):.2e}, + 8-bit query "
                f"{rel(with_query):.2e}, + 8-bit P {rel(with_p):.2e})"
            )
        print(line)


if __name__ == "__main__":
    main()
