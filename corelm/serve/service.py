"""The text layer between the HTTP adapter and the token-level batcher.

:class:`TextModel` turns a prompt or a chat conversation into token ids with the model's own
tokenizer and chat template (the same path as ``corelm.load(...).chat``), checks them against the
context window, and turns the batcher's token stream back into text pieces: the tokenizer's
incremental detokenizer (never splits a UTF-8 character), and stop strings that are never emitted.
:class:`EmbeddingModel` wraps an encoder's ``embed``. Nothing here knows about HTTP.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from corelm.generate.constraints import Constraint, GrammarTokenizer, grammar_for
from corelm.generate.engine import SamplingParams
from corelm.generate.text import StopMatcher
from corelm.serve import errors, tools
from corelm.serve.batcher import Batcher, Handle


@dataclass
class Piece:
    """A piece of generated text; ``finish_reason`` is set on the last one (``stop`` | ``length``)."""

    text: str
    finish_reason: str | None = None
    logprobs: list[dict[str, Any]] | None = None  # one entry per token behind this text (when asked for)


class TextStream:
    """One running generation: async-iterate :class:`Piece` s; counts tokens and times for usage/metrics."""

    def __init__(self, handle: Handle, tokenizer: Any, n_prompt: int, stops: list[str]) -> None:
        self.handle = handle
        self.tokenizer = tokenizer
        self.n_prompt = n_prompt
        self.n_generated = 0
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.finish_reason: str | None = None
        self._detok = tokenizer.stream_decoder(skip_special_tokens=True)
        self._stops = StopMatcher(stops)

    @property
    def n_cached(self) -> int:
        """Prompt tokens the prefix cache held (OpenAI's ``usage.prompt_tokens_details.cached_tokens``)."""
        return self.handle.cached_tokens

    def cancel(self) -> None:
        self.handle.cancel()

    async def pieces(self) -> AsyncIterator[Piece]:
        """Yields text pieces; the last one carries ``finish_reason``. Raises APIError on failure."""
        async for event in self.handle:
            if event.kind == "error":
                raise event.error
            if event.kind == "done":
                if event.finish_reason == "cancelled":  # the caller gave up on this stream
                    return
                tail, _ = self._stops.feed(self._detok.flush())
                self.finish_reason = event.finish_reason
                yield Piece(tail + self._stops.flush(), event.finish_reason)
                return
            self.n_generated += 1
            self.first_token_at = self.first_token_at or event.time
            self.last_token_at = event.time
            text, stopped = self._stops.feed(self._detok.push(event.token))
            logprobs = [self._logprob_entry(event)] if event.logprob is not None else None
            if stopped:
                self.handle.cancel()  # free the row now; tokens already queued are dropped
                self.finish_reason = "stop"
                yield Piece(text, "stop", logprobs)
                return
            if text or logprobs:
                yield Piece(text, None, logprobs)

    def _logprob_entry(self, event: Any) -> dict[str, Any]:
        """OpenAI's per-token logprob object: the token's text and bytes, its log-probability, and
        the most likely alternatives."""
        def token(t: int, lp: float) -> dict[str, Any]:
            text = self.tokenizer.decode([t])
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        entry = token(event.token, event.logprob)
        entry["top_logprobs"] = [token(t, lp) for t, lp in (event.top or [])]
        return entry


@dataclass
class TextOptions:
    """Validated sampling options of one request (see :mod:`corelm.serve.protocol`)."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    structure: dict[str, Any] | None = None  # keyword of corelm.generate.constraints.grammar_for
    logprobs: int | None = None  # None: off; k: each token's log-probability and the k most likely


class TextModel:
    """A decoder served through a :class:`Batcher`.

    Args:
        name: the model id clients send.
        llm: a ``corelm.load`` LLM (``.tokenizer``, ``.config``).
        batcher: the running batcher over ``llm.model``.
        default_max_tokens: used when a request gives none (capped by the room left in the window).
    """

    kind = "generate"

    def __init__(self, name: str, llm: Any, batcher: Batcher, default_max_tokens: int = 512) -> None:
        self.name = name
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.batcher = batcher
        self.context_window = min(int(llm.config.max_seq_len), batcher.max_seq_len)
        self.default_max_tokens = default_max_tokens
        eos = [getattr(self.tokenizer, "eos_token_id", None)]
        eos += list(getattr(llm, "stop_token_ids", None) or [])
        self.stop_token_ids = tuple(sorted({int(t) for t in eos if t is not None}))
        self._grammar_tokenizer: GrammarTokenizer | None = None
        self._native_tools: bool | None = None
        self.adapters: Any = None  # a corelm.serve.adapters.AdapterSet when LoRA adapters are served over it

    @property
    def native_tools(self) -> bool:
        """Whether the chat template renders ``tools`` itself (it changes the prompt when given one);
        if not, tool conversations are rewritten by :func:`corelm.serve.tools.fallback_messages`."""
        if self._native_tools is None:
            probe = [{"role": "user", "content": "Hi"}]
            tool = {"type": "function", "function": {"name": "probe", "description": "d",
                                                     "parameters": {"type": "object", "properties": {}}}}
            try:
                self._native_tools = (self.tokenizer.apply_chat_template(probe, tools=[tool])
                                      != self.tokenizer.apply_chat_template(probe))
            except Exception:  # noqa: BLE001 - a template that fails on tools does not support them
                self._native_tools = False
        return self._native_tools

    @property
    def tool_family(self) -> str:
        """The parser family of this model's tool calls (:data:`corelm.serve.tools.FAMILIES`)."""
        return tools.family_of(self.tokenizer.chat_template) if self.native_tools else "hermes"

    def tool_structure(self, specs: list[dict[str, Any]], choice: str | dict[str, Any]) -> dict[str, Any] | None:
        """The grammar (``grammar_for`` keyword) forcing one call when ``choice`` is "required" or a
        named function; None for "auto"/"none" (free text)."""
        if choice in ("none", "auto"):
            return None
        name = choice["function"]["name"] if isinstance(choice, dict) else None
        family = self.tool_family
        # The tags as single added tokens where the vocabulary has them (Qwen's <tool_call> pair,
        # Mistral's [TOOL_CALLS] control token): the grammar must name those tokens, not spell the text.
        names = (tools.MISTRAL_TAG,) if family == "mistral" else (tools.OPEN, tools.CLOSE)
        tags = [self.tokenizer.encode(tag) for tag in names]
        tag_tokens = tuple(t[0] for t in tags) if all(len(t) == 1 for t in tags) else None
        try:
            return {"grammar": tools.tool_grammar(specs, name, family, tag_tokens)}
        except RecursionError:  # a parameters schema nested deeper than json.dumps goes
            raise errors.bad_request("'tools' holds a parameters schema nested too deeply", "tools") from None

    def constraint(self, structure: dict[str, Any] | None, param: str | None = None) -> Constraint | None:
        """The request's grammar matcher, or a 400 naming the problem with its schema/grammar
        (``param``: the request parameter to name, default the one ``structure`` came from)."""
        if structure is None:
            return None
        if self._grammar_tokenizer is None:  # built once per model (reads the whole vocabulary)
            self._grammar_tokenizer = GrammarTokenizer(self.tokenizer, int(self.llm.config.vocab_size),
                                                       list(self.stop_token_ids))
        param = param or {"json_schema": "response_format", "json_object": "response_format"}.get(
            next(iter(structure)), next(iter(structure)))
        try:
            grammar = grammar_for(**structure)
            self._grammar_tokenizer.check(grammar)
            return self._grammar_tokenizer.constraint(grammar)
        except Exception as exc:  # noqa: BLE001 -- the grammar engine's parsers raise their own types on bad input
            raise errors.bad_request(f"'{param}' cannot be used: {str(exc).strip()[:500]}", param) from None

    def encode_prompt(self, prompt: str) -> list[int]:
        """A raw prompt's ids exactly as ``corelm generate`` makes them (BOS when the model wants one)."""
        return list(self.llm.encode_prompt(prompt))

    def render_chat(self, messages: list[dict[str, Any]], specs: list[dict[str, Any]] | None = None) -> str:
        """The prompt text: ``specs`` (function tools) through the template's own ``tools=``, or the
        Hermes-convention fallback when the template has no tool support (also for tool turns)."""
        has_tool_turns = any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
        if (specs or has_tool_turns) and not self.native_tools:
            return self.tokenizer.apply_chat_template(tools.fallback_messages(messages, specs),
                                                      add_generation_prompt=True)
        extra = {"tools": specs} if specs else {}
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **extra)

    def encode_chat(self, messages: list[dict[str, Any]], specs: list[dict[str, Any]] | None = None) -> list[int]:
        return list(self.tokenizer.encode(self.render_chat(messages, specs)))

    def budget(self, n_prompt: int, max_tokens: int | None, prompt_param: str) -> int:
        """Resolve max_tokens against the context window, or raise a 400 naming the counts."""
        window = self.context_window
        if n_prompt >= window:
            raise errors.context_exceeded(
                f"the prompt has {n_prompt} tokens but the context window is {window} tokens "
                f"(at least one token must be generated)", prompt_param)
        if max_tokens is None:
            return min(self.default_max_tokens, window - n_prompt)
        if n_prompt + max_tokens > window:
            raise errors.context_exceeded(
                f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) = {n_prompt + max_tokens} "
                f"exceeds the context window of {window} tokens", "max_tokens")
        return max_tokens

    def start(self, prompt_ids: list[int], options: TextOptions, max_tokens: int,
              deadline: float | None, constraint: Constraint | None = None, adapter: int = 0) -> TextStream:
        """Submit a generation (raises the batcher's 503 when full); ``constraint`` from
        :meth:`constraint` (one per generation: it holds the generation's grammar state); ``adapter``:
        the LoRA slot to decode with (:attr:`adapters`; 0: the base model)."""
        spec = SamplingParams(
            max_new_tokens=max_tokens, temperature=options.temperature, top_p=options.top_p,
            top_k=options.top_k, repetition_penalty=options.repetition_penalty, seed=options.seed,
            stop_token_ids=self.stop_token_ids, ignore_eos=options.ignore_eos)
        handle = self.batcher.submit(prompt_ids, spec, deadline, constraint=constraint, logprobs=options.logprobs,
                                     adapter=adapter)
        return TextStream(handle, self.tokenizer, len(prompt_ids), list(options.stop))


class EmbeddingModel:
    """An encoder served for ``/v1/embeddings`` (``enc.embed(list[str]) -> (N, d)``)."""

    kind = "embed"

    def __init__(self, name: str, encoder: Any) -> None:
        self.name = name
        self.encoder = encoder
        self.tokenizer = encoder.tokenizer
        self.context_window = int(encoder.config.max_seq_len)
        self._lock = asyncio.Lock()  # one forward at a time: the CPU is shared with the batcher

    def count_tokens(self, texts: list[str]) -> list[int]:
        # +2 for [CLS] and [SEP], which embed() adds around every input.
        return [len(self.tokenizer.encode(t)) + 2 for t in texts]

    async def embed(self, texts: list[str]) -> list[list[float]]:
        async with self._lock:
            vectors = await asyncio.to_thread(self._embed, texts)
        return vectors

    def _embed(self, texts: list[str]) -> list[list[float]]:
        import torch

        with torch.inference_mode():
            return self.encoder.embed(texts).float().tolist()


def now() -> float:
    return time.monotonic()
