"""Rotary position embeddings (RoPE, Su et al. 2021, "RoFormer", section 3.4).

Each pair of channels ``(i, i + d/2)`` of a query/key is rotated by the angle ``pos * inv_freq[i]``,
so the dot product of a query and a key depends only on their distance. The channel pairing is the
"rotate half" layout of the Hugging Face Llama checkpoints, which corelm loads directly. With
*partial* rotary embeddings (``rotary_dim < head_dim``, e.g. Phi-4-mini) only the first
``rotary_dim`` channels rotate; the rest pass through.

Scaling variants stretch ``inv_freq`` for longer contexts (``rope_type`` as in HF configs):

* ``linear`` (Chen et al. 2023, "position interpolation"): every frequency divided by ``factor``.
* ``dynamic`` (NTK-aware, bloc97/emozilla 2023): the base grows with the sequence length once it
  exceeds ``max_position_embeddings``.
* ``llama3`` (Llama 3.1 release, ``apply_scaling`` in meta-llama/llama-models): low frequencies
  divided by ``factor``, high frequencies kept, a smooth ramp in between.
* ``yarn`` (Peng et al. 2023, "YaRN", eq. 18-21): the same ramp placed by rotation counts
  (``beta_fast``/``beta_slow``), plus an attention factor ``0.1 ln(factor) + 1`` on cos/sin.
* ``longrope`` (Ding et al. 2024, "LongRoPE"; Phi-3): one rescale factor per frequency,
  ``short_factor`` up to ``original_max_position_embeddings`` and ``long_factor`` beyond, plus an
  attention factor ``sqrt(1 + ln(factor) / ln(original))``.

Each formula is tested against transformers' ``ROPE_INIT_FUNCTIONS``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from corelm.errors import CorelmError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


def rope_type_of(scaling: dict[str, Any] | None) -> str:
    """The ``rope_type`` of an HF scaling dict (older files say ``type``); ``default`` for None."""
    scaling = scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def rope_parameters(rotary_dim: int, theta: float, scaling: dict[str, Any] | None = None, *,
                    max_seq_len: int | None = None, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the attention factor that multiplies cos/sin.

    Args:
        rotary_dim: channels that rotate (``head_dim`` unless partial).
        theta: the RoPE base.
        scaling: HF's rope scaling dict (``rope_type``, ``factor``, ...) or None.
        max_seq_len: the config's ``max_position_embeddings`` (``dynamic``; ``longrope`` and ``yarn``
            derive ``factor`` from it when the dict has none).
        seq_len: length of the sequence being encoded (``dynamic`` and ``longrope`` depend on it).
    Returns:
        ``(inv_freq (rotary_dim // 2,) fp32, attention_factor)``.
    """
    rope_type = rope_type_of(scaling)
    scaling = scaling or {}
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim
    inv_freq = 1.0 / (theta ** exponents)
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if rope_type == "llama3":
        return _llama3_scale(inv_freq, scaling), 1.0
    if rope_type == "dynamic":
        factor = float(scaling["factor"])
        if max_seq_len is None:
            raise CorelmError("dynamic RoPE needs max_position_embeddings")
        n = max(seq_len or max_seq_len, max_seq_len)
        base = theta * ((factor * n / max_seq_len) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
        return 1.0 / (base ** exponents), 1.0
    if rope_type == "yarn":
        return _yarn(rotary_dim, theta, scaling, max_seq_len, exponents)
    if rope_type == "longrope":
        return _longrope(theta, scaling, max_seq_len, seq_len, exponents)
    raise CorelmError(f"unsupported RoPE scaling {rope_type!r}; corelm supports {', '.join(ROPE_TYPES)}")


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """Inverse frequencies ``theta ** (-2i / head_dim)``, scaled, in fp32. Returns ``(head_dim // 2,)``."""
    return rope_parameters(head_dim, theta, scaling)[0]


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


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN eq. 21: ``0.1 * mscale * ln(scale) + 1`` (1 when not stretching)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, theta: float, scaling: dict[str, Any], max_seq_len: int | None,
          exponents: torch.Tensor) -> tuple[torch.Tensor, float]:
    original = float(scaling["original_max_position_embeddings"])
    factor = scaling.get("factor")
    factor = float(factor) if factor is not None else max_seq_len / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # the channel whose wavelength fits `rotations` times in the original context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the frequency (high frequencies), 0: interpolate it
    pos_freqs = theta ** exponents
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention_factor)


