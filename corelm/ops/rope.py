"""Rotary position embeddings (RoPE, Su et al. 2021, "RoFormer", section 3.4).

Each pair of channels ``(i, i + d/2)`` of a query/key is rotated by the angle ``pos * inv_freq[i]``,
so the dot product of a query and a key depends only on their distance. The channel pairing is the
"rotate half" layout of the Hugging Face Llama checkpoints, which corelm loads directly.

Scaling variants stretch ``inv_freq`` for longer contexts:
* ``linear`` (Chen et al. 2023, "position interpolation"): every frequency divided by ``factor``.
* ``llama3`` (Llama 3.1 release, ``apply_scaling`` in meta-llama/llama-models): low frequencies
  divided by ``factor``, high frequencies kept, a smooth ramp in between.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from corelm.errors import CorelmError


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """Inverse frequencies ``theta ** (-2i / head_dim)``, scaled, in fp32. Returns ``(head_dim // 2,)``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        return _llama3_scale(inv_freq, scaling)
    raise CorelmError(f"unsupported RoPE scaling {rope_type!r}; corelm supports default, linear and llama3")


def _llama3_scale(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_context = float(scaling.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths (low frequencies) are interpolated, short ones kept as they are
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RopeTable:
    """Cosine/sine tables for positions ``0..n-1``, grown on demand and kept per device.

    Not an ``nn.Module`` buffer on purpose: a model built on the ``meta`` device and loaded with
    ``load_state_dict(assign=True)`` would otherwise keep a meta table. Tables are computed lazily
    on the device of the first input that needs them.
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> None:
        # built on the CPU even under a `with torch.device("meta")` model build
        self.inv_freq = rope_inv_freq(head_dim, theta, scaling)  # (head_dim/2,) fp32
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def _build(self, n: int, device: torch.device) -> None:
        n = max(256, 1 << (n - 1).bit_length())  # grow in powers of two: few rebuilds
        pos = torch.arange(n, dtype=torch.float32, device=device)
        freqs = pos[:, None] * self.inv_freq.to(device)[None, :]  # (n, head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (n, head_dim): the rotate-half layout
        self._cos, self._sin = emb.cos(), emb.sin()

    def __call__(self, input_pos: torch.Tensor, max_pos: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``cos, sin`` of shape ``(B, 1, T, head_dim)`` (fp32) for positions ``(B, T)``.

        Args:
            input_pos: ``(B, T)`` positions.
            max_pos: an upper bound on ``input_pos`` if the caller knows it (saves a device sync).
        """
        if max_pos is None:
            max_pos = int(input_pos.max()) if input_pos.numel() else 0
        if self._cos is None or self._cos.device != input_pos.device or self._cos.shape[0] <= max_pos:
            self._build(max_pos + 1, input_pos.device)
        return self._cos[input_pos][:, None], self._sin[input_pos][:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys ``(B, H, T, head_dim)`` by their positions' angles.

    The rotation runs in fp32 (the tables are fp32): in bf16 the angle of a far position loses
    the precision that separates neighbouring tokens.
    """
    if x.dtype == torch.float32:
        return x * cos + rotate_half(x) * sin
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
