"""What a run prints and records: the header (device, versions, what the
columns mean), the op, layer and memory tables (markdown, as llama-bench
prints them, row by row as they finish), and the JSON of `--json`."""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import platform
import re
import subprocess
import sys
from dataclasses import asdict

import jax
import jaxlib
import numpy as np

import jax_mla
from jax_mla.bench import timing
from jax_mla.bench.cases import SCALE
from jax_mla.bench.layer import (
    MEMORY_CONTEXTS,
    MEMORY_UBATCH,
    MODEL_TG_STEPS,
    MemoryRow,
    ModelRow,
    model_agreement,
    model_failed,
)
from jax_mla.bench.ops import Row, failed


def default_device():
    """The device JAX puts new arrays on (jax.default_device's, else the first)."""
    dev = jax.config.jax_default_device
    if isinstance(dev, str):
        return jax.devices(dev)[0]
    return dev if dev is not None else jax.devices()[0]


def cpu_model() -> str:
    """lscpu's model name, else /proc/cpuinfo's, else platform's."""
    for cmd, pattern in (
        (["lscpu"], r"Model name:\s*(.+)"),
        (["cat", "/proc/cpuinfo"], r"model name\s*:\s*(.+)"),
    ):
        try:
            text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            continue
        m = re.search(pattern, text)
        if m:
            return m[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> dict:
    """The CPU flags that decide the native kernel path (None where unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read().split("\n\n")[0]
    except OSError:
        return {"avx512f": None, "avx2": None}
    flags = set(re.search(r"flags\s*:\s*(.*)", text)[1].split()) if "flags" in text else set()
    return {"avx512f": "avx512f" in flags, "avx2": "avx2" in flags}


def git_commit() -> str | None:
    """The short commit of the checkout jax_mla was imported from, or None
    when it was not imported from a git checkout's root (an installed package)."""
    root = pathlib.Path(jax_mla.__file__).resolve().parent.parent
    try:
        top = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--show-toplevel"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if pathlib.Path(top).resolve() != root:  # e.g. a virtual environment inside a repo
            return None
        return subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def metadata(quick: bool, command: str) -> dict:
    dev = default_device()
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "quick": quick,
        "device": {"platform": dev.platform, "device_kind": dev.device_kind},
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "numpy": np.__version__,
            "jax_mla": jax_mla.__version__,
        },
        "commit": git_commit(),
        "scale": SCALE,
        "timing": {
            "passes": timing.PASSES,
            "samples": [timing.MIN_SAMPLES, timing.MAX_SAMPLES],
            "back_to_back_calls": [timing.MIN_CALLS, timing.MAX_CALLS]
            if dev.platform != "cpu"
            else None,
        },
    }
    if dev.platform == "cpu":
        meta["cpu"] = {
            "model": cpu_model(),
            **cpu_flags(),
            "threads": threads(),
            "isa": jax_mla.backends()["cpu"]["isa"],
        }
    else:
        meta["card"] = dev.device_kind
    return meta


