"""What each cache format costs in accuracy, end to end: MLA decode (16 heads,
4096 keys, standard-normal 576-wide rows, f32 queries, scale 1/sqrt(192))
through the native kernel over a cache stored in each format, against float64
attention over the unrounded rows. Prints the relative L2 error of the output.

    python -P benchmarks/cpu/quant_error.py
"""

import jax.numpy as jnp
import numpy as np

import jax_mla

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
        err = np.linalg.norm(out[0, 0] - want) / np.linalg.norm(want)
        print(f"{fmt:>9}: relative L2 error vs float64 {err:.2e}")


if __name__ == "__main__":
    main()
