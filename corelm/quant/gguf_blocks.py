"""GGUF blocks -> corelm's quantized layouts, without dequantizing the weights.

The int4 kernels dequantize as ``w = (q - 8) * scale + zero`` with ``q`` in 0..15. GGUF blocks map
onto this without dequantizing the weights: Q4_1 (``w = q*d + m``) is ``scale = d, zero = m + 8d``;
Q4_0 (``w = (q - 8)*d``) is ``scale = d, zero = 0``. Q8_0 (``w = q*d``, 32 values per block) is
:class:`~corelm.quant.layers.Q8Linear`'s layout as it is. Only ``d`` and ``m + 8d`` are rounded to
bf16; the 4-bit and 8-bit values are copied. The model file never knows any of this.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from corelm.errors import CorelmError
from corelm.quant.layers import Int4Linear, Int4PackedLinear, int4_class


def _gguf_rows(raw: np.ndarray | torch.Tensor, n: int, block_bytes: int) -> torch.Tensor:
    data = torch.as_tensor(np.ascontiguousarray(raw)).view(torch.uint8)
    return data.reshape(n, -1, block_bytes)  # (N, K/32, block bytes)


def _gguf_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """GGUF Q4 ``qs`` (N, B, 16) -> (N, B*32) values 0..15: low nibbles are elements 0..15."""
    return torch.cat([qs & 0xF, qs >> 4], dim=-1).reshape(qs.shape[0], -1)


def _half(raw: torch.Tensor) -> torch.Tensor:
    return raw.contiguous().view(torch.float16).squeeze(-1).float()  # (N, B)


def int4_from_gguf(raw: np.ndarray | torch.Tensor, kind: str, shape: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Map GGUF Q4_1 / Q4_0 blocks (group 32) to ``(q, scales, zeros)`` for an int4 layer.

    Q4_1 block: fp16 ``d``, fp16 ``m``, 16 bytes of nibbles; ``w = q*d + m`` -> ``scale = d``,
    ``zero = m + 8d``. Q4_0 block: fp16 ``d``, 16 bytes; ``w = (q-8)*d`` -> ``scale = d, zero = 0``.
    The 4-bit values are copied as they are; only ``d`` and ``m + 8d`` are rounded to bf16.

    Args:
        raw: the tensor's bytes as stored, (N, K/32 * block bytes) or flat.
        kind: ``"Q4_1"`` or ``"Q4_0"``.
        shape: (N, K) of the weight (output, input).

    Returns:
        ``q`` (N, K) uint8 in 0..15, ``scales`` and ``zeros`` (N, K/32) bf16.
    """
    n, k = shape
    if kind == "Q4_1":
        blocks = _gguf_rows(raw, n, 20)
        d, m, qs = _half(blocks[..., 0:2]), _half(blocks[..., 2:4]), blocks[..., 4:]
        zero = m + 8.0 * d
    elif kind == "Q4_0":
        blocks = _gguf_rows(raw, n, 18)
        d, qs = _half(blocks[..., 0:2]), blocks[..., 2:]
        zero = torch.zeros_like(d)
    else:
        raise CorelmError(f"GGUF {kind} blocks do not map onto int4 groups (Q4_0 and Q4_1 do)")
    q = _gguf_nibbles(qs)
    assert q.shape == (n, k), (q.shape, shape)
    return q, d.to(torch.bfloat16), zero.to(torch.bfloat16)


def int4_linear_from_gguf(raw: np.ndarray | torch.Tensor, kind: str,
                          shape: tuple[int, int]) -> Int4Linear | Int4PackedLinear:
    """An int4 layer (group 32, on the CPU, in the layout :func:`~corelm.quant.layers.int4_class`
    picks) holding a GGUF Q4_0/Q4_1 tensor."""
    mod = int4_class("cpu")(shape[1], shape[0], group_size=32)
    mod.set_quantized(*int4_from_gguf(raw, kind, shape))
    return mod


