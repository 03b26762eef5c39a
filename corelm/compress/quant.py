"""Weight-only quantization as a model transform: int8 per-channel and int4 group-wise.

``quantize_model(model, "int8" | "int4")`` swaps every ``nn.Linear`` child for a module that keeps
its weight packed in memory. On CPU the layers multiply with corelm's own C++ kernels when they are
built (:mod:`corelm.kernels`: integer dot products on the layers' own tensors, 15-bit activations,
fp32 in and out; 2-3x faster than the kernels below and closer to fp32). Otherwise, and on CUDA,
they use the packed-weight kernels PyTorch ships:

- int8: ``torch.ops.aten._weight_int8pack_mm`` (symmetric, one scale per output channel).
- int4: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (asymmetric, one scale and zero per group of
  32/64/128 input columns) on CPU, ``_weight_int4pack_mm`` on CUDA.

Both CPU kernels are vectorized only for **bf16 activations** (an fp32 input takes a scalar loop,
~10-20x slower, measured on AVX-512 and AVX2), so the modules cast their input to bf16 and the output
back. The int4 packed layout depends on the instruction set of the running CPU, so packed bytes are
never saved: a checkpoint holds portable nibbles, scales and zeros, and the module repacks at load.

The kernels dequantize int4 as ``w = (q - 8) * scale + zero`` with ``q`` in 0..15. GGUF blocks map
onto this without dequantizing the weights: Q4_1 (``w = q*d + m``) is ``scale = d, zero = m + 8d``;
Q4_0 (``w = (q - 8)*d``) is ``scale = d, zero = 0``. The model file never knows any of this.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from corelm.errors import CorelmError

METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
# Activations are cast to this dtype for the packed kernels: their vectorized path (see module doc).
ACT_DTYPE = torch.bfloat16


# --------------------------------------------------------------------------------------------------
# The kernels as opaque operators. Inductor decomposes aten::_weight_int8pack_mm into generated
# loops that ran ~10x slower than the ATen kernel for the 49152x576 output head (measured, torch
# 2.13, AVX-512); a custom op is an extern call that torch.compile keeps as it is.
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("corelm::int8_mm", mutates_args=())
def int8_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x (M, K) bf16 @ (weight (N, K) int8 * scales (N,))^T -> (M, N) bf16``."""
    if x.is_cuda:
        return torch.nn.functional.linear(x, weight.to(x.dtype)) * scales
    return torch.ops.aten._weight_int8pack_mm(x, weight, scales)


@int8_mm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


_PYTORCH_ONLY = [False]


@contextlib.contextmanager
def pytorch_kernels() -> Iterator[None]:
    """Layers created inside this block use PyTorch's packed kernels even where corelm's C++ kernels
    are available (for side-by-side benchmarks and tests of both paths)."""
    _PYTORCH_ONLY.append(True)
    try:
        yield
    finally:
        _PYTORCH_ONLY.pop()


def use_kernels(device: torch.device | str | None) -> bool:
    """Whether quantized layers on ``device`` run corelm's C++ kernels (:mod:`corelm.kernels`: int
    dot products with 15-bit activations, fp32 in and out) instead of PyTorch's packed kernels.
    CPU only, and only when the library is built: the first run on a machine without it starts the
    compile in the background and uses PyTorch's kernels. Decided when a layer is made."""
    if _PYTORCH_ONLY[-1] or torch.device(device or "cpu").type != "cpu":
        return False
    from corelm import kernels

    return kernels.load(background=True)


