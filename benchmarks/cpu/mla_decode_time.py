"""Times jax_mla's MLA decode (16 heads, 16384 cached 576-wide rows, V at
columns 64..575 as ik_bench lays it out) or a 512-query causal prefill chunk
over 4096 rows, or (std-pp) flash_attention's 192/128 causal prefill chunk of
512 queries over 4096 keys with 16 KV heads, for one cache format, as a jitted
call: wall time and the process's CPU time per call. For quick A/B runs of two
builds in alternating processes (python from two virtual environments).

    python -P benchmarks/cpu/mla_decode_time.py FORMAT [CALLS] [tg|pp|std-pp]
    FORMAT: f16, q8_0, q8_kv or q6_0
"""

import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_mla


def main():
    fmt = sys.argv[1]
    calls = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    mode = sys.argv[3] if len(sys.argv) > 3 else "tg"
    rng = np.random.default_rng(0)
    seq_q, seq_kv = (1, 16384) if mode == "tg" else (512, 4096)
    if mode != "tg":
        calls = max(1, calls // 100)
    if mode == "std-pp":
        q = jnp.asarray(rng.standard_normal((1, seq_q, 16, 192)), jnp.float32)
        k, v = (
            jnp.asarray(rng.standard_normal((1, seq_kv, 16, d)), jnp.float16) for d in (192, 128)
        )
        kv = (k, v) if fmt == "f16" else (jax_mla.quantize(k, fmt), jax_mla.quantize(v, fmt))
        f = jax.jit(lambda q, kv: jax_mla.flash_attention(q, *kv, causal=True, backend="native"))
    else:
        q = jnp.asarray(rng.standard_normal((1, seq_q, 16, 576)), jnp.float32)
        x = jnp.asarray(rng.standard_normal((1, seq_kv, 576)), jnp.float16)
        kv = x if fmt == "f16" else jax_mla.quantize(x, fmt)
        f = jax.jit(
            lambda q, kv: jax_mla.flash_mla(
                q, kv, dv=512, v_offset=64, causal=mode != "tg", backend="native"
            )
        )
    f(q, kv).block_until_ready()

    def cpu():
        return sum(resource.getrusage(resource.RUSAGE_SELF)[:2])

    wall, used = time.perf_counter(), cpu()
    for _ in range(calls):
        f(q, kv).block_until_ready()
    print(
        f"{fmt} {mode}: wall {(time.perf_counter() - wall) / calls * 1e3:.3f} ms, "
        f"cpu {(cpu() - used) / calls * 1e3:.3f} ms/call"
    )


if __name__ == "__main__":
    main()
