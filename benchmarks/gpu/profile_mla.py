"""One flash_mla decode shape, called a few times, for Nsight Compute:
  ncu --kernel-name regex:Mla --launch-skip 2 --launch-count 1 --section SpeedOfLight \
      python3 -P benchmarks/gpu/profile_mla.py B H S [fmt [ns,ns,...]]
fmt: bf16 (default), q8_0 or q8_kv (the bf16 cache quantized); ns: num_splits values,
each called 4 times in that order ("none", the default, for the heuristic's choice)."""

import sys

import jax
import jax.numpy as jnp

import jax_mla


def main():
    B, H, S = (int(x) for x in sys.argv[1:4])
    fmt = sys.argv[4] if len(sys.argv) > 4 else "bf16"
    kq, kk = jax.random.split(jax.random.PRNGKey(0))
    q = jax.random.normal(kq, (B, 1, H, 576), jnp.bfloat16)
    kv = jax.random.normal(kk, (B, S, 576), jnp.bfloat16)
    if fmt != "bf16":
        kv = jax_mla.quantize(kv, fmt)
    splits = sys.argv[5].split(",") if len(sys.argv) > 5 else ["none"]
    for ns in splits:
        ns = None if ns == "none" else int(ns)
        f = jax.jit(
            lambda q, kv, ns=ns: jax_mla.flash_mla(
                q, kv, scale=0.135, num_splits=ns, backend="native"
            )
        )
        for _ in range(4):
            out = f(q, kv)
        jax.block_until_ready(out)
        print("done", B, H, S, fmt, ns, out.shape, flush=True)


if __name__ == "__main__":
    main()
