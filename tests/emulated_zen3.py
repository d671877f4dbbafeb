"""The CPU kernels on an emulated Zen 3, compared bit for bit with the same
kernels run natively.

QEMU's user mode with its EPYC-Milan model (a Zen 3: AVX2, FMA and F16C, no
AVX-512) runs every kernel family, and the register-block tails that
tests/test_cpu_switches.py covers, on the ISA the module picks by itself,
which there must be AVX2; an AVX-512 instruction anywhere on the way
would stop it with SIGILL. This machine then runs the same cases on its own
AVX2 path (JAX_MLA_CPU_ISA=avx2), and the outputs and LSEs must be the same
bits: the same machine code on the same inputs. The tests compare the native
AVX2 results with the reference (tests/test_cpu_switches.py).

Why not the reference under QEMU: QEMU 7.2 does not emulate every instruction
exactly, and XLA's own code meets more of them. Its F16C conversions obey
MXCSR's denormals-are-zero and flush-to-zero, which XLA sets on its threads and
real CPUs ignore there (a float16 subnormal becomes 0 in and out: checked with
_mm_cvtph_ps and _mm_cvtps_ph under QEMU and on the Zen 4), and in our runs the
reference also got one head of a q8_kv decode wrong, while the kernel's output
had the native bits. So the float16 inputs here have no subnormals, and an
output that is a float16 subnormal natively may be 0 under QEMU (counted).

    python -P tests/emulated_zen3.py [--only SUBSTRING] [--qemu qemu-x86_64]

Needs this checkout's jax_mla installed and qemu-user 7.2 or newer (the first
whose emulator has AVX2; Debian 12: apt-get install qemu-user). Correctness
only, nothing is timed: emulated code runs tens of times slower (all 44 cases
took 83 s on 2 cores here). Not part of CI, whose machine need not have QEMU.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np

import jax_mla

CPU_MODEL = "EPYC-Milan"


def case(name, op, q, caches, **kw):
    """q: (shape, dtype); caches: ((shape, dtype or format), ...) for K and V
    (flash_attention) or the latent row (flash_mla)."""
    return dict(name=name, op=op, q=q, caches=caches, kw=kw)


F32, F16, BF16 = "float32", "float16", "bfloat16"
F16_TINY = 2.0**-14  # the smallest normal float16
MLA = dict(dv=512, v_offset=64)
CASES = [
    # flash_attention over float caches: the tile kernel (rows in lanes),
    # the GEMV kernel (few rows), several KV heads at once, MQA with empty rows.
    case(
        "attention tile, GQA prefill",
        "attention",
        ((2, 7, 8, 64), F32),
        (((2, 77, 2, 64), F32), ((2, 77, 2, 64), F32)),
        causal=True,
        kv_len=[77, 30],
    ),
    case(
        "attention GEMV, 192/128 decode",
        "attention",
        ((2, 1, 2, 192), F16),
        (((2, 300, 2, 192), F16), ((2, 300, 2, 128), F16)),
        kv_len=[300, 1],
    ),
    case(
        "attention KV heads, 16-head decode",
        "attention",
        ((1, 1, 16, 192), F16),
        (((1, 300, 16, 192), F16), ((1, 300, 16, 128), F16)),
    ),
    case(
        "attention tile, MQA bf16 prefill",
        "attention",
        ((2, 40, 5, 80), BF16),
        (((2, 65, 1, 80), BF16), ((2, 65, 1, 48), BF16)),
        causal=True,
        kv_len=[65, 3],
    ),
    # flash_mla over float caches: the direct path (decode, cache read in
    # place, split KV) and the tile path (more than 16 rows).
    case(
        "MLA direct, f16 decode, 2 splits",
        "mla",
        ((2, 1, 16, 576), F32),
        (((2, 300, 576), F16),),
        kv_len=[300, 45],
        num_splits=2,
        **MLA,
    ),
    case(
        "MLA direct, bf16 decode, 3 splits",
        "mla",
        ((1, 1, 16, 576), BF16),
        (((1, 200, 576), BF16),),
        num_splits=3,
        **MLA,
    ),
    case(
        "MLA tile, f16 prefill",
        "mla",
        ((2, 4, 16, 192), F16),
        (((2, 77, 192), F16),),
        dv=64,
        v_offset=24,
        causal=True,
        kv_len=[77, 0],
    ),
    case(
        "MLA tile, 32 rows over 576",
        "mla",
        ((1, 2, 16, 576), F32),
        (((1, 200, 576), F16),),
        causal=True,
        **MLA,
    ),
    # The 8-bit kernels: flash_mla's tile (16 heads) and GEMV (2 heads) per
    # format, an 8-bit prefill block; flash_attention's 8-bit tile, GEMV, and
    # KV-heads kernels, and a float K with 8-bit V.
    *[
        case(
            f"MLA {fmt}, {kind} decode",
            "mla",
            ((2, 1, heads, 576), F32),
            (((2, 77, 576), fmt),),
            kv_len=[77, 20],
            num_splits=2,
            **MLA,
        )
        for fmt in ("q8_0", "q8_kv", "q6_0")
        for kind, heads in (("tile", 16), ("GEMV", 2))
    ],
    case(
        "MLA q8_0, 32-row prefill",
        "mla",
        ((1, 2, 16, 576), F32),
        (((1, 200, 576), "q8_0"),),
        causal=True,
        **MLA,
    ),
    case(
        "attention q8_0, prefill",
        "attention",
        ((2, 40, 16, 192), F32),
        (((2, 135, 16, 192), "q8_0"), ((2, 135, 16, 128), "q8_0")),
        causal=True,
        kv_len=[135, 30],
    ),
    case(
        "attention q8_kv, GQA decode",
        "attention",
        ((2, 1, 8, 192), F32),
        (((2, 77, 4, 192), "q8_kv"), ((2, 77, 4, 128), "q8_kv")),
        kv_len=[77, 0],
    ),
    case(
        "attention q8_0, KV heads decode",
        "attention",
        ((2, 1, 16, 192), F32),
        (((2, 137, 16, 192), "q8_0"), ((2, 137, 16, 128), "q8_0")),
        kv_len=[137, 70],
    ),
    case(
        "attention f16 K, q8_0 V, GQA decode",
        "attention",
        ((2, 1, 8, 192), F32),
        (((2, 77, 4, 192), F16), ((2, 77, 4, 128), "q8_0")),
        kv_len=[77, 5],
    ),
    # The register blocks and their tails, as tests/test_cpu_switches.py
    # covers them per ISA: the float tile path's row blocks (17 to 30 rows),
    # the direct path's (4 to 16 rows), the 8-bit tile's (9 to 32 rows) and
    # its V column groups, each over key counts around the key blocks.
    *[
        case(
            f"tile row blocks, {sq} x {hq // hkv} rows",
            "attention",
            ((3, sq, hq, 96), F32),
            (((3, 129, hkv, 96), F16), ((3, 129, hkv, 80), BF16)),
            causal=True,
            q_pos=[87 - sq, 11 - sq, 129 - sq],
            kv_len=[87, 11, 129],
        )
        for sq, hq, hkv in ((17, 2, 2), (18, 2, 2), (7, 3, 1), (19, 3, 1))
    ],
    *[
        case(
            f"MLA direct row blocks, {heads} heads",
            "mla",
            ((7, 1, heads, 144), F32),
            (((7, 259, 144), F16),),
            dv=64,
            v_offset=16,
            kv_len=[1, 5, 7, 17, 63, 70, 259],
            num_splits=2,
        )
        for heads in (4, 5, 6, 7, 8, 9, 12, 13, 14, 15, 16)
    ],
    *[
        case(
            f"MLA {fmt} row blocks, {heads} heads",
            "mla",
            ((6, 1, heads, 576), F32),
            (((6, 137, 576), fmt),),
            kv_len=[1, 7, 9, 63, 72, 137],
            num_splits=3,
            **MLA,
        )
        for fmt in ("q8_0", "q8_kv")
        for heads in (9, 24, 32)
    ],
    *[
        case(
            f"MLA {fmt} V column groups, {heads} heads",
            "mla",
            ((7, 1, heads, 192), F32),
            (((7, 139, 192), fmt),),
            dv=144,
            v_offset=32,
            kv_len=[1, 3, 5, 8, 13, 66, 139],
            num_splits=2,
        )
        for fmt in ("q8_0", "q8_kv")
        for heads in (9, 16)
    ],
]


def make_inputs(c):
    """The case's inputs as numpy arrays (fresh normal data, seeded by name):
    q, then per cache its values or its quantized leaves (qs, d). Values of a
    narrower float type are kept as their (exact) float32 values, which .npz
    files hold; run_case rounds them back. float16 values have no subnormals:
    QEMU's F16C would flush them (module docstring)."""
    rng = np.random.default_rng(zlib.crc32(c["name"].encode()))

    def exact(x, dtype):
        x = np.asarray(x.astype(dtype).astype(jnp.float32))
        if dtype == F16:
            x = np.where(np.abs(x) < F16_TINY, np.copysign(F16_TINY, x), x)
        return x

    (shape, dtype), arrays = c["q"], {}
    arrays["q"] = exact(jnp.asarray(rng.standard_normal(shape, np.float32)), dtype)
    for i, (shape, kind) in enumerate(c["caches"]):
        x = jnp.asarray(rng.standard_normal(shape, np.float32))
        if kind in jax_mla.quant.FORMATS:
            qkv = jax_mla.quantize(x, kind)
            arrays[f"c{i}_qs"], arrays[f"c{i}_d"] = np.asarray(qkv.qs), np.asarray(qkv.d)
        else:
            arrays[f"c{i}"] = exact(x, kind)
    return arrays