def _kernel_matmul(x2: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.ops.corelm.qlinear(x2.float().contiguous(), q, s)


# --------------------------------------------------------------------------------------------------
# int8, per output channel
# --------------------------------------------------------------------------------------------------


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``weight ~= q * scale[:, None]``.

    Args:
        weight: (N, K) float.

    Returns:
        ``q`` (N, K) int8 in [-127, 127] and ``scale`` (N,) bf16 (the dtype the kernel reads; the
        rounding is applied before ``q`` is computed, so ``q * scale`` is the best fit to that scale).
    """
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(torch.bfloat16)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """``y = x @ (q * scale)^T + b`` with the weight kept as int8.

    Buffers: ``weight`` (N, K) int8, ``scales`` (N,) bf16, optional ``bias`` (N,) float.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.bfloat16, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)
        self.kernel = use_kernels(device)  # corelm's C++ kernels read weight and scales as they are

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device)
        mod.weight, mod.scales = quantize_int8_per_channel(linear.weight)
        if linear.bias is not None:
            mod.bias = linear.bias.detach().float().clone()
        return mod

    def dequantize(self) -> torch.Tensor:
        """The float (N, K) weight this layer multiplies with."""
        return self.weight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if self.kernel:
            y = _kernel_matmul(x.reshape(-1, self.in_features), self.weight, self.scales).to(x.dtype)
        else:
            x2 = x.reshape(-1, self.in_features).to(ACT_DTYPE)  # (M, K) bf16: the kernel's fast path
            y = int8_mm(x2, self.weight, self.scales).to(x.dtype)  # (M, N)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int8Embedding(nn.Module):
    """Token embedding stored as int8 with one scale per token (``scales`` (V,)) or per group of 32
    columns (``scales`` (V, d/32), GGUF Q8_0's layout).

    With tied embeddings the LM head and this module share one int8 matrix and its scales.
    """

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.out_dtype = out_dtype
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)

    def dequantize(self) -> torch.Tensor:
        """The float (V, d) embedding matrix."""
        return self(torch.arange(self.num_embeddings, device=self.weight.device)).float()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight).to(self.out_dtype)  # (..., d)
        scales = self.scales[ids].to(self.out_dtype)  # (...,) or (..., d/G)
        if scales.dim() == rows.dim():  # group-wise
            group = self.embedding_dim // scales.shape[-1]
            return (rows.unflatten(-1, (-1, group)) * scales.unsqueeze(-1)).flatten(-2)
        return rows * scales.unsqueeze(-1)


# --------------------------------------------------------------------------------------------------
# int4, group-wise asymmetric
# --------------------------------------------------------------------------------------------------


def quantize_int4_groupwise(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                             torch.Tensor]:
    """Asymmetric group-wise int4 in the kernels' convention ``w ~= (q - 8) * scale + zero``.

    Args:
        weight: (N, K) float, ``K % group_size == 0``.
        group_size: input columns sharing one scale and zero.

    Returns:
        ``q`` (N, K) uint8 in 0..15, ``scales`` and ``zeros`` (N, K // group_size) bf16.
    """
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((hi - lo) / 15.0).clamp(min=1e-8).to(torch.bfloat16)
    # Round scale and zero to bf16 first, then choose q against the rounded values.
    zeros = (lo + 8.0 * scales.float()).to(torch.bfloat16)
    s, z = scales.float()[..., None], zeros.float()[..., None]
    q = torch.round((w - z) / s + 8.0).clamp(0, 15).to(torch.uint8).reshape(n, k)
    return q, scales, zeros


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K/2) uint8, even column in the high nibble (portable layout)."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] << 4) | q[:, 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: (N, K/2) uint8 -> (N, K) uint8."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(packed.shape[0], -1)


def _inner_k_tiles(k: int) -> int:
    for tiles in (8, 4, 2):
        if k % (tiles * 16) == 0:
            return tiles
    raise CorelmError(f"int4 on CUDA needs the layer width {k} to be a multiple of 32")


