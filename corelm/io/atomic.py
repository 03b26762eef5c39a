"""Write an output directory so that a crash never leaves a half-written one looking complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to fill; on success it replaces ``out`` in one rename.

    On an exception the temporary directory is removed and ``out`` is left as it was.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(out, 0o777 & ~mask)  # mkdtemp makes 0700; give the directory the user's usual mode
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
