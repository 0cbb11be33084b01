"""Checks that a built library uses the shared C++ runtime rather than a private copy.

A static copy of libstdc++ inside the extension keeps its own locale-facet ids, apart from
those of the shared runtime that torch uses: formatting a number into a TORCH_CHECK message
then reads the wrong facet, which truncates the message or crashes the process (issue 13).
setup.py runs this on every build; ``python -m lambdapo_ext._runtime_check [LIBRARY]``
prints the verdict for a built library. Standard library only: setup.py loads this file
before the package is importable.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

# libstdc++'s locale and stream internals. Only strong definitions count: the library's own
# compiled code is strong, while a weak (W) copy can be an inline member emitted from the
# headers by an unoptimized build.
PRIVATE_CXX_RUNTIME_SYMBOL = re.compile(
    r"(?:^|[\s&*])std::(?:locale::|ios_base::|codecvt<|num_put<|num_get<|numpunct<|ctype<"
    r"|basic_ostream<.*>::_M_insert<|basic_ios<)")


def private_cxx_runtime_symbols(library: str | Path) -> list[str]:
    """libstdc++ internals defined inside ``library``; empty when the runtime is shared.

    Raises:
        FileNotFoundError: ``nm`` (binutils) is not installed.
        subprocess.CalledProcessError: ``nm`` cannot read ``library``.
    """
    nm = shutil.which("nm")
    if nm is None:
        raise FileNotFoundError("nm (binutils) is needed to inspect the built library")
    listing = subprocess.run([nm, "-C", "--defined-only", str(library)], capture_output=True,
                             text=True, check=True).stdout
    found = set()
    for line in listing.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[1] in "TtDdBbRr":
            if PRIVATE_CXX_RUNTIME_SYMBOL.search(parts[2].split("(")[0]):
                found.add(parts[2])
    return sorted(found)


def main(argv: list[str]) -> int:
    if argv:
        library = Path(argv[0])
    else:
        candidates = sorted(Path(__file__).parent.glob("_C*.so"))
        if not candidates:
            print("no built library found in", Path(__file__).parent)
            return 2
        library = candidates[0]
    private = private_cxx_runtime_symbols(library)
    if private:
        print(f"{library}: PRIVATE C++ runtime: {len(private)} libstdc++ symbols defined, "
              f"e.g. {private[:3]}")
        return 1
    print(f"{library}: shared C++ runtime (no libstdc++ internals defined)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
