"""One flash_mla decode shape, called a few times, for Nsight Compute:
  ncu --kernel-name regex:Mla --launch-skip 2 --launch-count 1 --section SpeedOfLight \
      python3 -P benchmarks/gpu/profile_mla.py B H S [fmt [ns,ns,...]] [--page P]
fmt: bf16 (default), q8_0 or q8_kv (the bf16 cache quantized); ns: num_splits values,
each called 4 times in that order ("none", the default, for the heuristic's choice).
--page P: the same rows as pages of P keys read through an in-order block table (what
side_by_side.py --paged times), so a profile of the paged kernel lines up with the
contiguous one of the same shape."""

import argparse

import jax
import jax.numpy as jnp

import jax_mla


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("B", type=int)
    ap.add_argument("H", type=int)
    ap.add_argument("S", type=int)
    ap.add_argument("fmt", nargs="?", default="bf16")
    ap.add_argument("splits", nargs="?", default="none")
    ap.add_argument("--page", type=int, default=0)
    a = ap.parse_args()
    B, H, S, fmt = a.B, a.H, a.S, a.fmt
    kq, kk = jax.random.split(jax.random.PRNGKey(0))
    q = jax.random.normal(kq, (B, 1, H, 576), jnp.bfloat16)
    kv = jax.random.normal(kk, (B, S, 576), jnp.bfloat16)
    table = None
    if a.page:
        if S % a.page:
            ap.error(f"--page {a.page} must divide S = {S}")
        table = jnp.arange(B * S // a.page, dtype=jnp.int32).reshape(B, S // a.page)
        kv = kv.reshape(B * S // a.page, a.page, 576)
    if fmt != "bf16":
        kv = jax_mla.quantize(kv, fmt)
    for ns in a.splits.split(","):
        ns = None if ns == "none" else int(ns)
        f = jax.jit(
            lambda q, kv, bt, ns=ns: jax_mla.flash_mla(
                q, kv, block_table=bt, dv=512, scale=0.135, num_splits=ns, backend="native"
            )
        )
        for _ in range(4):
            out = f(q, kv, table)
        jax.block_until_ready(out)
        print("done", B, H, S, fmt, ns, a.page or "contiguous", out.shape, flush=True)


if __name__ == "__main__":
    main()
