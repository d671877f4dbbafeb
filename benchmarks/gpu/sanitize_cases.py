"""Small flash_mla / flash_attention calls for compute-sanitizer (memcheck,
racecheck): every kernel variant (MLA 16- and 64-row blocks, each attention
head-dim pair, split-KV and its combine, causal, ragged kv_len with empty
rows), each checked against the reference so a silent failure also shows.
Run: compute-sanitizer --tool memcheck python3 benchmarks/gpu/sanitize_cases.py"""
import jax
import jax.numpy as jnp
import numpy as np

import jax_mla
from jax_mla import reference


def main():
    rng = np.random.default_rng(0)
    bad = 0

    def check(name, got, want, tol):
        nonlocal bad
        err = float(np.nanmax(np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32))))
        ok = err <= tol and not np.isnan(np.asarray(got, np.float32)).any()
        bad += not ok
        print(f"{name}: max|diff| {err:.3g} {'ok' if ok else 'FAIL'}", flush=True)

    for dtype in (jnp.bfloat16, jnp.float16):
        tol = 2e-2 if dtype == jnp.bfloat16 else 3e-3
        for heads, seq_q, splits in ((16, 1, 1), (16, 1, 3), (128, 2, 1), (20, 3, 2)):
            q = jnp.asarray(rng.standard_normal((2, seq_q, heads, 576)), dtype)
            kv = jnp.asarray(rng.standard_normal((2, 100, 576)), dtype)
            kv_len = jnp.array([100, 37], jnp.int32)
            got = jax_mla.flash_mla(q, kv, dv=512, causal=True, kv_len=kv_len, num_splits=splits,
                                    backend="native")
            want, _ = reference.mla(q, kv, dv=512, v_offset=0, scale=1 / 24, causal=True,
                                    q_pos=kv_len - seq_q, kv_len=kv_len)
            check(f"mla {jnp.dtype(dtype).name} H={heads} Sq={seq_q} ns={splits}", got, want, tol)
        for dk, dv in ((192, 128), (64, 64), (128, 128), (256, 256)):
            for seq_q in (1, 70):
                q = jnp.asarray(rng.standard_normal((2, seq_q, 4, dk)), dtype)
                k = jnp.asarray(rng.standard_normal((2, 90, 2, dk)), dtype)
                v = jnp.asarray(rng.standard_normal((2, 90, 2, dv)), dtype)
                kv_len = jnp.array([90, 0], jnp.int32)
                got = jax_mla.flash_attention(q, k, v, causal=True, kv_len=kv_len, backend="native")
                want, _ = reference.attention(q, k, v, scale=dk ** -0.5, causal=True,
                                              q_pos=kv_len - seq_q, kv_len=kv_len)
                check(f"attention {jnp.dtype(dtype).name} {dk}/{dv} Sq={seq_q}", got, want, tol)
    print("sanitize cases:", "all ok" if bad == 0 else f"{bad} FAILED", flush=True)


if __name__ == "__main__":
    main()
