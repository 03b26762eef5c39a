"""Data files read as UTF-8 text: strictly, and with errors that say where.

Every reader of a user's data file (task data, corpora, perplexity text) goes through these two
functions, so a Latin-1 CSV or a truncated download fails the same way everywhere: one
:class:`CorelmError` naming the file, the line and the byte offset of the first bad byte. Nothing is
replaced or dropped silently. A UTF-8 byte-order mark at the start of a file is not part of the text.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from corelm.errors import CorelmError

BOM = "\ufeff"


def _not_utf8(path: Path, exc: UnicodeDecodeError, line: int, offset: int) -> CorelmError:
    return CorelmError(f"{path}: not UTF-8 text ({exc.reason} at byte {offset + exc.start}, line {line})")


def _unreadable(path: Path, exc: OSError) -> CorelmError:
    return CorelmError(f"cannot read {path}: {exc.strerror or exc}")


def read_text(path: str | Path) -> str:
    """The whole file as text.

    Raises:
        CorelmError: the file cannot be read, or is not UTF-8 (naming the byte offset and line).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _unreadable(path, exc) from None
    try:
        return data.decode("utf-8").removeprefix(BOM)
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc, data.count(b"\n", 0, exc.start) + 1, 0) from None


def read_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a file, streamed; each line keeps its line ending.

    Lines end at ``\\n`` (a ``\\r\\n`` ending stays on the line, as with ``open(newline="")``, which
    is what the ``csv`` module expects). A line is decoded on its own: a ``\\n`` byte never occurs inside
    a multi-byte UTF-8 sequence, so this is exact, and the byte offset of an error is known.

    Raises:
        CorelmError: the file cannot be read, or a line is not UTF-8.
    """
    path = Path(path)
    try:
        f = path.open("rb")
    except OSError as exc:
        raise _unreadable(path, exc) from None
    number = offset = 0
    with f:
        while True:
            try:
                raw = f.readline()
            except OSError as exc:  # e.g. EISDIR, or an I/O error half-way
                raise _unreadable(path, exc) from None
            if not raw:
                return
            number += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _not_utf8(path, exc, number, offset) from None
            offset += len(raw)
            yield number, line.removeprefix(BOM) if number == 1 else line
