"""`python -m jax_mla`: the command line of the benchmark."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

import jax_mla
from jax_mla.bench import cases, layer, ops, report, sharded


def _names(allowed):
    def parse(text: str) -> list[str]:
        given = text.split(",")
        bad = [x for x in given if x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(bad)}; choose from {', '.join(allowed)}"
            )
        return given

    return parse


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m jax_mla",
        description="Benchmark jax_mla's native kernels against plain JAX on DeepSeek attention "
        "shapes on the default JAX device, checking each against jax_mla.reference "
        "first. On the CPU: a llama-bench-style sweep and the DeepSeek-V2-Lite layer; "
        "on a GPU: bf16 MLA decode, 8-bit latent caches, 192/128 prefill and the layer in "
        "bf16 at batches 1, 16 and 64 next to plain JAX that decompresses the cache at "
        "every step.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small sweep (CPU: f16 cache only, "
        f"{', '.join(cases.CPU_QUICK_TESTS)}); under a minute",
    )
    p.add_argument("--json", metavar="PATH", help="also write the rows and metadata as JSON")
    p.add_argument(
        "--tests",
        type=lambda s: [cases.parse_test(t) for t in s.split(",")],
        help="CPU and --sharded: comma-separated tg@N / ppS@N (default: the quick or full list)",
    )
    p.add_argument(
        "--ops",
        type=_names(cases.OPS),
        default=list(cases.OPS),
        help=f"comma-separated subset of {','.join(cases.OPS)}",
    )
    p.add_argument(
        "--caches",
        type=_names(cases.CACHES),
        help=f"CPU and --sharded: comma-separated subset of {','.join(cases.CACHES)} "
        "(default: f16 with --quick, all)",
    )
    p.add_argument(
        "--modes",
        type=_names(layer.MODES),
        help=f"layer: comma-separated subset of {','.join(layer.MODES)} ({layer.PLAIN}: "
        "plain JAX decompressing the whole cache at every call; default: "
        f"{','.join(layer.DEFAULT_MODES['cpu'])} on the CPU, all on a GPU)",
    )
    p.add_argument(
        "--model-tests",
        type=lambda s: [layer.parse_model_test(t) for t in s.split(",")],
        help=f"layer: comma-separated ppN / tg{layer.MODEL_TG_STEPS}@N / pgN "
        f"(default on the CPU: {','.join(layer.MODEL_QUICK_TESTS)} with --quick, else "
        f"{','.join(layer.MODEL_FULL_TESTS)}; on a GPU: {','.join(layer.GPU_QUICK_TESTS)} "
        f"with --quick, else {','.join(layer.GPU_FULL_TESTS)})",
    )
    p.add_argument(
        "--model-caches",
        type=_names(layer.MODEL_CACHES),
        help=f"layer: comma-separated subset of {','.join(layer.MODEL_CACHES)} "
        "(default: f16 with --quick, else f16,q8_0,q6_0 on the CPU; bf16 on a GPU, "
        f"which takes {','.join(layer.GPU_CACHES)})",
    )
    p.add_argument(
        "--model-batches",
        type=lambda s: [int(b) for b in s.split(",")],
        help="layer: comma-separated batch sizes (default: 1 on the CPU; "
        f"{','.join(map(str, layer.DEFAULT_BATCHES['gpu']))} on a GPU, "
        f"{','.join(map(str, layer.GPU_QUICK_BATCHES))} with --quick)",
    )
    p.add_argument(
        "--model-dtype",
        choices=list(layer.DTYPES),
        help="layer: the activations' and parameters' dtype (default: f32 on the CPU, "
        "bf16 on a GPU, whose kernels take bf16 and f16)",
    )
    p.add_argument(
        "--long",
        action="store_true",
        help=f"layer: add {','.join(layer.MODEL_LONG_TESTS)} on the CPU, "
        f"{','.join(layer.GPU_LONG_TESTS)} on a GPU",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--model-only",
        action="store_true",
        help="only the layer rows (the DeepSeek layer), not the op rows",
    )
    which.add_argument("--no-model", action="store_true", help="only the op rows")
    which.add_argument(
        "--sharded",
        action="store_true",
        help="instead: time each op split over every device JAX has, by --splits, next to "
        "the same call on one device, each checked against the one-device result; decode at "
        f"{','.join(sharded.TESTS['cpu'])} ({','.join(sharded.QUICK_TESTS['cpu'])} on the CPU "
        f"with --quick) unless --tests, {sharded.BATCH_PER_DEVICE['cpu']} batch row per device "
        f"and {sharded.HEADS['cpu']} heads on the CPU, {sharded.BATCH_PER_DEVICE['gpu']} rows "
        f"per device and {sharded.HEADS['gpu']} heads on GPUs (heads and keys rounded up to a "
        "multiple of the devices), an f16 cache (bf16 on GPUs) unless --caches. "
        "Needs several devices: for fake CPU ones (overhead only, not scaling) start with "
        "XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu",
    )
    p.add_argument(
        "--splits",
        type=_names(sharded.SPLITS),
        default=list(sharded.SPLITS),
        help=f"--sharded: comma-separated subset of {','.join(sharded.SPLITS)}",
    )
    args = p.parse_args(argv)
    if args.model_batches is not None and min(args.model_batches) < 1:
        p.error(f"--model-batches must be positive, got {args.model_batches}")
    return args, p


def layer_settings(args, parser, platform: str) -> None:
    """Fills the layer options left to the platform's defaults."""
    gpu = platform != "cpu"
    if args.model_tests is None:
        if gpu:
            names = layer.GPU_QUICK_TESTS if args.quick else layer.GPU_FULL_TESTS
        else:
            names = layer.MODEL_QUICK_TESTS if args.quick else layer.MODEL_FULL_TESTS
        args.model_tests = [layer.parse_model_test(t) for t in names]
    if args.long:
        longer = layer.GPU_LONG_TESTS if gpu else layer.MODEL_LONG_TESTS
        args.model_tests += [layer.parse_model_test(t) for t in longer]
    if args.model_caches is None:
        if gpu:
            args.model_caches = ["bf16"]
        else:
            args.model_caches = ["f16"] if args.quick else ["f16", "q8_0", "q6_0"]
    if args.model_batches is None:
        if gpu and args.quick:
            args.model_batches = list(layer.GPU_QUICK_BATCHES)
        else:
            args.model_batches = list(layer.DEFAULT_BATCHES["gpu" if gpu else "cpu"])
    if args.modes is None:
        args.modes = list(layer.DEFAULT_MODES["gpu" if gpu else "cpu"])
    args.model_dtype = args.model_dtype or layer.DEFAULT_DTYPE["gpu" if gpu else "cpu"]
    if gpu:
        bad = [c for c in args.model_caches if c not in layer.GPU_CACHES]
        if bad:
            parser.error(
                f"--model-caches {','.join(bad)}: the layer's CUDA kernels take "
                f"{','.join(layer.GPU_CACHES)} caches"
            )
        if args.model_dtype == "f32":
            parser.error("--model-dtype f32: the CUDA kernels take bf16 and f16 activations")


