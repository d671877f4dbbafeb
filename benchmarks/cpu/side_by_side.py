"""jax_mla vs ik_llama.cpp on the CPU, in one run, on the workloads of the CPU
speed comparison (DeepSeek-V2-Lite shapes: 16 heads, scale 1/sqrt(192), f32
queries over an f16 or q8_0 cache; MLA's V = the first 512 columns of the row).

jax_mla is checked against jax_mla.reference and timed by the benchmark
package (jax_mla.bench: its cases, its timer: a jitted call as a user makes
it, warm, best of 3 passes of the median of repeated calls). ik_llama.cpp is
timed by ik_bench's fa_bench_ik (one ggml graph node on its OpenMP threads)
with as many calls per pass, best of 3 passes, and checked by its own float64
--check. Ratio = jax_mla ms / ik ms (lower is better).

    python -P benchmarks/cpu/side_by_side.py --ik-bench /tmp/ik_bench/harness [--quick]
        [--only NAME-PART] [--json F]
    python -P benchmarks/cpu/side_by_side.py --ik-bench DIR --tests tg@1024,pp512@4096
        --caches f16,q8_0 [--ops flash_mla]     (any tests instead of the workloads)

Run it with `python -P` (or from outside the repo root), so the installed
jax_mla (with its native module) is imported. ik_bench: the ik_bench tool
(about 13 minutes to build, once per machine).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict

from jax_mla.bench import cases, ops, report
from jax_mla.bench.cases import Case

IK_BINARY = "fa_bench_ik"
# ik_llama.cpp's own --check: relative error against float64.
IK_TOLERANCE = {"f16": 1e-2, "bf16": 1e-2, "q8_0": 3e-2}
PASSES = 3
BUDGET_S = 0.5
WORKLOADS = [
    ("MLA tg@1024", Case("flash_mla", 1, 1024, "f16")),
    ("MLA tg@4096", Case("flash_mla", 1, 4096, "f16")),
    ("MLA tg@16384", Case("flash_mla", 1, 16384, "f16")),
    ("MLA q8_0 tg@16384", Case("flash_mla", 1, 16384, "q8_0")),
    ("MLA pp512@4096", Case("flash_mla", 512, 4096, "f16")),
    ("MLA q8_0 pp512@4096", Case("flash_mla", 512, 4096, "q8_0")),
    ("std tg@16384", Case("flash_attention", 1, 16384, "f16")),
    ("std q8_0 tg@4096", Case("flash_attention", 1, 4096, "q8_0")),
    ("std q8_0 tg@16384", Case("flash_attention", 1, 16384, "q8_0")),
    ("std pp512@4096", Case("flash_attention", 512, 4096, "f16")),
    ("std q8_0 pp512@4096", Case("flash_attention", 512, 4096, "q8_0")),
]
QUICK = {"MLA tg@1024", "MLA tg@4096", "std tg@16384", "MLA q8_0 tg@16384"}


def time_ik(binary: str, case: Case, reps: int) -> dict:
    """ik_llama.cpp on the case: best median_ms of PASSES runs of `reps` calls,
    its relative error against float64, and its lowest CPU use."""
    cmd = [
        binary,
        "mla" if case.op == "flash_mla" else "std",
        case.cache,
        str(case.seq_q),
        str(case.n_kv),
        "--threads",
        str(report.threads()),
        "--heads",
        str(case.heads),
    ]
    if case.op == "flash_mla":
        cmd += ["--voff", "0"]  # V = the first 512 columns, as jax_mla's rows read it
    if case.causal:
        cmd.append("--causal")

    def run(*extra):
        line = subprocess.run(cmd + list(extra), check=True, capture_output=True, text=True).stdout
        return dict(re.findall(r"(\w+)=(\S+)", line))

    err = float(run("--check", "--reps", "1")["rel_err"])
    passes = [run("--reps", str(reps)) for _ in range(PASSES)]
    return {
        "ms": min(float(p["median_ms"]) for p in passes),
        "err": err,
        "cpu_util": min(float(p["cpu_util"]) for p in passes),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ik-bench",
        default=os.environ.get("JAX_MLA_IK_BENCH"),
        help=f"folder with ik_bench's {IK_BINARY} (default $JAX_MLA_IK_BENCH)",
    )
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(sorted(QUICK))}")
    parser.add_argument("--json", help="also write the rows and metadata as JSON")
    parser.add_argument("--only", help="run the workloads whose name contains this")
    parser.add_argument(
        "--tests",
        type=lambda s: [cases.parse_test(t) for t in s.split(",")],
        help="comma-separated tg@N / ppS@N to run instead of the workloads",
    )
    parser.add_argument(
        "--caches",
        default="f16",
        type=lambda s: s.split(","),
        help=f"with --tests: comma-separated subset of {', '.join(IK_TOLERANCE)}",
    )
    parser.add_argument(
        "--ops",
        default=",".join(cases.OPS),
        type=lambda s: s.split(","),
        help=f"with --tests: comma-separated subset of {', '.join(cases.OPS)}",
    )
    args = parser.parse_args(argv)
    if not args.ik_bench:
        parser.error("--ik-bench (or JAX_MLA_IK_BENCH) must name the ik_bench harness folder")
    binary = os.path.join(args.ik_bench, IK_BINARY)
    if not os.access(binary, os.X_OK):
        parser.error(f"--ik-bench: no executable {IK_BINARY} in {args.ik_bench}")
    workloads = WORKLOADS
    if args.tests:
        bad = [c for c in args.caches if c not in IK_TOLERANCE] + [
            o for o in args.ops if o not in cases.OPS
        ]
        if bad:
            parser.error(f"--caches/--ops: unknown {', '.join(bad)}")
        workloads = [
            (f"{'MLA' if c.op == 'flash_mla' else 'std'} {c.cache} {c.test}", c)
            for c in cases.cpu_cases(args.tests, args.ops, args.caches)
        ]
    meta = report.metadata(
        args.quick,
        " ".join(["benchmarks/cpu/side_by_side.py", *(sys.argv[1:] if argv is None else argv)]),
    )
    print(
        f"# {meta['cpu']['model']}, {meta['cpu']['threads']} threads; jax "
        f"{meta['versions']['jax']}; jax_mla {meta['versions']['jax_mla']} commit "
        f"{meta['commit']}, ISA {meta['cpu']['isa']}"
    )
    print(
        f"{'workload':<20} {'jax_mla ms':>10} {'ik ms':>9} {'ratio':>6} {'jax_mla GFLOP/s':>15} "
        f"{'ik GFLOP/s':>10} {'ik cpu_util':>11} {'jax_mla err':>11} {'ik err':>8}"
    )
    rows, bad = [], []
    for name, case in workloads:
        if args.quick and name not in QUICK or args.only and args.only not in name:
            continue
        ours = ops.run_case(case, "cpu", BUDGET_S, backends=("native",))[0]
        if ops.failed(ours):
            bad.append(f"{name}: jax_mla err {ours.err:.3g} > {ours.tolerance:g}")
            continue
        ik = time_ik(binary, case, ours.samples)
        if not ik["err"] <= IK_TOLERANCE[case.cache]:
            bad.append(f"{name}: ik err {ik['err']:.3g} > {IK_TOLERANCE[case.cache]:g}")
        row = dict(
            workload=name,
            case=asdict(case),
            jax_mla=asdict(ours),
            ik_ms=ik["ms"],
            ik_err=ik["err"],
            ik_cpu_util=ik["cpu_util"],
            ratio=ours.ms / ik["ms"],
            jax_mla_gflops=case.flops / ours.ms / 1e6,
            ik_gflops=case.flops / ik["ms"] / 1e6,
        )
        rows.append(row)
        print(
            f"{name:<20} {ours.ms:>10.3f} {ik['ms']:>9.3f} {row['ratio']:>6.2f} "
            f"{row['jax_mla_gflops']:>15.1f} {row['ik_gflops']:>10.1f} {ik['cpu_util']:>11.2f} "
            f"{ours.err:>11.1e} {ik['err']:>8.1e}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    for line in bad:
        print(f"FAILED CHECK: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
