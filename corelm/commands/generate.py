"""``corelm generate``: continue a prompt with a language model, streaming tokens to stdout.

Examples::

    corelm generate "The three laws of thermodynamics are"
    corelm generate --model path/to/model.gguf --temperature 0.7 --top-p 0.9 --max-new-tokens 64 "Once upon"
    corelm generate --quantize int4 "Once upon"            # packed int4 weights, fused decode path
    corelm generate --lookup 3 "Repeat: a b c d. a b"     # prompt-lookup speculative decoding
    corelm generate --draft smaller/model --draft-k 4 "Once upon"
    corelm generate --json-schema person.json "A baker, as JSON:"   # output valid against the schema
    corelm generate --grammar 'root ::= "yes" | "no"' "Is water wet?"

The raw continuation goes to stdout as it is produced; a stats line (tokens, tokens/s) goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any, Literal, TextIO

from corelm.commands.args import as_options, option, options_from, parser_from
from corelm.commands.decoding import ModelOptions, SamplingOptions, load_llm, print_stats, write_pieces
from corelm.errors import CorelmError

SPECULATIVE = "speculative decoding (batch 1; greedy output equals plain greedy)"


@dataclass
class GenerateOptions(SamplingOptions, ModelOptions):
    """The prompt ``corelm generate`` continues, the model and how tokens are chosen."""

    prompt: str = option(help="the text to continue ('-' reads it from stdin)", positional=True)
    beams: int = option(1, "beam search width (1 = off); beams are deterministic and ignore sampling options")
    quantize: Literal["int8", "int4"] | None = option(
        None, "quantize the weights after loading (int4 from a GGUF reuses its Q4 blocks); a quantized "
              "decoder (llama family, Gemma, OLMo 2, MoE) decodes on the fused fast path")
    draft: str | None = option(None, "a smaller decoder with the same tokenizer proposes tokens the model verifies",
                               metavar="MODEL", section=SPECULATIVE)
    lookup: int | None = option(None, "prompt-lookup decoding: propose the tokens that followed the last N-gram "
                                      "earlier in the text", metavar="N", section=SPECULATIVE)
    draft_k: int = option(4, "tokens proposed per verification step", metavar="K", section=SPECULATIVE)

    @property
    def speculative(self) -> bool:
        """Whether ``draft`` or ``lookup`` proposes tokens."""
        return self.draft is not None or self.lookup is not None

    def check(self) -> None:
        super().check()
        if self.beams < 1:
            raise CorelmError(f"--beams must be at least 1, got {self.beams}")
        if not self.speculative:
            return
        if self.draft is not None and self.lookup is not None:
            raise CorelmError("--draft and --lookup are two ways to propose tokens; give one of them")
        if self.beams > 1:
            raise CorelmError("speculative decoding (--draft/--lookup) does not combine with --beams")
        if self.lookup is not None and self.lookup < 1:
            raise CorelmError(f"--lookup must be at least 1, got {self.lookup}")
        if any(not s for s in self.stop or []):
            raise CorelmError("stop strings must be non-empty strings")
        if self.draft_k < 1:
            raise CorelmError(f"--draft-k must be at least 1, got {self.draft_k}")
        unsupported = [flag for flag, off in (("--top-p", self.top_p == 1.0), ("--top-k", self.top_k == 0),
                                              ("--repetition-penalty", self.repetition_penalty == 1.0)) if not off]
        if unsupported:
            raise CorelmError(f"speculative decoding samples with --temperature only; drop {', '.join(unsupported)}")


def build_parser() -> argparse.ArgumentParser:
    return parser_from(
        GenerateOptions, prog="corelm generate",
        description="Continue a prompt (raw text, no chat template) and stream the continuation to stdout. "
                    "A stats line (tokens, tokens/s) goes to stderr.")


def speculative_pieces(llm: Any, ids: list[int], options: GenerateOptions, stats: dict[str, float]) -> Any:
    """Text pieces of a speculative run (the tokens come in verified bursts); fills ``stats``."""
    import torch

    from corelm.generate.speculative import speculative_generate
    from corelm.generate.text import stream_text

    llm._check_length(ids, options.max_new_tokens)
    constraint = llm.constraint(**options.structure())  # a bad schema fails before the draft loads
    draft = load_llm(options, options.draft).model if options.draft is not None else None
    eos = None if options.ignore_eos else llm.tokenizer.eos_token_id
    generator = torch.Generator().manual_seed(options.seed) if options.seed is not None else None
    t0 = time.perf_counter()
    tokens, spec = speculative_generate(llm.model, ids, options.max_new_tokens, draft=draft, lookup=options.lookup,
                                        k=options.draft_k, temperature=options.temperature, eos_token_id=eos,
                                        generator=generator, constraint=constraint)
    if tokens and tokens[-1] == eos:
        tokens = tokens[:-1]  # like the engine: the end-of-sequence token is not part of the text
    stats.update(prompt_tokens=len(ids), new_tokens=len(tokens), speculative_s=time.perf_counter() - t0,
                 acceptance_rate=spec.acceptance_rate, tokens_per_target_call=spec.tokens_per_target_call)
    return stream_text(llm.tokenizer, iter(tokens), options.stop or [])


def generate(options: GenerateOptions | str, *args: Any, stream: TextIO | None = None,
             stats: dict[str, float] | None = None, **kwargs: Any) -> str:
    """Load the model and continue ``options.prompt``; returns the continuation.

    ``generate("Once upon", max_new_tokens=8)`` is ``generate(GenerateOptions("Once upon", max_new_tokens=8))``.

    Args:
        options: what to continue, with which model and sampling (or the prompt and the other fields).
        stream: where to write the text pieces as they are decoded (the command passes stdout).
        stats: filled with the run's numbers (``prompt_tokens``, ``new_tokens``, ``prefill_s``/``decode_s``,
            or the speculative run's ``acceptance_rate``...), what the command's stderr line reports.
    """
    options = as_options(GenerateOptions, options, args, kwargs)
    stats = {} if stats is None else stats
    prompt = sys.stdin.read() if options.prompt == "-" else options.prompt
    llm = load_llm(options)
    ids = llm.encode_prompt(prompt)
    if options.speculative:
        if llm.tokenizer is None:
            raise CorelmError(f"{options.model} has no tokenizer")
        pieces = speculative_pieces(llm, ids, options, stats)
    else:
        pieces = llm.stream_ids(ids, num_beams=options.beams, stats=stats, **options.sampling_kwargs())
    return write_pieces(pieces, stream)


def main(argv: list[str]) -> int:
    options = options_from(GenerateOptions, build_parser().parse_args(argv))
    stats: dict[str, float] = {}
    generate(options, stream=sys.stdout, stats=stats)
    print_stats(stats)
    return 0
