"""One exception type for problems a user can fix.

The CLI prints a :class:`CorelmError` as one line on stderr and exits non-zero; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class CorelmError(Exception):
    """A user-facing error: bad input, missing file, unsupported format, invalid parameter."""

    exit_code: int = 2


def close_names(name: str, candidates: list[str], n: int = 3) -> str:
    """Return ``" (did you mean: a, b?)"`` for the closest candidates, or an empty string."""
    import difflib

    hits = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if not hits:
        hits = [c for c in candidates if name.lower() in c.lower()][:n]
    return f" (did you mean: {', '.join(hits)}?)" if hits else ""
