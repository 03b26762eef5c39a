"""Write outputs so that a crash, a full disk or a signal never leaves a half-written one looking complete.

:func:`atomic_dir` and :func:`atomic_file` hand out a hidden temporary sibling of the output to fill
and rename it into place only when it is complete. Whatever stops the writing -- an exception, Ctrl-C
(SIGINT), SIGTERM (which :mod:`corelm.cli` turns into the same ``KeyboardInterrupt``), a full or
read-only disk -- removes the temporary, and leaves a previous output as it was. A file-system failure
becomes a :class:`CorelmError` that names the output and the cause, so the CLI prints one line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from corelm.errors import CorelmError

# The file system refusing a write: full, over quota, over the file-size limit, read-only, not allowed.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


def disk_error(exc: BaseException) -> str | None:
    """The cause (``"No space left on device"``) when ``exc`` is the file system refusing, else None.

    Writers implemented in Rust (safetensors, tokenizers) raise their own exception types whose
    message ends in ``(os error N)``; those count too, and so does numpy's ``ndarray.tofile`` (used by
    the ``gguf`` writer), which reports a refused write as ``"N requested and M written"`` without errno.
    """
    if isinstance(exc, OSError) and exc.errno is None and re.fullmatch(r"\d+ requested and \d+ written", str(exc)):
        return "the write was cut short (disk full, or the file-size limit reached)"
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:
        found = re.search(r"\(os error (\d+)\)", str(exc))
        code = int(found.group(1)) if found else None
    return os.strerror(code) if code in DISK_ERRNOS else None


def _write_failed(out: Path, exc: BaseException) -> CorelmError | None:
    reason = disk_error(exc)
    if reason is None:
        return None
    name = getattr(exc, "filename", None)
    ours = name is None or Path(name) == out or any(p.startswith(f".{out.name}.") for p in Path(name).parts)
    return CorelmError(f"cannot write {out if ours else name}: {reason}")


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM during a few file operations (the final renames, removing the temporary).

    A second Ctrl-C while the temporary directory is being removed would otherwise leave half of it.
    A signal that arrives meanwhile is acted on (its handler called) at the end.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler is not None:  # None: installed outside Python, cannot be restored
            previous[sig] = signal.signal(sig, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if held:
            handler = previous[held[0]]
            if callable(handler):
                handler(held[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(held[0])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first and removed after."""
    old = None
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        _remove(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        _remove(old)


@contextlib.contextmanager
def write_errors(out: str | Path) -> Iterator[None]:
    """Turn the file system refusing a write inside the block into a :class:`CorelmError` naming ``out``.

    For writers that manage their own temporary file (GGUF export); :func:`atomic_dir` and
    :func:`atomic_file` do this themselves.
    """
    try:
        yield
    except Exception as exc:
        failure = _write_failed(Path(out), exc)
        if failure is None:
            raise
        raise failure from None


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to fill; on success it replaces ``out`` in one rename.

    On an exception or interrupt the temporary directory is removed and ``out`` is left as it was.

    Raises:
        CorelmError: the file system refused a write (full, read-only, no permission), naming ``out``.
    """
    with _atomic(Path(out), directory=True) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_file(out: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``out`` to write; on success it replaces ``out`` in one rename.

    On an exception or interrupt the temporary file is removed and ``out`` is left as it was.

    Raises:
        CorelmError: the file system refused a write (full, read-only, no permission), naming ``out``.
    """
    with _atomic(Path(out), directory=False) as tmp:
        yield tmp


@contextlib.contextmanager
def _atomic(out: Path, directory: bool) -> Iterator[Path]:
    """The one write-then-rename both writers share: a hidden temporary next to ``out`` (same file
    system, so the rename is atomic), the user's usual mode, and removal on any failure or signal."""
    with write_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{out.name}.tmp-"
        if directory:
            tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=prefix))
        else:
            fd, name = tempfile.mkstemp(dir=out.parent, prefix=prefix, suffix=out.suffix)
            os.close(fd)
            tmp = Path(name)
    try:
        with write_errors(out):
            yield tmp
            with _signals_held():
                if tmp.exists():  # mkdtemp/mkstemp make 0700/0600: give the output the user's usual mode
                    os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())
                if directory:
                    _swap_in(tmp, out)
                else:
                    os.replace(tmp, out)
    finally:
        with _signals_held():
            if directory:
                _remove(tmp)
            else:
                tmp.unlink(missing_ok=True)


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with the user's usual file mode.

    The safetensors writer creates its file ``0600``; weights a user exports are meant to be shared like
    any file they write, so the mode is set from the umask (``0644`` under the common ``022``).
    """
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())
