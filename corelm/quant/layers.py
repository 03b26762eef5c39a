"""The quantized layers, one memory layout per class, and the kernels they multiply with.

On CPU the layers multiply with corelm's own C++ kernels when they are built (:mod:`corelm.kernels`:
integer dot products on the layers' own tensors, 15-bit activations, fp32 in and out; 2-3x faster
than the kernels below and closer to fp32). Otherwise, and on CUDA, they use the packed-weight kernels
PyTorch ships:

- int8: ``torch.ops.aten._weight_int8pack_mm`` (symmetric, one scale per output channel).
- int4: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (asymmetric, one scale and zero per group of
  32/64/128 input columns) on CPU, ``_weight_int4pack_mm`` on CUDA.

Both PyTorch CPU kernels are vectorized only for **bf16 activations** (an fp32 input takes a scalar
loop, ~10-20x slower, measured on AVX-512 and AVX2), so the layers on them cast their input to bf16 and
the output back. The int4 packed layout depends on the instruction set of the running CPU, so packed
bytes are never saved: a state dict holds portable nibbles, scales and zeros, and a layer repacks at
load. Both kernels dequantize int4 as ``w = (q - 8) * scale + zero`` with ``q`` in 0..15.

==========================  ==============================================  ======================
layer                       tensors in memory                               multiplied by
==========================  ==============================================  ======================
:class:`Int8Linear`         ``weight`` (N, K) int8, ``scales`` (N,) bf16    corelm or PyTorch
                            (or ``records``, as Int4Linear)
:class:`Int8Embedding`      ``weight`` (V, d) int8, ``scales`` (V,)/(V, d/32) a row lookup
:class:`Int4Linear`         ``records``: rows interleaved eight at a time   corelm's C++ kernels
                            with bf16 scale/zero per block (or ``packed``
                            (N, K/2) u8 in GGUF Q4_1 nibble order and
                            ``scale_zeros`` (N, K/G, 2) bf16 where the
                            build does not interleave)
:class:`Int4PackedLinear`   ``packed`` in PyTorch's int4pack layout,        PyTorch (CPU or CUDA)
                            ``scale_zeros`` (K/G, N, 2) bf16
:class:`Q8Linear`           ``qweight`` (N, K) int8, ``scales`` (N, K/32)   corelm, or PyTorch's
                                                                            int4 kernel (two halves)
==========================  ==============================================  ======================

Which int4 class a model gets is decided by :func:`int4_class` (:func:`use_kernels` for the
device) when the transform (:mod:`corelm.quant.transform`) makes the layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from corelm.errors import CorelmError

GROUP_SIZES = (32, 64, 128)
# Activations are cast to this dtype for PyTorch's packed kernels: their vectorized path (module doc).
ACT_DTYPE = torch.bfloat16


# --------------------------------------------------------------------------------------------------
# The kernels as opaque operators, and which kernels a new layer uses. Inductor decomposes
# aten::_weight_int8pack_mm into generated loops that ran ~10x slower than the ATen kernel for the
# 49152x576 output head (measured, torch 2.13, AVX-512); a custom op is an extern call that
# torch.compile keeps as it is.
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


def int4_class(device: torch.device | str | None) -> type[Int4Linear | Int4PackedLinear]:
    """The int4 layer for ``device``: :class:`Int4Linear` where corelm's kernels run there
    (:func:`use_kernels`), else :class:`Int4PackedLinear`."""
    return Int4Linear if use_kernels(device) else Int4PackedLinear


def _kernel_matmul(x2: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.ops.corelm.qlinear(x2.float().contiguous(), q, s)


def check_group_size(in_features: int, group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise CorelmError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    if in_features % group_size:
        raise CorelmError(f"int4 group size {group_size} does not divide the layer width {in_features}")


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


class _Records:
    """What a layer kept as records shares (:class:`Int8Linear`, :class:`Q8Linear`, :class:`Int4Linear`).

    Where corelm's kernels interleave rows (``torch.ops.corelm.repack_rows``: every build with vectors unless
    ``CORELM_REPACK=0``) such a layer keeps one copy of its weight, ``records`` (eight rows to a group with each
    block's scales, ``corelm/kernels/repack.h``), and its row tensors are empty; elsewhere ``records`` is empty
    and the rows are kept. The kernels read the records as type ``TYPE`` (``CORELM_INT4``/``CORELM_INT8`` in
    ``corelm/kernels/kquants.h``), whose unpacked row is the row's values followed by a scale (int4: a scale
    and zero) per block of 32, bit for bit what was packed. A subclass defines :meth:`kernel_rows`.
    """

    TYPE: int
    records: torch.Tensor
    in_features: int
    out_features: int

    def _keep(self, records: torch.Tensor, **rows: torch.Tensor) -> None:
        """Keep ``records`` and empty row tensors (new ones: views would keep the rows' storage alive), or,
        when ``records`` is empty, the rows."""
        self.records = records
        for name, t in rows.items():
            setattr(self, name, t.new_empty(0) if records.numel() else t)

    def _unpacked(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The records' rows split into their values (N, ``width`` bytes) and their per-block scale bytes."""
        rows = torch.ops.corelm.unpack_blocks(self.records, self.TYPE, self.out_features, self.in_features)
        return rows[:, :width].contiguous(), rows[:, width:].contiguous()

    def kernel_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(values, scales)`` rows corelm's kernels read when the layer keeps no records (unpacked from
        the records when it does)."""
        raise NotImplementedError

    def kernel_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What corelm's C++ kernels read as it is (a bias is ``bias``): ``(records, (type, N))``, or the
        rows (:meth:`kernel_rows`)."""
        if self.records.numel():
            return self.records, torch.tensor([self.TYPE, self.out_features])
        return self.kernel_rows()

    def _records_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """(M, K) -> (M, N) fp32 on the records."""
        return torch.ops.corelm.qlinear_packed(x2.float().contiguous(), self.records, self.TYPE, self.out_features)


