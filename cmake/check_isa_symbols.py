"""Fails the build when a per-ISA copy of the CPU kernels defines a symbol
outside its own namespace (jax_mla::cpu::<ISA>::).

kernels.cc is compiled once per ISA level with that level's target flags
(CMakeLists.txt). Any external or weak symbol such a copy defines under a
shared name (an inline function emitted out of line, a std:: template
instantiated there) is merged by the linker with the same name from the other
copies and from the rest of the module, and one definition wins for all of
them: AVX-512 code run on a Zen 3, or a function called with another copy's
vector type. Inside the copy's namespace every name is its own.

So every function a copy defines (nm types T, W, i) must be in its namespace,
and so must its data (D, B, R, V, u, ...) when it belongs to the CPU kernels
(jax_mla::cpu), whose constants may differ per ISA. Other data may stand
outside: constants of the headers shared with the rest of the build
(ffi/common's jax_mla::kQBlock, say, emitted when a sanitizer build takes its
address) and the compiler's own (DW.ref.__gxx_personality_v0) hold no code and
are the same in every copy.

    python check_isa_symbols.py --nm NM --isa ISA OBJECT...

CMake runs it before every link of the CPU module. Exit status 1 with the
stray symbols named; 2 when nm fails.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

# Itanium mangling of a name in jax_mla::cpu, with what may precede it: guard
# variables and typeinfo/vtables (_ZGV, _ZTI, ...), function-local statics
# (_ZZN), cv- and ref-qualified members (_ZNK...); a leading _ on Mach-O.
CPU_NAME = r"_?_Z(GV|T[HISVW])?Z?N[rVKRO]*7jax_mla3cpu"
KERNEL_DATA = re.compile(CPU_NAME)
FUNCTION_TYPES = set("TWi")  # nm's letters for code: text, weak function, indirect function


def allowed(isa: str) -> re.Pattern:
    """Names in jax_mla::cpu::<isa>."""
    return re.compile(f"{CPU_NAME}{len(isa)}{isa}")


def stray_symbols(nm: str, isa: str, obj: str) -> list[str]:
    listing = subprocess.run([nm, "-g", "--defined-only", obj], capture_output=True, text=True)
    if listing.returncode != 0:
        raise RuntimeError(f"{nm} failed on {obj}: {listing.stderr.strip()}")
    ok = allowed(isa)
    stray = []
    for line in listing.stdout.splitlines():
        fields = line.split()
        if len(fields) < 2:
            continue
        kind, name = fields[-2], fields[-1]
        if ok.match(name):
            continue
        if kind in FUNCTION_TYPES or KERNEL_DATA.match(name):
            stray.append(name)
    return stray


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nm", required=True)
    parser.add_argument("--isa", required=True)
    parser.add_argument("objects", nargs="+")
    args = parser.parse_args()
    status = 0
    for obj in args.objects:
        try:
            stray = stray_symbols(args.nm, args.isa, obj)
        except (OSError, RuntimeError) as err:
            print(f"check_isa_symbols.py: {err}", file=sys.stderr)
            return 2
        if stray:
            status = 1
            print(
                f"The {args.isa} copy of the CPU kernels ({obj}) defines symbols outside "
                f"namespace jax_mla::cpu::{args.isa}, which the linker would share with the "
                "other ISA copies (cmake/check_isa_symbols.py says why; c++filt demangles):\n  "
                + "\n  ".join(stray)
                + "\nMove them into the ISA namespace or give them internal linkage.",
                file=sys.stderr,
            )
    return status


if __name__ == "__main__":
    sys.exit(main())
