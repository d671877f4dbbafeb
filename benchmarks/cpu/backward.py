"""Times the CPU attention backward (jax_mla_flash_attention_bwd) against
jax.vjp of the plain-JAX formulation (jax_mla.bench.baselines.plain_attention:
einsums in the inputs' dtype with float32 accumulation, a float32 softmax;
jax.nn.dot_product_attention refuses Dk != Dv), DeepSeek's 192/128 causal
prefill, batch 1, 16 heads (KV heads = heads), scale 1/sqrt(192).

Two rows per size and dtype:
  bwd      the backward alone, given the forward's saved values: the native
           target after delta = rowsum(dout * out) (what the custom_vjp's
           backward runs) against the plain formulation's pullback (its
           residuals, the S x S softmax weights among them, already saved);
  fwd+bwd  a whole gradient step: the native forward with its LSE, delta and
           the backward, against jax.vjp of the plain formulation.
Each timed with jax_mla.bench.timing's timer (jitted, warm, synchronized);
`*` marks a time taken while other processes kept more than 0.25 cores busy.
speedup is jax ms / native ms. native cpu and jax cpu are the process's CPU
milliseconds per call (all threads, spin-waits included) and cpu x their
ratio: the work a call costs, which other processes' load moves far less
than the wall time. temp MiB is XLA's temporary buffer size of the fwd+bwd
functions (native / jax); err is max |native - plain| / max |plain| over dq,
dk, dv (the plain one rounds its einsum operands to the inputs' dtype).

    python -P benchmarks/cpu/backward.py [--sizes 1024,2048] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import subprocess

import jax
import jax.numpy as jnp
import numpy as np

import jax_mla
from jax_mla.bench import baselines, report, timing
from jax_mla.bench.cases import SCALE

BATCH, HEADS, DK, DV = 1, 16, 192, 128


def backward_call(q, k, v, dout, lse, delta):
    """The native backward target: (dq, dk, dv) in float32."""
    batch, seq_q = q.shape[:2]
    seq_kv = k.shape[1]
    call = jax.ffi.ffi_call(
        "jax_mla_flash_attention_bwd",
        tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)),
        vmap_method="sequential",
    )
    return call(
        q,
        k,
        v,
        dout,
        lse,
        delta,
        jnp.full((batch,), seq_kv - seq_q, jnp.int32),
        jnp.full((batch,), seq_kv, jnp.int32),
        scale=np.float32(SCALE),
        causal=np.bool_(True),
    )


def native_bwd(q, k, v, dout, out, lse):
    delta = jnp.moveaxis(jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1), 1, 2)
    grads = backward_call(q, k, v, dout, lse, delta)
    return tuple(g.astype(x.dtype) for g, x in zip(grads, (q, k, v)))


def native_fwd_bwd(q, k, v, dout):
    out, lse = jax_mla.flash_attention(
        q, k, v, scale=SCALE, causal=True, return_lse=True, backend="native"
    )
    return native_bwd(q, k, v, dout, out, lse)


plain = functools.partial(baselines.plain_attention, causal=True)


def plain_fwd_bwd(q, k, v, dout):
    return jax.vjp(plain, q, k, v)[1](dout)


def cpu_ms(fn, args, calls: int = 3) -> float:
    """CPU milliseconds this process spends per call (all its threads): the
    work a call costs, which other processes' load on a shared machine
    changes far less than the wall time."""
    start = os.times()
    for _ in range(calls):
        jax.block_until_ready(fn(*args))
    end = os.times()
    return ((end.user - start.user) + (end.system - start.system)) / calls * 1e3


def run(seq: int, dtype, budget_s: float) -> list[str]:
    rng = np.random.default_rng(0)
    shapes = [(BATCH, seq, HEADS, d) for d in (DK, DK, DV, DV)]
    q, k, v, dout = (jnp.asarray(rng.standard_normal(s, np.float32), dtype) for s in shapes)
    out, lse = jax_mla.flash_attention(
        q, k, v, scale=SCALE, causal=True, return_lse=True, backend="native"
    )
    _, pullback = jax.vjp(plain, q, k, v)
    fns = {
        ("bwd", "native"): (jax.jit(native_bwd), (q, k, v, dout, out, lse)),
        ("bwd", "jax"): (jax.jit(lambda f, g: f(g)), (pullback, dout)),
        ("fwd+bwd", "native"): (jax.jit(native_fwd_bwd), (q, k, v, dout)),
        ("fwd+bwd", "jax"): (jax.jit(plain_fwd_bwd), (q, k, v, dout)),
    }
    grads = {key: jax.block_until_ready(fn(*args)) for key, (fn, args) in fns.items()}
    err = max(
        float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
        / float(jnp.max(jnp.abs(b.astype(jnp.float32))))
        for a, b in zip(grads["fwd+bwd", "native"], grads["fwd+bwd", "jax"])
    )
    ms, load, cpu = {}, {}, {}
    for key, (fn, args) in fns.items():
        with timing.OtherLoad() as other:
            ms[key] = timing.time_calls(fn, lambda _: args, budget_s=budget_s).seconds * 1e3
        load[key] = timing.disturbed(other.cores)
        cpu[key] = cpu_ms(fn, args)
    lines = []
    for step in ("bwd", "fwd+bwd"):
        temp = ""
        if step == "fwd+bwd":
            mib = {
                b: fns[step, b][0].lower(*fns[step, b][1]).compile().memory_analysis()
                for b in ("native", "jax")
            }
            temp = "/".join(f"{m.temp_size_in_bytes / 2**20:.0f}" for m in mib.values())
        mark = {b: "*" if load[step, b] else " " for b in ("native", "jax")}
        lines.append(
            f"{seq:>5} {jnp.dtype(dtype).name:>8} {step:>8} "
            f"{ms[step, 'native']:>9.1f}{mark['native']} {ms[step, 'jax']:>9.1f}{mark['jax']} "
            f"{ms[step, 'jax'] / ms[step, 'native']:>7.2f} {cpu[step, 'native']:>9.0f} "
            f"{cpu[step, 'jax']:>9.0f} {cpu[step, 'jax'] / cpu[step, 'native']:>7.2f} "
            f"{temp:>11} {err:>8.1e}"
        )
    return lines


def script_commit() -> str:
    """The commit of the checkout this script runs from (jax_mla itself is
    the installed package, so report.git_commit cannot tell)."""
    here = pathlib.Path(__file__).resolve().parent
    result = subprocess.run(
        ["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return result.stdout.strip() or "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1024,2048")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds per timed pass")
    args = parser.parse_args()
    jax.config.update("jax_default_device", jax.devices("cpu")[0])
    meta = report.metadata(quick=False, command="benchmarks/cpu/backward.py")
    cpu = meta["cpu"]
    print(
        f"{meta['date']}, commit {script_commit()}; CPU: {cpu['model']}, avx512f: "
        f"{cpu['avx512f']}, avx2: {cpu['avx2']}; {cpu['threads']} threads; ISA path "
        f"{cpu['isa']}; jax {meta['versions']['jax']}"
    )
    print(f"B={BATCH}, H={HEADS} (KV heads = heads), Dk={DK}, Dv={DV}, causal, Sq = Skv = S")
    print(
        f"{'S':>5} {'dtype':>8} {'step':>8} {'native ms':>10} {'jax ms':>10} {'speedup':>7} "
        f"{'native cpu':>9} {'jax cpu':>9} {'cpu x':>7} {'temp MiB':>11} {'err':>8}"
    )
    for seq in (int(s) for s in args.sizes.split(",")):
        for dtype in args.dtypes.split(","):
            for line in run(seq, jnp.dtype(dtype), args.budget):
                print(line, flush=True)


if __name__ == "__main__":
    main()