class Int4Linear(nn.Module):
    """``y = x @ W^T + b`` with W stored as 4-bit groups packed for the running device.

    In memory, with corelm's C++ kernels (CPU, ``kernel`` True): ``packed`` (N, K/2) uint8 in GGUF
    Q4_1's nibble order and ``scale_zeros`` (N, K/G, 2) bf16. Otherwise PyTorch's kernels: ``packed``
    in the layout of the running CPU's instruction set (or the CUDA tile layout) and ``scale_zeros``
    (K/G, N, 2). In a state dict: ``qweight`` (N, K/2) uint8 portable nibbles, ``scales`` and
    ``zeros`` (N, K/G) bf16 — repacked when loaded, so a file is portable across machines.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int = 32, bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        check_group_size(in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.derived = False  # True inside a Q8Linear: the parent saves and loads the portable form
        self.kernel = use_kernels(device)  # True: packed for corelm's C++ kernels (see class doc)
        self.register_buffer("packed", torch.empty(0, dtype=torch.uint8, device=device), persistent=False)
        self.register_buffer("scale_zeros", torch.empty(in_features // group_size, out_features, 2,
                                                        dtype=torch.bfloat16, device=device), persistent=False)
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 32) -> Int4Linear:
        mod = cls(linear.in_features, linear.out_features, group_size, linear.bias is not None,
                  linear.weight.device)
        mod.set_quantized(*quantize_int4_groupwise(linear.weight, group_size))
        if linear.bias is not None:
            mod.bias = linear.bias.detach().float().clone()
        return mod

    def set_quantized(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        """Pack ``q`` (N, K) 0..15 with ``scales``/``zeros`` (N, K/G) for the device this module is on."""
        n, k = self.out_features, self.in_features
        if tuple(q.shape) != (n, k) or tuple(scales.shape) != (n, k // self.group_size):
            raise CorelmError(f"int4 weight of shape {tuple(q.shape)} does not fit a {k}->{n} layer "
                              f"with group size {self.group_size}")
        device = self.scale_zeros.device
        q = q.to(device)
        if self.kernel:
            from corelm import kernels

            self.packed = kernels.pack_blocks(q)
            self.scale_zeros = torch.stack([scales, zeros], dim=-1).to(device, torch.bfloat16).contiguous()
            return
        pad = (-n) % 16  # the CPU packing works on tiles of 16 output rows: pad with zero rows
        if pad:
            q = F.pad(q, (0, 0, 0, pad))
            scales, zeros = F.pad(scales, (0, 0, 0, pad)), F.pad(zeros, (0, 0, 0, pad))
        if device.type == "cuda":
            self.packed = torch.ops.aten._convert_weight_to_int4pack(pack_nibbles(q).contiguous(),
                                                                     _inner_k_tiles(k))
        else:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        # (K/G, N, 2): the kernels read scale and zero interleaved, groups outermost.
        self.scale_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).to(device, torch.bfloat16).contiguous()

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.is_cuda:
            return torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, self.scale_zeros)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scale_zeros)

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Recover ``(q (N, K) uint8, scales, zeros)`` from the packed layout.

        The packed layout is private to the kernel, so the kernel itself unpacks it: multiplying the
        identity with scale 1 and zero 8 yields ``(q - 8) * 1 + 8 = q`` exactly (0..15 is exact in bf16).
        """
        k, g = self.in_features, self.group_size
        if self.kernel:
            from corelm import kernels

            sz = self.scale_zeros
            return kernels.unpack_blocks(self.packed), sz[..., 0].contiguous(), sz[..., 1].contiguous()
        unit = torch.zeros_like(self.scale_zeros)
        unit[..., 0], unit[..., 1] = 1.0, 8.0
        saved, self.scale_zeros = self.scale_zeros, unit
        try:
            eye = torch.eye(k, dtype=ACT_DTYPE, device=unit.device)
            q = self._matmul(eye).t().round().to(torch.uint8)  # (N + pad, K)
        finally:
            self.scale_zeros = saved
        n = self.out_features
        q, saved = q[:n], saved[:, :n]
        scales, zeros = saved[..., 0].t().contiguous(), saved[..., 1].t().contiguous()
        assert scales.shape[1] * g == k
        return q, scales, zeros

    def dequantize(self) -> torch.Tensor:
        """The float (N, K) weight this layer multiplies with."""
        q, scales, zeros = self.quantized()
        g = self.group_size
        w = (q.float().reshape(self.out_features, -1, g) - 8.0) * scales.float()[..., None] + zeros.float()[..., None]
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if self.kernel:
            y = _kernel_matmul(x.reshape(-1, self.in_features), self.packed, self.scale_zeros).to(x.dtype)
        else:
            x2 = x.reshape(-1, self.in_features).to(ACT_DTYPE)  # (M, K) bf16: the kernel's fast path
            y = self._matmul(x2)[:, : self.out_features].to(x.dtype)  # (M, N)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*lead, self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.derived:
            return
        q, scales, zeros = self.quantized()
        destination[prefix + "qweight"] = pack_nibbles(q).cpu()
        destination[prefix + "scales"] = scales.cpu()
        destination[prefix + "zeros"] = zeros.cpu()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if self.derived:
            return
        keys = [prefix + name for name in ("qweight", "scales", "zeros")]
        if self.bias is not None:
            keys.append(prefix + "bias")
        absent = [key for key in keys if key not in state_dict]
        if absent:
            missing_keys.extend(absent)
            return
        self.set_quantized(unpack_nibbles(state_dict[keys[0]]), state_dict[keys[1]], state_dict[keys[2]])
        if self.bias is not None:
            self.bias = state_dict[keys[3]].to(self.scale_zeros.device, torch.float32).clone()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 group_size={self.group_size}")


