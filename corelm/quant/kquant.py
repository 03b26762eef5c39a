"""GGUF's own block formats as layers: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS.

A file from llama.cpp's quantizer (``Q4_K_M`` = Q4_K + Q6_K matrices, ``Q5_K_M``, ``Q6_K``, ``Q8_0``,
``Q4_0``/``Q4_1`` with a Q8_0 or Q6_K head) keeps each matrix in the bytes it was written in (the
quantizer falls back to Q5_0/Q5_1/Q8_0 for rows that are not whole 256-value super-blocks, e.g.
SmolLM2's 576 columns): :class:`GGUFBlockLinear` holds a matrix's rows of blocks and its GGML type,
and multiplies through ``torch.ops.corelm.qlinear_blocks`` (corelm's C++ kernels, ``kquants.h``:
integer dot products of the blocks with 15-bit activation blocks of 32, the fp16 scales used as
stored). Without the kernels it dequantizes (:func:`dequantize_blocks`).

Layouts (llama.cpp ``ggml-common.h``; a K super-block is 256 values of one row):

==========  ======  ================================================  ===============================
type        bytes   fields                                            value of sub-block ``i``
==========  ======  ================================================  ===============================
Q4_0 (2)    18/32   ``d`` fp16, ``qs[16]``                            ``d * (q - 8)``
Q4_1 (3)    20/32   ``d, m`` fp16, ``qs[16]``                         ``d * q + m``
Q5_0 (6)    22/32   ``d`` fp16, ``qh[4]``, ``qs[16]``                 ``d * (q - 16)``
Q5_1 (7)    24/32   ``d, m`` fp16, ``qh[4]``, ``qs[16]``              ``d * q + m``
Q8_0 (8)    34/32   ``d`` fp16, ``qs[32]`` int8                       ``d * q``
IQ4_NL(20)  18/32   ``d`` fp16, ``qs[16]``                            ``d * kv[q]``
Q4_K (12)   144     ``d, dmin`` fp16, ``scales[12]``, ``qs[128]``     ``d*sc_i * q - dmin*m_i``
Q5_K (13)   176     ``d, dmin``, ``scales[12]``, ``qh[32]``, ``qs``   same, ``q`` 5 bits
Q6_K (14)   210     ``ql[128], qh[64]``, ``scales[16]`` int8, ``d``   ``d*sc_j * (q - 32)``, 16 per sc
IQ4_XS(23)  136     ``d``, ``scales_h`` u16, ``scales_l[4]``, ``qs``  ``d*(ls_i - 32) * kv[q]``
==========  ======  ================================================  ===============================

IQ4_NL's and IQ4_XS's 4-bit codes ``q`` index the non-uniform int8 levels ``kv`` (:data:`IQ4_LEVELS`,
llama.cpp's ``kvalues_iq4nl``), laid out as Q4_0's nibbles; IQ4_XS's sub-block ``i`` has the 6-bit scale
``ls_i``: nibble ``i % 2`` of ``scales_l[i // 2]`` with bits ``2i, 2i+1`` of ``scales_h`` on top. (An IQ4_XS
file's matrices whose rows are not whole super-blocks are IQ4_NL: SmolLM2's 576 columns.)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from corelm.errors import CorelmError

QK = 32  # activation block, and a K sub-block
QK_K = 256  # K super-block
# GGML type id -> (name, values per block, bytes per block)
FORMATS = {2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34),
           20: ("IQ4_NL", 32, 18), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
           23: ("IQ4_XS", 256, 136)}
TYPE_IDS = {name: t for t, (name, _, _) in FORMATS.items()}
IQ4_LEVELS = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=torch.int32)


def row_bytes(ggml_type: int, k: int) -> int:
    """Bytes of one row of ``k`` values in block format ``ggml_type``."""
    name, values, nbytes = FORMATS[ggml_type]
    if k % values:
        raise CorelmError(f"{name} rows are whole blocks of {values} values; {k} columns are not")
    return k // values * nbytes


def _half(b: torch.Tensor) -> torch.Tensor:  # (..., 2) uint8 -> (...) fp32
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., 12) packed bytes -> eight 6-bit scales and mins (..., 8) (ggml get_scale_min_k4)."""
    s = s.int()
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([d & 63, (md & 0xF) | ((d >> 6) << 4)], -1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 6) << 4)], -1)
    return sc, mn


