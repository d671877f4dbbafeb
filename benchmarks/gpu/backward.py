"""The attention backward on the GPU: jax_mla's native CUDA backward against
cuDNN's through PyTorch's SDPA backward, same process, same card.

DeepSeek's 192/128 causal attention, bf16, B = 1, Hq = Hkv = H, S queries
over S keys, scale 1/sqrt(192), at S in --seqs and H in --heads (default S =
4096, 16384 and H = 16, 128). Timed (jax_mla.bench.timing, back-to-back
calls, best pass of the median):
  jax_mla     the backward of jax.vjp(flash_attention): delta, the native
              kernels (dq, dk, dv in float32), the casts to bf16; the forward's
              residuals are computed once, outside the timing;
  kernel      the native target alone (jax_mla_flash_attention_bwd), its auto
              family, then each family forced (mma_sync; sm90 on Hopper), as
              kernel_<family> (its gradients against auto's: max|d|/max);
  cudnn       torch.autograd.grad of F.scaled_dot_product_attention under
              sdpa_kernel(SDPBackend.CUDNN_ATTENTION) (its preprocessing included).
TFLOP/s counts the five GEMMs of a flash backward over the visible pairs
(S, dP, dV, dK, dQ: 2 B H pairs (3 Dk + 2 Dv)) for every side; jax_mla's
kernels do two more (S and dP recomputed for dQ), not counted. "ratio" is
jax_mla's TFLOP/s (auto: sm90 on Hopper) over cuDNN's; "kernel", "mma_sync"
and "sm90" the target's alone in each family. "max|d|/max" compares jax_mla's gradients
with cuDNN's (max |difference| over max |cuDNN's|, per gradient).

Usage (device): python3 -P benchmarks/gpu/backward.py [--seqs 4096,16384] [--heads 16,128]
Writes $OUT/backward.json and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import math
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

OUT = os.environ.get("OUT", "/tmp/bench_out")
BUDGET_S = 0.5
DK, DV = 192, 128
SCALE = 1.0 / math.sqrt(DK)


def log(*a):
    print(*a, flush=True)


def flops(heads: int, seq: int) -> int:
    pairs = seq * (seq + 1) // 2  # causal, S queries over S keys
    return 2 * heads * pairs * (3 * DK + 2 * DV)


def families() -> list[str]:
    """The backward kernel families this card runs for 192/128: mma_sync, and
    sm90 on compute capability 9.0 (where the module lists the pair)."""
    import jax

    import jax_mla

    caps = jax_mla._ffi.module("gpu").capabilities()
    hopper = getattr(jax.devices()[0], "compute_capability", "") == "9.0"
    sm90 = hopper and [DK, DV] in [list(d) for d in caps.get("attention_bwd_sm90_head_dims", [])]
    return ["mma_sync"] + (["sm90"] if sm90 else [])


def row(heads: int, seq: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import jax_mla
    from jax_mla import _autodiff
    from jax_mla.bench import timing

    res: dict = dict(H=heads, S=seq)
    work = flops(heads, seq)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, seq, heads, DK, generator=g, device=dev).to(torch.bfloat16)
    k = torch.randn(1, seq, heads, DK, generator=g, device=dev).to(torch.bfloat16)
    v = torch.randn(1, seq, heads, DV, generator=g, device=dev).to(torch.bfloat16)
    dout = torch.randn(1, seq, heads, DV, generator=g, device=dev).to(torch.bfloat16)
    torch.cuda.synchronize()
    qj, kj, vj, dj = (jax.dlpack.from_dlpack(x) for x in (q, k, v, dout))

    def f(q, k, v):
        return jax_mla.flash_attention(q, k, v, scale=SCALE, causal=True, backend="native")

    out, vjp = jax.vjp(f, qj, kj, vj)  # the residuals, once
    backward = jax.jit(lambda vjp, d: vjp(d))
    grads = jax.block_until_ready(backward(vjp, dj))
    t = timing.time_calls(backward, lambda i: (vjp, dj), budget_s=BUDGET_S, back_to_back=True)
    res["jax_mla"] = dict(ms=t.seconds * 1e3, TFLOPs=work / t.seconds / 1e12)

    # The target alone, on the forward's LSE and the delta the backward computes.
    _, lse = jax.jit(
        lambda q, k, v: jax_mla.flash_attention(
            q, k, v, scale=SCALE, causal=True, return_lse=True, backend="native"
        )
    )(qj, kj, vj)
    delta = jnp.swapaxes(jnp.sum(dj.astype(jnp.float32) * out.astype(jnp.float32), -1), 1, 2)
    pos = (jnp.zeros((1,), jnp.int32), jnp.full((1,), seq, jnp.int32))
    args = (qj, kj, vj, dj, lse, delta) + pos
    names = list(jax_mla._ffi.module("gpu").capabilities()["attention_kernels"])
    auto = None
    for family in ["auto"] + families():
        kernel = jax.jit(
            _autodiff._native_backward(
                "flash_attention", SCALE, True, np.int32(names.index(family))
            )
        )
        got = jax.block_until_ready(kernel(*args))
        t = timing.time_calls(kernel, lambda i: args, budget_s=BUDGET_S, back_to_back=True)
        key = "kernel" if family == "auto" else f"kernel_{family}"
        res[key] = dict(ms=t.seconds * 1e3, TFLOPs=work / t.seconds / 1e12)
        if auto is None:
            auto = [np.asarray(g) for g in got]
        else:
            res[key]["max_rel_diff_vs_auto"] = {
                name: float(np.abs(np.asarray(g) - a).max() / max(np.abs(a).max(), 1e-30))
                for name, g, a in zip(("dq", "dk", "dv"), got, auto)
            }
        log(f"H={heads} S={seq}: {key} {res[key]}")
    log(f"H={heads} S={seq}: jax_mla {res['jax_mla']}")

    try:
        qt, kt, vt, dt = (x.transpose(1, 2).detach() for x in (q, k, v, dout))
        for x in (qt, kt, vt):
            x.requires_grad_(True)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=SCALE)

            def torch_bwd():
                return torch.autograd.grad(o, (qt, kt, vt), dt, retain_graph=True)

            ref = torch_bwd()
            t = timing.time_calls(
                torch_bwd,
                lambda i: (),
                budget_s=BUDGET_S,
                back_to_back=True,
                sync=lambda _: torch.cuda.synchronize(),
            )
        res["cudnn"] = dict(ms=t.seconds * 1e3, TFLOPs=work / t.seconds / 1e12)
        res["ratio"] = res["jax_mla"]["TFLOPs"] / res["cudnn"]["TFLOPs"]
        diffs = {}
        for name, mine, theirs in zip(("dq", "dk", "dv"), grads, ref):
            mine = np.asarray(mine, np.float32)
            theirs = theirs.transpose(1, 2).float().cpu().numpy()
            diffs[name] = float(np.abs(mine - theirs).max() / max(np.abs(theirs).max(), 1e-30))
        res["max_rel_diff_vs_cudnn"] = diffs
        log(f"  cudnn {res['cudnn']}, ratio {res['ratio']:.2f}, max|d|/max {diffs}")
    except Exception as e:  # noqa: BLE001  (a cuDNN without this config says why)
        res["cudnn_error"] = repr(e)[:2000]
        log("cudnn error", repr(e)[:500])
    return res


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", default="4096,16384")
    parser.add_argument("--heads", default="16,128")
    args = parser.parse_args()
    import jax
    import torch

    os.makedirs(OUT, exist_ok=True)
    log(
        "device",
        jax.devices()[0].device_kind,
        "torch",
        torch.__version__,
        "cudnn",
        torch.backends.cudnn.version(),
    )
    rows = []
    for seq in (int(s) for s in args.seqs.split(",")):
        for heads in (int(h) for h in args.heads.split(",")):
            try:
                rows.append(row(heads, seq))
            except Exception as e:  # noqa: BLE001  (e.g. out of memory: the next row still runs)
                rows.append(dict(H=heads, S=seq, error=repr(e)[:2000]))
                log(f"H={heads} S={seq}: error {e!r}"[:600])
            torch.cuda.empty_cache()
            with open(os.path.join(OUT, "backward.json"), "w") as fh:
                json.dump(rows, fh, indent=1)
    log("\n==== 192/128 causal backward, bf16, B = 1 (TFLOP/s of 5 GEMMs) ====")
    log(
        f"{'H':>4} {'S':>6} {'jax_mla ms':>11} {'TFLOP/s':>8} {'kernel':>8} {'mma_sync':>9} "
        f"{'sm90':>8} {'cuDNN ms':>9} {'TFLOP/s':>8} {'ratio':>6}"
    )
    nan = float("nan")
    for r in rows:
        j, kr, c = r.get("jax_mla", {}), r.get("kernel", {}), r.get("cudnn", {})
        mma, sm90 = r.get("kernel_mma_sync", {}), r.get("kernel_sm90", {})
        log(
            f"{r['H']:>4} {r['S']:>6} {j.get('ms', nan):>11.3f} {j.get('TFLOPs', nan):>8.1f} "
            f"{kr.get('TFLOPs', nan):>8.1f} {mma.get('TFLOPs', nan):>9.1f} "
            f"{sm90.get('TFLOPs', nan):>8.1f} {c.get('ms', nan):>9.3f} "
            f"{c.get('TFLOPs', nan):>8.1f} {r.get('ratio', nan):>6.2f}"
        )


if __name__ == "__main__":
    main()