def quantize_int8_groupwise(weight: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per group of ``group_size`` columns (GGUF Q8_0's scheme).

    Returns:
        ``q`` (N, K) int8 in [-127, 127] and ``scales`` (N, K/G) bf16.
    """
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    scales = (w.abs().amax(-1) / 127.0).clamp(min=1e-12).to(torch.bfloat16)
    q = torch.round(w / scales.float()[..., None]).clamp(-127, 127).to(torch.int8).reshape(n, k)
    return q, scales


class Q8Linear(nn.Module):
    """Group-wise int8 (one scale per 32 columns, like GGUF Q8_0), multiplied by the int4 kernel.

    ``_weight_int8pack_mm`` takes one scale per output channel only, and re-quantizing a Q8_0 head
    per channel cost 3-4 points of top-1 agreement on SmolLM2. Instead each int8 value is split into
    two 4-bit halves, ``q = 16*hi + lo`` with ``hi`` in -8..7 and ``lo`` in 0..15, and both halves are
    laid side by side along the input dimension of one int4 matrix of width 2K:

        W x = (16 d * hi) x + (d * lo) x = [W_hi | W_lo] [x ; x]

    which the int4 kernel's ``(q4 - 8) * scale + zero`` expresses exactly (``hi``: q4 = hi + 8,
    scale 16d, zero 0; ``lo``: q4 = lo, scale d, zero 8d). Same bytes as int8 plus the group scales;
    exact for Q8_0 blocks (``d`` rounded to bf16). Keeps the portable ``qweight`` (N, K) int8 and
    ``scales`` (N, K/32) as well: they are what is saved, and a tied embedding reads them.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int = 32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        check_group_size(in_features, group_size)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, in_features // group_size, dtype=torch.bfloat16,
                                                   device=device))
        self.kernel = use_kernels(device)  # corelm's C++ kernels read qweight and scales: no pair
        self.pair = Int4Linear(2 * in_features, out_features, group_size, device=device)
        self.pair.derived, self.pair.kernel = True, False
        if self.kernel:
            self.pair.scale_zeros = self.pair.scale_zeros.new_empty(0)
        self.bias = None
        self.refine = 0  # > 0: recompute this many top outputs in fp32 (set for the LM head)

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 32) -> Q8Linear:
        if linear.bias is not None:
            raise CorelmError("group-wise int8 layers carry no bias; use int8 for biased heads")
        mod = cls(linear.in_features, linear.out_features, group_size, linear.weight.device)
        mod.set_quantized(*quantize_int8_groupwise(linear.weight, group_size))
        return mod

    def set_quantized(self, q: torch.Tensor, scales: torch.Tensor) -> None:
        self.qweight, self.scales = q.to(torch.int8).contiguous(), scales.to(torch.bfloat16).contiguous()
        if self.kernel:
            return
        q16 = self.qweight.to(torch.int16)
        hi, lo = q16 >> 4, q16 & 0xF  # arithmetic shift: hi in -8..7, lo in 0..15, q = 16*hi + lo
        d = self.scales.float()
        self.pair.set_quantized(torch.cat([hi + 8, lo], dim=1).to(torch.uint8),
                                torch.cat([16.0 * d, d], dim=1), torch.cat([torch.zeros_like(d), 8.0 * d], dim=1))

    def dequantize(self) -> torch.Tensor:
        g = self.group_size
        w = self.qweight.float().reshape(self.out_features, -1, g) * self.scales.float()[..., None]
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel:  # fp32 output from 15-bit activations: no bf16 rounding to refine
            y = _kernel_matmul(x.reshape(-1, self.in_features), self.qweight, self.scales)
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        y = self.pair(torch.cat([x, x], dim=-1))  # (..., N), computed from bf16 inputs and outputs
        if not self.refine:
            return y
        # The kernel's output is bf16: logits near 20 are rounded to steps of 0.06-0.125, which ties
        # and reorders close candidates (measured: fp32 logits rounded to bf16 alone move the argmax on
        # 3% of SmolLM2's positions). Recompute the top candidates exactly in fp32 from the int8 rows.
        lead = y.shape[:-1]
        y2, x2 = y.reshape(-1, self.out_features).float(), x.reshape(-1, self.in_features).float()
        top = y2.topk(self.refine, dim=-1).indices  # (M, k)
        rows = self.qweight[top].float().unflatten(-1, (-1, self.group_size))  # (M, k, K/G, G)
        rows = (rows * self.scales[top].float().unsqueeze(-1)).flatten(-2)  # (M, k, K)
        exact = torch.einsum("mk,mjk->mj", x2, rows)  # (M, k)
        return y2.scatter(1, top, exact).reshape(*lead, self.out_features).to(x.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "qweight"] = self.qweight
        destination[prefix + "scales"] = self.scales

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        keys = [prefix + "qweight", prefix + "scales"]
        if any(k not in state_dict for k in keys):
            missing_keys.extend(k for k in keys if k not in state_dict)
            return
        self.set_quantized(state_dict[keys[0]], state_dict[keys[1]])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int8 group_size={self.group_size} (as two int4 halves)")


