"""Prefix caching: a prompt's head that an earlier prompt shared is not prefilled again.

The keys and values of a token depend only on the tokens up to it (causal attention), so the
slots an earlier request wrote for ``prompt[:n]`` are exactly what a new request starting with the
same ``n`` tokens would compute -- a shared system prompt, a chat template's head, the earlier turns
of a conversation. :class:`PrefixCache` keeps copies of those slots in fixed blocks of ``block``
tokens (vLLM's automatic prefix caching, Kwon et al. 2023, keyed the same way): a block is found by
*its parent block and its own tokens*, so a block is reused only after the whole prefix before it
matched. On admission the batcher copies the longest cached run of blocks into the request's row
and prefills only the rest; after a prompt is prefilled its full blocks are stored.

The store is a bounded LRU (``max_tokens`` slots; bytes = ``max_tokens x bytes_per_token``).
A lookup touches a prompt's blocks deepest first, so a parent is always used more recently than its
children and eviction takes leaves before the prefixes they extend. A block whose parent was evicted
can never match again (its parent's id is gone) and ages out.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(eq=False)
class _Block:
    id: int
    k: torch.Tensor  # (n_layer, n_kv_head, block, head_dim): the step's read_slots
    v: torch.Tensor


class PrefixCache:
    """A bounded LRU of KV blocks keyed by the exact token prefix they end.

    Args:
        step: the decode step (``read_slots``/``write_slots``) whose cache rows the blocks come from.
        block: tokens per block; only whole blocks are cached.
        max_tokens: slots kept at most (0 disables the cache).
    """

    def __init__(self, step: Any, block: int = 16, max_tokens: int = 4096) -> None:
        self.step = step
        self.block = block
        self.max_blocks = max_tokens // block
        self._blocks: collections.OrderedDict[tuple[int, tuple[int, ...]], _Block] = collections.OrderedDict()
        self._ids = itertools.count(1)  # 0 is the empty prefix
        self.hits = 0          # requests that reused at least one block
        self.hit_tokens = 0    # prompt tokens not prefilled thanks to the cache
        self.lookups = 0

    @staticmethod
    def bytes_per_token(step: Any, cache: Any) -> int:
        """Bytes one cached token slot takes (keys and values of every layer)."""
        k, v = step.read_slots(cache, 0, 0, 1)
        return k.numel() * k.element_size() + v.numel() * v.element_size()

    @property
    def tokens(self) -> int:
        """Token slots held now."""
        return len(self._blocks) * self.block

    def _chain(self, prompt: list[int], limit: int) -> list[tuple[tuple[int, tuple[int, ...]], _Block]]:
        """The cached blocks that cover ``prompt[:limit]`` from its start, in order."""
        found, parent = [], 0
        for start in range(0, limit - self.block + 1, self.block):
            key = (parent, tuple(prompt[start:start + self.block]))
            entry = self._blocks.get(key)
            if entry is None:
                break
            found.append((key, entry))
            parent = entry.id
        return found

    def load(self, cache: Any, row: int, prompt: list[int], have: int = 0) -> int:
        """Copy the longest cached head of ``prompt`` into ``row`` and return its length in tokens.

        ``have``: tokens the row already holds (a multiple of ``block``); only the blocks after them are
        copied, and the result is never less. At least the prompt's last token is always left to
        prefill: its logits give the first token.
        """
        if self.max_blocks == 0:
            return have
        self.lookups += 1
        chain = self._chain(prompt, len(prompt) - 1)
        n = len(chain) * self.block
        if n <= have:
            return have
        for key, _ in reversed(chain):  # deepest first: parents end up the most recently used
            self._blocks.move_to_end(key)
        for i in range(have // self.block, len(chain)):
            entry = chain[i][1]
            self.step.write_slots(cache, row, i * self.block, (entry.k, entry.v))
        self.hits += have == 0
        self.hit_tokens += n - have
        return n

    def store(self, cache: Any, row: int, prompt: list[int], upto: int | None = None) -> None:
        """Keep the full blocks of ``prompt[:upto]`` (default all of it), whose slots ``row`` holds now."""
        if self.max_blocks == 0:
            return
        parent, touched = 0, []
        upto = len(prompt) if upto is None else upto
        for start in range(0, upto - self.block + 1, self.block):
            key = (parent, tuple(prompt[start:start + self.block]))
            entry = self._blocks.get(key)
            if entry is None:
                k, v = self.step.read_slots(cache, row, start, start + self.block)
                entry = self._blocks[key] = _Block(next(self._ids), k, v)
            touched.append(key)
            parent = entry.id
        for key in reversed(touched):
            self._blocks.move_to_end(key)
        while len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)

    def clear(self) -> None:
        self._blocks.clear()
