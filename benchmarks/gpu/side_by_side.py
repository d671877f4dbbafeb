"""jax_mla vs the plain-JAX formulation vs FlashInfer (MLA decode) and vs
PyTorch's cuDNN SDPA (192/128 causal prefill), same process, same card.

The shapes are the benchmark package's GPU cases (jax_mla.bench.cases): MLA
decode at (B, H, S) with q [B, 1, H, 576], a bf16 latent cache [B, S, 576],
V = its first 512 columns, scale 1/sqrt(192); 192/128 causal prefill of S
queries over S keys, B = 1. Every side is timed by the package's timer
(jax_mla.bench.timing: calls issued back to back between synchronizations,
best pass of the median of samples, caches under 256 MB rotated among copies
so calls do not hit the L2); jax_mla, XLA and FlashInfer read the very same
bytes (DLPack). jax_mla is also timed as n calls inside one jitted executable
("in-jit"), which removes the Python dispatch of each call, and checked
against jax_mla.reference ("err"); the others report max |diff| vs XLA.

Quantized latent caches (--quant q8_0,q8_kv): jax_mla is also timed over the
same cache quantized to each format; GB/s counts the bytes read (576 + 36 per
row for q8_0, 576 + 4 for q8_kv); max |diff| vs XLA over the bf16 cache is the
format's error, not only the kernel's.

Paged caches (--paged P): jax_mla is also timed over the same bytes viewed as
pages of P rows (jax_mla.flash_mla's block_table, an in-order table so the
result is the contiguous one's; --shuffle: the pages copied to a random order
of the pool, the table to match), and, with --flashmla-dir (FlashMLA built by
/work/shared/tools/flashmla's build.sh; sm_90a), DeepSeek's FlashMLA, which
reads pages of 64 natively, over the same bytes; FlashInfer's fa3 already reads
them as pages of 64.

Usage (device): python3 -P benchmarks/gpu/side_by_side.py --fi-dir .carry/flashinfer_mla
  [--rows 64,16,16384/128,128,8192] [--quant q8_0,q8_kv] [--skip prefill,fa3]
  [--paged 64 [--shuffle] --flashmla-dir /tmp/fmb/flashmla]
Writes $OUT/side_by_side.json and prints a table last.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

OUT = os.environ.get("OUT", "/tmp/bench_out")
BUDGET_S = 0.3
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


def metrics(case, seconds: float) -> dict:
    return dict(
        ms=seconds * 1e3, GBps=case.cache_bytes / seconds / 1e9, TFLOPs=case.flops / seconds / 1e12
    )


def load_flashmla(fm_dir):
    """DeepSeek's flash_mla module built in fm_dir (build.sh's DEST/flashmla), or None."""
    if not fm_dir:
        return None
    try:
        sys.path.insert(0, fm_dir)
        import flash_mla

        return flash_mla
    except Exception as e:  # noqa: BLE001
        RES["errors"].append(f"flashmla import: {e!r}"[:2000])
        log("flashmla import failed:", repr(e)[:500])
        return None


def bench_mla(fb, fi_ok, in_jit_calls, configs, quant=(), paged=0, fm=None, shuffle=False):
    import torch

    ws = (
        torch.empty(512 * 1024 * 1024, dtype=torch.uint8, device=torch.device("cuda"))
        if fi_ok
        else None
    )
    for B, H, S in configs:
        row = dict(B=B, H=H, S=S)
        RES["mla"].append(row)
        mla_row(row, fb, ws, in_jit_calls, quant, paged, fm, shuffle)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # this row's tensors died with mla_row's frame
        save()


def mla_row(row, fb, ws, in_jit_calls, quant, paged=0, fm=None, shuffle=False):
    """Fills row with one MLA decode configuration's timings (FlashInfer's
    when ws, its workspace, is given; jax_mla paged with pages of `paged`
    rows and FlashMLA's when fm is given; with shuffle, those two read pages
    placed in a random order of the pool, through the matching table)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import jax_mla
    from jax_mla.bench import baselines, ops, timing
    from jax_mla.bench.cases import Case

    B, H, S = row["B"], row["H"], row["S"]
    dev = torch.device("cuda")
    torch_sync = lambda _: torch.cuda.synchronize()  # noqa: E731
    case = Case("flash_mla", 1, S, "bf16", B, H, "bf16")
    ncp = timing.copies_past_l2(case.cache_bytes)
    row["cache_copies"] = ncp
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, H, 576, generator=g, device=dev).to(torch.bfloat16)
    kvs = [torch.randn(B * S, 576, generator=g, device=dev).to(torch.bfloat16) for _ in range(ncp)]
    torch.cuda.synchronize()
    qj = jax.dlpack.from_dlpack(q)[:, None]  # [B, 1, H, 576], as the op takes it
    kvj = [jax.dlpack.from_dlpack(kv.view(B, S, 576)) for kv in kvs]
    ours, xla = ops.native_fn(case), baselines.plain_fn(case)
    outs = {}
    for name, fn in (("jax_mla", ours), ("xla", xla)):
        jax.block_until_ready(fn(qj, kvj[0]))
        t = timing.time_calls(
            fn, lambda i: (qj, kvj[i % ncp]), budget_s=BUDGET_S, back_to_back=True
        )
        row[name] = dict(loop=metrics(case, t.seconds), calls=t.calls)
        outs[name] = np.asarray(fn(qj, kvj[0]).astype(jnp.float32))[:, 0]
    row["jax_mla"]["err"] = ops.relative_error(ours, ops.reference_fn(case), (qj, kvj[0]))
    # jax_mla, n calls in one executable (rotating the copies)
    reps = max(ncp, (in_jit_calls // ncp) * ncp)
    many_fn = jax.jit(lambda q, kvs: [ours(q, kv) for kv in kvs])
    many = [kvj[i % ncp] for i in range(reps)]
    jax.block_until_ready(many_fn(qj, many))
    t = timing.time_calls(many_fn, lambda i: (qj, many), budget_s=BUDGET_S)
    row["jax_mla"]["in_jit"] = metrics(case, t.seconds / reps)
    # jax_mla over quantized copies of the same caches
    for fmt in quant:
        qcase = Case("flash_mla", 1, S, fmt, B, H, "bf16")
        quantize = jax.jit(functools.partial(jax_mla.quantize, fmt=fmt))
        qkvs = jax.block_until_ready([quantize(kv) for kv in kvj])
        ours_q = ops.native_fn(qcase)
        jax.block_until_ready(ours_q(qj, qkvs[0]))
        t = timing.time_calls(
            ours_q, lambda i, cs=qkvs: (qj, cs[i % ncp]), budget_s=BUDGET_S, back_to_back=True
        )
        row[f"jax_mla_{fmt}"] = dict(loop=metrics(qcase, t.seconds))
        outs[f"jax_mla_{fmt}"] = np.asarray(ours_q(qj, qkvs[0]).astype(jnp.float32))[:, 0]
        del qkvs
    # Paged: the same bytes as pages, the block table in order.
    if paged:
        from jax_mla.bench.cases import SCALE

        n_pages = B * S // paged
        order = np.random.default_rng(1).permutation(n_pages) if shuffle else np.arange(n_pages)
        table = jnp.asarray(order, jnp.int32).reshape(B, S // paged)
        pages = [kv.reshape(n_pages, paged, 576) for kv in kvj]
        if shuffle:  # logical page i at pool slot order[i]
            pages = [jnp.zeros_like(pg).at[table.reshape(-1)].set(pg) for pg in pages]
        ours_p = jax.jit(
            lambda q, pg, bt: jax_mla.flash_mla(
                q, pg, block_table=bt, dv=512, scale=SCALE, backend="native"
            )
        )
        jax.block_until_ready(ours_p(qj, pages[0], table))
        t = timing.time_calls(
            ours_p, lambda i: (qj, pages[i % ncp], table), budget_s=BUDGET_S, back_to_back=True
        )
        row["jax_mla_paged"] = dict(
            loop=metrics(case, t.seconds), calls=t.calls, page=paged, shuffled=shuffle
        )
        outs["jax_mla_paged"] = np.asarray(ours_p(qj, pages[0], table).astype(jnp.float32))[:, 0]
        del pages
    if fm is not None:
        try:
            from jax_mla.bench.cases import SCALE

            fq = q[:, None].contiguous()  # [B, 1, H, 576]
            fcaches = [kv.view(B * S // 64, 64, 1, 576) for kv in kvs]
            ftable = torch.arange(B * S // 64, dtype=torch.int32, device=dev).view(B, S // 64)
            if shuffle:  # logical page i at pool slot order[i]
                order = np.random.default_rng(2).permutation(B * S // 64)
                ftable = torch.as_tensor(order, dtype=torch.int32, device=dev).view(B, S // 64)
                shuffled = []
                for fc in fcaches:
                    pool = torch.empty_like(fc)
                    pool[ftable.view(-1).long()] = fc
                    shuffled.append(pool)
                fcaches = shuffled
            seqlens = torch.full((B,), S, dtype=torch.int32, device=dev)
            sched, _ = fm.get_mla_metadata()

            def fm_run(cache):
                return fm.flash_mla_with_kvcache(
                    fq, cache, ftable, seqlens, 512, sched, None, softmax_scale=SCALE
                )[0]

            out = fm_run(fcaches[0])
            torch.cuda.synchronize()
            outs["flashmla"] = out[:, 0].float().cpu().numpy()
            t = timing.time_calls(
                fm_run,
                lambda i: (fcaches[i % ncp],),
                budget_s=BUDGET_S,
                back_to_back=True,
                sync=torch_sync,
            )
            row["flashmla"] = dict(loop=metrics(case, t.seconds), calls=t.calls)
            del fcaches
        except Exception as e:  # noqa: BLE001
            RES["errors"].append(f"flashmla {B},{H},{S}: {e!r}"[:2000])
            log("flashmla error", repr(e)[:500])
    # FlashInfer fa3
    if ws is not None:
        try:
            q_nope, q_pe = q[..., :512].contiguous(), q[..., 512:].contiguous()
            ps = 64
            ckvs = [kv[:, :512].contiguous().view(B * S // ps, ps, 512) for kv in kvs]
            kpes = [kv[:, 512:].contiguous().view(B * S // ps, ps, 64) for kv in kvs]
            w, run, _, _ = fb.fi_make_wrapper("fa3", ws, B, H, [S] * B, ps, dev)
            out = torch.empty(B, H, 512, dtype=torch.bfloat16, device=dev)
            fa3_args = lambda i: (q_nope, q_pe, ckvs[i % ncp], kpes[i % ncp], out)  # noqa: E731
            run(*fa3_args(0))
            torch.cuda.synchronize()
            outs["fa3"] = out.float().cpu().numpy()
            t = timing.time_calls(
                run, fa3_args, budget_s=BUDGET_S, back_to_back=True, sync=torch_sync
            )
            row["fa3"] = dict(loop=metrics(case, t.seconds), calls=t.calls)
            try:
                graph_s = fb.time_graph(lambda i: run(*fa3_args(i)), min(t.calls, 50))
                row["fa3"]["graph"] = metrics(case, graph_s)
            except Exception as e:  # noqa: BLE001
                row["fa3"]["graph_error"] = repr(e)[:300]
            del ckvs, kpes, w
        except Exception as e:  # noqa: BLE001
            RES["errors"].append(f"fa3 {B},{H},{S}: {e!r}"[:2000])
            log("fa3 error", repr(e)[:500])
    ref = outs["xla"]
    for k, o in outs.items():
        row.setdefault(k, {})["max_abs_diff_vs_xla"] = float(np.abs(o - ref).max())
    log(
        f"MLA B={B} H={H} S={S}: "
        + ", ".join(
            f"{k} {row[k]['loop']['ms']:.4f} ms"
            for k in ("jax_mla", "xla", "fa3", "jax_mla_paged", "flashmla")
            + tuple(f"jax_mla_{f}" for f in quant)
            if "loop" in row.get(k, {})
        )
        + f", jax_mla in-jit {row['jax_mla']['in_jit']['ms']:.4f} ms, jax_mla err "
        f"{row['jax_mla']['err']:.1e}, max|diff| vs xla "
        + ", ".join(f"{k} {row[k]['max_abs_diff_vs_xla']:.2e}" for k in outs)
    )


def bench_prefill(prefill):
    import torch

    for H, S in prefill:
        row = dict(B=1, H=H, S=S)
        RES["prefill"].append(row)
        prefill_row(row)
        torch.cuda.empty_cache()  # this row's tensors died with prefill_row's frame
        save()


def prefill_row(row):
    """Fills row with one 192/128 causal prefill configuration's timings."""
    import jax
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from jax_mla.bench import ops, timing
    from jax_mla.bench.cases import SCALE, Case

    H, S = row["H"], row["S"]
    dev = torch.device("cuda")
    torch_sync = lambda _: torch.cuda.synchronize()  # noqa: E731
    case = Case("flash_attention", S, S, "bf16", 1, H, "bf16")
    flops = case.flops  # the visible half of the score matrix
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, S, H, 192, generator=g, device=dev).to(torch.bfloat16)
    k = torch.randn(1, S, H, 192, generator=g, device=dev).to(torch.bfloat16)
    v = torch.randn(1, S, H, 128, generator=g, device=dev).to(torch.bfloat16)
    torch.cuda.synchronize()
    qj, kj, vj = (jax.dlpack.from_dlpack(x) for x in (q, k, v))
    ours = ops.native_fn(case)
    mine = ours(qj, kj, vj)
    t = timing.time_calls(ours, lambda i: (qj, kj, vj), budget_s=BUDGET_S, back_to_back=True)
    row["jax_mla"] = dict(
        ms=t.seconds * 1e3,
        TFLOPs=flops / t.seconds / 1e12,
        err=ops.relative_error(ours, ops.reference_fn(case), ops.check_inputs(case, (qj, kj, vj))),
    )
    mine = torch.from_dlpack(mine).float()
    try:
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            sdpa = lambda q, k, v: F.scaled_dot_product_attention(  # noqa: E731
                q, k, v, is_causal=True, scale=SCALE
            )
            ref = sdpa(qt, kt, vt).transpose(1, 2).float()
            t = timing.time_calls(
                sdpa, lambda i: (qt, kt, vt), budget_s=BUDGET_S, back_to_back=True, sync=torch_sync
            )
        row["cudnn"] = dict(
            ms=t.seconds * 1e3,
            TFLOPs=flops / t.seconds / 1e12,
            max_abs_diff_vs_jax_mla=float((ref - mine).abs().max()),
        )
    except Exception as e:  # noqa: BLE001
        RES["errors"].append(f"cudnn {H},{S}: {e!r}"[:2000])
        log("cudnn error", repr(e)[:500])
    log(
        f"prefill H={H} S={S}: jax_mla {row['jax_mla']['ms']:.3f} ms "
        f"{row['jax_mla']['TFLOPs']:.0f} TFLOP/s err {row['jax_mla']['err']:.1e}"
        + (
            f", cuDNN {row['cudnn']['ms']:.3f} ms {row['cudnn']['TFLOPs']:.0f} TFLOP/s, "
            f"max|diff| {row['cudnn']['max_abs_diff_vs_jax_mla']:.2e}"
            if "cudnn" in row
            else ""
        )
    )


def summary():
    nan = float("nan")
    log("\n==== MLA decode (ms; back-to-back calls) ====")
    log(
        f"{'B':>4} {'H':>4} {'S':>6} | jax_mla  in-jit   GB/s  TFLOP/s | xla     | fa3     [graph] "
        "| fa3/jax_mla"
    )
    for r in RES["mla"]:
        j, x, f = r["jax_mla"], r["xla"], r.get("fa3", {})
        best = min(j["loop"]["ms"], j["in_jit"]["ms"])
        fms = f.get("loop", {}).get("ms", nan)
        log(
            f"{r['B']:>4} {r['H']:>4} {r['S']:>6} | {j['loop']['ms']:.4f} {j['in_jit']['ms']:.4f} "
            f"{j['loop']['GBps']:6.0f} {j['loop']['TFLOPs']:6.1f} | {x['loop']['ms']:.4f} | "
            f"{fms:.4f} [{f.get('graph', {}).get('ms', nan):.4f}] | {fms / best:.2f}"
        )
    for fmt in ("q8_0", "q8_kv"):
        rows = [r for r in RES["mla"] if f"jax_mla_{fmt}" in r]
        if rows:
            log(f"==== MLA decode over a {fmt} cache (ms; back-to-back calls) ====")
        for r in rows:
            qm, j = r[f"jax_mla_{fmt}"]["loop"], r["jax_mla"]["loop"]
            log(
                f"{r['B']:>4} {r['H']:>4} {r['S']:>6} | {qm['ms']:.4f} ms {qm['GBps']:6.0f} GB/s | "
                f"bf16 cache {j['ms']:.4f} ms | speedup {j['ms'] / qm['ms']:.2f}x | max|diff| vs "
                f"xla {r[f'jax_mla_{fmt}']['max_abs_diff_vs_xla']:.2e}"
            )
    rows = [r for r in RES["mla"] if "jax_mla_paged" in r]
    if rows:
        shuffled = rows[0]["jax_mla_paged"].get("shuffled")
        tables = "shuffled (jax_mla, FlashMLA)" if shuffled else "in pool order"
        log(
            f"==== MLA decode, paged (pages of {rows[0]['jax_mla_paged']['page']} for jax_mla, "
            f"64 for FlashMLA and fa3; tables {tables}; ms, back-to-back calls) ===="
        )
        log(f"{'B':>4} {'H':>4} {'S':>6} | paged   contig. | FlashMLA fm/paged | fa3     fa3/paged")
    for r in rows:
        pm = r["jax_mla_paged"]["loop"]["ms"]
        fm = r.get("flashmla", {}).get("loop", {}).get("ms", nan)
        fa = r.get("fa3", {}).get("loop", {}).get("ms", nan)
        log(
            f"{r['B']:>4} {r['H']:>4} {r['S']:>6} | {pm:.4f} {r['jax_mla']['loop']['ms']:.4f} | "
            f"{fm:.4f}   {fm / pm:.2f}      | {fa:.4f} {fa / pm:.2f}"
        )
    log("==== 192/128 causal prefill, B=1 ====")
    for r in RES["prefill"]:
        j, c = r["jax_mla"], r.get("cudnn", {})
        log(
            f"H={r['H']:>3} S={r['S']:>5} | jax_mla {j['ms']:.3f} ms {j['TFLOPs']:.0f} TFLOP/s | "
            f"cuDNN {c.get('ms', nan):.3f} ms {c.get('TFLOPs', nan):.0f} TFLOP/s | "
            f"ratio {c.get('ms', nan) / j['ms']:.2f}"
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fi-dir", default=".carry/flashinfer_mla")
    ap.add_argument("--site", default="/tmp/fisite")
    ap.add_argument("--in-jit-calls", type=int, default=32)
    ap.add_argument("--skip", default="", help="comma list: mla, prefill, fa3")
    ap.add_argument(
        "--rows",
        default="",
        help="MLA rows to run, B,H,S separated by '/' (default: the package's GPU MLA decode rows)",
    )
    ap.add_argument(
        "--quant",
        default="",
        help="comma list of cache formats to time jax_mla over as well: q8_0, q8_kv",
    )
    ap.add_argument(
        "--paged",
        type=int,
        default=0,
        help="also time jax_mla over the caches as pages of this many rows (16, 32, 64, 128)",
    )
    ap.add_argument(
        "--shuffle",
        action="store_true",
        help="with --paged: jax_mla's and FlashMLA's pages in a random order of the pool "
        "(fa3 keeps its in-order table)",
    )
    ap.add_argument(
        "--flashmla-dir",
        default="",
        help="FlashMLA built by build.sh (its DEST/flashmla): time it over pages of 64",
    )
    a = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    skip = set(a.skip.split(","))
    fb = load_fi(a.fi_dir)
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
    import torch

    from jax_mla.bench import cases, report

    RES["env"] = dict(
        gpu=torch.cuda.get_device_name(0),
        torch=torch.__version__,
        **report.metadata(False, " ".join(sys.argv)),
    )
    log("env", RES["env"])
    if "mla" not in skip:
        configs = (
            [tuple(int(x) for x in r.split(",")) for r in a.rows.split("/")]
            if a.rows
            else cases.GPU_MLA_DECODE
        )
        quant = tuple(f for f in a.quant.split(",") if f)
        fm = load_flashmla(a.flashmla_dir)
        bench_mla(fb, fi_ok, a.in_jit_calls, configs, quant, a.paged, fm, a.shuffle)
    if "prefill" not in skip:
        bench_prefill(cases.GPU_PREFILL)
    save()
    summary()


if __name__ == "__main__":
    main()
