"""``python -m corelm.kernels``: build the C++ kernels for this machine (the set-up step runs it)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from corelm import kernels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m corelm.kernels",
                                 description="Compile corelm's C++ CPU kernels for this machine's instruction set "
                                             "into ~/.cache/corelm/kernels (CORELM_CACHE moves it).")
    ap.add_argument("--isa", choices=sorted(kernels.FLAGS), default=None,
                    help="instruction set to build for (default: what this CPU and ATen use)")
    ap.add_argument("--all", action="store_true",
                    help="build every instruction set this CPU runs (what the test suite checks each kernel on), "
                         "as many compiles at a time as there are cores")
    ap.add_argument("--lock", default=None, help=argparse.SUPPRESS)  # removed when done (background builds)
    ap.add_argument("--amx-check", action="store_true",
                    help="run the built library's AMX tile check and print its answer (0: the tiles agree with "
                         "their C emulation, 1: no tiles, 2: they disagree); corelm runs it in a child process "
                         "once per build and CPU before using the tiles")
    args = ap.parse_args(argv)
    if args.amx_check:
        return amx_check(args.isa or kernels.isa())
    if args.all:
        return build_all()
    level = args.isa or kernels.isa()
    start = time.perf_counter()
    try:
        path = kernels.build(level)
    except RuntimeError as exc:
        print(f"corelm kernels not built ({exc.args[0].splitlines()[0]}); PyTorch's kernels will be used",
              file=sys.stderr)
        return 0  # not fatal: every fast path falls back to PyTorch
    finally:
        if args.lock:
            Path(args.lock).unlink(missing_ok=True)
    print(f"corelm kernels ({level}): {path} [{time.perf_counter() - start:.1f} s]")
    return 0


def amx_check(level: str) -> int:
    """Load ``level``'s built library (without :func:`kernels.load`, which would ask for this very check)
    and print what ``amx_check`` finds."""
    import torch

    path = kernels.cache_dir(level) / "corelm_kernels.so"
    try:
        kernels.cache.check_file(path)
    except OSError as exc:  # not built yet, or a file that fails the cache's ownership check
        print(f"corelm: no usable {level} kernel build to check ({exc.strerror or exc}); run "
              f"`python -m corelm.kernels --isa {level}` first", file=sys.stderr)
        return 2
    torch.ops.load_library(str(path))
    print(int(torch.ops.corelm.amx_check()), flush=True)
    return 0


def build_all() -> int:
    """Every runnable build, compiled concurrently (one compiler process per core); 0 even when one fails
    (every fast path falls back), with the failure on stderr."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    levels = kernels.runnable_builds()
    start = time.perf_counter()

    def one(level: str) -> str:
        try:
            return f"{level}: {kernels.build(level)}"
        except RuntimeError as exc:
            return f"{level}: not built ({exc.args[0].splitlines()[0]})"

    with ThreadPoolExecutor(max_workers=max(1, min(len(levels), os.cpu_count() or 1))) as pool:
        for line in pool.map(one, levels):
            print(f"corelm kernels {line}", file=sys.stderr if "not built" in line else sys.stdout)
    print(f"corelm kernels: {len(levels)} builds [{time.perf_counter() - start:.1f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
