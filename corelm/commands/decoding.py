"""What the commands that decode text share (``generate``, ``chat``): their model and sampling options,
loading the decoder with its one stderr line, and printing a stream with its stats line.

Not a command itself: commands import this module, never each other.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from corelm.commands.args import Options, option, set_threads, threads_option
from corelm.errors import CorelmError
from corelm.presets import DEFAULT_MODEL

STRUCTURE = "structured output (one of them; also with --beams and speculative decoding)"


@dataclass(kw_only=True)
class ModelOptions(Options):
    """The decoder a command loads, and how it runs."""

    model: str = option(DEFAULT_MODEL, "embedded model or preset name (see `corelm models`), a .gguf file, an HF "
                                       "checkpoint directory, or a Hugging Face repo id "
                                       "org/name[@rev][:file.gguf|:QUANT] (from the local cache; `corelm pull` "
                                       "downloads; an existing local path of the same spelling wins)")
    dtype: str = option("auto", "weight and compute dtype", dtype=True)
    threads: int | None = threads_option()
    compile: bool = option(False, "decode through a torch.compile'd step of the model's forward (minutes to compile "
                                  "the first time on a small CPU, seconds once cached; for float models, mainly on "
                                  "GPU)")


@dataclass(kw_only=True)
class SamplingOptions(Options):
    """How tokens are chosen; the defaults are greedy decoding."""

    max_new_tokens: int = option(256, "generate at most this many tokens")
    temperature: float = option(0.0, "0 = greedy (deterministic); higher = more random")
    top_p: float = option(1.0, "nucleus sampling: sample from the smallest set of tokens whose probability "
                               "reaches p (0<p<=1)")
    top_k: int = option(0, "sample only from the k most likely tokens (0 = no limit)")
    repetition_penalty: float = option(1.0, "divide the logits of tokens already present by this "
                                            "(>1 discourages repeats)")
    seed: int | None = option(None, "random seed for sampling (same seed, same text)")
    stop: list[str] | None = field(default=None, metadata={
        "help": "stop before this text (repeatable); it is not printed", "metavar": "TEXT"})
    ignore_eos: bool = option(False, "keep generating after the end-of-sequence token (for timing)")
    json_schema: str | None = option(None, "the output is a JSON document valid against this schema (a file, or the "
                                           "schema's JSON text); decoding ends when the document is complete",
                                     metavar="FILE_OR_JSON", section=STRUCTURE)
    json_object: bool = option(False, "the output is a JSON object (any)", flag="--json", section=STRUCTURE)
    regex: str | None = option(None, "the whole output matches this regular expression", metavar="REGEX",
                               section=STRUCTURE)
    grammar: str | None = option(None, "the output follows this grammar: GBNF (root ::= ...) or Lark (start: ...), "
                                       "a file or the grammar's text", metavar="FILE_OR_TEXT", section=STRUCTURE)

    def check(self) -> None:
        super().check()
        if self.max_new_tokens < 1:
            raise CorelmError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise CorelmError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise CorelmError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise CorelmError(f"--top-k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise CorelmError(f"--repetition-penalty must be > 0, got {self.repetition_penalty}")
        given = [flag for flag, value in (("--json-schema", self.json_schema), ("--json", self.json_object or None),
                                          ("--regex", self.regex), ("--grammar", self.grammar)) if value is not None]
        if len(given) > 1:
            raise CorelmError(f"{' and '.join(given)} are two ways to constrain the output; give one of them")
        self.structure()  # a schema file that is missing or not JSON fails before the model loads

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``LLM.generate`` / ``LLM.stream_ids``."""
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "repetition_penalty": self.repetition_penalty, "seed": self.seed,
                "stop": self.stop, "ignore_eos": self.ignore_eos, **self.structure()}

    def structure(self) -> dict[str, Any]:
        """The structured-output keyword of ``LLM.generate`` these options ask for (``{}`` for free text):
        ``--json-schema`` and ``--grammar`` read a file when one exists at that path, else take the text."""
        if self.json_object:
            return {"json_object": True}
        if self.regex is not None:
            return {"regex": self.regex}
        if self.grammar is not None:
            return {"grammar": _file_or_text(self.grammar)}
        if self.json_schema is None:
            return {}
        text = _file_or_text(self.json_schema)
        try:
            return {"json_schema": json.loads(text)}
        except ValueError as exc:
            raise CorelmError(f"--json-schema is neither a file nor JSON text: {exc}") from None


