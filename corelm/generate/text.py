"""From token ids to text for a stream: incremental detokenizing and stop strings, written once.

The engine speaks token ids; :func:`stream_text` (the API, the CLI) and the server's text streams use
the same :class:`StopMatcher`, so a stop string ends the text at the same place everywhere and is
never emitted, not even its first characters.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class StopMatcher:
    """Holds back text that could be the start of a stop string; reports when one completes."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def _partial(self) -> int:
        """Length of the longest suffix of the pending text that is a proper prefix of a stop string."""
        return max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was reached). After a stop, nothing more
        should be fed: the text from the stop string on is dropped."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        cut = len(self.pending) - self._partial()
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        """The held-back text at the end of generation (it turned out to be no stop string)."""
        out, self.pending = self.pending, ""
        return out


def stream_text(tokenizer: Any, token_ids: Iterator[int], stops: list[str]) -> Iterator[str]:
    """Detokenize a token stream into text pieces, ending before the first stop string.

    When a stop string completes, ``token_ids.close()`` is called (if it has one) so the engine stops
    now, not at ``max_new_tokens``.
    """
    decoder = tokenizer.stream_decoder(skip_special_tokens=True)
    matcher = StopMatcher(stops)
    for token in token_ids:
        text, stopped = matcher.feed(decoder.push(token))
        if text:
            yield text
        if stopped:
            if hasattr(token_ids, "close"):
                token_ids.close()
            return
    text, stopped = matcher.feed(decoder.flush())
    tail = text if stopped else text + matcher.flush()
    if tail:
        yield tail
