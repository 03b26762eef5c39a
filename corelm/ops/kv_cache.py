"""A preallocated key/value cache with per-row positions (see docs/DESIGN.md, "KV cache").

Row ``b`` keeps the keys/values of its token at position ``p`` in slot ``p``. A query at position
``p`` attends slots ``0..p`` of its own row, so prompts of different lengths can be prefilled
right-padded: the padding writes slots that no query sees before decoding overwrites them.
"""

from __future__ import annotations

import torch


class KVCache:
    """Buffers ``k[layer], v[layer]`` of shape ``(B, n_kv_head, S_max, head_dim)``.

    Args:
        n_layer: number of attention layers.
        batch: rows B.
        n_kv_head: key/value heads.
        max_seq_len: slots S_max per row.
        head_dim: width of one head.
        dtype: cache dtype; use the model's dtype.
        device: where the buffers live.
    """

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 *, _views: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None) -> None:
        if _views is None:
            shape = (batch, n_kv_head, max_seq_len, head_dim)
            self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
            self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        else:
            self.k, self.v = _views
        self.n_layer = n_layer
        self.batch = self.k[0].shape[0]
        self.max_seq_len = max_seq_len
        # True: attend all S_max slots every step (static shapes, for torch.compile);
        # False: only the slots written so far (less work in eager mode).
        self.full_window = False
        # Precomputed once: row indices used to scatter new keys into their rows' slots.
        self._rows = torch.arange(self.batch, device=self.k[0].device)[:, None]  # (B, 1)
        self.slots = torch.arange(max_seq_len, device=self.k[0].device)  # (S_max,)

    @classmethod
    def for_model(cls, config, batch: int, max_seq_len: int, dtype: torch.dtype,
                  device: str | torch.device = "cpu") -> KVCache:
        """A cache shaped for a decoder ``config`` (a :class:`corelm.config.ModelConfig`)."""
        return cls(config.n_layer, batch, config.n_kv_head, max_seq_len, config.head_dim, dtype, device)

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    def rows(self, sl: slice) -> KVCache:
        """A view on rows ``sl``: writes through the view land in this cache."""
        k = [t[sl] for t in self.k]
        v = [t[sl] for t in self.v]
        view = KVCache(self.n_layer, 0, 0, self.max_seq_len, 0, _views=(k, v))
        view.full_window = self.full_window
        return view

    def update(self, layer: int, input_pos: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
               n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values at their positions and return the first ``n_keys`` slots.

        Args:
            layer: layer index.
            input_pos: ``(B, T)`` positions of the new tokens.
            k_new, v_new: ``(B, n_kv_head, T, head_dim)``.
            n_keys: slots to return: ``max(input_pos) + 1``, or ``S_max`` when ``full_window``.
        Returns:
            keys and values ``(B, n_kv_head, n_keys, head_dim)``.
        """
        k, v = self.k[layer], self.v[layer]
        B, _, T, _ = k_new.shape
        if B == 1 and T == 1 and not self.full_window:
            # one token of one row at the last slot read (n_keys - 1): a plain copy, no scatter
            k[:, :, n_keys - 1 : n_keys].copy_(k_new)
            v[:, :, n_keys - 1 : n_keys].copy_(v_new)
        else:
            rows = self._rows[:B]
            # Advanced indices on dims 0 and 2 around a slice: the indexed view is (B, T, n_kv_head, head_dim).
            k[rows, :, input_pos] = k_new.transpose(1, 2).to(k.dtype)
            v[rows, :, input_pos] = v_new.transpose(1, 2).to(v.dtype)
        return k[:, :, :n_keys], v[:, :, :n_keys]

    def reset(self) -> None:
        for t in self.k + self.v:
            t.zero_()
