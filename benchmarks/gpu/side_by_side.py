"""jax_mla vs the plain-JAX formulation vs FlashInfer (MLA decode) and vs
PyTorch's cuDNN SDPA (192/128 causal prefill), same process, same card.

MLA decode configs are issue 5's: (B, H, S) with q [B, 1, H, 576], a bf16
latent cache [B, S, 576], V = its first 512 columns, scale 1/sqrt(192). Each
side is timed the way ../shared/tools/flashinfer_mla/bench.py times FlashInfer
(whose helpers this imports): n back-to-back calls between synchronizations,
median of 7, caches under 256 MB rotated among copies so calls do not hit L2.
jax_mla and XLA read the very bytes FlashInfer reads (DLPack). jax_mla is also
timed as n calls inside one jitted executable ("in-jit"), which removes the
Python dispatch of each call.

Prefill: Dk 192 / Dv 128, causal, B = 1, S in {4096, 16384}, H in {16, 128};
TFLOP/s counts the visible half of the score matrix: 2 * S^2/2 * H * (192 + 128).

Quantized latent caches (--quant q8_0,q8_kv): jax_mla is also timed over the
same cache quantized to each format (loop timing; GB/s counts the bytes read:
576 + 36 per row for q8_0, 576 + 4 for q8_kv), with its max |diff| vs XLA over
the bf16 cache (the format's error, not only the kernel's).

Usage (device): python3 benchmarks/gpu/side_by_side.py --fi-dir .carry/flashinfer_mla
  [--rows 64,16,16384/128,128,8192] [--quant q8_0,q8_kv] [--skip prefill]
Writes $OUT/side_by_side.json and prints a table last.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

OUT = os.environ.get("OUT", "/tmp/bench_out")
MLA_CONFIGS = [(1, 16, 16384), (64, 16, 4096), (64, 16, 16384), (128, 128, 4096),
               (128, 128, 8192), (32, 128, 32768)]
PREFILL_CONFIGS = [(16, 4096), (16, 16384), (128, 4096), (128, 16384)]
SCALE = 1.0 / math.sqrt(192.0)
RES: dict = {"mla": [], "prefill": [], "errors": []}


def log(*a):
    print(*a, flush=True)


def save():
    with open(os.path.join(OUT, "side_by_side.json"), "w") as fh:
        json.dump(RES, fh, indent=1, default=str)


def load_fi(fi_dir):
    spec = importlib.util.spec_from_file_location("fi_bench", os.path.join(fi_dir, "bench.py"))
    fb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fb)
    return fb


QUANT_ROW_BYTES = {"q8_0": 576 + 36, "q8_kv": 576 + 4}


def bench_mla(fb, fi_ok, in_jit_calls, configs=MLA_CONFIGS, quant=()):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import jax_mla

    dev = torch.device("cuda")
    ws = torch.empty(512 * 1024 * 1024, dtype=torch.uint8, device=dev) if fi_ok else None
    xla = jax.jit(fb.mla_decode_xla)

    @jax.jit
    def ours(q, kv):  # q [B, H, 576] like FlashInfer's; the op takes [B, 1, H, 576]
        return jax_mla.flash_mla(q[:, None], kv, dv=512, scale=SCALE, backend="native")[:, 0]

    def ours_n(qs, kvs):
        return [jax_mla.flash_mla(qs[:, None], kv, dv=512, scale=SCALE, backend="native")
                for kv in kvs]

    for B, H, S in configs:
        row = dict(B=B, H=H, S=S)
        RES["mla"].append(row)
        cache_bytes = B * S * 576 * 2
        ncp = max(1, min(8, math.ceil(256e6 / cache_bytes)))
        n_inner = int(min(400, max(20, 0.03 / (cache_bytes / 2.5e12 + 2e-5))))
        row.update(cache_copies=ncp, n_inner=n_inner)
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(B, H, 576, generator=g, device=dev).to(torch.bfloat16)
        kvs = [torch.randn(B * S, 576, generator=g, device=dev).to(torch.bfloat16)
               for _ in range(ncp)]
        torch.cuda.synchronize()
        qj = jax.dlpack.from_dlpack(q)
        kvj = [jax.dlpack.from_dlpack(kv.view(B, S, 576)) for kv in kvs]
        outs = {}
        # jax_mla, Python loop of jitted calls
        holder = {}

        def call(i):
            holder["o"] = ours(qj, kvj[i % ncp])

        t_loop, t_single = fb.time_calls(call, lambda: holder["o"].block_until_ready(), n_inner)
        row["jax_mla"] = dict(loop=fb.metrics(B, H, S, t_loop), single=fb.metrics(B, H, S, t_single))
        outs["jax_mla"] = np.asarray(ours(qj, kvj[0]).astype(jnp.float32))
        # jax_mla, n calls in one executable (rotating the copies)
        reps = max(ncp, (in_jit_calls // ncp) * ncp)
        fn = jax.jit(ours_n)
        many = [kvj[i % ncp] for i in range(reps)]
        jax.block_until_ready(fn(qj, many))
        ts = []
        for _ in range(7):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(qj, many))
            ts.append((time.perf_counter() - t0) / reps)
        row["jax_mla"]["in_jit"] = fb.metrics(B, H, S, float(np.median(ts)))
        # plain JAX
        hx = {}

        def xcall(i):
            hx["o"] = xla(qj, kvj[i % ncp])

        t_loop, _ = fb.time_calls(xcall, lambda: hx["o"].block_until_ready(), n_inner)
        row["xla"] = dict(loop=fb.metrics(B, H, S, t_loop))
        outs["xla"] = np.asarray(xla(qj, kvj[0]).astype(jnp.float32))
        # jax_mla over quantized copies of the same caches
        for fmt in quant:
            qkvs = [jax_mla.quantize(kv, fmt) for kv in kvj]
            jax.block_until_ready(qkvs)
            hq = {}

            def qcall(i):
                hq["o"] = ours(qj, qkvs[i % ncp])

            t_loop, _ = fb.time_calls(qcall, lambda: hq["o"].block_until_ready(), n_inner)
            m = fb.metrics(B, H, S, t_loop)
            m["GBps"] = B * S * QUANT_ROW_BYTES[fmt] / t_loop / 1e9
            row[f"jax_mla_{fmt}"] = dict(loop=m)
            outs[f"jax_mla_{fmt}"] = np.asarray(ours(qj, qkvs[0]).astype(jnp.float32))
            del qkvs, hq
        # FlashInfer fa3
        if fi_ok:
            try:
                q_nope, q_pe = q[..., :512].contiguous(), q[..., 512:].contiguous()
                ps = 64
                ckvs = [kv[:, :512].contiguous().view(B * S // ps, ps, 512) for kv in kvs]
                kpes = [kv[:, 512:].contiguous().view(B * S // ps, ps, 64) for kv in kvs]
                w, run, _, _ = fb.fi_make_wrapper("fa3", ws, B, H, [S] * B, ps, dev)
                out = torch.empty(B, H, 512, dtype=torch.bfloat16, device=dev)
                fcall = lambda i: run(q_nope, q_pe, ckvs[i % ncp], kpes[i % ncp], out)
                fcall(0)
                torch.cuda.synchronize()
                outs["fa3"] = out.float().cpu().numpy()
                t_loop, _ = fb.time_calls(fcall, torch.cuda.synchronize, n_inner)
                row["fa3"] = dict(loop=fb.metrics(B, H, S, t_loop))
                try:
                    row["fa3"]["graph"] = fb.metrics(B, H, S, fb.time_graph(fcall, min(n_inner, 50)))
                except Exception as e:  # noqa: BLE001
                    row["fa3"]["graph_error"] = repr(e)[:300]
                del ckvs, kpes, w
            except Exception as e:  # noqa: BLE001
                RES["errors"].append(f"fa3 {B},{H},{S}: {e!r}"[:2000])
                log("fa3 error", repr(e)[:500])
        ref = outs["xla"]
        for k, o in outs.items():
            row.setdefault(k, {})["max_abs_diff_vs_xla"] = float(np.abs(o - ref).max())
        log(f"MLA B={B} H={H} S={S}: " + ", ".join(
            f"{k} {row[k]['loop']['ms']:.4f} ms" for k in ("jax_mla", "xla", "fa3",
                                                           *(f"jax_mla_{f}" for f in quant))
            if "loop" in row.get(k, {}))
            + f", jax_mla in-jit {row['jax_mla']['in_jit']['ms']:.4f} ms"
            + ", max|diff| vs xla " + ", ".join(f"{k} {row[k]['max_abs_diff_vs_xla']:.2e}" for k in outs))
        del qj, kvj, kvs, q, holder, hx, many, outs
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        save()


def bench_prefill():
    import jax
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import jax_mla

    dev = torch.device("cuda")
    ours = jax.jit(lambda q, k, v: jax_mla.flash_attention(q, k, v, scale=SCALE, causal=True,
                                                           backend="native"))
    for H, S in PREFILL_CONFIGS:
        row = dict(B=1, H=H, S=S)
        RES["prefill"].append(row)
        flops = 2 * (S * S / 2) * H * (192 + 128)
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(1, S, H, 192, generator=g, device=dev).to(torch.bfloat16)
        k = torch.randn(1, S, H, 192, generator=g, device=dev).to(torch.bfloat16)
        v = torch.randn(1, S, H, 128, generator=g, device=dev).to(torch.bfloat16)
        torch.cuda.synchronize()
        qj, kj, vj = (jax.dlpack.from_dlpack(x) for x in (q, k, v))
        n = 20 if S <= 4096 else 5
        holder = {}

        def call(i):
            holder["o"] = ours(qj, kj, vj)

        import importlib
        fb = sys.modules["fi_bench"]
        t, _ = fb.time_calls(call, lambda: holder["o"].block_until_ready(), n, n_outer=5, warm=2)
        row["jax_mla"] = dict(ms=t * 1e3, TFLOPs=flops / t / 1e12)
        mine = torch.from_dlpack(holder["o"]).float()
        try:
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                tcall = lambda i: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True,
                                                                 scale=SCALE)
                ref = tcall(0).transpose(1, 2).float()
                t, _ = fb.time_calls(tcall, torch.cuda.synchronize, n, n_outer=5, warm=2)
            row["cudnn"] = dict(ms=t * 1e3, TFLOPs=flops / t / 1e12,
                                max_abs_diff_vs_jax_mla=float((ref - mine).abs().max()))
        except Exception as e:  # noqa: BLE001
            RES["errors"].append(f"cudnn {H},{S}: {e!r}"[:2000])
            log("cudnn error", repr(e)[:500])
        log(f"prefill H={H} S={S}: jax_mla {row['jax_mla']['ms']:.3f} ms "
            f"{row['jax_mla']['TFLOPs']:.0f} TFLOP/s" + (
                f", cuDNN {row['cudnn']['ms']:.3f} ms {row['cudnn']['TFLOPs']:.0f} TFLOP/s, "
                f"max|diff| {row['cudnn']['max_abs_diff_vs_jax_mla']:.2e}" if "cudnn" in row else ""))
        del q, k, v, qj, kj, vj, holder, mine
        torch.cuda.empty_cache()
        save()


def summary():
    log("\n==== MLA decode (ms; loop timing) ====")
    log(f"{'B':>4} {'H':>4} {'S':>6} | jax_mla  in-jit   GB/s  TFLOP/s | xla     | fa3     [graph] | fa3/jax_mla")
    for r in RES["mla"]:
        j, x, f = r.get("jax_mla", {}), r.get("xla", {}), r.get("fa3", {})
        best = min(j["loop"]["ms"], j["in_jit"]["ms"]) if "loop" in j else float("nan")
        fms = f.get("loop", {}).get("ms", float("nan"))
        log(f"{r['B']:>4} {r['H']:>4} {r['S']:>6} | {j['loop']['ms']:.4f} {j['in_jit']['ms']:.4f} "
            f"{j['loop']['GBps']:6.0f} {j['loop']['TFLOPs']:6.1f} | {x['loop']['ms']:.4f} | "
            f"{fms:.4f} [{f.get('graph', {}).get('ms', float('nan')):.4f}] | {fms / best:.2f}")
    for fmt in QUANT_ROW_BYTES:
        rows = [r for r in RES["mla"] if f"jax_mla_{fmt}" in r]
        if rows:
            log(f"==== MLA decode over a {fmt} cache (ms; loop timing) ====")
        for r in rows:
            qm, j = r[f"jax_mla_{fmt}"]["loop"], r["jax_mla"]["loop"]
            log(f"{r['B']:>4} {r['H']:>4} {r['S']:>6} | {qm['ms']:.4f} ms {qm['GBps']:6.0f} GB/s | "
                f"bf16 cache {j['ms']:.4f} ms | speedup {j['ms'] / qm['ms']:.2f}x | max|diff| vs "
                f"xla {r[f'jax_mla_{fmt}']['max_abs_diff_vs_xla']:.2e}")
    log("==== 192/128 causal prefill, B=1 ====")
    for r in RES["prefill"]:
        j, c = r["jax_mla"], r.get("cudnn", {})
        log(f"H={r['H']:>3} S={r['S']:>5} | jax_mla {j['ms']:.3f} ms {j['TFLOPs']:.0f} TFLOP/s | "
            f"cuDNN {c.get('ms', float('nan')):.3f} ms {c.get('TFLOPs', float('nan')):.0f} TFLOP/s | "
            f"ratio {c.get('ms', float('nan')) / j['ms']:.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fi-dir", default=".carry/flashinfer_mla")
    ap.add_argument("--site", default="/tmp/fisite")
    ap.add_argument("--in-jit-calls", type=int, default=32)
    ap.add_argument("--skip", default="", help="comma list: mla, prefill, fa3")
    ap.add_argument("--rows", default="", help="MLA rows to run, B,H,S separated by '/' "
                                               "(default: all of MLA_CONFIGS)")
    ap.add_argument("--quant", default="", help="comma list of cache formats to time jax_mla "
                                                "over as well: q8_0, q8_kv")
    a = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    skip = set(a.skip.split(","))
    fb = load_fi(a.fi_dir)
    sys.modules["fi_bench"] = fb
    fi_ok = False
    if "fa3" not in skip:
        try:
            fb.unpack(os.path.join(a.fi_dir, "fi_pruned.tar.xz"), a.site)
            fb.setup_cuda_env()
            import jax  # noqa: F401  (jax first, then torch, as the tool does)
            import torch  # noqa: F401
            fi_ok = "fa3" in fb.jit_build(["fa3"], os.path.join(a.fi_dir, "prebuilt"))
        except Exception as e:  # noqa: BLE001
            RES["errors"].append(f"flashinfer setup: {e!r}"[:2000])
            log("flashinfer setup failed:", repr(e)[:500])
    import jax
    import torch
    RES["env"] = dict(gpu=torch.cuda.get_device_name(0), jax=jax.__version__, torch=torch.__version__)
    log("env", RES["env"])
    if "mla" not in skip:
        configs = ([tuple(int(x) for x in r.split(",")) for r in a.rows.split("/")]
                   if a.rows else MLA_CONFIGS)
        quant = tuple(f for f in a.quant.split(",") if f)
        bench_mla(fb, fi_ok, a.in_jit_calls, configs, quant)
    if "prefill" not in skip:
        bench_prefill()
    save()
    summary()


if __name__ == "__main__":
    main()