def unpack(blocks: torch.Tensor, ggml_type: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Split a block matrix into what the kernels multiply, per activation block of 32.

    Args:
        blocks: (N, row bytes) uint8, the rows of blocks as the file stores them.
        ggml_type: a key of :data:`FORMATS`.
        k: values per row.

    Returns:
        ``q`` (N, K/32, 32) int32 integer weights, ``scale`` (N, K/32, 2) fp32 for the two halves of
        each 32 (equal except in Q6_K), and ``m`` (N, K/32) fp32 subtracted per ``d_a * sum(a)`` (K
        formats with mins; None otherwise): ``w = q * scale - m``.
    """
    n, nb = blocks.shape[0], k // QK
    name, per, nbytes = FORMATS[ggml_type]
    b = blocks.reshape(n, k // per, nbytes)
    if name == "Q8_0":
        d = _half(b[..., 0:2])  # (N, nb)
        q = b[..., 2:].contiguous().view(torch.int8).int()
        return q, d[..., None].expand(n, nb, 2).contiguous(), None
    if name in ("Q4_0", "Q4_1"):  # the 4-bit integers 0..15 as stored: w = d*q - m, m = 8d (Q4_0) or -m
        d = _half(b[..., 0:2])
        m = -_half(b[..., 2:4]) if name == "Q4_1" else 8.0 * d
        qs = b[..., 4 if name == "Q4_1" else 2:].int()
        return torch.cat([qs & 0xF, qs >> 4], -1), d[..., None].expand(n, nb, 2).contiguous(), m
    if name in ("Q5_0", "Q5_1"):
        d = _half(b[..., 0:2])
        m = -_half(b[..., 2:4]) if name == "Q5_1" else 16.0 * d  # w = d*q - m
        at = 4 if name == "Q5_1" else 2
        qh = b[..., at:at + 4].contiguous().view(torch.int32)  # (N, nb, 1), little-endian bits
        qs = b[..., at + 4:].int()
        q = torch.cat([qs & 0xF, qs >> 4], -1) | (((qh >> torch.arange(32)) & 1) << 4)
        return q, d[..., None].expand(n, nb, 2).contiguous(), m
    if name == "IQ4_NL":  # w = d * kv[q]
        d = _half(b[..., 0:2])
        qs = b[..., 2:].int()
        return IQ4_LEVELS[torch.cat([qs & 0xF, qs >> 4], -1)], d[..., None].expand(n, nb, 2).contiguous(), None
    if name == "IQ4_XS":  # w = d * (ls_i - 32) * kv[q]
        d = _half(b[..., 0:2])  # (N, S)
        high = b[..., 2:4].contiguous().view(torch.int16).int() & 0xFFFF  # (N, S, 1) scales_h
        low = b[..., 4:8].int()  # (N, S, 4) scales_l
        ls = torch.stack([low & 0xF, low >> 4], -1).reshape(n, -1, 8) | (((high >> (2 * torch.arange(8))) & 3) << 4)
        scale = d[..., None] * (ls - 32).float()  # (N, S, 8), exact
        qs = b[..., 8:].int().reshape(n, -1, 8, 1, 16)
        codes = torch.cat([qs & 0xF, qs >> 4], dim=3)  # (N, S, sub-block, nibble, 16)
        return IQ4_LEVELS[codes].reshape(n, nb, QK), scale.reshape(n, nb, 1).expand(n, nb, 2).contiguous(), None
    if name == "Q6_K":
        ql, qh = b[..., :128].int(), b[..., 128:192].int()
        sc = b[..., 192:208].contiguous().view(torch.int8).float()  # (N, S, 16)
        d = _half(b[..., 208:210])  # (N, S)
        ql = ql.reshape(n, -1, 2, 1, 2, 32)  # chunk c, byte half s%2, value l
        lo = torch.cat([ql & 0xF, ql >> 4], dim=3)  # (N, S, c, nibble s/2, s%2, 32)
        lo = lo.reshape(n, -1, 2, 4, 32)  # s = 2*(s/2) + s%2
        hi = (qh.reshape(n, -1, 2, 1, 32) >> torch.tensor([0, 2, 4, 6]).reshape(4, 1)) & 3  # (N, S, c, s, 32)
        q = (lo | (hi << 4)) - 32
        scale = d[..., None] * sc  # (N, S, 16)
        return q.reshape(n, nb, QK), scale.reshape(n, nb, 2), None
    d, dmin = _half(b[..., 0:2]), _half(b[..., 2:4])
    sc, mn = _scale_min_k4(b[..., 4:16])  # (N, S, 8)
    qs = b[..., -128:].int().reshape(n, -1, 4, 1, 32)
    q = torch.cat([qs & 0xF, qs >> 4], dim=3).reshape(n, -1, 8, 32)  # sub-block i = 2*(i/2) + nibble
    if name == "Q5_K":
        qh = b[..., 16:48].int().reshape(n, -1, 1, 32)
        q = q | (((qh >> torch.arange(8).reshape(8, 1)) & 1) << 4)
    scale = (d[..., None] * sc.float()).reshape(n, nb)
    m = (dmin[..., None] * mn.float()).reshape(n, nb)
    return q.reshape(n, nb, QK), scale[..., None].expand(n, nb, 2).contiguous(), m


def dequantize_blocks(blocks: torch.Tensor, ggml_type: int, k: int) -> torch.Tensor:
    """The (N, K) fp32 matrix a block matrix stores (ggml's dequantize_row_* arithmetic)."""
    q, scale, m = unpack(blocks, ggml_type, k)
    w = q.float() * scale.repeat_interleave(QK // 2, -1)
    if m is not None:
        w = w - m[..., None]
    return w.reshape(blocks.shape[0], k)


def reference_qlinear_blocks(x: torch.Tensor, blocks: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """What ``torch.ops.corelm.qlinear_blocks`` computes for fewer than 64 rows, in PyTorch: 15-bit
    integer activations (:func:`corelm.kernels.quantize_activations`), exact integer dot products per
    16 values, then the fp32 scales. (T, K) f32 -> (T, N) f32."""
    from corelm.kernels import quantize_activations

    k = x.shape[1]
    q, scale, m = unpack(blocks, ggml_type, k)
    a, da, sa = quantize_activations(x)  # (T, nb, 32), (T, nb), (T, nb)
    n, nb = q.shape[:2]
    sumi = torch.einsum("tbhj,nbhj->tnbh", a.double().reshape(-1, nb, 2, QK // 2),
                        q.double().reshape(n, nb, 2, QK // 2)).float()  # exact integers, per half
    y = ((sumi * scale[None]).sum(-1) * da[:, None]).sum(-1)
    if m is not None:
        y = y - (m[None] * sa[:, None]).sum(-1)
    return y


class _BlockStore(nn.Module):
    """A GGUF block matrix's bytes, held as the file's rows (buffer ``raw``) or only repacked eight rows at a
    time (buffer ``packed``: ``repack_blocks`` in corelm/kernels/qlinear.h, what the decode kernels read);
    :attr:`blocks` is the file's rows either way, and the state dict holds ``blocks``. Subclasses set
    ``ggml_type`` and :meth:`_shape`."""

    ggml_type: int

    def _shape(self) -> tuple[int, int]:  # (rows, values per row)
        raise NotImplementedError

    def _keep(self, blocks: torch.Tensor | None, packed: torch.Tensor | None) -> None:
        """Hold ``packed`` (where not None) or else ``blocks``."""
        self.register_buffer("raw", blocks if packed is None else None, persistent=False)
        self.register_buffer("packed", packed, persistent=False)

    @property
    def blocks(self) -> torch.Tensor:
        """(rows, row bytes) uint8, the file's rows (unpacked anew from ``packed`` when only that is kept)."""
        if self.packed is None:
            return self.raw
        return torch.ops.corelm.unpack_blocks(self.packed, self.ggml_type, *self._shape())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "blocks"] = self.blocks if keep_vars or self.packed is not None else self.raw.detach()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        key = prefix + "blocks"
        if key in unexpected_keys:
            unexpected_keys.remove(key)
        if key not in state_dict:
            missing_keys.append(key)
            return
        blocks, (n, k) = state_dict[key], self._shape()
        if blocks.dtype != torch.uint8 or tuple(blocks.shape) != (n, row_bytes(self.ggml_type, k)):
            error_msgs.append(f"{key}: expected {(n, row_bytes(self.ggml_type, k))} uint8, got "
                              f"{tuple(blocks.shape)} {blocks.dtype}")
        elif self.packed is not None:  # repacked anew (a tied head and embedding: a copy each from here on)
            self._keep(None, torch.ops.corelm.repack_blocks(blocks.detach().cpu().contiguous(), self.ggml_type))
        elif local_metadata.get("assign_to_params_buffers", False):
            self.raw = blocks.detach()
        else:
            with torch.no_grad():
                self.raw.copy_(blocks)


class GGUFBlockLinear(_BlockStore):
    """``y = x W^T + b`` with ``W`` kept as a GGUF file's blocks (a type of :data:`FORMATS`).

    ``blocks`` (out_features, row bytes) uint8 is the matrix's rows as the file stores them (llama's
    Q/K rows moved back to HF order, whole rows at a time; a fused matrix's row range); ``ggml_type``
    names the format; ``bias`` (out_features,) is optional (Qwen2's q/k/v), kept in fp32.

    With ``repack`` (and the C++ kernels loaded, and a repacked record for the type: ``repack.h``, which
    ``CORELM_REPACK=0`` turns off) the layer keeps only the rows interleaved eight at a time (the buffer
    ``packed``, what the decode kernels read; llama.cpp's CPU "repack" buffers), not the file's rows as
    well: one copy of the weights instead of two. ``blocks`` then unpacks them (a new tensor, bit for bit
    the file's), and the state dict still holds ``blocks``.
    """

    def __init__(self, blocks: torch.Tensor, ggml_type: int, in_features: int,
                 bias: torch.Tensor | None = None, repack: bool = False) -> None:
        super().__init__()
        if ggml_type not in FORMATS:
            raise CorelmError(f"GGML type {ggml_type} has no block kernel; expected one of "
                              f"{', '.join(n for n, _, _ in FORMATS.values())}")
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != row_bytes(ggml_type, in_features):
            raise CorelmError(f"{FORMATS[ggml_type][0]} blocks for {in_features} columns must be (N, "
                              f"{row_bytes(ggml_type, in_features)}) uint8, not {tuple(blocks.shape)} {blocks.dtype}")
        self.in_features, self.out_features, self.ggml_type = in_features, blocks.shape[0], ggml_type
        # the step's "scales": the GGML type for rows of blocks, (type, rows) for repacked bytes (qlinear.h)
        self.register_buffer("format", torch.tensor([ggml_type], dtype=torch.int64), persistent=False)
        self.register_buffer("packed_format", torch.tensor([ggml_type, blocks.shape[0]]), persistent=False)
        if bias is not None and tuple(bias.shape) != (blocks.shape[0],):
            raise CorelmError(f"a bias of shape {tuple(bias.shape)} for {blocks.shape[0]} output rows")
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        from corelm.quant.layers import use_kernels

        self.kernel = use_kernels(blocks.device)
        blocks = blocks.contiguous()
        packed = torch.ops.corelm.repack_blocks(blocks, ggml_type) if repack and self.kernel else None
        self._keep(blocks, packed if packed is not None and packed.numel() else None)  # empty: CORELM_REPACK=0

    def _shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def dequantize(self) -> torch.Tensor:
        return dequantize_blocks(self.blocks, self.ggml_type, self.in_features)

    def kernel_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(values, scales) for the C++ step (``as_matrix`` in qlinear.h): the rows of blocks and the
        one-element GGML type, or the repacked bytes and (type, rows), which the step reads as they are."""
        if not self.kernel:
            return None
        return (self.raw, self.format) if self.packed is None else (self.packed, self.packed_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        if self.kernel and self.packed is not None:
            y = torch.ops.corelm.qlinear_packed(x2.contiguous(), self.packed, self.ggml_type, self.out_features)
        elif self.kernel:
            y = torch.ops.corelm.qlinear_blocks(x2.contiguous(), self.raw, self.ggml_type)
        else:
            y = x2 @ self.dequantize().t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {FORMATS[self.ggml_type][0]}"


class GGUFBlockEmbedding(_BlockStore):
    """A token embedding kept as a GGUF file's blocks (``token_embd.weight``, one row of blocks per token;
    with a tied head the same tensor as the head's :class:`GGUFBlockLinear`, or, where the head keeps only
    its repacked bytes, those: ``packed``). A lookup dequantizes its rows as ggml does
    (:func:`dequantize_blocks`, fp32); ``forward`` returns them in ``out_dtype`` (the model's), :meth:`rows`
    in fp32 (the C++ step reads those: no rounding of the file's values).
    """

    def __init__(self, blocks: torch.Tensor, ggml_type: int, embedding_dim: int, out_dtype: torch.dtype,
                 packed: torch.Tensor | None = None) -> None:
        super().__init__()
        if ggml_type not in FORMATS or blocks.dtype != torch.uint8 or blocks.dim() != 2 \
                or blocks.shape[1] != row_bytes(ggml_type, embedding_dim):
            raise CorelmError(f"GGML type {ggml_type} blocks of shape {tuple(blocks.shape)} are not an embedding "
                              f"of width {embedding_dim}")
        self.num_embeddings, self.embedding_dim, self.ggml_type = blocks.shape[0], embedding_dim, ggml_type
        self.out_dtype = out_dtype
        self._keep(blocks, packed)

    def _shape(self) -> tuple[int, int]:
        return self.num_embeddings, self.embedding_dim

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """(...) token ids -> (..., d) fp32 rows, exactly the file's values."""
        if self.packed is None:
            flat = self.raw.index_select(0, ids.reshape(-1))  # (n, row bytes)
        else:
            flat = torch.ops.corelm.unpack_rows(self.packed, self.ggml_type, *self._shape(), ids.reshape(-1))
        if self.ggml_type == TYPE_IDS["Q8_0"]:  # a decode step's lookup: d * q in five ops (unpack's in ~15)
            b = flat.view(-1, self.embedding_dim // QK, 34)
            w = b[..., 2:].view(torch.int8).float() * b[..., :2].view(torch.float16).float()  # (n, d/32, 32)
        else:
            w = dequantize_blocks(flat, self.ggml_type, self.embedding_dim)
        return w.reshape(*ids.shape, self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids).to(self.out_dtype)

    def dequantize(self) -> torch.Tensor:
        """The (V, d) fp32 embedding matrix."""
        return dequantize_blocks(self.blocks, self.ggml_type, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {FORMATS[self.ggml_type][0]}"


# --------------------------------------------------------------------------------------------------
# From a GGUF file: every matrix keeps its stored type
# --------------------------------------------------------------------------------------------------

INT4_TYPES = ("Q4_0", "Q4_1")  # blocks corelm's int4 layers (``--quantize int4``) take as they are, d in bf16


def quantize_gguf(model: nn.Module, source: object, targets: tuple[list, tuple | None]) -> nn.Module:
    """Swap a llama model's linears (and head) for :class:`GGUFBlockLinear` layers on the blocks of the
    GGUF file it was loaded from, each in its stored type (:data:`FORMATS`: the fp16 scales as stored, no
    bf16 copy), and its token embedding for a :class:`GGUFBlockEmbedding` where the file stores it in one
    of those types (with a tied head: the head's blocks, shared). Biases kept, a fused matrix split by rows
    (Phi-3), so every matrix runs on its blocks; a MoE's expert stacks are split by expert beforehand
    (:func:`corelm.quant.experts.gguf_experts`, called by the loader or the transform), and its routers (F32
    in llama.cpp's files) are not among ``targets`` and stay in floats. In place; sets
    ``model.corelm_quantization = {"method": "gguf", ...}``. ``targets`` is the transform's ``(linears, tied
    embedding)`` of the model (:func:`corelm.quant.transform.quantize_model` passes it: this module imports
    neither the transform nor the experts).

    Raises:
        CorelmError: no file, an already quantized model, or a matrix whose type has no kernel
            (:func:`corelm.loading.stored_quantization` picks ``gguf`` only for files without one).
    """
    from corelm.quant.gguf_blocks import GGUFBlocks

    if source is None:
        raise CorelmError('quantize="gguf" runs the blocks of the GGUF file the model was loaded from; '
                          "none given")
    if getattr(model, "corelm_quantization", None):
        raise CorelmError("the model is already quantized")
    found = GGUFBlocks(source, model)
    targets, tied = targets
    plan = []
    for parent, name, linear in targets:
        path = found.by_module.get(id(linear), name)
        # a matrix of its own, or a row range of one stored fused (Phi-3's attn_qkv and gate/up ffn_up)
        gguf_name, start, stop = found.fused.get(path) or (found.gguf_names.get(path), None, None)
        if parent is model and name == "lm_head":
            gguf_name = "output.weight" if "output.weight" in found.file.tensors else "token_embd.weight"
        info = found.file.tensors.get(gguf_name) if gguf_name else None
        shape = (stop - start, info.shape[1]) if info is not None and start is not None else getattr(info, "shape", ())
        if info is None or tuple(shape) != tuple(linear.weight.shape):
            raise CorelmError(f"no GGUF matrix of shape {tuple(linear.weight.shape)} for {path}")
        kind = info.qtype.name
        if kind not in TYPE_IDS:
            raise CorelmError(f"{gguf_name} is {kind}: no corelm kernel runs it natively")
        plan.append((parent, name, linear, gguf_name, kind, (start, stop)))
    whole: dict[str, GGUFBlockLinear] = {}  # GGUF name -> layer of a whole matrix (a tied head, for the embedding)
    for parent, name, linear, gguf_name, kind, span in plan:
        # a layer that repacks reads the file's map directly: a copy of the rows freed right after would
        # leave the allocator's heap full of holes (measured: +30 MB resident on SmolLM2)
        rows = _rows(found, gguf_name, name, span, copy=False)
        layer = GGUFBlockLinear(rows, TYPE_IDS[kind], linear.in_features, linear.bias, repack=True)
        if layer.packed is None:  # not repacked after all (no kernels, CORELM_REPACK=0): a copy it owns
            layer.raw = rows.clone()
        found.file.release(gguf_name)  # the file's pages of it (a peak of both copies otherwise)
        if span[0] is None and _heads(found, name) is None:
            whole[gguf_name] = layer  # a tied head: the embedding shares its bytes
        setattr(parent, name, layer)
    embedding = _embed_blocks(model, found, whole)
    from corelm.quant.gguf_quantize import MIX_NAMES

    # a MoE's expert stacks are on their blocks already (the loader, or quantize_model, put them there)
    types = {p[4] for p in plan} | {t.qtype.name for n, t in found.file.tensors.items()
                                    if n.startswith("blk.") and "_exps." in n}
    model.corelm_quantization = {"method": "gguf", "types": sorted(types),
                                 "file_type": MIX_NAMES.get(found.file.metadata.get("general.file_type")),
                                 "source": str(getattr(found.file, "path", "")), "tied_embedding": tied is not None,
                                 "embedding": embedding,
                                 "skip": [n for n, m in model.named_modules() if type(m) is nn.Linear]}  # routers
    return model


def _embed_blocks(model: nn.Module, found: object, whole: dict[str, GGUFBlockLinear]) -> str | None:
    """Swap the token embedding for a :class:`GGUFBlockEmbedding` when the file stores it in a type of
    :data:`FORMATS` (sharing a tied head's blocks or repacked bytes); returns that type's name, or None (left
    as loaded)."""
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            path = f"{parent_name}.{child_name}" if parent_name else child_name
            info = found.file.tensors.get(found.gguf_names.get(path, ""))
            if not isinstance(child, nn.Embedding) or info is None or info.qtype.name not in TYPE_IDS \
                    or tuple(info.shape) != tuple(child.weight.shape):
                continue
            gguf_name = found.gguf_names[path]
            head = whole.get(gguf_name)
            packed = None if head is None else head.packed
            # with a packed head, the file's rows only check the shape (a view of the map, not kept)
            blocks = head.raw if head is not None and packed is None else _rows(found, gguf_name, child_name,
                                                                                copy=packed is None)
            setattr(parent, child_name, GGUFBlockEmbedding(blocks, TYPE_IDS[info.qtype.name], child.embedding_dim,
                                                           child.weight.dtype, packed))
            found.file.release(gguf_name)
            return info.qtype.name
    return None


def _heads(found: object, name: str) -> int | None:
    return found.heads.get(name) if name in ("q_proj", "k_proj") else None


def _rows(found: object, gguf_name: str, name: str, span: tuple[int | None, int | None] = (None, None),
          copy: bool = True) -> torch.Tensor:
    """(rows, row bytes) uint8 of one matrix, or of rows ``span`` of a fused one (a block never straddles
    two rows, and each output's row is whole), Q/K rows in HF order; a copy the layer owns (``copy``
    False: a read-only view of the file's map where no rows move)."""
    from corelm.io.gguf import unpermute_rows

    info = found.file.tensors[gguf_name]
    rows, cols = info.shape
    raw = torch.from_numpy(found.file.raw(gguf_name)).reshape(rows, row_bytes(TYPE_IDS[info.qtype.name], cols))
    raw = raw[span[0]:span[1]]
    raw = raw.clone() if copy else raw
    heads = _heads(found, name)
    return unpermute_rows(raw, heads).contiguous() if heads else raw


def stored_types(path: str | Path) -> set[str]:
    """GGML type names of the matrices of a GGUF file's blocks (``blk.*``; a MoE's 3-D expert stacks too)."""
    from corelm.io.gguf import read_gguf

    gguf = read_gguf(path)
    try:
        return {t.qtype.name for n, t in gguf.tensors.items() if n.startswith("blk.") and len(t.shape) >= 2}
    finally:
        gguf.close()
