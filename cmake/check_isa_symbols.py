"""Fails the build when a per-ISA copy of the CPU kernels defines a symbol
outside its own namespace (jax_mla::cpu::<ISA>::).

kernels.cc is compiled once per ISA level with that level's target flags
(CMakeLists.txt). Any external or weak symbol such a copy defines under a
shared name (an inline function emitted out of line, a std:: template
instantiated there) is merged by the linker with the same name from the other
copies and from the rest of the module, and one definition wins for all of
them: AVX-512 code run on a Zen 3, or a function called with another copy's
vector type. Inside the copy's namespace every name is its own.

    python check_isa_symbols.py --nm NM --isa ISA OBJECT...

CMake runs it before every link of the CPU module. Exit status 1 with the
stray symbols named; 2 when nm fails.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys


def allowed(isa: str) -> re.Pattern:
    # Itanium mangling of a name in jax_mla::cpu::<isa>, with what may precede
    # it: guard variables and typeinfo/vtables (_ZGV, _ZTI, ...), function-local
    # statics (_ZZN), cv- and ref-qualified members (_ZNK...); a leading _ on Mach-O.
    return re.compile(rf"_?_Z(GV|T[HISVW])?Z?N[rVKRO]*7jax_mla3cpu{len(isa)}{isa}")


def stray_symbols(nm: str, isa: str, obj: str) -> list[str]:
    listing = subprocess.run([nm, "-g", "--defined-only", obj], capture_output=True, text=True)
    if listing.returncode != 0:
        raise RuntimeError(f"{nm} failed on {obj}: {listing.stderr.strip()}")
    ok = allowed(isa)
    names = (line.split()[-1] for line in listing.stdout.splitlines() if line.strip())
    return [name for name in names if not ok.match(name)]


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
            print(f"The {args.isa} copy of the CPU kernels ({obj}) defines symbols outside "
                  f"namespace jax_mla::cpu::{args.isa}, which the linker would share with the "
                  "other ISA copies (cmake/check_isa_symbols.py says why; c++filt demangles):\n  "
                  + "\n  ".join(stray)
                  + "\nMove them into the ISA namespace or give them internal linkage.",
                  file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
