"""``corelm.load``: one call from a name or a path to a ready model with its tokenizer.

Decoders come back as :class:`LLM` (text in, text out; the engine below speaks token ids),
encoders as :class:`Encoder` (hidden states and sentence embeddings). Finding and reading the
weights is :mod:`corelm.loading`'s job (the sources it accepts are listed there); this module only
wraps what it returns.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from corelm.config import ModelConfig
from corelm.errors import CorelmError
from corelm.generate.text import StopMatcher, stream_text
from corelm.loading import (  # noqa: F401 - part of this module's API since before the loaders moved
    Loaded,
    default_dtype,
    gguf_tokenizer,
    load_parts,
    load_tokenizer,
    resolve_dtype,
)
from corelm.tokenizer import Tokenizer

STRUCTURE = ("json_schema", "json_object", "regex", "grammar")  # the ways to ask for structured output


def load(name_or_path: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
         device: str | torch.device = "cpu", quantize: str | None = None) -> LLM | Encoder:
    """Load a model by embedded/preset name or path.

    Args:
        name_or_path: ``smollm2-135m-instruct``, ``minilm-l6``, a preset (random weights), a ``.gguf``
            file, an HF-layout directory (``config.json`` + ``model.safetensors``), a ``corelm quantize``
            output or an ``sft`` fine-tuning run.
        dtype: ``fp32``/``bf16``/``fp16`` or a torch dtype; ``None`` follows the CPU's flags
            (:func:`corelm.loading.default_dtype`). GGUF weights are dequantized to it.
        device: Where the model runs.
        quantize: ``None``, or a method of ``corelm.quant.transform.quantize_model`` (e.g. ``int8``).

    Returns:
        :class:`LLM` for decoders, :class:`Encoder` for encoders.

    Raises:
        CorelmError: unknown name (with close names), missing path, unreadable or unsupported checkpoint.
    """
    return wrap(load_parts(name_or_path, dtype=dtype, device=device, quantize=quantize))


def wrap(loaded: Loaded) -> LLM | Encoder:
    """The :class:`LLM` or :class:`Encoder` over a loader's parts (encoder-decoders: a
    :class:`~corelm.generate.seq2seq.Seq2Seq` with ``translate(texts)``)."""
    if loaded.config.is_seq2seq:
        from corelm.generate.seq2seq import Seq2Seq

        return Seq2Seq(loaded.model, loaded.tokenizer, loaded.config, source=loaded.source)
    if loaded.config.is_encoder:
        return Encoder(loaded.model, loaded.tokenizer, loaded.config, source=loaded.source,
                       **loaded.encoder_options)
    return LLM(loaded.model, loaded.tokenizer, loaded.config, source=loaded.source)


class LLM:
    """A decoder with its tokenizer: text in, text out.

    Attributes:
        model: The ``nn.Module`` (``model(input_ids) -> logits (B, T, V)``).
        tokenizer: Its :class:`~corelm.tokenizer.Tokenizer` (``None`` for presets without a vocabulary file).
        config: The :class:`~corelm.config.ModelConfig`.
        source: Where the weights came from (path, or ``"random init"``).
        compile: Decode through a ``torch.compile``d step of the model's forward (minutes to compile
            on a 2-core CPU the first time, seconds once inductor's cache holds it; for float models,
            mainly on GPU). Off: a decoder of the llama family, Gemma, OLMo 2 or MoE on CPU, quantized or with
            fp32/bf16 weights, decodes on corelm's C++ step (``CORELM_STEP=pytorch``: on its forward),
            others eagerly.
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer | None, config: ModelConfig, source: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.source = source
        self.compile = False
        self._grammar_tokenizer: Any = None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __repr__(self) -> str:
        return f"LLM({self.config.name or self.config.family}, dtype={self.dtype}, source={self.source})"

    # ---- text generation --------------------------------------------------------------------
    def generate(self, prompt: str | list[str], max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
                 stop: str | list[str] | None = None, seed: int | None = None, ignore_eos: bool = False,
                 num_beams: int = 1, json_schema: dict | bool | str | None = None, json_object: bool = False,
                 regex: str | None = None, grammar: str | None = None) -> str | list[str]:
        """Continue ``prompt`` (raw text, no chat template) and return the continuation.

        Args:
            prompt: The text to continue, or a list of texts: they are decoded together as one batch
                (each row with its own KV cache row and sampler; a row's text equals its lone run) and
                a list of continuations comes back, in order.
            max_new_tokens: At most this many new tokens.
            temperature: 0 = greedy; higher = more random.
            top_p: Nucleus sampling: keep the smallest set of tokens with this much probability.
            top_k: Keep only the k most likely tokens (0 = all).
            repetition_penalty: >1 discourages tokens already in the text (CTRL, Keskar et al. 2019).
            stop: Stop strings; generation ends before the first one and it is not returned.
            seed: Seed for sampling; the same seed gives the same text.
            ignore_eos: Keep going after the end-of-sequence token (for benchmarks).
            num_beams: Beam search width (1 = no beam search; beams ignore sampling parameters).
            json_schema: The output is a JSON document that validates against this schema (a dict, or its
                JSON text). Decoding is constrained token by token and ends when the document is complete
                (or at ``max_new_tokens``, cut off).
            json_object: The output is a JSON object (any).
            regex: The whole output matches this regular expression.
            grammar: The output follows this grammar: Lark (``start: ...``) or GBNF (``root ::= ...``).
        Raises:
            CorelmError: a schema, regex or grammar that cannot be used (one line, naming the problem).
        """
        structure = {"json_schema": json_schema, "json_object": json_object, "regex": regex, "grammar": grammar}
        if isinstance(prompt, (list, tuple)):
            return self._generate_batch(list(prompt), max_new_tokens=max_new_tokens, temperature=temperature,
                                        top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                                        stop=stop, seed=seed, ignore_eos=ignore_eos, num_beams=num_beams,
                                        structure=structure)
        return "".join(self.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                   top_k=top_k, repetition_penalty=repetition_penalty, stop=stop, seed=seed,
                                   ignore_eos=ignore_eos, num_beams=num_beams, **structure))

    def stream(self, prompt: str, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, repetition_penalty: float = 1.0, stop: str | list[str] | None = None,
               seed: int | None = None, ignore_eos: bool = False, num_beams: int = 1,
               **structure: Any) -> Iterator[str]:
        """Like :meth:`generate`, yielding text pieces as tokens are produced."""
        ids = self.encode_prompt(prompt)
        return self.stream_ids(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               top_k=top_k, repetition_penalty=repetition_penalty, stop=stop, seed=seed,
                               ignore_eos=ignore_eos, num_beams=num_beams, **structure)

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
                   num_beams: int = 1, stats: dict[str, float] | None = None, **structure: Any) -> Iterator[str]:
        """Generate from token ids, yielding text pieces; stop strings are applied here.

        Args:
            stats: If given, filled with ``prompt_tokens``, ``new_tokens``, ``prefill_s``, ``decode_s``.
            structure: ``json_schema``, ``json_object``, ``regex`` or ``grammar``, as in :meth:`generate`.
        """
        tok = self._need_tokenizer()
        stops = _stop_list(stop)
        params = self._params(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, ignore_eos)
        self._check_length(prompt_ids, max_new_tokens)
        constraint = self.constraint(**structure)
        token_iter = self._token_stream(prompt_ids, params, num_beams, stats, constraint)
        return stream_text(tok, token_iter, stops)

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 256, **kwargs: Any) -> list[int]:
        """Generate and return the new token ids (no stop-string handling)."""
        params = self._params(max_new_tokens, kwargs.get("temperature", 0.0), kwargs.get("top_p", 1.0),
                              kwargs.get("top_k", 0), kwargs.get("repetition_penalty", 1.0),
                              kwargs.get("seed"), kwargs.get("ignore_eos", False))
        self._check_length(prompt_ids, max_new_tokens)
        constraint = self.constraint(**{k: kwargs[k] for k in STRUCTURE if k in kwargs})
        return list(self._token_stream(prompt_ids, params, kwargs.get("num_beams", 1), None, constraint))

    def constraint(self, json_schema: dict | bool | str | None = None, json_object: bool = False,
                   regex: str | None = None, grammar: str | None = None) -> Any:
        """A fresh :class:`~corelm.generate.constraints.Constraint` for one generation, or None when no
        structure is asked for (arguments as in :meth:`generate`).

        Raises:
            CorelmError: several structures at once, JSON schema text that does not parse, or a schema,
                regex or grammar the grammar engine refuses.
        """
        from corelm.generate.constraints import GrammarTokenizer, build_constraint

        given = {k: v for k, v in (("json_schema", json_schema), ("json_object", json_object or None),
                                   ("regex", regex), ("grammar", grammar)) if v is not None}
        if not given:
            return None
        if len(given) > 1:
            raise CorelmError(f"give one of json_schema, json_object, regex and grammar, not {' and '.join(given)}")
        if isinstance(json_schema, str):
            try:
                given["json_schema"] = json.loads(json_schema)
            except ValueError as exc:
                raise CorelmError(f"the JSON schema is not valid JSON: {exc}") from None
        if self._grammar_tokenizer is None:  # reads the whole vocabulary once (~0.2 s for 49k tokens)
            tok = self._need_tokenizer()
            eos = {t for t in (tok.eos_token_id, self.config.extra.get("eos_token_id")) if isinstance(t, int)}
            self._grammar_tokenizer = GrammarTokenizer(tok, int(self.config.vocab_size), sorted(eos))
        return build_constraint(self._grammar_tokenizer, **given)

    def _generate_batch(self, prompts: list[str], *, max_new_tokens: int, stop: str | list[str] | None,
                        num_beams: int, structure: dict[str, Any], **sampling: Any) -> list[str]:
        """Several prompts in one batch through the engine; stop strings cut each row's text."""
        from corelm.generate import engine

        if num_beams != 1:  # beam search keeps num_beams rows per prompt already: one prompt at a time
            return [self.generate(p, max_new_tokens=max_new_tokens, stop=stop, num_beams=num_beams, **sampling,
                                  **structure) for p in prompts]
        tok = self._need_tokenizer()
        stops = _stop_list(stop)
        ids = [self.encode_prompt(p) for p in prompts]
        params = self._params(max_new_tokens, sampling["temperature"], sampling["top_p"], sampling["top_k"],
                              sampling["repetition_penalty"], sampling["seed"], sampling["ignore_eos"])
        for row in ids:
            self._check_length(row, max_new_tokens)
        constraints = [self.constraint(**structure) for _ in ids]  # each row walks its own grammar
        # Each row watches its own text as tokens come (the one stop matcher, fed incrementally) so the
        # engine stops a row at its stop string; the returned text is cut by stream_text as a lone run is.
        watch = [(tok.stream_decoder(skip_special_tokens=True), StopMatcher(stops)) for _ in ids]

        def stopped(row: int, tokens: list[int]) -> bool:
            decoder, matcher = watch[row]
            return matcher.feed(decoder.push(tokens[-1]))[1]

        rows = engine.generate(self.model, ids, params, should_stop=stopped if stops else None,
                               compile=self.compile, constraints=constraints)
        return ["".join(stream_text(tok, iter(tokens), stops)) for tokens in rows]

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
                      stats: dict[str, float] | None, constraint: Any = None) -> Iterator[int]:
        from corelm.generate import engine

        if not isinstance(num_beams, int) or num_beams < 1:
            raise CorelmError(f"num_beams must be a positive integer, got {num_beams!r}")
        t0 = time.perf_counter()
        first: float | None = None
        n = 0
        try:
            if num_beams > 1:
                ids = engine.beam_search(self.model, prompt_ids, params, num_beams=num_beams, constraint=constraint)
                first = time.perf_counter()
                for n, token in enumerate(ids, 1):
                    yield token
            else:
                for token in engine.stream(self.model, prompt_ids, params, compile=self.compile,
                                           constraint=constraint):
                    if first is None:
                        first = time.perf_counter()
                    n += 1
                    yield token
        finally:
            if stats is not None:
                end = time.perf_counter()
                stats.update(prompt_tokens=len(prompt_ids), new_tokens=n,
                             prefill_s=(first or end) - t0, decode_s=end - (first or end))
                if num_beams > 1:  # one search, prefill included: its tokens come out together at the end
                    stats.update(beams=num_beams, search_s=(first or end) - t0)


def _stop_list(stop: str | list[str] | None) -> list[str]:
    """``stop`` as a list of strings, checked: each must be a non-empty string."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise CorelmError("stop strings must be non-empty strings")
    return stops


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


