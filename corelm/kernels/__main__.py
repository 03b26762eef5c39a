"""``python -m corelm.kernels``: build the C++ kernels for this machine (the set-up step runs it)."""

from __future__ import annotations

import sys
import time

from corelm import kernels


def main() -> int:
    level = kernels.isa()
    start = time.perf_counter()
    try:
        path = kernels.build(level)
    except RuntimeError as exc:
        print(f"corelm kernels not built ({exc.args[0].splitlines()[0]}); PyTorch kernels will be used",
              file=sys.stderr)
        return 0  # not fatal: every fast path falls back to PyTorch
    print(f"corelm kernels ({level}): {path} [{time.perf_counter() - start:.1f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