def dequantize_gguf_q8_0(raw: np.ndarray | torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """GGUF Q8_0 blocks (fp16 ``d``, 32 int8) -> (N, K) fp32 ``q * d``."""
    blocks = _gguf_rows(raw, shape[0], 34)
    d, qs = _half(blocks[..., 0:2]), blocks[..., 2:].contiguous().view(torch.int8).float()
    return (qs * d[..., None]).reshape(shape)


def q8_from_blocks(qb: object) -> tuple[torch.Tensor, torch.Tensor]:
    """:class:`corelm.io.gguf.QuantBlocks` of a Q8_0 tensor -> ``(q (N, K) int8, scales (N, K/32) bf16)``."""
    return qb.qs, qb.scales.to(torch.bfloat16)


def int4_from_blocks(qb: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:class:`corelm.io.gguf.QuantBlocks` of a Q4_0/Q4_1 tensor -> ``(q, scales, zeros)`` (group 32)."""
    rows, cols = qb.shape
    q = _gguf_nibbles(qb.qs.reshape(rows, cols // 32, 16))
    d = qb.scales.float()
    zero = qb.mins.float() + 8.0 * d if qb.mins is not None else torch.zeros_like(d)
    return q, d.to(torch.bfloat16), zero.to(torch.bfloat16)


class GGUFBlocks:
    """Finds the GGUF Q4_0/Q4_1 blocks behind each ``nn.Linear`` of a llama model loaded from a file,
    and the Q8_0 blocks of its output head."""

    def __init__(self, source: object, model: nn.Module) -> None:
        from corelm.io import gguf as gguf_io

        self.io = gguf_io
        self.file = source if isinstance(source, gguf_io.GGUFFile) else gguf_io.read_gguf(source)
        self.by_module = {id(m): n for n, m in model.named_modules()}
        modules = set(self.by_module.values())
        arch = gguf_io._arch(self.file)
        self.gguf_names = {}
        for name in self.file.tensors:
            hf = gguf_io.hf_name(name, arch)
            # only matrices stored one-to-one (not Phi-3's fused qkv/gate_up, not expert stacks)
            if hf is not None and hf.endswith(".weight") and hf.removesuffix(".weight") in modules:
                self.gguf_names[hf.removesuffix(".weight")] = name
        config = getattr(model, "config", None)
        self.fused = _fused_rows(self.file, arch, config) if config is not None else {}
        # llama.cpp permutes Q/K rows for its llama architecture only (the others keep HF's order)
        permuted = gguf_io.ARCHS[arch].permute_qk
        self.heads = {"q_proj": getattr(config, "n_head", None), "k_proj": getattr(config, "n_kv_head", None)} \
            if permuted else {}

    def int4(self, linear: nn.Linear) -> tuple[torch.Tensor, ...] | None:
        """``(q, scales, zeros)`` of ``linear``'s Q4_0/Q4_1 tensor in the file, or None."""
        path = self.by_module.get(id(linear), "")
        if path in self.fused:  # Phi-3: rows of a fused matrix (blocks never straddle rows)
            name, start, stop = self.fused[path]
            if self.file.tensors[name].qtype.name not in ("Q4_0", "Q4_1"):
                return None
            qb = self.io.quant_blocks(self.file, name)
            heads = self.heads.get(path.rsplit(".", 1)[-1])  # llama: fused q/k rows are permuted too

            def rows(t: torch.Tensor | None) -> torch.Tensor | None:
                t = t[start:stop] if t is not None else None
                return self.io.unpermute_rows(t, heads) if t is not None and heads else t

            qb = dataclasses.replace(qb, shape=(stop - start, qb.shape[1]), qs=rows(qb.qs), scales=rows(qb.scales),
                                     mins=rows(qb.mins))
            return int4_from_blocks(qb)
        name = self.gguf_names.get(path)
        if name is None or self.file.tensors[name].qtype.name not in ("Q4_0", "Q4_1"):
            return None
        heads = self.heads.get(name_suffix := self.by_module[id(linear)].rsplit(".", 1)[-1])
        qb = self.io.quant_blocks(self.file, name, unpermute_heads=heads if name_suffix in self.heads else None)
        return int4_from_blocks(qb)

    def float_weight(self, linear: nn.Linear, dtype: torch.dtype) -> torch.Tensor | None:
        """``linear``'s matrix dequantized from the file to ``dtype`` (Q/K rows un-permuted as the loader
        does), for a layer the loader left as a placeholder; None when the file has no one-to-one tensor
        for it."""
        path = self.by_module.get(id(linear), "")
        name = self.gguf_names.get(path)
        if name is None:
            return None
        info = self.file.tensors[name]
        w = self.io.dequantize(self.file.raw(name), info.qtype, info.shape).to(dtype, copy=True)
        heads = self.heads.get(path.rsplit(".", 1)[-1])
        self.file.release(name)  # the copy is all that stays resident
        return self.io.unpermute_rows(w, heads) if heads else w

    def q8(self, model: nn.Module, name: str, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Q8_0 blocks of the output head (``output.weight``, or ``token_embd.weight`` when tied)."""
        if name != "lm_head":
            return None
        gguf_name = "output.weight" if "output.weight" in self.file.tensors else "token_embd.weight"
        info = self.file.tensors.get(gguf_name)
        if info is None or info.qtype.name != "Q8_0" or tuple(info.shape) != tuple(linear.weight.shape):
            return None
        return q8_from_blocks(self.io.quant_blocks(self.file, gguf_name))


def _fused_rows(file: object, arch: str, config: object) -> dict[str, tuple[str, int, int]]:
    """Module path -> (GGUF tensor, first row, end row) for matrices a file stores fused (Phi-3's
    ``attn_qkv``: q, k, v rows; its ``ffn_up``: gate, up rows)."""
    out: dict[str, tuple[str, int, int]] = {}
    hd = config.head_dim
    for name in file.tensors:
        parts = name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[3] != "weight":
            continue
        if parts[2] == "attn_qkv":
            sizes = {"self_attn.q_proj": config.n_head * hd, "self_attn.k_proj": config.n_kv_head * hd,
                     "self_attn.v_proj": config.n_kv_head * hd}
        elif parts[2] == "ffn_up" and arch == "phi3":
            sizes = {"mlp.gate_proj": config.d_ff, "mlp.up_proj": config.d_ff}
        else:
            continue
        start = 0
        for module, n in sizes.items():
            out[f"model.layers.{parts[1]}.{module}"] = (name, start, start + n)
            start += n
    return out
