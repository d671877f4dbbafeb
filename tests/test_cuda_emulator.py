"""The CUDA attention and MLA kernels' fragment logic on the CPU: tests/cuda_emulator/
compiles the mma.sync kernels as host C++ over an emulation of the device
helpers (one thread per CUDA thread; ldmatrix and mma.sync with the PTX
fragment layouts) and checks them against float64 loops. The forward kernel,
which the GPU tests validate, checks the emulation itself; the backward
kernels' cases cover every code path of each pair's shape (GQA, causal,
q_pos, kv_len, the column split), those of the sm_90a backward (bwd90_*)
too, over an emulation of wgmma that reads each shared-memory descriptor
with its own model of the PTX 128B-swizzled K- and MN-major layouts (so a
layout the kernel gets wrong fails) and runs each operation at the wait
that retires it; the kernel over 8-bit caches' cases every
pair of k and v formats (with the int8 mma.sync m16n8k32), GQA, causal,
empty rows and split-KV partials; the MLA mma.sync kernel's 16- and 64-row
blocks over paged caches (mla_paged, mla_paged_g4) equal its contiguous call
bit for bit and the float64 attention over the live keys, and read no
block-table entry past kv_len (such a read aborts). Races are not
emulated (racecheck on the GPU covers them). Needs a C++20 compiler; the sources come from the
repository checkout next to this file."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMULATOR = ROOT / "tests" / "cuda_emulator"
KERNELS = (
    "attention/attention_kernel.cuh",
    "attention/attention_bwd_kernel.cuh",
    "attention/attention_bwd_sm90_kernel.cuh",
    "attention/attention_quant_kernel.cuh",
    "mla/mla_kernel.cuh",
)
CASES = (
    "forward",
    "bwd_64x64",
    "bwd_64x64_f16",
    "bwd_192x128",
    "bwd_128x128_f16",
    "bwd_128x128_gqa3",
    "bwd_256x256",
    "bwd90_192x128",
    "bwd90_192x128_f16",
    "bwd90_128x128",
    "bwd90_128x128_f16",
    "mla_paged",
    "mla_paged_g4",
    "quant_q8_0",
    "quant_q8_kv",
    "quant_mixed",
    "quant_splits",
)


def host_copy(name: str) -> str:
    """A kernel header without its launcher (host code with <<<>>>), which
    is its file's last template."""
    text = (ROOT / "ffi" / "cuda" / name).read_text()
    launcher = re.search(r"template <[^>]*>\ncudaError_t Launch\w+\(", text)
    assert launcher, f"{name}: no launcher found"
    return text[: launcher.start()] + "}  // namespace jax_mla::cuda\n"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    compiler = shutil.which("g++") or shutil.which("clang++")
    if compiler is None or not (ROOT / "ffi").is_dir():
        pytest.skip("needs a C++ compiler and the repository's ffi/ sources")
    build = tmp_path_factory.mktemp("cuda_emulator")
    (build / "kernels.h").write_text("".join(f"{host_copy(n)}\n" for n in KERNELS))
    binary = build / "attention"
    subprocess.run(
        [compiler, "-std=c++20", "-O1", "-pthread", f"-I{EMULATOR / 'mock'}", f"-I{build}"]
        + [f"-I{ROOT}", str(EMULATOR / "attention.cc"), "-o", str(binary)],
        check=True,
    )
    return binary


@pytest.mark.parametrize("case", CASES)
def test_kernel(emulator, case):
    run = subprocess.run([str(emulator), case], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "all ok" in run.stdout, run.stdout + run.stderr
