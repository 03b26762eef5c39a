"""Reading prepared token shards as fixed-length training windows (memory-mapped, no copies up front)."""

from __future__ import annotations

import bisect
from pathlib import Path

import numpy as np
import torch

from corelm.data.prepare import read_manifest
from corelm.errors import CorelmError


class TokenWindows:
    """Consecutive windows of ``length`` tokens from a split's shards, stepping by ``stride``.

    For causal LM, ``length = T + 1`` and ``stride = T``: inputs ``w[:-1]``, targets ``w[1:]``, and
    every token is a target exactly once per epoch. Windows never cross a shard boundary.
    """

    def __init__(self, data_dir: str | Path, split: str, length: int, stride: int | None = None) -> None:
        manifest = read_manifest(data_dir)
        if split not in manifest["splits"]:
            raise CorelmError(f"{data_dir} has no {split!r} split")
        self.length, self.stride = length, stride or length
        self.arrays: list[np.memmap] = []
        starts = [0]
        for shard in manifest["splits"][split]["shards"]:
            path = Path(data_dir) / shard["file"]
            if not path.is_file():
                raise CorelmError(f"{path} is missing; prepare the data again")
            arr = np.memmap(path, dtype=np.dtype(manifest["dtype"]), mode="r")
            if arr.shape[0] != shard["tokens"]:
                raise CorelmError(f"{path} has {arr.shape[0]} tokens, the manifest says {shard['tokens']}")
            n = max(0, (arr.shape[0] - length) // self.stride + 1)
            if n:
                self.arrays.append(arr)
                starts.append(starts[-1] + n)
        self._starts = starts
        self.manifest = manifest

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = bisect.bisect_right(self._starts, i) - 1
        off = (i - self._starts[s]) * self.stride
        return torch.from_numpy(self.arrays[s][off:off + self.length].astype(np.int64))
