"""Which scale layout fp8_e4m3 should use: the error of e4m3 latent rows with
one float32 scale per row, per block of 64, per block of 128 (the 64 RoPE
values a block of their own), one scale for the latent and one for the RoPE
part, and FlashMLA's FP8 cache (latent in e4m3 with per-128 scales, the RoPE
part in bf16), next to bf16. Each is scaled so its largest magnitude maps to
448 and rounded to nearest even (numpy, float64 attention).

Rows: standard normal, and a DeepSeek-like model (assumed, not measured from
a checkpoint): an RMS-normalized latent times per-channel gains (log-normal,
sigma 0.6, 4 channels x8), and a RoPE part with larger, uneven channel pairs
(log-normal around 2, sigma 1, 2 pairs x15) and per-token magnitudes. Prints
the round trip's relative RMS error and MLA decode's (16 heads, 4096 keys,
scores of std 2, V the first 512 columns) relative L2 error against the
unrounded rows, each the mean of 8 draws (and its range).

    python -P benchmarks/cpu/fp8_layouts.py
"""

import jax.numpy as jnp
import numpy as np

E4M3 = jnp.float8_e4m3fn


def fp8(x, block):
    """x rounded to e4m3 with one float32 scale per `block` values."""
    xb = x.reshape(x.shape[:-1] + (x.shape[-1] // block, block)).astype(np.float32)
    d = np.abs(xb).max(-1, keepdims=True) / np.float32(448)
    y = np.clip(xb / np.where(d == 0, 1, d), -448, 448).astype(E4M3).astype(np.float32)
    return (y * d).reshape(x.shape)


def layouts(x):
    lat, pe = x[..., :512], x[..., 512:]
    return {
        "per row (580 B/token)": fp8(x, 576),
        "per block of 64 (612 B)": fp8(x, 64),
        "per 128 latent, 64 RoPE (596 B)": np.concatenate([fp8(lat, 128), fp8(pe, 64)], -1),
        "latent row + RoPE row (584 B)": np.concatenate([fp8(lat, 512), fp8(pe, 64)], -1),
        "FlashMLA: bf16 RoPE (656 B)": np.concatenate(
            [fp8(lat, 128), pe.astype(jnp.bfloat16).astype(np.float32)], -1
        ),
        "bf16 (1152 B)": x.astype(jnp.bfloat16).astype(np.float32),
    }


def rows(rng, kind, n):
    if kind == "standard normal":
        return rng.standard_normal((n, 576)).astype(np.float32)
    z = rng.standard_normal((n, 512))
    z /= np.sqrt((z**2).mean(-1, keepdims=True))
    gain = np.exp(rng.normal(0, 0.6, 512))
    gain[rng.choice(512, 4, replace=False)] *= 8
    pair = np.exp(rng.normal(np.log(2), 1.0, 32))
    pair[rng.choice(32, 2, replace=False)] *= 15
    token = np.exp(rng.normal(0, 0.5, (n, 1)))
    pe = rng.standard_normal((n, 64)) * np.repeat(pair, 2) * token
    return np.concatenate([z * gain, pe], -1).astype(np.float32)


def main():
    rng = np.random.default_rng(0)
    for kind in ("standard normal", "DeepSeek-like"):
        results = {}
        for _ in range(8):
            x = rows(rng, kind, 4096)
            q = rng.standard_normal((16, 576))
            scale = 2.0 / (q @ x.astype(np.float64).T).std()

            def attend(k):
                s = (q @ k.astype(np.float64).T) * scale
                p = np.exp(s - s.max(-1, keepdims=True))
                return (p / p.sum(-1, keepdims=True)) @ k[:, :512].astype(np.float64)

            want = attend(x)
            for name, y in layouts(x).items():
                rt = np.sqrt(((y - x) ** 2).sum() / (x.astype(np.float64) ** 2).sum())
                e2e = np.linalg.norm(attend(y) - want) / np.linalg.norm(want)
                results.setdefault(name, []).append((rt, e2e))
        print(kind)
        for name, r in results.items():
            r = np.array(r)
            print(
                f"  {name:34s} round trip {r[:, 0].mean():.2e}   MLA decode {r[:, 1].mean():.2e}"
                f" ({r[:, 1].min():.1e} to {r[:, 1].max():.1e})"
            )


if __name__ == "__main__":
    main()
