"""``corelm translate``: translate (or summarize) text with an encoder-decoder, by beam search.

Examples::

    corelm translate --model runs/en-de "Central African Republic"       # a translate run (full or LoRA)
    corelm translate --model ./opus-mt-en-de --num-beams 6 "Good morning." "How are you?"
    echo "one text per line" | corelm translate --model runs/en-de --json -

The model is any encoder-decoder ``corelm.load`` reads (T5, BART, mBART, Marian directories with a
tokenizer.json, or a ``corelm finetune --task translate|summarize`` run). Decoding settings a checkpoint ships in
``generation_config.json`` apply unless an option overrides them.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from corelm.commands.args import Options, as_options, option, options_from, parser_from
from corelm.errors import CorelmError


@dataclass
class TranslateOptions(Options):
    """What ``corelm translate`` reads, and how it decodes."""

    model: str = option(help="an encoder-decoder: a T5/BART/mBART/Marian directory or a translate/summarize run")
    texts: list[str] = field(metadata={"help": "texts to translate; '-' reads one text per line from stdin",
                                       "positional": True})
    num_beams: int | None = option(None, "beam width, 1 = greedy (default: the checkpoint's generation_config.json, "
                                         "else 4)")
    max_new_tokens: int | None = option(None, "tokens generated per text at most (default: the checkpoint's, else "
                                              "64 or the model's target length if shorter)")
    length_penalty: float | None = option(None, "beam search: a finished hypothesis scores sum(log p) / "
                                                "length ** length_penalty (default: the checkpoint's, else 1.0)")
    batch_size: int = option(32, "texts decoded together")
    dtype: str = option("fp32", "weight dtype", dtype=True)
    json: bool = option(False, "one JSON object per text ({source, translation}) instead of one line each")

    def check(self) -> None:
        for name in ("num_beams", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise CorelmError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def build_parser() -> argparse.ArgumentParser:
    return parser_from(TranslateOptions, prog="corelm translate",
                       description="Translate (or summarize) text with an encoder-decoder model by beam search.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])


def translate(options: TranslateOptions | str, *values: Any, **named: Any) -> list[str]:
    """One output per text of ``options.texts`` ('-': the lines of stdin). ``translate(model, texts, ...)`` is
    ``translate(TranslateOptions(...))``."""
    import corelm
    from corelm.generate.seq2seq import Seq2Seq, decoding_overrides

    options = as_options(TranslateOptions, options, values, named)
    texts = ([line.rstrip("\n") for line in sys.stdin if line.strip()] if options.texts == ["-"]
             else list(options.texts))
    if not texts:
        raise CorelmError("no text given")
    s2s = corelm.load(options.model, dtype=options.dtype)
    if not isinstance(s2s, Seq2Seq):
        raise CorelmError(f"{options.model} is a {s2s.config.family} model, not an encoder-decoder; "
                          "use corelm generate or chat")
    overrides = decoding_overrides(s2s, options.num_beams, options.max_new_tokens, options.length_penalty)
    return s2s.translate(texts, batch_size=options.batch_size, **overrides)


def main(argv: list[str]) -> int:
    args = options_from(TranslateOptions, build_parser().parse_args(argv))
    texts = args.texts
    if texts == ["-"]:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
        args.texts = texts
    for text, out in zip(texts, translate(args)):
        print(json.dumps({"source": text, "translation": out}, ensure_ascii=False) if args.json else out)
    return 0