def check_group_size(in_features: int, group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise CorelmError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    if in_features % group_size:
        raise CorelmError(f"int4 group size {group_size} does not divide the layer width {in_features}")


# --------------------------------------------------------------------------------------------------
# GGUF blocks -> packed layouts, without dequantizing the weights
# --------------------------------------------------------------------------------------------------


def _gguf_rows(raw: np.ndarray | torch.Tensor, n: int, block_bytes: int) -> torch.Tensor:
    data = torch.as_tensor(np.ascontiguousarray(raw)).view(torch.uint8)
    return data.reshape(n, -1, block_bytes)  # (N, K/32, block bytes)


def _gguf_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """GGUF Q4 ``qs`` (N, B, 16) -> (N, B*32) values 0..15: low nibbles are elements 0..15."""
    return torch.cat([qs & 0xF, qs >> 4], dim=-1).reshape(qs.shape[0], -1)


def _half(raw: torch.Tensor) -> torch.Tensor:
    return raw.contiguous().view(torch.float16).squeeze(-1).float()  # (N, B)


def int4_from_gguf(raw: np.ndarray | torch.Tensor, kind: str, shape: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Map GGUF Q4_1 / Q4_0 blocks (group 32) to ``(q, scales, zeros)`` for :class:`Int4Linear`.

    Q4_1 block: fp16 ``d``, fp16 ``m``, 16 bytes of nibbles; ``w = q*d + m`` -> ``scale = d``,
    ``zero = m + 8d``. Q4_0 block: fp16 ``d``, 16 bytes; ``w = (q-8)*d`` -> ``scale = d, zero = 0``.
    The 4-bit values are copied as they are; only ``d`` and ``m + 8d`` are rounded to bf16.

    Args:
        raw: the tensor's bytes as stored, (N, K/32 * block bytes) or flat.
        kind: ``"Q4_1"`` or ``"Q4_0"``.
        shape: (N, K) of the weight (output, input).
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


def int4_linear_from_gguf(raw: np.ndarray | torch.Tensor, kind: str, shape: tuple[int, int]) -> Int4Linear:
    """An :class:`Int4Linear` (group 32) holding a GGUF Q4_0/Q4_1 tensor."""
    mod = Int4Linear(shape[1], shape[0], group_size=32)
    mod.set_quantized(*int4_from_gguf(raw, kind, shape))
    return mod


def dequantize_gguf_q8_0(raw: np.ndarray | torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """GGUF Q8_0 blocks (fp16 ``d``, 32 int8) -> (N, K) fp32 ``q * d``."""
    blocks = _gguf_rows(raw, shape[0], 34)
    d, qs = _half(blocks[..., 0:2]), blocks[..., 2:].contiguous().view(torch.int8).float()
    return (qs * d[..., None]).reshape(shape)


class _GGUFBlocks:
    """Finds the GGUF Q4_0/Q4_1 blocks behind each ``nn.Linear`` of a llama model loaded from a file."""

    def __init__(self, source: object, model: nn.Module) -> None:
        from corelm.io import gguf as gguf_io

        self.io = gguf_io
        self.file = source if isinstance(source, gguf_io.GGUFFile) else gguf_io.read_gguf(source)
        self.by_module = {id(m): n for n, m in model.named_modules()}
        self.gguf_names = {}
        for name in self.file.tensors:
            hf = gguf_io.hf_name(name)
            if hf is not None:
                self.gguf_names[hf.removesuffix(".weight")] = name
        config = getattr(model, "config", None)
        self.heads = {"q_proj": getattr(config, "n_head", None), "k_proj": getattr(config, "n_kv_head", None)}

    def int4(self, linear: nn.Linear) -> tuple[torch.Tensor, ...] | None:
        name = self.gguf_names.get(self.by_module.get(id(linear), ""))
        if name is None or self.file.tensors[name].qtype.name not in ("Q4_0", "Q4_1"):
            return None
        heads = self.heads.get(name_suffix := self.by_module[id(linear)].rsplit(".", 1)[-1])
        qb = self.io.quant_blocks(self.file, name, unpermute_heads=heads if name_suffix in self.heads else None)
        return int4_from_blocks(qb)

    def q8(self, model: nn.Module, name: str, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Q8_0 blocks of the output head (``output.weight``, or ``token_embd.weight`` when tied)."""
        if name != "lm_head":
            return None
        gguf_name = "output.weight" if "output.weight" in self.file.tensors else "token_embd.weight"
        info = self.file.tensors.get(gguf_name)
        if info is None or info.qtype.name != "Q8_0" or tuple(info.shape) != tuple(linear.weight.shape):
            return None
        return q8_from_blocks(self.io.quant_blocks(self.file, gguf_name))


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


# --------------------------------------------------------------------------------------------------
# The transform
# --------------------------------------------------------------------------------------------------


def _linears(model: nn.Module, skip: Iterable[str]) -> list[tuple[nn.Module, str, nn.Linear]]:
    skip = tuple(skip)
    found = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not any(full == s or full.startswith(s + ".") for s in skip):
                found.append((module, child_name, child))
    return found


def _tied_embedding(model: nn.Module) -> tuple[nn.Module, str, nn.Embedding] | None:
    """The embedding whose matrix ``model.lm_head`` reuses (an ``nn.Linear`` sharing the parameter, or
    a parameter-free tied head such as :class:`corelm.ops.tied.TiedLMHead`), with its parent."""
    head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    if weight is None:
        return None
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, nn.Embedding) and child.weight is weight:
                return module, child_name, child
    return None


def _head_matrix(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The int8 matrix and scales a tied embedding can share with a quantized head."""
    if isinstance(head, Int8Linear):
        return head.weight, head.scales
    if isinstance(head, Q8Linear):
        return head.qweight, head.scales
    return None


def _tie_quantized(model: nn.Module, tied: tuple[nn.Module, str, nn.Embedding] | None,
                   out_dtype: torch.dtype | None = None) -> None:
    shared = _head_matrix(getattr(model, "lm_head", None))
    if tied is not None and shared is not None:
        parent, name, emb = tied
        setattr(parent, name, Int8Embedding(*shared, out_dtype or emb.weight.dtype))


HEAD_METHODS = ("q8", "int8", "int4")
HEAD_REFINE = 8  # top logits of a q8 head recomputed in fp32 (see Q8Linear.forward)


def _new_layer(kind: str, linear: nn.Linear, group_size: int, device: torch.device | str) -> nn.Module:
    """An empty quantized layer of ``kind`` shaped like ``linear``."""
    bias = linear.bias is not None
    if kind == "int8":
        return Int8Linear(linear.in_features, linear.out_features, bias, device)
    if kind == "q8":
        return Q8Linear(linear.in_features, linear.out_features, 32, device)
    return Int4Linear(linear.in_features, linear.out_features, group_size, bias, device)


def _targets(model: nn.Module, skip: tuple[str, ...]) -> tuple[list, tuple | None]:
    tied = _tied_embedding(model)
    targets = _linears(model, skip)
    if tied is not None and not isinstance(model.lm_head, nn.Linear) and "lm_head" not in skip:
        # a parameter-free tied head (TiedLMHead): the embedding matrix is quantized as the head
        weight = tied[2].weight
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        linear.weight = weight
        targets.append((model, "lm_head", linear))
    return targets, tied


def quantize_model(model: nn.Module, method: str, group_size: int = 32, head: str | None = None,
                   skip: Iterable[str] = (), from_gguf: object | None = None,
                   progress: object | None = None) -> nn.Module:
    """Swap the ``nn.Linear`` children of ``model`` for packed int8/int4 layers, in place.

    Args:
        model: any corelm model (decoder or encoder), on CPU or CUDA.
        method: ``"int8"`` (per output channel) or ``"int4"`` (group-wise asymmetric).
        group_size: int4 group width (32, 64 or 128); must divide every quantized layer's width.
        head: method for ``lm_head``: ``q8`` (default: int8 with a scale per 32 columns, see
            :class:`Q8Linear`), ``int8`` (per channel) or ``int4``. The output head is the largest
            matrix of a small model and its error lands directly in the logits, which is why
            llama.cpp's Q4 files keep it at 8 bits too.
        skip: qualified module names to leave in floating point.
        from_gguf: the GGUF file (path or :class:`corelm.io.gguf.GGUFFile`) the model was loaded
            from: its Q4_0/Q4_1 tensors become int4 layers (group 32) and a Q8_0 head a
            :class:`Q8Linear` directly from their blocks, without re-quantizing dequantized values.
        progress: optional wrapper for the list of layers (e.g. ``tqdm``), to show progress.

    Returns:
        The same model. With tied embeddings the token embedding becomes an :class:`Int8Embedding`
        that shares the head's int8 matrix. ``model.corelm_quantization`` records the spec.

    Raises:
        CorelmError: unknown method, or a group size that does not divide a layer width (checked for
        every layer before anything is changed).
    """
    if method not in METHODS:
        raise CorelmError(f"unknown quantization method {method!r}; expected one of {', '.join(METHODS)}")
    skip = tuple(skip)
    if getattr(model, "corelm_quantization", None):
        raise CorelmError("the model is already quantized")
    head = head or "q8"
    if head not in HEAD_METHODS:
        raise CorelmError(f"unknown head quantization method {head!r}; expected one of {', '.join(HEAD_METHODS)}")
    targets, tied = _targets(model, skip)
    for parent, name, linear in targets:
        kind = head if parent is model and name == "lm_head" else method
        if kind == "int4":
            check_group_size(linear.in_features, group_size)
        elif kind == "q8":
            check_group_size(linear.in_features, 32)
    out_dtype = tied[2].weight.dtype if tied is not None else None
    blocks = _GGUFBlocks(from_gguf, model) if from_gguf is not None else None
    for parent, name, linear in (progress(targets) if progress else targets):
        kind = head if parent is model and name == "lm_head" else method
        device = linear.weight.device
        new = None
        if blocks is not None and kind == "int4" and group_size == 32:
            if (qb := blocks.int4(linear)) is not None:
                new = _new_layer(kind, linear, 32, device)
                new.set_quantized(*qb)
        elif blocks is not None and kind == "q8" and (qb := blocks.q8(model, name, linear)) is not None:
            new = _new_layer(kind, linear, 32, device)
            new.set_quantized(*qb)
        if new is None:
            if kind == "int8":
                new = Int8Linear.from_float(linear)
            elif kind == "q8":
                new = Q8Linear.from_float(linear)
            else:
                new = Int4Linear.from_float(linear, group_size)
        if kind == "q8" and name == "lm_head":
            new.refine = HEAD_REFINE
        setattr(parent, name, new)
    _tie_quantized(model, tied, out_dtype)
    model.corelm_quantization = {"method": method, "group_size": group_size, "head": head,
                                 "skip": list(skip), "tied_embedding": tied is not None,
                                 "embedding_dtype": str(out_dtype).removeprefix("torch.") if out_dtype else None}
    return model


def quantized_structure(model: nn.Module, spec: dict) -> nn.Module:
    """Give a float model (real or on ``meta``) the module structure of a quantized one, without
    quantizing anything, so that a quantized state dict (:func:`quantize_model` + ``state_dict()``)
    loads into it with ``load_state_dict``. Int4 layers repack for this machine while loading.
    """
    method, group_size, head = spec["method"], int(spec["group_size"]), spec.get("head", "q8")
    targets, tied = _targets(model, tuple(spec.get("skip", ())))
    for parent, name, linear in targets:
        kind = head if parent is model and name == "lm_head" else method
        device = "cpu" if linear.weight.is_meta else linear.weight.device
        new = _new_layer(kind, linear, group_size, device)
        if kind == "q8" and name == "lm_head":
            new.refine = HEAD_REFINE
        setattr(parent, name, new)
    dtype = getattr(torch, spec["embedding_dtype"]) if spec.get("embedding_dtype") else None
    _tie_quantized(model, tied, dtype)
    model.corelm_quantization = dict(spec)
    return model


def is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "corelm_quantization", None)) or any(
        isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules())


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer as held in memory (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or t.is_meta:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _tied_names(model: nn.Module) -> list[str]:
    shared = _head_matrix(getattr(model, "lm_head", None))
    return [name for name, m in model.named_modules()
            if isinstance(m, Int8Embedding) and shared is not None and m.weight is shared[0]]


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict to save: int4 layers as portable nibbles, scales and zeros; a tied
    :class:`Int8Embedding` is left out (it is the head's matrix, re-tied at load)."""
    state = model.state_dict()
    for name in _tied_names(model):
        state.pop(f"{name}.weight", None)
        state.pop(f"{name}.scales", None)
    return {k: v.contiguous() for k, v in state.items()}


def load_quantized_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load :func:`quantized_state_dict` output into a model prepared by :func:`quantized_structure`
    (works on ``meta`` models: tensors are assigned, int4 layers repack for this machine)."""
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {name for name, m in model.named_modules() if isinstance(m, Int8Embedding)}
    allowed = {f"{name}.{b}" for name in tied for b in ("weight", "scales")}
    bad = [k for k in missing if k not in allowed]
    if bad or unexpected:
        raise CorelmError(f"quantized checkpoint does not match the model: missing {bad[:3]}, "
                          f"unexpected {list(unexpected)[:3]}")
    shared = _head_matrix(getattr(model, "lm_head", None))
    for name, m in model.named_modules():
        if isinstance(m, Int8Embedding) and f"{name}.weight" in missing and shared is not None:
            m.weight, m.scales = shared
    return model


# --------------------------------------------------------------------------------------------------
# Quantized checkpoint directories
# --------------------------------------------------------------------------------------------------

QUANT_KEY = "corelm_quantization"  # config.json key that marks a quantized checkpoint


def save_quantized_dir(model: nn.Module, config: object, out_dir: str | Path, tokenizer: object = None) -> Path:
    """Write a quantized model as ``config.json`` (HF fields + ``"corelm"`` + ``"corelm_quantization"``),
    ``model.safetensors`` (int8 weights, int4 nibbles, scales, zeros, float norms) and the tokenizer.

    Files are written under temporary names and renamed, ``config.json`` last, so a directory with
    a ``config.json`` is always complete.
    """
    import json
    import os

    from corelm.io.atomic import save_safetensors
    from corelm.io.hf import config_to_hf

    spec = getattr(model, "corelm_quantization", None)
    if not spec:
        raise CorelmError("the model is not quantized")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in quantized_state_dict(model).items()}
    tmp = out / f".model.safetensors.tmp{os.getpid()}"
    try:
        save_safetensors(state, str(tmp), metadata={"format": "pt", "corelm_quantization": json.dumps(spec)})
        os.replace(tmp, out / "model.safetensors")
    finally:
        tmp.unlink(missing_ok=True)
    if tokenizer is not None:
        tokenizer.save(out)
    hf = config_to_hf(config)
    hf["corelm"] = config.to_dict()
    hf[QUANT_KEY] = spec
    tmp_cfg = out / f".config.json.tmp{os.getpid()}"
    tmp_cfg.write_text(json.dumps(hf, indent=2, default=str) + "\n")
    os.replace(tmp_cfg, out / "config.json")
    return out


def is_quantized_dir(path: str | Path) -> bool:
    import json

    cfg = Path(path) / "config.json"
    try:
        return Path(path).is_dir() and cfg.is_file() and QUANT_KEY in json.loads(cfg.read_text())
    except ValueError:
        return False


def load_quantized_dir(path: str | Path, device: str | torch.device = "cpu") -> tuple[object, nn.Module]:
    """Read a directory written by :func:`save_quantized_dir`: ``(config, model)``, int4 repacked
    for this machine's instruction set."""
    import json

    from safetensors.torch import load_file

    from corelm.config import ModelConfig
    from corelm.models import build_model

    path = Path(path)
    if not is_quantized_dir(path):
        raise CorelmError(f"{path} is not a quantized corelm checkpoint (config.json lacks {QUANT_KEY!r})")
    hf = json.loads((path / "config.json").read_text())
    config = ModelConfig.from_dict(hf["corelm"])
    with torch.device("meta"):
        model = build_model(config)
    quantized_structure(model, hf[QUANT_KEY])
    state = load_file(str(path / "model.safetensors"), device=str(device))
    load_quantized_state_dict(model, state)
    return config, model.eval()
