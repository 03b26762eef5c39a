"""A resumable, rank-aware batch iterator over any indexable dataset.

The position in the data is two integers, ``(epoch, cursor)``; the order within an epoch is a
permutation drawn from ``seed + epoch``. Saving those integers and restoring them reproduces the
exact batch sequence, which DataLoader workers with their own RNG cannot promise (accelerate#2016).

Every step draws one *global* batch of ``batch_size * world_size`` indices and rank ``r`` takes
the ``r``-th slice, so a 2-process run with ``batch_size=B`` sees the same examples per step as a
1-process run with ``batch_size=2B``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def default_collate(items: list[Any]) -> Any:
    """Stack tensors (or dicts of tensors) along a new batch dimension."""
    if isinstance(items[0], dict):
        return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}
    return torch.stack([torch.as_tensor(it) for it in items])


class ResumableLoader:
    """Endless batches from ``dataset`` in a seeded per-epoch order.

    Args:
        dataset: anything with ``len()`` and ``[i]``.
        batch_size: examples per rank per micro-batch.
        collate: turns a list of examples into a batch; receives ``indices=`` too when
            ``collate_with_indices`` is set (for per-example deterministic randomness, e.g. MLM masks).
        seed: base seed of the shuffling permutation.
        shuffle: permute each epoch (else sequential).
        rank, world_size: this process's slice of each global batch.
        drop_last: skip an epoch's incomplete final global batch (keeps every rank's batch equal).
    """

    def __init__(self, dataset: Sequence, batch_size: int, collate: Callable | None = None, *, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1, drop_last: bool = True,
                 collate_with_indices: bool = False) -> None:
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.collate = collate or default_collate
        self.collate_with_indices = collate_with_indices
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.global_batch = batch_size * world_size
        self.n_examples = len(dataset)
        if len(dataset) < self.global_batch:
            from corelm.errors import CorelmError

            raise CorelmError(f"the dataset has {len(dataset)} examples, fewer than one global batch "
                              f"({batch_size} x {world_size} processes); use more data or a smaller batch")
        self.epoch, self.cursor = 0, 0
        self._order: torch.Tensor | None = None

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            n = len(self.dataset)
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                self._order = torch.randperm(n, generator=g)
            else:
                self._order = torch.arange(n)
        return self._order

    def __iter__(self) -> ResumableLoader:
        return self

    def __next__(self) -> Any:
        order = self._epoch_order()
        if self.cursor + (self.global_batch if self.drop_last else 1) > len(order):
            self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
            order = self._epoch_order()
        global_idx = order[self.cursor:self.cursor + self.global_batch]
        self.cursor += self.global_batch
        mine = global_idx[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()
        items = [self.dataset[i] for i in mine]
        if self.collate_with_indices:
            return self.collate(items, indices=[(self.epoch, i) for i in mine])
        return self.collate(items)

    def state_dict(self) -> dict[str, int]:
        """The data position: epoch and cursor within it (plus what must match on resume)."""
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "global_batch": self.global_batch,
                "n_examples": self.n_examples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        from corelm.errors import CorelmError

        for key in ("seed", "global_batch", "n_examples"):
            if key in state and state[key] != getattr(self, key):
                raise CorelmError(f"cannot resume exactly: the data loader's {key} was {state[key]} and is "
                                  f"now {getattr(self, key)}; keep the same data, seed and global batch")
        self.epoch, self.cursor, self._order = int(state["epoch"]), int(state["cursor"]), None
