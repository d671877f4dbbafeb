"""Small flash_mla / flash_attention calls for compute-sanitizer (memcheck,
racecheck): every kernel variant (MLA 16- and 64-row blocks over float and
q8_0 / q8_kv caches, each attention head-dim pair, split-KV and its combine,
causal, ragged kv_len with empty rows), each checked against the reference so a silent failure also shows.
The references run in float64 numpy on the host: XLA's own GEMM autotuning
under the sanitizer was slow and crashed it (seen on the H100, 2026-11-25).
Run: compute-sanitizer --tool memcheck python3 benchmarks/gpu/sanitize_cases.py [--quick]
(--quick: one case per kernel kind, bfloat16 only, for racecheck's slower run)."""
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_mla


def ref_attention(q, k, v, scale, causal, q_pos, kv_len):
    """float64 numpy attention: q [B,Sq,Hq,Dk], k [B,Skv,Hkv,Dk], v [B,Skv,Hkv,Dv]."""
    q, k, v = (np.asarray(x, np.float32).astype(np.float64) for x in (q, k, v))
    B, Sq, Hq, _ = q.shape
    Skv, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    out = np.zeros((B, Sq, Hq, Dv))
    for b in range(B):
        for i in range(Sq):
            n = min(int(kv_len[b]), Skv)
            if causal:
                n = min(n, max(int(q_pos[b]) + i + 1, 0))
            if n == 0:
                continue
            for h in range(Hq):
                kh = h // (Hq // Hkv)
                s = k[b, :n, kh] @ q[b, i, h] * scale
                p = np.exp(s - s.max())
                out[b, i, h] = p @ v[b, :n, kh] / p.sum()
    return out


def round_query_q8(q, scale):
    """The query as the kernels take it over 8-bit caches (quant_format.h,
    RoundQueryToQ8): q * scale, each block of 32 rounded with q8_0's rule."""
    x = np.asarray(q, np.float32) * np.float32(scale)
    xb = x.reshape(x.shape[:-1] + (-1, 32))
    d = np.abs(xb).max(axis=-1, keepdims=True) / np.float32(127)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, np.float32(1)), np.float32(0))
    v = (xb * inv).astype(np.float64)
    return (d * (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.float32)).reshape(x.shape)


def main():
    rng = np.random.default_rng(0)
    bad = 0

    def check(name, got, want, tol):
        nonlocal bad
        err = float(np.nanmax(np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32))))
        ok = err <= tol and not np.isnan(np.asarray(got, np.float32)).any()
        bad += not ok
        print(f"{name}: max|diff| {err:.3g} {'ok' if ok else 'FAIL'}", flush=True)

    quick = "--quick" in sys.argv
    for dtype in (jnp.bfloat16,) if quick else (jnp.bfloat16, jnp.float16):
        tol = 2e-2 if dtype == jnp.bfloat16 else 3e-3
        mla_cases = ((16, 1, 3), (128, 1, 2)) if quick else ((16, 1, 1), (16, 1, 3), (128, 2, 1),
                                                             (20, 3, 2))
        for heads, seq_q, splits in mla_cases:
            q = jnp.asarray(rng.standard_normal((2, seq_q, heads, 576)), dtype)
            kv = jnp.asarray(rng.standard_normal((2, 100, 576)), dtype)
            kv_len = jnp.array([100, 37], jnp.int32)
            got = jax_mla.flash_mla(q, kv, dv=512, causal=True, kv_len=kv_len, num_splits=splits,
                                    backend="native")
            want = ref_attention(q, kv[:, :, None], kv[:, :, None, :512], 1 / 24, True,
                                 np.asarray(kv_len) - seq_q, np.asarray(kv_len))
            check(f"mla {jnp.dtype(dtype).name} H={heads} Sq={seq_q} ns={splits}", got, want, tol)
        # Quantized latent caches (q8_0, q8_kv): 16-row and 64-row blocks, splits.
        for fmt in ("q8_0", "q8_kv"):
            for heads, seq_q, splits in ((16, 1, 3), (128, 1, 2)) if quick else mla_cases:
                q = jnp.asarray(rng.standard_normal((2, seq_q, heads, 576)), dtype)
                kvq = jax_mla.quantize(jnp.asarray(rng.standard_normal((2, 100, 576)),
                                                   jnp.float32), fmt)
                kv = np.asarray(jax_mla.dequantize(kvq))
                kv_len = jnp.array([100, 37], jnp.int32)
                got = jax_mla.flash_mla(q, kvq, dv=512, causal=True, kv_len=kv_len,
                                        num_splits=splits, backend="native")
                want = ref_attention(round_query_q8(q, 1 / 24), kv[:, :, None],
                                     kv[:, :, None, :512], 1.0, True,
                                     np.asarray(kv_len) - seq_q, np.asarray(kv_len))
                check(f"mla {fmt} {jnp.dtype(dtype).name} H={heads} Sq={seq_q} ns={splits}", got,
                      want, tol)
        dims = ((192, 128),) if quick else ((192, 128), (64, 64), (128, 128), (256, 256))
        for dk, dv in dims:
            for seq_q in (70,) if quick else (1, 70):
                q = jnp.asarray(rng.standard_normal((2, seq_q, 4, dk)), dtype)
                k = jnp.asarray(rng.standard_normal((2, 90, 2, dk)), dtype)
                v = jnp.asarray(rng.standard_normal((2, 90, 2, dv)), dtype)
                kv_len = jnp.array([90, 0], jnp.int32)
                got = jax_mla.flash_attention(q, k, v, causal=True, kv_len=kv_len, backend="native")
                want = ref_attention(q, k, v, dk ** -0.5, True, np.asarray(kv_len) - seq_q,
                                     np.asarray(kv_len))
                check(f"attention {jnp.dtype(dtype).name} {dk}/{dv} Sq={seq_q}", got, want, tol)
    print("sanitize cases:", "all ok" if bad == 0 else f"{bad} FAILED", flush=True)


if __name__ == "__main__":
    main()
