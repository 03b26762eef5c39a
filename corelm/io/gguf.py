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


def _dequantize_reference(buf: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """Other types through the ``gguf`` package's numpy reference (slower, but correct)."""
    from gguf import quants

    try:
        arr = quants.dequantize(buf, qtype)
    except NotImplementedError:
        raise CorelmError(f"unsupported GGUF tensor type {qtype.name}; corelm reads F32, F16, BF16, Q8_0, "
                          "Q4_0, Q4_1 and the types gguf.quants can dequantize") from None
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


def _arch(gguf: GGUFFile) -> str:
    arch = gguf.metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise CorelmError(f"unsupported GGUF architecture {arch!r} in {gguf.path.name}; corelm reads "
                          f"{', '.join(SUPPORTED_ARCHS)}")
    return arch


def config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    """Build a :class:`ModelConfig` from the ``<arch>.*`` metadata keys (llama.cpp's names).

    Architecture specifics follow llama.cpp (``src/llama-model.cpp``, ``convert_hf_to_gguf.py``):
    Qwen2 has q/k/v biases, Qwen3 and Gemma 3 QK norms; Gemma 2 alternates sliding/global layers
    starting with a sliding one, Gemma 3 makes every 6th layer global and slides the others with a
    RoPE base of 10000; both scale queries by ``(d_model / n_head) ** -0.5`` in their 27B models
    (46 and 62 layers) and by ``head_dim ** -0.5`` otherwise. Phi-3's LongRoPE factors are tensors.
    """
    arch = _arch(gguf)
    md = gguf.metadata

    def key(name: str, default: Any = None) -> Any:
        value = md.get(f"{arch}.{name}", default)
        if value is None:
            raise CorelmError(f"{gguf.path.name}: GGUF metadata lacks {arch}.{name}")
        return value

    n_head = int(key("attention.head_count"))
    d_model = int(key("embedding_length"))
    vocab = md.get(f"{arch}.vocab_size")
    if vocab is None:  # older files: the vocabulary length, else the embedding rows
        tokens = md.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if tokens else gguf.tensors["token_embd.weight"].shape[0]
    head_dim = md.get(f"{arch}.attention.key_length") or md.get(f"{arch}.rope.dimension_count")
    rope_scaling = None
    scaling_type = md.get(f"{arch}.rope.scaling.type")
    if scaling_type and scaling_type != "none":
        rope_scaling = {"rope_type": scaling_type, "factor": float(key("rope.scaling.factor"))}
        orig = md.get(f"{arch}.rope.scaling.original_context_length")
        if orig:
            rope_scaling["original_max_position_embeddings"] = int(orig)
    family, model_type = _ARCH_MODEL[arch]
    n_layer = int(key("block_count"))
    head_dim = int(head_dim) if head_dim else d_model // n_head
    options: dict[str, Any] = {}
    if arch in ("llama", "qwen2", "qwen3", "phi3"):
        options.update(bias=False, qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3",
                       tie_embeddings="output.weight" not in gguf.tensors)
    else:  # the Gemmas: GeGLU (tanh), tied embeddings unless an output tensor is present
        options.update(activation="gelu_tanh", tie_embeddings="output.weight" not in gguf.tensors)
    window = md.get(f"{arch}.attention.sliding_window")
    if arch == "gemma2":
        options.update(sandwich_norm=True, sliding_window=int(window),
                       attn_softcap=md.get(f"{arch}.attn_logit_softcapping"),
                       final_softcap=md.get(f"{arch}.final_logit_softcapping"),
                       layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layer)],
                       query_pre_attn_scalar=d_model // n_head if n_layer == 46 else head_dim)
    if arch == "gemma3":
        pattern = md.get(f"{arch}.attention.sliding_window_pattern", 6)
        if isinstance(pattern, (list, tuple)):  # newer files: one bool per layer, True = sliding
            layer_types = ["sliding_attention" if p else "full_attention" for p in pattern]
        else:
            layer_types = ["full_attention" if (i + 1) % int(pattern) == 0 else "sliding_attention"
                           for i in range(n_layer)]
        options.update(sandwich_norm=True, qk_norm=True, sliding_window=int(window), layer_types=layer_types,
                       rope_local_theta=float(md.get(f"{arch}.rope.freq_base_swa", 10000.0)),
                       final_softcap=md.get(f"{arch}.final_logit_softcapping"),
                       query_pre_attn_scalar=d_model // n_head if n_layer == 62 else head_dim)
    if arch == "phi3":
        options["sliding_window"] = int(window) if window else None
        rot = md.get(f"{arch}.rope.dimension_count")
        if rot and int(rot) < head_dim:
            options["rotary_dim"] = int(rot)
        if "rope_factors_long.weight" in gguf.tensors:
            rope_scaling = {"rope_type": "longrope",
                            "long_factor": gguf.tensor("rope_factors_long.weight").tolist(),
                            "short_factor": gguf.tensor("rope_factors_short.weight").tolist(),
                            "original_max_position_embeddings": int(key("rope.scaling.original_context_length"))}
            if md.get(f"{arch}.rope.scaling.attn_factor") is not None:
                rope_scaling["attention_factor"] = float(md[f"{arch}.rope.scaling.attn_factor"])
    return ModelConfig(
        family=family,
        name=str(md.get("general.name", gguf.path.stem)),
        vocab_size=int(vocab),
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=int(md.get(f"{arch}.attention.head_count_kv", n_head)),
        d_model=d_model,
        d_ff=int(key("feed_forward_length")),
        head_dim=head_dim,
        max_seq_len=int(key("context_length")),
        norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(md.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        extra={"model_type": model_type},
        **options,
    )


# GGUF block tensor -> HF llama name (per layer), and the globals.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
# Per architecture, what differs from llama's table (gguf-py's tensor_mapping.py names). Gemma 2/3
# call their pre-MLP norm `ffn_norm` and add post norms; Phi-3 stores q/k/v fused (`attn_qkv`) and
# gate/up fused in `ffn_up`, split at load (see _FUSED).
_ARCH_LAYER_NAMES = {
    "llama": _LAYER_NAMES,
    "qwen2": _LAYER_NAMES,
    "qwen3": {**_LAYER_NAMES, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
    "phi3": {**_LAYER_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
    "gemma": {**_LAYER_NAMES, "ffn_norm": "pre_feedforward_layernorm"},
    "gemma2": {**_LAYER_NAMES, "ffn_norm": "pre_feedforward_layernorm",
               "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"},
    "gemma3": {**_LAYER_NAMES, "ffn_norm": "pre_feedforward_layernorm",
               "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
               "attn_q_norm": "self_attn.q_norm",
               "attn_k_norm": "self_attn.k_norm"},
}
# Tensors llama.cpp stores that HF checkpoints do not have (precomputed RoPE frequencies; Phi-3's
# LongRoPE factors, read into the config instead).
_IGNORED = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """Map a GGUF tensor name to its corelm/HF name (``None`` for tensors HF does not keep).

    Phi-3's fused ``attn_qkv``/``ffn_up`` map to ``qkv_proj``/``gate_up_proj``, which
    :func:`load_gguf_state_dict` splits.
    """
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name in _IGNORED:
        return None
    names = _ARCH_LAYER_NAMES.get(arch, _LAYER_NAMES)
    parts = gguf_name.split(".")  # blk.N.attn_q.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in names:
        return f"model.layers.{parts[1]}.{names[parts[2]]}.{parts[3]}"
    raise CorelmError(f"unexpected tensor {gguf_name!r} in a {arch} GGUF file")


def load_gguf_state_dict(gguf: GGUFFile, config: ModelConfig,
                         dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Dequantize every tensor to ``dtype`` under HF llama names, Q/K rows un-permuted.

    Shapes are checked against ``config`` so a mismatched file fails with the tensor's name.
    """
    arch = _arch(gguf)
    hd, d = config.head_dim, config.d_model
    expected = {"model.embed_tokens.weight": (config.vocab_size, d), "model.norm.weight": (d,),
                "lm_head.weight": (config.vocab_size, d)}
    ffn_norm = "pre_feedforward_layernorm" if config.family == "gemma" else "post_attention_layernorm"
    per_layer = {"input_layernorm.weight": (d,), f"{ffn_norm}.weight": (d,),
                 "self_attn.q_proj.weight": (config.n_head * hd, d),
                 "self_attn.k_proj.weight": (config.n_kv_head * hd, d),
                 "self_attn.v_proj.weight": (config.n_kv_head * hd, d),
                 "self_attn.o_proj.weight": (d, config.n_head * hd),
                 "mlp.gate_proj.weight": (config.d_ff, d), "mlp.up_proj.weight": (config.d_ff, d),
                 "mlp.down_proj.weight": (d, config.d_ff)}
    if config.qkv_bias:
        per_layer.update({"self_attn.q_proj.bias": (config.n_head * hd,),
                          "self_attn.k_proj.bias": (config.n_kv_head * hd,),
                          "self_attn.v_proj.bias": (config.n_kv_head * hd,)})
    if config.qk_norm:
        per_layer.update({"self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,)})
    if config.sandwich_norm:
        per_layer.update({"post_attention_layernorm.weight": (d,), "post_feedforward_layernorm.weight": (d,)})
    if arch == "phi3":  # fused in the file: checked here, split by _load_one
        per_layer["self_attn.qkv_proj.weight"] = ((config.n_head + 2 * config.n_kv_head) * hd, d)
        per_layer["mlp.gate_up_proj.weight"] = (2 * config.d_ff, d)
    for i in range(config.n_layer):
        expected.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    state: dict[str, torch.Tensor] = {}
    # One thread: these element-wise passes are memory-bound, and on a shared 2-core machine a second
    # intra-op thread mostly adds synchronisation stalls (measured: 2x the wall time under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, info in gguf.tensors.items():
            _load_one(gguf, name, info, config, expected, dtype, state, arch)
    finally:
        torch.set_num_threads(threads)
    missing = [k for k in expected if k not in state and not (k == "lm_head.weight" and config.tie_embeddings)
               and not k.endswith(("qkv_proj.weight", "gate_up_proj.weight"))]
    if missing:
        raise CorelmError(f"{gguf.path.name} lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    return state


def _load_one(gguf: GGUFFile, name: str, info: GGUFTensor, config: ModelConfig,
              expected: dict[str, tuple[int, ...]], dtype: torch.dtype, state: dict[str, torch.Tensor],
              arch: str = "llama") -> None:
    target = hf_name(name, arch)
    if target is None:
        return
    w = dequantize(gguf.raw(name), info.qtype, info.shape)
    if arch == "llama":  # only llama.cpp's LlamaModel converter permutes Q/K rows (the others use NeoX RoPE)
        if target.endswith("q_proj.weight"):
            w = unpermute_rows(w, config.n_head)
        elif target.endswith("k_proj.weight"):
            w = unpermute_rows(w, config.n_kv_head)
    want = expected.get(target)
    if want is None or tuple(w.shape) != want:
        raise CorelmError(f"{gguf.path.name}: tensor {name!r} has shape {tuple(w.shape)}, expected {want}")
    if config.family == "gemma" and target.endswith("norm.weight"):
        # llama.cpp's Gemma converters store 1 + w (its RMSNorm multiplies by the weight as is)
        w = w.float() - 1.0
    # F32 tensors are still views of the read-only map: copy them so the model owns its memory.
    w = w.to(dtype, copy=info.qtype in (Q.F32, Q.F16, Q.BF16))
    if target.endswith("qkv_proj.weight"):  # Phi-3: rows q, then k, then v
        hd = config.head_dim
        sizes = [config.n_head * hd, config.n_kv_head * hd, config.n_kv_head * hd]
        for part, chunk in zip(("q_proj", "k_proj", "v_proj"), w.split(sizes)):
            state[target.replace("qkv_proj", part)] = chunk
    elif target.endswith("gate_up_proj.weight"):  # Phi-3: rows gate, then up
        for part, chunk in zip(("gate_proj", "up_proj"), w.split(config.d_ff)):
            state[target.replace("gate_up_proj", part)] = chunk
    else:
        state[target] = w