def run_case(c, arrays):
    """(out, lse) of the native kernel on the case, as numpy arrays."""
    caches = []
    for i, (_, kind) in enumerate(c["caches"]):
        if kind in jax_mla.quant.FORMATS:
            caches.append(
                jax_mla.QuantizedKV(
                    jnp.asarray(arrays[f"c{i}_qs"]), jnp.asarray(arrays[f"c{i}_d"]), kind
                )
            )
        else:
            caches.append(jnp.asarray(arrays[f"c{i}"]).astype(kind))
    kw = dict(c["kw"])
    for key in ("q_pos", "kv_len"):
        if key in kw:
            kw[key] = jnp.asarray(kw[key], jnp.int32)
    op = jax_mla.flash_mla if c["op"] == "mla" else jax_mla.flash_attention
    fn = jax.jit(lambda q, *cs: op(q, *cs, return_lse=True, backend="native", **kw))
    out, lse = fn(jnp.asarray(arrays["q"]).astype(c["q"][1]), *caches)
    return np.asarray(out.astype(jnp.float32)), np.asarray(lse)  # out exact in float32


def child(folder):
    """Runs under QEMU: every case's kernel on the ISA the module picks."""
    cpu = jax_mla.backends()["cpu"]
    with open(os.path.join(folder, "isa.json"), "w") as f:
        json.dump(cpu, f)
    cases = json.load(open(os.path.join(folder, "cases.json")))
    for i, c in enumerate(cases):
        arrays = dict(np.load(os.path.join(folder, f"in{i}.npz")))
        out, lse = run_case(c, arrays)
        np.savez(os.path.join(folder, f"out{i}.npz"), out=out, lse=lse)
        print(f"emulated: {c['name']}", flush=True)