def header(meta: dict) -> str:
    yes = {True: "yes", False: "no", None: "unknown"}
    v = meta["versions"]
    lines = [
        f"jax_mla {v['jax_mla']} benchmark{' (--quick)' if meta['quick'] else ''}, "
        f"{meta['date']}, commit {meta['commit'] or 'unknown (not a checkout)'}"
    ]
    if "cpu" in meta:
        cpu = meta["cpu"]
        lines.append(
            f"CPU: {cpu['model']}, avx512f: {yes[cpu['avx512f']]}, avx2: "
            f"{yes[cpu['avx2']]}; {cpu['threads']} threads; jax_mla CPU ISA path: "
            f"{cpu['isa']}"
        )
        lines.append("f32 queries over the cache type; batch 1, 16 heads (DeepSeek-V2-Lite)")
        timed = (
            f"jitted call incl. dispatch, warm, each synchronized; best of "
            f"{timing.PASSES} passes of the median of {timing.MIN_SAMPLES}.."
            f"{timing.MAX_SAMPLES} calls"
        )
    else:
        lines.append(f"GPU: {meta['card']}; bf16 queries and caches (or the 8-bit format named)")
        timed = (
            f"jitted calls incl. dispatch issued back to back ({timing.MIN_CALLS}.."
            f"{timing.MAX_CALLS}) between synchronizations, inputs rotated past the L2; best "
            f"of {timing.PASSES} passes of the median of {timing.MIN_SAMPLES}.."
            f"{timing.MAX_SAMPLES} samples"
        )
    lines += [
        f"python {v['python']}, jax {v['jax']}, jaxlib {v['jaxlib']}, numpy {v['numpy']}",
        "flash_mla: 576/512 over one latent head; flash_attention: 192/128, KV heads = heads; "
        "scale 1/sqrt(192)",
        "tg@N: decode over N cached tokens; ppS@N: S causal queries ending a cache of N",
        "native: jax_mla kernel; jax: plain-JAX einsums in the cache dtype, f32 accumulation",
        f"ms: {timed}; GB/s: cache bytes read; speedup: jax ms / native ms; "
        "err: max|out-ref|/max|ref| vs jax_mla.reference",
    ]
    return "\n".join(lines)


# (field, title, width, format); widths are fixed so rows print as they finish.
COLUMNS = (
    ("test", "test", 11, "{}"),
    ("batch", "B", 3, "{}"),
    ("heads", "H", 3, "{}"),
    ("op", "op", 15, "{}"),
    ("cache", "cache", 5, "{}"),
    ("backend", "backend", 7, "{}"),
    ("ms", "ms", 10, "{:.3f}"),
    ("tokens_per_s", "tokens/s", 9, "{:.1f}"),
    ("gflops", "GFLOP/s", 7, "{:.1f}"),
    ("gbps", "GB/s", 7, "{:.1f}"),
    ("speedup", "speedup", 7, "{:.2f}"),
    ("err", "err", 12, "{:.1e}"),
)
LEFT = {"test", "op", "cache", "backend"}


class Table:
    """A markdown table printed a row at a time: columns of (field, title,
    width, format), the fields in `left` left-aligned. A row whose check
    failed gets FAIL after its err, and a time taken under load a *."""

    def __init__(self, columns, left):
        self.columns, self.left = columns, frozenset(left)

    def _line(self, values) -> str:
        cells = (
            f"{v:{'<' if name in self.left else '>'}{width}}"
            for v, (name, _, width, _) in zip(values, self.columns)
        )
        return "| " + " | ".join(cells) + " |"

    def head(self) -> str:
        """The title line and rule, like llama-bench's."""
        rule = " | ".join(
            "-" * w if name in self.left else "-" * (w - 1) + ":" for name, _, w, _ in self.columns
        )
        return self._line([title for _, title, _, _ in self.columns]) + "\n| " + rule + " |"

    def row(self, row) -> str:
        return self._line([self._cell(row, name, fmt) for name, _, _, fmt in self.columns])

    @staticmethod
    def _cell(row, name: str, fmt: str) -> str:
        value = getattr(row, name)
        if value is None or (isinstance(value, float) and math.isnan(value) and name != "err"):
            return ""
        text = fmt.format(value)
        if name == "err" and not row.err <= row.tolerance:  # NaN fails too
            return text + " FAIL"
        if name == "ms" and timing.disturbed(row.other_load):
            return text + " *"
        return text


OP_TABLE = Table(COLUMNS, LEFT)


def table_head() -> str:
    return OP_TABLE.head()


def table_row(row: Row) -> str:
    return OP_TABLE.row(row)


def print_load_note(rows) -> None:
    """The footnote for rows timed while other processes kept cores busy."""
    noisy = [r.other_load for r in rows if timing.disturbed(r.other_load)]
    if noisy:
        print(
            f"* timed while other processes kept up to {max(noisy):.1f} cores busy: rerun on "
            "a quiet machine"
        )


