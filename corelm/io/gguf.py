"""Read GGUF checkpoints (llama.cpp's format): metadata, tensors, dequantization, HF name mapping.

GGUF is a little-endian container: a header, typed key/value metadata, a table of tensor infos,
then the tensor data, aligned (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md).

corelm parses the header itself and memory-maps the data; the ``gguf`` package supplies the
type tables (``GGMLQuantizationType``, ``GGML_QUANT_SIZES``) and, for quant types corelm does not
vectorize, its reference ``gguf.quants.dequantize``. ``gguf.GGUFReader`` builds one numpy view per
token string and takes ~2 s on the embedded SmolLM2 file before any tensor is read; this reader takes
tens of milliseconds, which is what lets the model load in well under the 3 s budget.

Dequantization is vectorized in torch over the memory-mapped blocks. The packed blocks themselves
stay available through :func:`quant_blocks` for packed int4/int8 inference.
"""

from __future__ import annotations

import mmap
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from corelm.config import ModelConfig
from corelm.errors import CorelmError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3")
# GGUF architecture -> (corelm family, HF model_type written on export)
_ARCH_MODEL = {"llama": ("llama", "llama"), "qwen2": ("llama", "qwen2"), "qwen3": ("llama", "qwen3"),
               "phi3": ("llama", "phi3"), "gemma": ("gemma", "gemma"), "gemma2": ("gemma", "gemma2"),
               "gemma3": ("gemma", "gemma3_text")}

# Value type ids of the GGUF spec -> struct format (scalars) ; 8 = string, 9 = array.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}
_NUMPY_DTYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
                 6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
_SPLIT_NAME = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")  # llama_split_path

Q = GGMLQuantizationType
# Types dequantized here with vectorized torch code; others fall back to gguf.quants.dequantize.