def compare(native, emulated, out_dtype):
    """(same, flushed): whether the emulated result has the native bits, except
    for float16 outputs that are subnormal natively and 0 under QEMU (flushed:
    how many)."""
    if native.shape != emulated.shape or native.dtype != emulated.dtype:
        return False, 0
    differ = native.view(np.uint32) != emulated.view(np.uint32)
    flushed = np.zeros_like(differ)
    if out_dtype == F16:
        flushed = differ & (np.abs(native) < F16_TINY) & (emulated == 0)
    return not (differ & ~flushed).any(), int(flushed.sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--qemu", default="qemu-x86_64")
    parser.add_argument("--only", help="run the cases whose name contains this")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)

    cases = [c for c in CASES if not args.only or args.only in c["name"]]
    if not cases:
        sys.exit(f"no case name contains {args.only!r}")
    with tempfile.TemporaryDirectory() as folder:
        inputs = [make_inputs(c) for c in cases]
        for i, arrays in enumerate(inputs):
            np.savez(os.path.join(folder, f"in{i}.npz"), **arrays)
        with open(os.path.join(folder, "cases.json"), "w") as f:
            json.dump(cases, f)
        cmd = [
            args.qemu,
            "-cpu",
            CPU_MODEL,
            sys.executable,
            "-P",
            str(pathlib.Path(__file__).resolve()),
            "--child",
            folder,
        ]
        print("+", " ".join(cmd[:-1]), "<folder>", flush=True)
        proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
        warnings = "TCG doesn't support requested feature"  # the model's extras TCG lacks
        sys.stderr.write("".join(l for l in proc.stderr.splitlines(True) if warnings not in l))
        if proc.returncode != 0:
            sys.exit(f"the emulated run failed (exit status {proc.returncode}; -4 is SIGILL)")
        cpu = json.load(open(os.path.join(folder, "isa.json")))
        print(
            f"emulated {CPU_MODEL}: jax_mla picked {cpu['isa']} (supported there: "
            f"{cpu['supported_isas']})"
        )
        failures = []
        if cpu["isa"] != "avx2" or "avx512" in cpu["supported_isas"]:
            failures.append(f"expected AVX2 and no AVX-512 on {CPU_MODEL}, got {cpu}")
        os.environ["JAX_MLA_CPU_ISA"] = "avx2"  # read at every call
        total_flushed = 0
        for i, (c, arrays) in enumerate(zip(cases, inputs)):
            emulated = np.load(os.path.join(folder, f"out{i}.npz"))
            native = run_case(c, arrays)
            (same_out, flushed), (same_lse, _) = (
                compare(native[0], emulated["out"], c["q"][1]),
                compare(native[1], emulated["lse"], F32),
            )
            same = (same_out, same_lse)
            total_flushed += flushed
            note = f" ({flushed} float16-subnormal output(s) 0 under QEMU)" if flushed else ""
            print(
                f"{c['name']:<40} out {'same bits' if same_out else 'DIFFERENT'}{note}, "
                f"lse {'same bits' if same_lse else 'DIFFERENT'}"
            )
            if not all(same):
                diff = np.nanmax(np.abs(native[0].astype(np.float64) - emulated["out"]))
                failures.append(
                    f"{c['name']}: emulated and native AVX2 results differ "
                    f"(max |out diff| {diff:.3g})"
                )
    if failures:
        sys.exit("\n".join(failures))
    aside = f", {total_flushed} float16-subnormal output(s) aside" if total_flushed else ""
    print(
        f"all {len(cases)} cases: the emulated Zen 3 and this machine's AVX2 path agree bit for "
        f"bit{aside}"
    )


if __name__ == "__main__":
    main()