def _records_of(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``repack_rows`` of a CPU matrix (empty where the build keeps rows, and off the CPU)."""
    return torch.ops.corelm.repack_rows(q, scales) if q.device.type == "cpu" else q.new_empty(0, dtype=torch.uint8)


class Int8Linear(_Records, nn.Module):
    """``y = x @ (q * scale)^T + b`` with the weight kept as int8.

    Buffers: ``weight`` (N, K) int8, ``scales`` (N,) bf16, optional ``bias`` (N,) float; ``kernel`` says
    which kernels multiply (decided when the layer is made). On corelm's kernels the layer may keep
    ``records`` instead of ``weight``/``scales`` (:class:`_Records`; a tied :class:`Int8Embedding` looks its
    rows up in them); the state dict holds ``weight`` and ``scales`` either way.
    """

    TYPE = 1008  # CORELM_INT8 (corelm/kernels/kquants.h): the records' type for the kernels

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.bfloat16, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)
        self.register_buffer("records", torch.empty(0, dtype=torch.uint8, device=device), persistent=False)
        self.kernel = use_kernels(device)  # corelm's C++ kernels read weight and scales as they are

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device)
        mod.set_quantized(*quantize_int8_per_channel(linear.weight))
        if linear.bias is not None:
            mod.bias = linear.bias.detach().float().clone()
        return mod

    def set_quantized(self, q: torch.Tensor, scales: torch.Tensor) -> None:
        """Hold ``q`` (N, K) int8 and ``scales`` (N,) bf16: as records where corelm's kernels interleave
        rows, else as they are."""
        q, scales = q.to(torch.int8).contiguous(), scales.to(torch.bfloat16).contiguous()
        records = _records_of(q, scales) if self.kernel else q.new_empty(0, dtype=torch.uint8)
        self._keep(records, weight=q, scales=scales)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        weight, scales = self.quantized()
        destination[prefix + "weight"], destination[prefix + "scales"] = weight, scales
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight (N, K) int8, scales (N,) bf16)``, unpacked from the records (bit for bit) where the
        layer keeps records, without changing what it keeps."""
        if not self.records.numel():
            return self.weight, self.scales
        values, scales = self._unpacked(self.in_features)
        return values.view(torch.int8), scales[:, :2].contiguous().view(torch.bfloat16).reshape(-1)

    kernel_rows = quantized

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        keys = [prefix + "weight", prefix + "scales"] + ([prefix + "bias"] if self.bias is not None else [])
        absent = [key for key in keys if key not in state_dict]
        if absent:
            missing_keys.extend(absent)
            return
        q, scales = state_dict[keys[0]], state_dict[keys[1]]
        if tuple(q.shape) != (self.out_features, self.in_features) or tuple(scales.shape) != (self.out_features,):
            error_msgs.append(f"{prefix}weight/scales: shapes {tuple(q.shape)}, {tuple(scales.shape)} do not fit a "
                              f"{self.in_features}->{self.out_features} int8 layer")
            return
        device = self.records.device if self.records.device.type != "meta" else q.device
        # a copy of its own: _weight_int8pack_mm crashed (SIGSEGV, torch 2.13) on tensors assigned from a
        # safetensors file, which are views into one buffer at unaligned offsets
        self.set_quantized(q.to(device).clone(), scales.to(device).clone())
        if self.bias is not None:
            self.bias = state_dict[keys[2]].to(device, torch.float32).clone()

    def dequantize(self) -> torch.Tensor:
        """The float (N, K) weight this layer multiplies with."""
        weight, scales = self.quantized()
        return weight.float() * scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.records.numel():
            y = self._records_matmul(x2).to(x.dtype)
        elif self.kernel:
            y = _kernel_matmul(x2, self.weight, self.scales).to(x.dtype)
        else:
            y = int8_mm(x2.to(ACT_DTYPE), self.weight, self.scales).to(x.dtype)  # bf16: the kernel's fast path
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int8Embedding(nn.Module):
    """Token embedding stored as int8 with one scale per token (``scales`` (V,)) or per group of 32
    columns (``scales`` (V, d/32), GGUF Q8_0's layout).

    With tied embeddings (:meth:`tied`) the module holds no tensors of its own: it reads the rows of the
    int8 LM head (:class:`Int8Linear` or :class:`Q8Linear`) it was tied to, from the head's records
    (``torch.ops.corelm.unpack_rows``: only the looked-up rows' groups) or its rows, whichever the head
    keeps, so the matrix is in memory once. Such an embedding has no state-dict entries (the head's are
    the matrix).
    """

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.out_dtype = out_dtype
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self._head: tuple[nn.Module, ...] = ()  # the tied head, not a submodule (its tensors are its own)

    @classmethod
    def tied(cls, head: Int8Linear | Q8Linear, out_dtype: torch.dtype) -> Int8Embedding:
        """An embedding that reads ``head``'s int8 matrix (V = its outputs, d = its inputs)."""
        emb = cls(torch.empty(0, 0, dtype=torch.int8), torch.empty(0), out_dtype)
        emb.num_embeddings, emb.embedding_dim = head.out_features, head.in_features
        emb.weight = emb.scales = None  # no buffers of its own
        emb._head = (head,)
        return emb

    @property
    def head(self) -> nn.Module | None:
        """The LM head this embedding is tied to, or None."""
        return self._head[0] if self._head else None

    def _rows(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(int8 rows (n, d), scales (n,) or (n, d/G))`` of the flat ``ids``."""
        head = self.head
        if head is None:
            return F.embedding(ids, self.weight), self.scales[ids]
        if head.records.numel():
            d = self.embedding_dim
            flat = torch.ops.corelm.unpack_rows(head.records, head.TYPE, self.num_embeddings, d, ids)
            return flat[:, :d].contiguous().view(torch.int8), flat[:, d:].contiguous().view(torch.bfloat16)
        weight, scales = head.quantized()
        return F.embedding(ids, weight), scales[ids]

    def kernel_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What corelm's kernels read: this module's ``(weight, scales)``, or the tied head's."""
        return self.head.kernel_weights() if self.head is not None else (self.weight, self.scales)

    def dequantize(self) -> torch.Tensor:
        """The float (V, d) embedding matrix."""
        device = self.weight.device if self.head is None else self.head.records.device
        return self(torch.arange(self.num_embeddings, device=device)).float()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q, scales = self._rows(ids.reshape(-1))
        rows, scales = q.to(self.out_dtype), scales.to(self.out_dtype)  # (n, d), (n,) or (n, d/G)
        if scales.dim() == rows.dim():  # group-wise
            group = self.embedding_dim // scales.shape[-1]
            out = (rows.unflatten(-1, (-1, group)) * scales.unsqueeze(-1)).flatten(-2)
        else:
            out = rows * scales.unsqueeze(-1)
        return out.reshape(*ids.shape, self.embedding_dim)


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


class _Int4(nn.Module):
    """What the int4 layouts share: shapes, the portable state dict, dequantize and the bias.

    A state dict holds ``qweight`` (N, K/2) uint8 portable nibbles (:func:`pack_nibbles`), ``scales``
    and ``zeros`` (N, K/G) bf16 and the optional ``bias``, whatever the layout in memory: loading
    packs them for the layer's own layout, so a file is portable across machines and layouts.
    Subclasses hold ``packed`` and ``scale_zeros`` (non-persistent) in their layout and define
    :meth:`set_quantized`, :meth:`quantized` and ``_linear`` (an (M, K) input to (M, N)).
    """

    kernel: bool  # whether corelm's C++ kernels multiply (the class's layout decides)

    def __init__(self, in_features: int, out_features: int, group_size: int = 32, bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        check_group_size(in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.derived = False  # True inside a Q8Linear: the parent saves and loads the portable form
        self.register_buffer("packed", torch.empty(0, dtype=torch.uint8, device=device), persistent=False)
        self.register_buffer("scale_zeros", torch.empty(0, dtype=torch.bfloat16, device=device), persistent=False)
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 32) -> _Int4:
        mod = cls(linear.in_features, linear.out_features, group_size, linear.bias is not None,
                  linear.weight.device)
        mod.set_quantized(*quantize_int4_groupwise(linear.weight, group_size))
        if linear.bias is not None:
            mod.bias = linear.bias.detach().float().clone()
        return mod

    def _check(self, q: torch.Tensor, scales: torch.Tensor) -> None:
        n, k = self.out_features, self.in_features
        if tuple(q.shape) != (n, k) or tuple(scales.shape) != (n, k // self.group_size):
            raise CorelmError(f"int4 weight of shape {tuple(q.shape)} does not fit a {k}->{n} layer "
                              f"with group size {self.group_size}")

    def set_quantized(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        """Pack ``q`` (N, K) 0..15 with ``scales``/``zeros`` (N, K/G) into this layer's layout."""
        raise NotImplementedError

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q (N, K) uint8, scales, zeros (N, K/G) bf16)``, recovered from the layout."""
        raise NotImplementedError

    def _linear(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The float (N, K) weight this layer multiplies with."""
        q, scales, zeros = self.quantized()
        g = self.group_size
        w = (q.float().reshape(self.out_features, -1, g) - 8.0) * scales.float()[..., None] + zeros.float()[..., None]
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self._linear(x.reshape(-1, self.in_features)).to(x.dtype)  # (M, N)
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


class Int4Linear(_Records, _Int4):
    """``y = x @ W^T + b`` with W in 4-bit groups in corelm's kernel layout (CPU, C++ kernels built).

    The layer keeps one copy of its weight, in the form the kernels read fastest. Where corelm's kernels
    interleave rows (``torch.ops.corelm.repack_rows``: every build with vectors, unless
    ``CORELM_REPACK=0``) that is ``records``, the rows eight at a time with each block's bf16 scale and
    zero (``corelm/kernels/repack.h``; the decode step, the few-token kernels and the prompt's panels all
    read them), and ``packed``/``scale_zeros`` are empty. Otherwise ``packed`` (N, K/2) uint8 in GGUF
    Q4_1's nibble order (:func:`corelm.kernels.pack_blocks`: in every block of 32 columns, byte ``j`` holds
    column ``j`` low and ``j + 16`` high) and ``scale_zeros`` (N, K/G, 2) bf16, scale and zero
    interleaved. Either way the multiply is corelm's kernels, fp32 in and out, and the state dict is the
    portable form (:class:`_Int4`), unpacked from the records bit for bit.
    """

    kernel = True
    TYPE = 1004  # CORELM_INT4 (corelm/kernels/kquants.h): the records' type for the kernels

    def __init__(self, in_features: int, out_features: int, group_size: int = 32, bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, group_size, bias, device)
        self.register_buffer("records", torch.empty(0, dtype=torch.uint8, device=device), persistent=False)

    def set_quantized(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        from corelm import kernels

        self._check(q, scales)
        device = self.scale_zeros.device
        packed = kernels.pack_blocks(q.to(device))
        scale_zeros = torch.stack([scales, zeros], dim=-1).to(device, torch.bfloat16).contiguous()
        self._keep(_records_of(packed, scale_zeros), packed=packed, scale_zeros=scale_zeros)

    def kernel_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(packed (N, K/2), scale_zeros (N, K/G, 2))``, unpacked from the records when kept as records."""
        if not self.records.numel():
            return self.packed, self.scale_zeros
        packed, pairs = self._unpacked(self.in_features // 2)  # nibbles, then a (scale, zero) pair per block
        pairs = pairs.view(torch.bfloat16).reshape(self.out_features, self.in_features // 32, 2)
        return packed, pairs[:, ::self.group_size // 32].contiguous()

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from corelm import kernels

        packed, sz = self.kernel_rows()
        return kernels.unpack_blocks(packed), sz[..., 0].contiguous(), sz[..., 1].contiguous()

    def _linear(self, x2: torch.Tensor) -> torch.Tensor:
        if self.records.numel():
            return self._records_matmul(x2)
        return _kernel_matmul(x2, self.packed, self.scale_zeros)


def _inner_k_tiles(k: int) -> int:
    for tiles in (8, 4, 2):
        if k % (tiles * 16) == 0:
            return tiles
    raise CorelmError(f"int4 on CUDA needs the layer width {k} to be a multiple of 32")


class Int4PackedLinear(_Int4):
    """``y = x @ W^T + b`` with W in 4-bit groups in PyTorch's int4pack layout (CUDA, or a CPU
    without corelm's kernels).

    ``packed`` is ``_convert_weight_to_int4pack_for_cpu``'s layout for the running CPU's instruction
    set (or ``_convert_weight_to_int4pack``'s CUDA tile layout), rows padded to a multiple of 16, and
    ``scale_zeros`` (K/G, N, 2) bf16, groups outermost. Activations go in as bf16 (module doc).
    """

    kernel = False

    def set_quantized(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        self._check(q, scales)
        n, k = self.out_features, self.in_features
        device = self.scale_zeros.device
        q = q.to(device)
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
        """The packed layout is private to the kernel, so the kernel itself unpacks it: multiplying
        the identity with scale 1 and zero 8 yields ``(q - 8) * 1 + 8 = q`` exactly (0..15 is exact
        in bf16)."""
        k, g = self.in_features, self.group_size
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

    def kernel_weights(self) -> None:
        """None: corelm's C++ kernels do not read PyTorch's int4pack layout."""

    def _linear(self, x2: torch.Tensor) -> torch.Tensor:
        # (M, K) bf16 in: the kernel's fast path; the padding rows are cut off the output
        return self._matmul(x2.to(ACT_DTYPE))[:, : self.out_features]


# --------------------------------------------------------------------------------------------------
# int8, one scale per group of 32 columns (GGUF Q8_0)
# --------------------------------------------------------------------------------------------------


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


class Q8Linear(_Records, nn.Module):
    """Group-wise int8 (one scale per 32 columns, like GGUF Q8_0).

    ``qweight`` (N, K) int8 and ``scales`` (N, K/32) bf16 are what corelm's C++ kernels read, what
    is saved, and what a tied embedding reads; where those kernels interleave rows the layer keeps
    ``records`` instead (:class:`_Records`; :meth:`quantized` gives the rows back bit for bit). Without
    those kernels (``kernel`` False) the layer also holds ``pair``, an :class:`Int4PackedLinear` derived
    from them, and multiplies with it:

    ``_weight_int8pack_mm`` takes one scale per output channel only, and re-quantizing a Q8_0 head
    per channel cost 3-4 points of top-1 agreement on SmolLM2. Instead each int8 value is split into
    two 4-bit halves, ``q = 16*hi + lo`` with ``hi`` in -8..7 and ``lo`` in 0..15, and both halves are
    laid side by side along the input dimension of one int4 matrix of width 2K:

        W x = (16 d * hi) x + (d * lo) x = [W_hi | W_lo] [x ; x]

    which the int4 kernel's ``(q4 - 8) * scale + zero`` expresses exactly (``hi``: q4 = hi + 8,
    scale 16d, zero 0; ``lo``: q4 = lo, scale d, zero 8d). Same bytes as int8 plus the group scales;
    exact for Q8_0 blocks (``d`` rounded to bf16).
    """

    TYPE = 1008  # CORELM_INT8 (corelm/kernels/kquants.h): the records' type for the kernels

    def __init__(self, in_features: int, out_features: int, group_size: int = 32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        check_group_size(in_features, group_size)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, in_features // group_size, dtype=torch.bfloat16,
                                                   device=device))
        self.register_buffer("records", torch.empty(0, dtype=torch.uint8, device=device), persistent=False)
        self.kernel = use_kernels(device)  # corelm's C++ kernels read qweight and scales: no pair
        self.pair = None if self.kernel else Int4PackedLinear(2 * in_features, out_features, group_size,
                                                              device=device)
        if self.pair is not None:
            self.pair.derived = True
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
        q, scales = q.to(torch.int8).contiguous(), scales.to(torch.bfloat16).contiguous()
        self._keep(_records_of(q, scales) if self.pair is None else q.new_empty(0, dtype=torch.uint8),
                   qweight=q, scales=scales)
        if self.pair is None:
            return
        q16 = self.qweight.to(torch.int16)
        hi, lo = q16 >> 4, q16 & 0xF  # arithmetic shift: hi in -8..7, lo in 0..15, q = 16*hi + lo
        d = self.scales.float()
        self.pair.set_quantized(torch.cat([hi + 8, lo], dim=1).to(torch.uint8),
                                torch.cat([16.0 * d, d], dim=1), torch.cat([torch.zeros_like(d), 8.0 * d], dim=1))

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(qweight (N, K) int8, scales (N, K/G) bf16)``, unpacked from the records (bit for bit) where the
        layer keeps records."""
        if not self.records.numel():
            return self.qweight, self.scales
        values, scales = self._unpacked(self.in_features)
        return values.view(torch.int8), scales.view(torch.bfloat16)[:, ::self.group_size // 32].contiguous()

    kernel_rows = quantized

    def dequantize(self) -> torch.Tensor:
        g = self.group_size
        qweight, scales = self.quantized()
        w = qweight.float().reshape(self.out_features, -1, g) * scales.float()[..., None]
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.records.numel():  # fp32 output from 15-bit activations: no bf16 rounding to refine
            y = self._records_matmul(x.reshape(-1, self.in_features))
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        if self.kernel:
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
        destination[prefix + "qweight"], destination[prefix + "scales"] = self.quantized()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        keys = [prefix + "qweight", prefix + "scales"]
        if any(k not in state_dict for k in keys):
            missing_keys.extend(k for k in keys if k not in state_dict)
            return
        self.set_quantized(state_dict[keys[0]], state_dict[keys[1]])

    def extra_repr(self) -> str:
        how = "corelm kernels" if self.kernel else "as two int4 halves"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int8 group_size={self.group_size} ({how})")


def new_layer(kind: str, linear: nn.Linear, group_size: int, device: torch.device | str) -> nn.Module:
    """An empty quantized layer of ``kind`` shaped like ``linear``, in the layout for ``device``."""
    bias = linear.bias is not None
    if kind == "int8":
        return Int8Linear(linear.in_features, linear.out_features, bias, device)
    if kind == "q8":
        return Q8Linear(linear.in_features, linear.out_features, 32, device)
    return int4_class(device)(linear.in_features, linear.out_features, group_size, bias, device)


def quantize_linear(linear: nn.Linear, method: str, group_size: int = 32) -> nn.Module:
    """The quantized layer :func:`quantize_model` makes of one ``nn.Linear``.

    Args:
        linear: a float (N, K) layer, on CPU or CUDA.
        method: ``"int8"`` (:class:`Int8Linear`), ``"int4"`` (:class:`Int4Linear` where corelm's
            C++ kernels run, else :class:`Int4PackedLinear`) or ``"q8"`` (:class:`Q8Linear`).
        group_size: int4 group width (32, 64 or 128).
    """
    if method == "int8":
        return Int8Linear.from_float(linear)
    if method == "q8":
        return Q8Linear.from_float(linear)
    return int4_class(linear.weight.device).from_float(linear, group_size)