@dataclass
class GGUFTensor:
    """One tensor entry: ``shape`` is PyTorch order (rows first), the reverse of GGUF's ``dims``."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file (in its part of a split file)
    nbytes: int
    part: int = 0  # which file of a llama.cpp split holds it (0 for a single file)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


class GGUFFile:
    """A memory-mapped GGUF file: ``metadata`` (key -> Python value) and ``tensors`` (name -> info).

    A llama.cpp split (``gguf-split``: ``PREFIX-00001-of-0000N.gguf``, each part carrying ``split.no``
    and ``split.count``) reads as one file: the metadata of the first part, the tensors of all parts,
    each part memory-mapped. Any part's path opens the whole split.

    Args:
        path: Path to a ``.gguf`` file, or to one part of a split.

    Raises:
        CorelmError: the file or a part of its split is missing, is not GGUF, or is truncated.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._maps: list[mmap.mmap] = []
        self.tensors: dict[str, GGUFTensor] = {}
        self.metadata = self._read_part(self.path, 0)
        count = int(self.metadata.get("split.count", 1))
        if count > 1:
            self._read_split(count)
        self._mm = self._maps[0]

    def _read_split(self, count: int) -> None:
        """Open every part of a split; parts are named by llama.cpp's ``llama_split_path``."""
        match = _SPLIT_NAME.match(self.path.name)
        if match is None or int(match["count"]) != count:
            raise CorelmError(f"{self.path} is part of a {count}-file split, but its name does not follow the "
                              "PREFIX-00001-of-0000N.gguf naming that finds the other parts")
        parts = [self.path.with_name(f"{match['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
        missing = [p.name for p in parts if not p.is_file()]
        if missing:
            raise CorelmError(f"split GGUF {parts[0].name} is incomplete: part(s) {', '.join(missing)} missing "
                              f"next to it (all {count} parts must be in {self.path.parent})")
        no = int(self.metadata.get("split.no", 0))
        if no != 0:  # a later part was named: start again from the first, which holds the model's metadata
            for m in self._maps:
                m.close()
            self.__init__(parts[0])
            return
        for i, part in enumerate(parts[1:], 1):
            meta = self._read_part(part, i)
            if int(meta.get("split.no", -1)) != i or int(meta.get("split.count", -1)) != count:
                raise CorelmError(f"{part} says it is part {meta.get('split.no')} of {meta.get('split.count')}, "
                                  f"not part {i} of {count}")
        expected = self.metadata.get("split.tensors.count")
        if expected is not None and int(expected) != len(self.tensors):
            raise CorelmError(f"split GGUF {self.path.name} should hold {expected} tensors, its parts hold "
                              f"{len(self.tensors)}")

    def _read_part(self, path: Path, part: int) -> dict[str, Any]:
        """Map one file, add its tensors to ``self.tensors``; return its metadata."""
        if not path.is_file():
            raise CorelmError(f"GGUF file not found: {path}")
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise CorelmError(f"{path} is not a GGUF file (it does not start with the 'GGUF' magic)")
            try:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:
                raise CorelmError(f"{path} is empty") from None
        self._maps.append(self._mm)
        try:
            return self._parse(path, part)
        except (struct.error, IndexError, ValueError, UnicodeDecodeError) as exc:
            raise CorelmError(f"{path} is a truncated or corrupt GGUF file ({exc})") from None

    # ---- parsing -------------------------------------------------------------------------------
    def _parse(self, path: Path, part: int) -> dict[str, Any]:
        mm = self._mm
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
        if version not in (2, 3):
            raise CorelmError(f"{path}: unsupported GGUF version {version} (corelm reads versions 2 and 3)")
        self.version = version
        pos = 24
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key, pos = self._string(pos)
            (vtype,) = struct.unpack_from("<I", mm, pos)
            value, pos = self._value(vtype, pos + 4)
            metadata[key] = value
        infos = []
        for _ in range(n_tensors):
            name, pos = self._string(pos)
            (n_dims,) = struct.unpack_from("<I", mm, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", mm, pos + 4)
            qtype, offset = struct.unpack_from("<IQ", mm, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            infos.append((name, dims, qtype, offset))
        align = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = (pos + align - 1) // align * align
        for name, dims, qtype_id, offset in infos:
            try:
                qtype = GGMLQuantizationType(qtype_id)
            except ValueError:
                raise CorelmError(f"tensor {name!r} in {path} has unknown GGML type id {qtype_id}") from None
            block, block_bytes = GGML_QUANT_SIZES[qtype]
            numel = int(np.prod(dims)) if dims else 1
            nbytes = numel // block * block_bytes
            start = data_start + offset
            if start + nbytes > len(mm):
                raise CorelmError(f"{path} is truncated: tensor {name!r} runs past the end of the file")
            self.tensors[name] = GGUFTensor(name, tuple(int(d) for d in reversed(dims)), qtype, start, nbytes, part)
        return metadata

    def _string(self, pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self._mm, pos)
        end = pos + 8 + n
        if end > len(self._mm):
            raise ValueError("string runs past the end of the file")
        return self._mm[pos + 8:end].decode("utf-8", errors="replace"), end

    def _value(self, vtype: int, pos: int) -> tuple[Any, int]:
        if vtype in _SCALAR_FORMATS:
            fmt = _SCALAR_FORMATS[vtype]
            return struct.unpack_from(fmt, self._mm, pos)[0], pos + struct.calcsize(fmt)
        if vtype == _STRING:
            return self._string(pos)
        if vtype == _ARRAY:
            item_type, count = struct.unpack_from("<IQ", self._mm, pos)
            pos += 12
            if item_type in _NUMPY_DTYPES:  # numeric arrays in one read
                dtype = np.dtype(_NUMPY_DTYPES[item_type])
                arr = np.frombuffer(self._mm, dtype=dtype, count=count, offset=pos).tolist()
                return arr, pos + count * dtype.itemsize
            items = []
            for _ in range(count):
                item, pos = self._value(item_type, pos)
                items.append(item)
            return items, pos
        raise ValueError(f"unknown GGUF value type {vtype}")

    # ---- tensors -------------------------------------------------------------------------------
    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored, a read-only ``uint8`` view of the memory map."""
        t = self._info(name)
        return np.frombuffer(self._maps[t.part], dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def release(self, name: str) -> None:
        """Drop the pages of one tensor's bytes from this process's resident memory (``MADV_DONTNEED``; the
        map stays valid, a later read faults them in again from the page cache): a loader that has copied a
        tensor calls it, so that the file's pages and the copy are not resident together."""
        t = self._info(name)
        m = self._maps[t.part]
        if t.nbytes and hasattr(mmap, "MADV_DONTNEED"):
            start = t.offset // mmap.PAGESIZE * mmap.PAGESIZE
            m.madvise(mmap.MADV_DONTNEED, start, t.offset + t.nbytes - start)

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize one tensor to ``dtype``, in PyTorch shape order (no Q/K un-permutation)."""
        t = self._info(name)
        return dequantize(self.raw(name), t.qtype, t.shape).to(dtype)

    def _info(self, name: str) -> GGUFTensor:
        if name not in self.tensors:
            raise CorelmError(f"tensor {name!r} is not in {self.path}")
        return self.tensors[name]

    def close(self) -> None:
        """Unmap every part; a BufferError (a view still alive) is raised after trying them all."""
        busy = []
        for m in self._maps:
            try:
                m.close()
            except BufferError as exc:
                busy.append(exc)
        if busy:
            raise busy[0]


def read_gguf(path: str | Path) -> GGUFFile:
    """Open and parse a GGUF file (memory-mapped; tensors are read on demand)."""
    return GGUFFile(path)


# ---- dequantization ----------------------------------------------------------------------------
def _as_torch(buf: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # the mmap is read-only; the tensor is only ever read
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(buf)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Column ``start:start+2`` of a (n_blocks, block_bytes) uint8 tensor as fp32 of shape (n_blocks, 1)."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def dequantize(buf: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """Dequantize raw GGUF bytes to an fp32 (or the stored float dtype) tensor of ``shape``.

    Block layouts (ggml-common.h): Q8_0 = fp16 scale + 32 int8; Q4_0 = fp16 scale + 16 bytes of
    nibbles, value = (q - 8) * d; Q4_1 = fp16 scale d + fp16 min m + 16 bytes, value = q * d + m.
    In a 4-bit block, byte j holds element j in its low nibble and element j + 16 in its high one.

    The fp32 output is the only large allocation: integer codes are written straight into it and
    scaled in place. (Fresh memory costs a page fault per 4 KiB; a chain of full-size temporaries
    made loading several times slower.)
    """
    raw = _as_torch(buf)
    if qtype == Q.F32:
        return raw.view(torch.float32).reshape(shape)
    if qtype == Q.F16:
        return raw.view(torch.float16).reshape(shape)
    if qtype == Q.BF16:
        return raw.view(torch.bfloat16).reshape(shape)
    if qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1):
        blocks = raw.view(-1, GGML_QUANT_SIZES[qtype][1])  # (n_blocks, block_bytes)
        out = torch.empty(blocks.shape[0], 32, dtype=torch.float32)  # (n_blocks, 32)
        if qtype == Q.Q8_0:
            out.copy_(blocks[:, 2:].contiguous().view(torch.int8))
            out.mul_(_f16(blocks, 0))
        else:
            qs = blocks[:, 4:] if qtype == Q.Q4_1 else blocks[:, 2:]  # (n_blocks, 16) packed nibbles
            out[:, :16].copy_(qs & 0x0F)
            out[:, 16:].copy_(qs >> 4)
            if qtype == Q.Q4_0:
                out.sub_(8.0).mul_(_f16(blocks, 0))
            else:
                out.mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))
        return out.reshape(shape)
    return _dequantize_reference(buf, qtype, shape)


def readable_types() -> list[str]:
    """Names of the tensor types corelm dequantizes: the float types, and every block type gguf-py's
    reference dequantizer implements (Q4_0 ... Q8_0, Q2_K ... Q6_K, IQ4_NL, IQ4_XS, the other IQ types, ...)."""
    from gguf import quants

    return ["F32", "F16", "BF16"] + [t.name for t in quants._type_traits if t.name != "BF16"]


def _dequantize_reference(buf: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """Other types through the ``gguf`` package's numpy reference (slower, but correct)."""
    from gguf import quants

    try:
        arr = quants.dequantize(buf, qtype)
    except NotImplementedError:
        raise CorelmError(f"unsupported GGUF tensor type {qtype.name}; corelm reads {', '.join(readable_types())}") \
            from None
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).reshape(shape)


@dataclass
class QuantBlocks:
    """The packed blocks of a Q4_0/Q4_1/Q8_0 tensor, split into their parts (no dequantization).

    A weight of shape ``(rows, cols)`` is ``rows * cols / 32`` blocks of 32 consecutive values along a row.

    Attributes:
        qtype: ``Q4_0``, ``Q4_1`` or ``Q8_0``.
        shape: ``(rows, cols)`` of the dequantized weight (PyTorch order).
        qs: Q8_0: int8 ``(rows, cols)``; Q4_*: uint8 ``(rows, cols // 2)`` with element ``j`` of a block
            in the low nibble of byte ``j`` and element ``j + 16`` in its high nibble (ggml's packing).
        scales: fp16 ``(rows, cols // 32)``.
        mins: Q4_1 only: fp16 ``(rows, cols // 32)`` added after scaling; ``None`` otherwise.
    """

    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    qs: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None


def quant_blocks(gguf: GGUFFile, name: str, unpermute_heads: int | None = None) -> QuantBlocks:
    """Return the packed blocks of one quantized tensor.

    Args:
        gguf: An open GGUF file.
        name: GGUF tensor name, e.g. ``blk.0.attn_q.weight``.
        unpermute_heads: For Q/K projections, the number of heads whose rows llama.cpp permuted;
            rows are reordered (whole rows of blocks move, so packing stays valid) to HF order.
    """
    t = gguf._info(name)
    if t.qtype not in (Q.Q8_0, Q.Q4_0, Q.Q4_1) or len(t.shape) != 2:
        raise CorelmError(f"tensor {name!r} is {t.qtype.name} with shape {t.shape}; packed blocks exist only "
                          "for 2-D Q8_0/Q4_0/Q4_1 tensors")
    rows, cols = t.shape
    block_bytes = GGML_QUANT_SIZES[t.qtype][1]
    blocks = _as_torch(gguf.raw(name)).view(rows, cols // 32, block_bytes)
    if unpermute_heads:
        blocks = unpermute_rows(blocks, unpermute_heads)
    scales = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1)
    if t.qtype == Q.Q8_0:
        qs = blocks[..., 2:].contiguous().view(torch.int8).reshape(rows, cols)
        return QuantBlocks(t.qtype, t.shape, qs, scales, None)
    first = 4 if t.qtype == Q.Q4_1 else 2
    mins = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1) if t.qtype == Q.Q4_1 else None
    qs = blocks[..., first:].contiguous().reshape(rows, cols // 2)
    return QuantBlocks(t.qtype, t.shape, qs, scales, mins)


# ---- llama architecture: config and HF names ----------------------------------------------------
def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (convert_hf_to_gguf.py ``LlamaModel.permute``).

    HF stores each head's rotary pairs as two halves (rotate_half); llama.cpp interleaves them.
    The converter reshapes rows to ``(n_head, 2, head_dim/2)`` and swaps the last two axes; this is
    the inverse: ``(n_head, head_dim/2, 2)`` -> swap -> ``(n_head, 2, head_dim/2)``.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's Q/K row permutation (HF order -> GGUF order), the inverse of :func:`unpermute_rows`."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---- architectures: config and tensor names ------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    """How one llama.cpp architecture maps onto a corelm family.

    From llama.cpp's ``src/models/<arch>.cpp`` (hyper-parameters, tensors, graph) and
    ``convert_hf_to_gguf.py`` (what the converter changes on the way in).

    Attributes:
        family: corelm family that runs it.
        model_type: HF ``model_type`` of the equivalent checkpoint (Mixtral: ``llama`` with experts).
        permute_qk: the converter interleaves Q/K rows for llama.cpp's normal (GPT-J) RoPE; only
            ``llama`` does, the others use NeoX RoPE on HF's row order.
        qkv_bias: q/k/v projections carry biases (Qwen2, Qwen2-MoE).
        qk_norm: RMSNorm over each query/key head (Qwen3, Qwen3-MoE, Gemma 3).
        ffn_norm: the corelm norm that ``ffn_norm`` names (Gemma: the pre-MLP norm of a sandwich).
        norm_offset: the converter stores RMSNorm weights as ``offset + w`` (Gemma's ``1 + w``).
        norm_topk_prob: MoE: llama.cpp renormalises the top-k router weights (fixed per architecture:
            ``build_moe_ffn(..., norm_w, ...)`` in ``src/models/<arch>.cpp``).
    """

    family: str
    model_type: str
    permute_qk: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    ffn_norm: str = "post_attention_layernorm"
    norm_offset: float = 0.0
    norm_topk_prob: bool = True


_GEMMA = {"family": "gemma", "ffn_norm": "pre_feedforward_layernorm", "norm_offset": 1.0}
ARCHS = {
    "llama": Arch("llama", "llama", permute_qk=True),  # also Mistral (no window: llama.cpp has none) and Mixtral
    "qwen2": Arch("llama", "qwen2", qkv_bias=True),
    "qwen3": Arch("llama", "qwen3", qk_norm=True),
    "phi3": Arch("llama", "phi3"),
    "qwen2moe": Arch("moe", "qwen2_moe", qkv_bias=True, norm_topk_prob=False),
    "qwen3moe": Arch("moe", "qwen3_moe", qk_norm=True),
    "gemma": Arch(model_type="gemma", **_GEMMA),
    "gemma2": Arch(model_type="gemma2", **_GEMMA),
    "gemma3": Arch(model_type="gemma3_text", qk_norm=True, **_GEMMA),
    "olmo2": Arch("olmo2", "olmo2"),
}
SUPPORTED_ARCHS = tuple(ARCHS)
# Gemma 2/3's largest models scale queries by (d_model / n_head) ** -0.5, the others by head_dim ** -0.5;
# llama.cpp tells them apart by layer count (LLM_TYPE_27B in src/models/gemma2.cpp, gemma3.cpp).
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_REQUIRED = object()


def _arch(gguf: GGUFFile) -> str:
    arch = gguf.metadata.get("general.architecture")
    if arch not in ARCHS:
        raise CorelmError(f"unsupported GGUF architecture {arch!r} in {gguf.path.name}; corelm reads "
                          f"{', '.join(SUPPORTED_ARCHS)}")
    return arch


def _layer_types(pattern: Any, n_layer: int, default: int) -> list[str]:
    """llama.cpp's ``attention.sliding_window_pattern``: one bool per layer (True = sliding), or a period
    ``n`` where layer ``i`` slides unless ``i % n == n - 1`` (``llama_hparams::set_swa_pattern``)."""
    if isinstance(pattern, (list, tuple)):
        if len(pattern) != n_layer:
            raise CorelmError(f"attention.sliding_window_pattern lists {len(pattern)} layers, the model has {n_layer}")
        return ["sliding_attention" if p else "full_attention" for p in pattern]
    n = int(pattern if pattern is not None else default)
    return ["sliding_attention" if n == 0 or i % n < n - 1 else "full_attention" for i in range(n_layer)]


def _rope_scaling(gguf: GGUFFile, arch: str, key: Any) -> dict[str, Any] | None:
    """HF-style ``rope_scaling`` from ``rope.scaling.*`` and the ``rope_freqs``/``rope_factors_*`` tensors."""
    md = gguf.metadata
    kind = key("rope.scaling.type", None)
    if kind is None and float(key("rope.scale_linear", 1.0)) != 1.0:  # older files
        return {"rope_type": "linear", "factor": float(key("rope.scale_linear"))}
    if "rope_factors_long.weight" in gguf.tensors:  # LongRoPE (Phi-3.5, Phi-4-mini): the factors are tensors
        scaling = {"rope_type": "longrope", "long_factor": gguf.tensor("rope_factors_long.weight").tolist(),
                   "short_factor": gguf.tensor("rope_factors_short.weight").tolist(),
                   "original_max_position_embeddings": int(key("rope.scaling.original_context_length"))}
        if md.get(f"{arch}.rope.scaling.attn_factor") is not None:
            scaling["attention_factor"] = float(md[f"{arch}.rope.scaling.attn_factor"])
        return scaling
    if "rope_freqs.weight" in gguf.tensors:
        # Llama 3's scaling, as the converter precomputes it: frequency i divided by rope_freqs[i]. That is
        # LongRoPE with one factor list and no attention scaling, which corelm's RoPE table computes exactly.
        if kind not in (None, "none"):
            raise CorelmError(f"{gguf.path.name} has both rope_freqs and rope.scaling.type={kind}; corelm reads one")
        factors = gguf.tensor("rope_freqs.weight").tolist()
        return {"rope_type": "longrope", "long_factor": factors, "short_factor": factors, "attention_factor": 1.0,
                "original_max_position_embeddings": int(key("context_length"))}
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    if kind == "yarn":
        if float(key("rope.scaling.yarn_ext_factor", 1.0)) not in (1.0, -1.0):
            raise CorelmError(f"{gguf.path.name}: YaRN with rope.scaling.yarn_ext_factor != 1 is not supported")
        scaling = {"rope_type": "yarn", "factor": float(key("rope.scaling.factor")),
                   "original_max_position_embeddings": int(key("rope.scaling.original_context_length"))}
        for gguf_key, hf_key in (("yarn_attn_factor", "attention_factor"), ("yarn_beta_fast", "beta_fast"),
                                 ("yarn_beta_slow", "beta_slow")):
            if md.get(f"{arch}.rope.scaling.{gguf_key}") is not None:
                scaling[hf_key] = float(md[f"{arch}.rope.scaling.{gguf_key}"])
        return scaling
    raise CorelmError(f"{gguf.path.name}: unsupported RoPE scaling {kind!r}; corelm reads none, linear, yarn, "
                      "longrope (rope_factors_* tensors) and Llama 3's rope_freqs")


# one metadata key per line, in the order llama.cpp reads them; the architectures' extras are flat branches
def config_from_gguf(gguf: GGUFFile) -> ModelConfig:  # noqa: C901
    """Build a :class:`ModelConfig` from the ``<arch>.*`` metadata keys (llama.cpp's names).

    Architecture specifics follow llama.cpp (``src/models/<arch>.cpp``, ``convert_hf_to_gguf.py``):
    Qwen2 has q/k/v biases, Qwen3 and Gemma 3 QK norms; Gemma 2 alternates sliding/global layers
    starting with a sliding one, Gemma 3 makes every 6th layer global and slides the others with a
    RoPE base of 10000 unless ``rope.freq_base_swa`` says otherwise; both scale queries by
    ``(d_model / n_head) ** -0.5`` in their 27B models (46 and 62 layers) and by ``head_dim ** -0.5``
    otherwise. Phi-3's LongRoPE factors are tensors. ``llama`` with ``expert_count`` is Mixtral.
    A key llama.cpp requires and the file lacks is refused with its name.
    """
    arch = _arch(gguf)
    spec = ARCHS[arch]
    md = gguf.metadata

    def key(name: str, default: Any = _REQUIRED) -> Any:
        value = md.get(f"{arch}.{name}")
        if value is None:
            if default is _REQUIRED:
                raise CorelmError(f"{gguf.path.name}: GGUF metadata lacks {arch}.{name}, which a {arch} model needs")
            return default
        return value

    n_layer = int(key("block_count"))
    n_head, n_kv_head = key("attention.head_count"), key("attention.head_count_kv", None)
    for name, value in (("head_count", n_head), ("head_count_kv", n_kv_head)):
        if isinstance(value, list) and len(set(value)) != 1:  # llama.cpp allows one count per layer
            raise CorelmError(f"{gguf.path.name}: {arch}.attention.{name} differs between layers ({value[:4]}...)")
    n_head = int(n_head[0] if isinstance(n_head, list) else n_head)
    n_kv_head = int((n_kv_head[0] if isinstance(n_kv_head, list) else n_kv_head) or n_head)
    d_model = int(key("embedding_length"))
    head_dim = int(key("attention.key_length", d_model // n_head))
    if int(key("attention.value_length", head_dim)) != head_dim:
        raise CorelmError(f"{gguf.path.name}: attention.value_length != attention.key_length; corelm's heads have one "
                          "width")
    vocab = md.get(f"{arch}.vocab_size")
    if vocab is None:  # older files: the vocabulary length, else the embedding rows
        tokens = md.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if tokens else gguf.tensors["token_embd.weight"].shape[0]
    options: dict[str, Any] = {"qkv_bias": spec.qkv_bias, "qk_norm": spec.qk_norm,
                               "tie_embeddings": "output.weight" not in gguf.tensors}
    rot = key("rope.dimension_count", None)
    if rot is not None and int(rot) != head_dim:
        if not 0 < int(rot) < head_dim:
            raise CorelmError(f"{gguf.path.name}: rope.dimension_count {rot} exceeds the head width {head_dim}")
        options["rotary_dim"] = int(rot)
    family, model_type = spec.family, spec.model_type
    if spec.family == "gemma":
        options["activation"] = "gelu_tanh"
    window = key("attention.sliding_window", None)
    if arch == "gemma2":  # llama.cpp's defaults: window 4096, every other layer (from the first) slides
        options.update(sandwich_norm=True, sliding_window=int(window or 4096),
                       layer_types=_layer_types(md.get(f"{arch}.attention.sliding_window_pattern"), n_layer, 2),
                       attn_softcap=float(key("attn_logit_softcapping", 50.0)),  # llama.cpp always caps Gemma 2
                       final_softcap=float(key("final_logit_softcapping", 30.0)))
    if arch == "gemma3":
        options.update(sandwich_norm=True, final_softcap=key("final_logit_softcapping", None) or None)
        if window:
            options.update(sliding_window=int(window), rope_local_theta=float(key("rope.freq_base_swa", 10000.0)),
                           layer_types=_layer_types(md.get(f"{arch}.attention.sliding_window_pattern"), n_layer, 6))
    if arch in GEMMA_27B_LAYERS:
        options["query_pre_attn_scalar"] = d_model // n_head if n_layer == GEMMA_27B_LAYERS[arch] else head_dim
    if arch == "olmo2" and window:
        if float(key("rope.freq_base_swa", key("rope.freq_base", 10000.0))) != float(key("rope.freq_base", 10000.0)):
            raise CorelmError(f"{gguf.path.name}: OLMo sliding layers with their own RoPE base are not supported")
        options.update(sliding_window=int(window),
                       layer_types=_layer_types(md.get(f"{arch}.attention.sliding_window_pattern"), n_layer, 4))
    if arch == "phi3" and window:  # llama.cpp disables Phi-3's window (its PR 13676); transformers applies it
        options["sliding_window"] = int(window)
    d_ff = int(key("feed_forward_length"))
    if md.get(f"{arch}.expert_count"):
        options.update(_moe_options(gguf, arch, key, d_ff))
        family = "moe"
        model_type = "mixtral" if arch == "llama" else model_type
    elif spec.family == "moe":
        raise CorelmError(f"{gguf.path.name}: GGUF metadata lacks {arch}.expert_count, which a {arch} model needs")
    if family == "moe" and options.get("rotary_dim"):
        raise CorelmError(f"{gguf.path.name}: partial rotary MoE models are not supported")
    return ModelConfig(
        family=family,
        name=str(md.get("general.name", gguf.path.stem)),
        vocab_size=int(vocab),
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=n_kv_head,
        d_model=d_model,
        d_ff=d_ff,
        head_dim=head_dim,
        max_seq_len=int(key("context_length")),
        norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(gguf, arch, key),
        bias=False,
        extra={"model_type": model_type},
        **options,
    )


def _moe_options(gguf: GGUFFile, arch: str, key: Any, d_ff: int) -> dict[str, Any]:
    """Experts of a Mixtral (``llama`` + experts), Qwen2-MoE or Qwen3-MoE file.

    Mixtral's experts are ``feed_forward_length`` wide; the Qwens name the expert width
    ``expert_feed_forward_length`` and keep ``feed_forward_length`` for dense layers. A layer without
    ``ffn_gate_inp`` (a router) is dense.
    """
    if key("expert_gating_func", 1) != 1:  # LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX
        raise CorelmError(f"{gguf.path.name}: only softmax expert gating is supported")
    n_layer = int(key("block_count"))
    dense = [i for i in range(n_layer) if f"blk.{i}.ffn_gate_inp.weight" not in gguf.tensors]
    options: dict[str, Any] = {
        "n_experts": int(key("expert_count")), "n_experts_per_tok": int(key("expert_used_count")),
        "moe_d_ff": d_ff if arch == "llama" else int(key("expert_feed_forward_length")),
        "norm_topk_prob": ARCHS[arch].norm_topk_prob, "dense_layers": dense or None}
    if "blk.0.ffn_gate_shexp.weight" in gguf.tensors or f"blk.{n_layer - 1}.ffn_gate_shexp.weight" in gguf.tensors:
        options["shared_expert_d_ff"] = int(key("expert_shared_feed_forward_length", d_ff))
    return options


# GGUF block tensor (gguf-py's tensor_mapping.py names) -> corelm/HF name, per layer.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    # stored fused or split differently from corelm's parameters: joined/split by load_gguf_state_dict
    "attn_qkv": "self_attn.qkv_proj",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_gate_up_exps": "mlp.experts.gate_up_proj",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
# Tensors llama.cpp stores that HF checkpoints do not have (RoPE frequency factors, read into the config).
_IGNORED = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """Map a GGUF tensor name to its corelm/HF name (``None`` for tensors HF does not keep).

    ``ffn_norm`` is the pre-MLP norm of each architecture (Gemma's ``pre_feedforward_layernorm``).
    Fused tensors map to names :func:`load_gguf_state_dict` splits or joins: ``attn_qkv`` ->
    ``qkv_proj``, Phi-3's ``ffn_up`` -> ``gate_up_proj``, ``ffn_gate_exps``/``ffn_up_exps`` ->
    ``experts.gate_proj``/``experts.up_proj`` (joined into corelm's ``experts.gate_up_proj``).
    """
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name in _IGNORED:
        return None
    parts = gguf_name.split(".")  # blk.N.attn_q.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit():
        kind = parts[2]
        if kind == "ffn_norm":
            target = ARCHS[arch].ffn_norm if arch in ARCHS else "post_attention_layernorm"
        elif kind == "ffn_up" and arch == "phi3":
            target = "mlp.gate_up_proj"
        else:
            target = _LAYER_NAMES.get(kind)
        if target is not None:
            return f"model.layers.{parts[1]}.{target}.{parts[3]}"
    raise CorelmError(f"unexpected tensor {gguf_name!r} in a {arch} GGUF file")


def load_gguf_state_dict(gguf: GGUFFile, config: ModelConfig, dtype: torch.dtype = torch.float32,
                         experts: bool = True, blocks: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Dequantize every tensor to ``dtype`` under corelm's (HF) names.

    Q/K rows are un-permuted (``llama`` only), Gemma's ``1 + w`` norms shifted back, fused tensors split
    (``attn_qkv``, Phi-3's gate/up) and llama.cpp's separate expert stacks joined. Every tensor's shape
    is checked against the model ``config`` describes, so a mismatched file fails with the tensor's
    name; a tensor the model needs and the file lacks is named too. ``experts=False`` leaves a MoE's
    routed expert stacks out (the caller takes them from the file's blocks). A projection or output head
    stored whole (not fused) in one of the GGML types ``blocks`` is not dequantized: its entry is a
    placeholder of the right shape that costs no memory (a zero-stride view of one element), for a caller
    that swaps the layer for the file's blocks (:func:`corelm.quant.kquant.quantize_gguf`) before use.
    """
    from corelm.models import build_model
    from corelm.ops.init import skip_init

    arch = _arch(gguf)
    with torch.device("meta"), skip_init():
        expected = {k: tuple(v.shape) for k, v in build_model(config).state_dict().items()
                    if experts or ".mlp.experts." not in k}
    state: dict[str, torch.Tensor] = {}
    # One thread: these element-wise passes are memory-bound, and on a shared 2-core machine a second
    # intra-op thread mostly adds synchronisation stalls (measured: 2x the wall time under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, info in gguf.tensors.items():
            target = hf_name(name, arch)
            if target is None or not (experts or ".mlp.experts." not in target):
                continue
            if (info.qtype.name in blocks and (target.endswith("_proj.weight") or target == "lm_head.weight")
                    and ".mlp.experts." not in target and _split_sizes(target, config) is None
                    and expected.get(target) == tuple(info.shape)):
                state[target] = placeholder(info.shape, dtype)  # the blocks (or the caller's quantizer) replace it
            else:
                _load_one(gguf, name, info, target, config, arch, dtype, state)
    finally:
        torch.set_num_threads(threads)
    _join_experts(state)
    for target, w in state.items():
        if expected.get(target) != tuple(w.shape):
            raise CorelmError(f"{gguf.path.name}: tensor for {target!r} has shape {tuple(w.shape)}, "
                              f"expected {expected.get(target)}")
    missing = [k for k in expected if k not in state]
    if missing:
        raise CorelmError(f"{gguf.path.name} lacks {len(missing)} tensor(s) a {arch} model needs, e.g. {missing[0]}")
    return state


def placeholder(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A matrix left in its file: the right shape and dtype, no memory (a zero-stride view of one element)."""
    return torch.zeros((), dtype=dtype).expand(shape)


def is_placeholder(t: torch.Tensor) -> bool:
    """Whether ``t`` is a :func:`placeholder`, not yet swapped for the file's blocks or values."""
    return t.numel() > 1 and 0 in t.stride()


def _split_sizes(target: str, config: ModelConfig) -> tuple[tuple[str, ...], list[int]] | None:
    """How a fused tensor splits along its rows: (part names, row counts); None when it is not fused."""
    hd = config.head_dim
    if ".qkv_proj." in target:  # rows q, then k, then v (Phi-3, and any file converted with --fuse-qkv)
        return ("q_proj", "k_proj", "v_proj"), [config.n_head * hd, config.n_kv_head * hd, config.n_kv_head * hd]
    if target.endswith("mlp.gate_up_proj.weight"):  # Phi-3: rows gate, then up
        return ("gate_proj", "up_proj"), [config.d_ff, config.d_ff]
    return None


def _load_one(gguf: GGUFFile, name: str, info: GGUFTensor, target: str, config: ModelConfig, arch: str,
              dtype: torch.dtype, state: dict[str, torch.Tensor]) -> None:
    w = dequantize(gguf.raw(name), info.qtype, info.shape)
    if ARCHS[arch].norm_offset and target.endswith("norm.weight"):
        # llama.cpp's Gemma converters store 1 + w (its RMSNorm multiplies by the weight as is)
        w = w.float() - ARCHS[arch].norm_offset
    if target.endswith("shared_expert_gate.weight"):
        w = w.reshape(1, -1)  # llama.cpp: a vector {n_embd}; the converter writes it as (1, n_embd)
    # F32 tensors are still views of the read-only map: copy them so the model owns its memory. A MoE's
    # routers stay fp32 when the file keeps them so (llama.cpp's converters do): they pick the experts.
    router = target.endswith(("mlp.gate.weight", "shared_expert_gate.weight")) and info.qtype == Q.F32
    w = w.to(torch.float32 if router else dtype, copy=info.qtype in (Q.F32, Q.F16, Q.BF16))
    split = _split_sizes(target, config)
    if split is None:
        pieces = [(target, w)]
    else:
        parts, sizes = split
        if w.shape[0] != sum(sizes):
            raise CorelmError(f"{gguf.path.name}: tensor {name!r} has {w.shape[0]} rows, expected {sum(sizes)}")
        fused = target.rsplit(".", 2)[-2]  # qkv_proj / gate_up_proj
        pieces = [(target.replace(fused, part), chunk) for part, chunk in zip(parts, w.split(sizes))]
    for key, piece in pieces:
        if ARCHS[arch].permute_qk:  # only llama.cpp's LlamaModel converter permutes Q/K rows (the rest: NeoX RoPE)
            if ".q_proj." in key:
                piece = unpermute_rows(piece, config.n_head)
            elif ".k_proj." in key:
                piece = unpermute_rows(piece, config.n_kv_head)
        state[key] = piece


def _join_experts(state: dict[str, torch.Tensor]) -> None:
    """llama.cpp's ``ffn_gate_exps``/``ffn_up_exps`` ``(E, F, d)`` -> corelm's ``gate_up_proj`` ``(E, 2F, d)``."""
    for gate_name in [k for k in state if k.endswith("experts.gate_proj.weight")]:
        up_name = gate_name.replace("gate_proj", "up_proj")
        if up_name not in state:
            raise CorelmError(f"GGUF file has {gate_name} but not {up_name}")
        state[gate_name.replace("gate_proj.weight", "gate_up_proj")] = torch.cat(
            [state.pop(gate_name), state.pop(up_name)], dim=1)
    for name in [k for k in state if k.endswith(("experts.gate_up_proj.weight", "experts.down_proj.weight"))]:
        state[name.removesuffix(".weight")] = state.pop(name)  # nn.Parameters of the Experts module