def _file_or_text(value: str) -> str:
    path = Path(value)
    try:
        is_file = len(value) < 4096 and "\n" not in value and path.is_file()
    except OSError:  # a name too long for the file system: text
        is_file = False
    if not is_file:
        return value
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CorelmError(f"cannot read {value}: {exc}") from None


def load_llm(options: ModelOptions, model: str | None = None) -> Any:
    """Load ``options.model`` (or ``model``) as a decoder with ``options``' dtype, threads, compile and (where the
    command has it) quantize, reporting the load time on stderr."""

    import corelm
    from corelm.api import LLM

    set_threads(options.threads)
    model = model or options.model
    t0 = time.perf_counter()
    llm = corelm.load(model, dtype=options.dtype, quantize=getattr(options, "quantize", None))
    if not isinstance(llm, LLM):
        if llm.config.is_seq2seq:
            raise CorelmError(f"{model} is an encoder-decoder ({llm.config.family}); use corelm translate --model "
                              f"{model} TEXT (generate and chat need a decoder, e.g. {DEFAULT_MODEL})")
        raise CorelmError(f"{model} is an encoder; generate and chat need a decoder (e.g. {DEFAULT_MODEL})")
    llm.compile = options.compile
    print(f"[loaded {model} ({describe_decoder(llm.model, llm.compile)}) in {time.perf_counter() - t0:.1f} s]",
          file=sys.stderr, flush=True)
    return llm


def describe_decoder(model: Any, compile: bool = False) -> str:
    """What the load line says about the weights and the decode path: ``int4, C++ step``, ``bf16, PyTorch``."""
    from corelm.generate.step import KernelStep, step_for

    spec = getattr(model, "corelm_quantization", None)
    weights = str(next(model.parameters()).dtype).removeprefix("torch.")
    if spec:  # the storage, not the float dtype the layers compute in: int4 / int8, or a GGUF file's own blocks
        weights = spec["method"]
        if weights == "gguf":  # the file's mix by llama.cpp's name (general.file_type) where it has one
            mix = spec.get("file_type")
            weights = f"{mix}, GGUF blocks as stored" if mix else "GGUF blocks as stored"
    path = "C++ step" if isinstance(step_for(model, compile=compile), KernelStep) else (
        "PyTorch, compiled" if compile else "PyTorch")
    return f"{weights}, {path}"


def write_pieces(pieces: Any, out: TextIO | None) -> str:
    """Write text pieces to ``out`` (if given) as they come. Returns the text."""
    text = []
    for piece in pieces:
        if out is not None:
            out.write(piece)
            out.flush()
        text.append(piece)
    return "".join(text)


def print_stream(pieces: Any, stats: dict[str, float]) -> str:
    """Write text pieces to stdout as they come; then :func:`print_stats`. Returns the text."""
    text = write_pieces(pieces, sys.stdout)
    print_stats(stats)
    return text


def print_stats(stats: dict[str, float]) -> None:
    """End the streamed text's line on stdout, and write one stats line to stderr."""
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(format_stats(stats), file=sys.stderr, flush=True)


def format_stats(stats: dict[str, float]) -> str:
    if "acceptance_rate" in stats:  # speculative: one number for the whole run, plus what the drafts earned
        n, seconds = int(stats["new_tokens"]), stats["speculative_s"]
        return (f"[{n} tokens; prompt {int(stats['prompt_tokens'])} tokens; {n / seconds if seconds else 0:.3g} "
                f"tok/s overall; acceptance rate {stats['acceptance_rate']:.0%}; "
                f"{stats['tokens_per_target_call']:.2f} tokens per target pass]")
    if "search_s" in stats:  # beam search: the prompt and every beam's steps in one search
        n, seconds = int(stats["new_tokens"]), stats["search_s"]
        return (f"[{n} tokens; prompt {int(stats['prompt_tokens'])} tokens; beam search, {int(stats['beams'])} "
                f"beams: {n / seconds if seconds else 0:.3g} tok/s overall]")
    n, decode_s = int(stats.get("new_tokens", 0)), stats.get("decode_s", 0.0)
    prompt, prefill_s = int(stats.get("prompt_tokens", 0)), stats.get("prefill_s", 0.0)
    # the first new token comes out of the prefill; the rest are decode steps
    rate = (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0
    prefill_rate = prompt / prefill_s if prefill_s > 0 else 0.0
    return (f"[{n} tokens; prompt {prompt} tokens at {prefill_rate:.3g} tok/s; "
            f"decode {rate:.3g} tok/s]")