def model_header(cfg, dtype: str = "float32", batches=(1,)) -> str:
    return (
        f"DeepSeek-V2-Lite attention layer (jax_mla.deepseek): hidden {cfg.hidden_size}, "
        f"{cfg.num_heads} heads, latent {cfg.kv_lora_rank} + rope {cfg.qk_rope_head_dim}, "
        f"batch {', '.join(map(str, batches))}, {dtype} activations and parameters; ppN: "
        f"prefill of N tokens; tg{MODEL_TG_STEPS}@N: {MODEL_TG_STEPS} decode steps after N "
        "tokens; pgN: N prompt tokens then N/10 generated; tokens/s as llama-bench, summed "
        "over the batch; plain: plain JAX decompressing the whole cache at every call; "
        "vs std: max|out - standard|/max|standard|"
    )


def model_table_head() -> str:
    return (
        "| test        |  B | mode     | cache | ms         | tokens/s  | vs std       |\n"
        "| ----------- | -: | -------- | ----- | ---------: | --------: | -----------: |"
    )


def model_table_row(row: ModelRow) -> str:
    ms = f"{row.ms:.1f}" + (" *" if timing.disturbed(row.other_load) else "")
    if row.error:
        ms = row.error
    err = "" if row.vs_std is None else f"{row.vs_std:.1e}" + (" FAIL" if model_failed(row) else "")
    return (
        f"| {row.test:<11} | {row.batch:>2} | {row.mode:<8} | {row.cache:<5} | {ms:>10} | "
        f"{row.tokens_per_s:>9.1f} | {err:>12} |"
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def memory_table(rows: list[MemoryRow]) -> str:
    lines = [
        f"KV cache (the latent cache of one layer, shared by every mode) and peak workspace "
        f"(XLA temporaries of the compiled call) at {', '.join(map(str, MEMORY_CONTEXTS))} "
        "tokens of context",
        f"| context | cache | mode     | KV B/token | KV MiB (1 layer) | workspace MiB, decode "
        f"| workspace MiB, ubatch {MEMORY_UBATCH} |",
        "| ------: | ----- | -------- | ---------: | ---------------: | --------------------: "
        "| ----------------------: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.context:>7} | {r.cache:<5} | {r.mode:<8} | {r.kv_bytes_per_token:>10} "
            f"| {_mib(r.kv_bytes):>16} | {_mib(r.workspace_decode_bytes):>21} "
            f"| {_mib(r.workspace_ubatch_bytes):>23} |"
        )
    return "\n".join(lines)


def write_json(
    path: str,
    meta: dict,
    rows: list[Row],
    model_rows: list[ModelRow],
    memory_rows: list[MemoryRow],
    sharded_rows: list = (),
) -> None:
    """The run as JSON: {"meta", "rows", "model_rows", "memory_rows",
    "sharded_rows"}; a row whose check failed (or a layer row not run) keeps
    its NaN times."""
    with open(path, "w") as f:
        json.dump(
            {
                "meta": meta,
                "rows": [asdict(r) for r in rows],
                "model_rows": [asdict(r) for r in model_rows],
                "memory_rows": [asdict(r) for r in memory_rows],
                "sharded_rows": [asdict(r) for r in sharded_rows],
            },
            f,
            indent=1,
        )


def print_failures(rows: list[Row], model_rows: list[ModelRow]) -> None:
    sys.stdout.flush()
    for r in rows:
        if failed(r):
            print(
                f"FAILED CHECK: {r.test} B={r.batch} H={r.heads} {r.op} {r.cache} {r.backend}: "
                f"err {r.err:.3g} > {r.tolerance:g} (vs jax_mla.reference)",
                file=sys.stderr,
            )
    for r in model_rows:
        if model_failed(r):
            print(
                f"FAILED CHECK: {r.test} B={r.batch} {r.mode} {r.cache}: vs std "
                f"{r.vs_std:.3g} > {model_agreement(r.cache, r.dtype):g} (the modes disagree)",
                file=sys.stderr,
            )