def native_ready(platform: str) -> str | None:
    """Why the native kernels cannot be benchmarked on this platform, or None."""
    info = jax_mla.backends()
    if platform == "cpu":
        cpu = info["cpu"]
        if not cpu["loaded"]:
            return f"the native CPU module did not load: {cpu['error']}"
        if str(cpu["isa"]).startswith("error"):  # JAX_MLA_CPU_ISA names a path this CPU lacks
            return cpu["isa"]
        return None
    if platform == "gpu":
        cuda = info["cuda"]
        return None if cuda["loaded"] else f"the native CUDA module did not load: {cuda['error']}"
    return (
        f"the default JAX platform is {platform!r}; jax_mla has CPU and CUDA kernels only: "
        "rerun with JAX_PLATFORMS=cpu"
    )


def op_cases(args, parser, platform: str) -> list[cases.Case]:
    if platform == "cpu":
        tests = args.tests or [
            cases.parse_test(t)
            for t in (cases.CPU_QUICK_TESTS if args.quick else cases.CPU_FULL_TESTS)
        ]
        caches = args.caches or (["f16"] if args.quick else list(cases.CACHES))
        return cases.cpu_cases(tests, args.ops, caches)
    if args.tests or args.caches:
        parser.error(
            "--tests and --caches choose the CPU sweep; on a GPU the cases are the GPU "
            "shapes (choose among them with --ops and --quick)"
        )
    return cases.gpu_cases(args.quick, args.ops)


def run_layer(args, budget_s: float, meta: dict):
    """The layer rows and the memory table; prints as it goes."""
    cfg = layer.model_cfg()
    dtype = layer.DTYPES[args.model_dtype]
    params = layer.model_params(cfg, dtype)
    meta["model"] = asdict(cfg)
    meta["model_dtype"] = dtype
    print("\n" + report.model_header(cfg, dtype, args.model_batches), flush=True)
    print(report.model_table_head(), flush=True)
    rows = []
    for kind, n in args.model_tests:
        for batch in args.model_batches:
            for cache in args.model_caches:
                for row in layer.run_model_case(
                    kind, n, cache, args.modes, cfg, params, budget_s, batch, dtype
                ):
                    print(report.model_table_row(row), flush=True)
                    rows.append(row)
    if 1 not in args.model_batches:
        return rows, []  # the memory table is batch 1's (run.sh runs a process per batch)
    mem = layer.memory_rows(
        cfg, params, args.model_caches[:1] if args.quick else args.model_caches, args.modes, dtype
    )
    print("\n" + report.memory_table(mem), flush=True)
    return rows, mem


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, parser = parse_args(argv)
    platform = report.default_device().platform
    why = native_ready(platform)
    if why:
        print(f"python -m jax_mla: {why}", file=sys.stderr)
        return 2
    if args.sharded:
        return sharded.main(args, platform, " ".join(["python -m jax_mla", *argv]))
    case_list = [] if args.model_only else op_cases(args, parser, platform)
    if not args.no_model:
        layer_settings(args, parser, platform)
    meta = report.metadata(args.quick, " ".join(["python -m jax_mla", *argv]))
    print(report.header(meta), flush=True)
    budget_s = 0.1 if args.quick else 0.5
    rows = []
    if case_list:
        print(report.table_head(), flush=True)
    for case in case_list:
        for row in ops.run_case(case, platform, budget_s):
            print(report.table_row(row), flush=True)
            rows.append(row)
    report.print_load_note(rows)
    model_rows, mem_rows = [], []
    if not args.no_model:
        model_rows, mem_rows = run_layer(args, budget_s, meta)
    if args.json:
        report.write_json(args.json, meta, rows, model_rows, mem_rows)
    report.print_failures(rows, model_rows)
    bad = any(ops.failed(r) for r in rows) or any(layer.model_failed(r) for r in model_rows)
    return 1 if bad else 0