def _longrope(theta: float, scaling: dict[str, Any], max_seq_len: int | None, seq_len: int | None,
              exponents: torch.Tensor) -> tuple[torch.Tensor, float]:
    original = int(scaling["original_max_position_embeddings"])
    factor = scaling.get("factor")
    factor = float(factor) if factor is not None else (max_seq_len or original) / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = scaling["long_factor"] if seq_len and seq_len > original else scaling["short_factor"]
    ext_factors = torch.tensor(ext, dtype=torch.float32, device="cpu")
    return 1.0 / (ext_factors * theta ** exponents), float(attention_factor)


class RopeTable:
    """Cosine/sine tables for positions ``0..n-1``, grown on demand and kept per device.

    Not an ``nn.Module`` buffer on purpose: a model built on the ``meta`` device and loaded with
    ``load_state_dict(assign=True)`` would otherwise keep a meta table. Tables are computed lazily
    on the device of the first input that needs them.

    ``dynamic`` and ``longrope`` tables depend on the length of the sequence: as transformers does,
    one forward's table follows its largest position ``max_pos`` (``longrope`` switches to the long
    factors once ``max_pos + 1 > original_max_position_embeddings``). The decision is made on the
    Python int ``max_pos``, never on tensor values, so it stays compile-friendly. A static-shape
    (compiled) decode passes the cache length as ``max_pos``, so there the table follows the cache
    size: a cache longer than ``original_max_position_embeddings`` uses the long factors throughout.

    Args:
        head_dim: width of a head.
        theta: RoPE base.
        scaling: HF scaling dict or None.
        rotary_dim: channels that rotate (partial RoPE); default ``head_dim``.
        max_seq_len: the config's ``max_position_embeddings`` (``dynamic``, ``longrope``, ``yarn``).
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None = None, *,
                 rotary_dim: int | None = None, max_seq_len: int | None = None) -> None:
        self.rotary_dim = rotary_dim or head_dim
        self.theta, self.scaling, self.max_seq_len = theta, scaling, max_seq_len
        self.rope_type = rope_type_of(scaling)
        if self.rope_type not in ROPE_TYPES:
            raise CorelmError(f"unsupported RoPE scaling {self.rope_type!r}; corelm supports {', '.join(ROPE_TYPES)}")
        # built on the CPU even under a `with torch.device("meta")` model build
        self.inv_freq, self.attention_factor = rope_parameters(self.rotary_dim, theta, scaling,
                                                               max_seq_len=max_seq_len)
        self._tables: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}

    def _key(self, max_pos: int) -> Any:
        """Which table a forward with largest position ``max_pos`` reads (None: the one static table)."""
        if self.rope_type == "longrope":
            return "long" if max_pos + 1 > int(self.scaling["original_max_position_embeddings"]) else "short"
        if self.rope_type == "dynamic" and self.max_seq_len is not None and max_pos + 1 > self.max_seq_len:
            return max_pos + 1
        return None

    def _build(self, key: Any, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if key is None:
            inv_freq, factor = self.inv_freq, self.attention_factor
        else:
            seq_len = key if isinstance(key, int) else (n if key == "long" else None)
            inv_freq, factor = rope_parameters(self.rotary_dim, self.theta, self.scaling,
                                               max_seq_len=self.max_seq_len, seq_len=seq_len)
        n = max(256, 1 << (n - 1).bit_length())  # grow in powers of two: few rebuilds
        pos = torch.arange(n, dtype=torch.float32, device=device)
        freqs = pos[:, None] * inv_freq.to(device)[None, :]  # (n, rotary_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (n, rotary_dim): the rotate-half layout
        return emb.cos() * factor, emb.sin() * factor

    def __call__(self, input_pos: torch.Tensor, max_pos: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``cos, sin`` of shape ``(B, 1, T, rotary_dim)`` (fp32) for positions ``(B, T)``.

        Args:
            input_pos: ``(B, T)`` positions.
            max_pos: an upper bound on ``input_pos`` if the caller knows it (saves a device sync).
        """
        if max_pos is None:
            max_pos = int(input_pos.max()) if input_pos.numel() else 0
        key = self._key(max_pos)
        table = self._tables.get(key)
        if table is None or table[0].device != input_pos.device or table[0].shape[0] <= max_pos:
            if isinstance(key, int):  # a longer dynamic sequence: its table replaces the previous one
                self._tables = {k: v for k, v in self._tables.items() if not isinstance(k, int)}
            table = self._tables[key] = self._build(key, max_pos + 1, input_pos.device)
        cos, sin = table
        return cos[input_pos][:, None], sin[input_pos][:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys ``(B, H, T, head_dim)`` by their positions' angles.

    Only the first ``cos.shape[-1]`` channels rotate (partial RoPE); the others pass through.
    The rotation runs in fp32 (the tables are fp32): in bf16 the angle of a far position loses
    the precision that separates neighbouring tokens.
    """
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
    if x.dtype == torch.float32:
        return x * cos + rotate_half(x) * sin
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
