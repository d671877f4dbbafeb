"""The build's own checks, run on small objects made here.

cmake/check_isa_symbols.py runs before every link of the CPU module and
fails the build when a per-ISA copy of the kernels defines a symbol outside its
namespace (the linker would share it among the copies: AVX-512 code on a Zen 3).
These tests show it passes what a copy may define and names what it may not.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECK = ROOT / "cmake" / "check_isa_symbols.py"
TOOLS = {name: shutil.which(name) for name in ("nm", "c++")}
pytestmark = pytest.mark.skipif(
    not all(TOOLS.values()), reason=f"needs nm and a C++ compiler: {TOOLS}"
)

# What a copy of kernels.cc defines: its table, inline functions emitted out of
# line (weak), a const member, a function-local static with its guard, all in
# jax_mla::cpu::<isa>, some in an unnamed namespace; and a constant of a header
# shared with the rest of the build (jax_mla::, as ffi/common's), emitted
# because its address is taken, as a sanitizer build does.
GOOD = """
#include <algorithm>
namespace jax_mla { inline constexpr int kQBlock = 32; }
namespace jax_mla::cpu::avx2 {
__attribute__((noinline)) const int& Smaller(const int& a) { return std::min(a, kQBlock); }
namespace simd {
struct F32 { float v[8]; __attribute__((noinline)) float Sum() const; };
__attribute__((noinline)) inline F32 Exp(F32 x) { for (float& f : x.v) f *= 2; return x; }
inline float F32::Sum() const { float s = 0; for (float f : v) s += f; return s; }
}  // namespace simd
namespace {
__attribute__((noinline)) float Local(float x) { return simd::Exp({{x}}).Sum(); }
}  // namespace
__attribute__((noinline)) inline int& Counter() { static int n = Local(1) > 0; return n; }
extern const int kKernels = Counter();
}  // namespace jax_mla::cpu::avx2
"""

STRAYS = {
    # simd.h's mistake: the vector helpers in a namespace every copy shares.
    "shared_namespace": (
        "namespace jax_mla::cpu::simd {\n"
        "struct F32 { float v[8]; };\n"
        "__attribute__((noinline)) inline F32 Exp(F32 x) { x.v[0] *= 2; return x; }\n"
        "}\n"
        "namespace jax_mla::cpu::avx2 {\n"
        "float Use(float x) { return simd::Exp({{x}}).v[0]; }\n"
        "}\n",
        "_ZN7jax_mla3cpu4simd3ExpENS1_3F32E",
    ),
    # A std:: template instantiated in the copy, with its flags.
    "std_template": (
        "#include <vector>\n"
        "template class std::vector<float>;\n"
        "namespace jax_mla::cpu::avx2 { int kKernels = 1; }\n",
        "_ZNSt6vectorIfSaIfEE",
    ),
    # A kernel constant in the shared namespace (its value could differ per
    # ISA, as simd.h's kWidth did), emitted because its address is taken.
    "kernel_constant": (
        "#include <algorithm>\n"
        "namespace jax_mla::cpu::simd { inline constexpr int kWidth = 8; }\n"
        "namespace jax_mla::cpu::avx2 {\n"
        "const int& Wider(const int& a) { return std::max(a, simd::kWidth); }\n"
        "}\n",
        "_ZN7jax_mla3cpu4simd6kWidthE",
    ),
    # Another copy's namespace.
    "other_isa": (
        "namespace jax_mla::cpu::avx512 { int kKernels = 1; }\n",
        "_ZN7jax_mla3cpu6avx512",
    ),
    # A plain C symbol.
    "c_symbol": ('extern "C" int jax_mla_helper(int x) { return x + 1; }\n', "jax_mla_helper"),
}


def _object(tmp_path, name, source):
    src = tmp_path / f"{name}.cc"
    src.write_text(source)
    obj = tmp_path / f"{name}.o"
    subprocess.run(
        [TOOLS["c++"], "-std=c++17", "-O2", "-fPIC", "-c", str(src), "-o", str(obj)],
        check=True,
        capture_output=True,
        text=True,
    )
    return obj


def _check(obj, isa="avx2"):
    return subprocess.run(
        [sys.executable, str(CHECK), "--nm", TOOLS["nm"], "--isa", isa, str(obj)],
        capture_output=True,
        text=True,
    )


def test_isa_symbol_check_passes_a_copy_that_keeps_to_its_namespace(tmp_path):
    obj = _object(tmp_path, "good", GOOD)
    listing = subprocess.run(
        [TOOLS["nm"], "-g", "--defined-only", str(obj)], check=True, capture_output=True, text=True
    ).stdout
    # The object has what the check must accept: weak, const-member and guard symbols.
    for kind in (
        "W _ZN7jax_mla3cpu4avx24simd3Exp",
        "W _ZNK7jax_mla3cpu4avx24simd3F323Sum",
        "_ZGVZN7jax_mla3cpu4avx27Counter",
        "u _ZN7jax_mla7kQBlockE",
    ):
        assert kind in listing, (kind, listing)
    result = _check(obj)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("case", sorted(STRAYS))
def test_isa_symbol_check_fails_on_a_stray_symbol(tmp_path, case):
    source, symbol = STRAYS[case]
    result = _check(_object(tmp_path, case, source))
    assert result.returncode == 1
    assert "outside namespace jax_mla::cpu::avx2" in result.stderr
    assert symbol in result.stderr, result.stderr


def test_isa_symbol_check_fails_when_nm_fails(tmp_path):
    missing = tmp_path / "missing.o"
    result = _check(missing)
    assert result.returncode == 2
    assert "failed on" in result.stderr
