"""corelm's private cache directory: compiled kernels, inductor's generated code, the demo data.

A cache holds code that corelm later *loads* (``corelm_kernels.so``, inductor's compiled graphs), so a
directory someone else can write to is a way to run their code in this process. Every directory of the
cache is therefore created ``0700`` and checked before use: a real directory (not a symlink), owned by
this user, with no group or other write bit. A directory that fails the check is never used.

Where the cache lives, first usable of:

1. ``CORELM_CACHE``, else ``~/.cache/corelm``;
2. ``$TMPDIR/corelm-cache-<uid>`` (the first one is read-only or not ours);
3. a fresh ``mkdtemp`` directory for this process alone, removed at exit (the shared temporary
   directory holds a ``corelm-cache-<uid>`` that is not ours: someone planted it).

The reason a candidate was skipped is kept in :func:`skipped` for diagnostics.
"""

from __future__ import annotations

import atexit
import os
import shutil
import stat
import tempfile
from pathlib import Path

_state: dict[str, object] = {"root": None, "skipped": []}


def check_private(path: Path) -> None:
    """Raise ``PermissionError`` unless ``path`` is a directory owned by this user that nobody else can
    write to (no symlink; group/other write bits clear)."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{path} is not a directory (a symlink or a file)")
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} is owned by uid {st.st_uid}, not this user ({os.getuid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o})")


def make_private(path: Path) -> Path:
    """Create ``path`` (and missing parents below an existing one) ``0700``; check it; return it.

    An existing directory of ours is tightened to ``0700``; one that is not ours raises ``PermissionError``.
    """
    if not path.exists():
        if path.parent != path and not path.parent.exists():
            make_private(path.parent)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:  # created meanwhile by a concurrent process: checked below
            pass
    check_private(path)
    if stat.S_IMODE(os.lstat(path).st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def _candidates() -> list[Path]:
    configured = os.environ.get("CORELM_CACHE")
    first = Path(configured) if configured else Path.home() / ".cache" / "corelm"
    return [first, Path(tempfile.gettempdir()) / f"corelm-cache-{os.getuid()}"]


def cache_root() -> Path:
    """The checked, private cache root (see the module docstring for the order of candidates)."""
    configured = (os.environ.get("CORELM_CACHE", ""), tempfile.gettempdir())
    root = _state["root"]
    if isinstance(root, Path) and _state.get("for") == configured and root.is_dir():
        return root
    skipped: list[str] = []
    for candidate in _candidates():
        try:
            make_private(candidate)
            if not os.access(candidate, os.W_OK | os.X_OK):
                raise PermissionError(f"{candidate} is not writable")
            chosen = candidate
            break
        except OSError as exc:
            skipped.append(str(exc))
    else:
        chosen = Path(tempfile.mkdtemp(prefix="corelm-cache-"))  # 0700, unique, ours
        atexit.register(shutil.rmtree, chosen, ignore_errors=True)
    _state.update(root=chosen, skipped=skipped)
    _state["for"] = configured
    return chosen


def cache_subdir(*parts: str) -> Path:
    """``cache_root()/parts...``, each level created ``0700`` and checked."""
    path = cache_root()
    for part in parts:
        path = make_private(path / part)
    return path


def check_file(path: Path) -> None:
    """Raise ``PermissionError`` unless ``path`` is a regular file owned by this user that nobody else
    can write to, in a directory that passes :func:`check_private` (checked before loading code from it)."""
    check_private(path.parent)
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise PermissionError(f"{path} is not a regular file")
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} is owned by uid {st.st_uid}, not this user ({os.getuid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o})")


def skipped() -> list[str]:
    """Why earlier candidates for the cache root were not used (empty when the first one was)."""
    return list(_state["skipped"])  # type: ignore[arg-type]
