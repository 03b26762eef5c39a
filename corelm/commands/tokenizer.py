"""``corelm tokenizer``: train a new tokenizer on text files, or inspect a model's tokenizer.

Examples::

    corelm tokenizer train --kind bpe --vocab-size 8192 corpus/*.txt --out my_tokenizer/
    corelm tokenizer encode --model smollm2-135m-instruct "Hello 世界"
    corelm tokenizer decode --model smollm2-135m-instruct 19556 28120
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from corelm.commands.args import HelpFormatter, Options, Parser, add_fields, option, options_from
from corelm.errors import CorelmError
from corelm.io.atomic import atomic_dir
from corelm.presets import DEFAULT_MODEL


@dataclass
class TrainTokenizerOptions(Options):
    """``corelm tokenizer train``: what the tokenizer learns from and where it is written."""

    files: list[str] = field(metadata={"help": "UTF-8 text files to learn from", "positional": True})
    out: str = option(help="output directory")
    kind: Literal["bpe", "wordpiece"] = option("bpe", "bpe: GPT-2-style byte-level BPE (any text, no unknown tokens); "
                                                      "wordpiece: BERT-style, lowercased, adds [CLS] ... [SEP]")
    vocab_size: int = option(8192, "target vocabulary size, special tokens included")
    min_frequency: int = option(2, "a merge must occur at least this often")


_MODEL_HELP = "embedded model or preset name, .gguf file, checkpoint directory or tokenizer.json"


@dataclass
class EncodeOptions(Options):
    """``corelm tokenizer encode``: print the token ids (and tokens) of a text."""

    text: str = option(help="the text ('-' reads stdin)", positional=True)
    model: str = option(DEFAULT_MODEL, _MODEL_HELP)
    special: bool = option(False, "add the model's special tokens around the text (e.g. [CLS] ... [SEP])")
    json: bool = option(False, "print only a JSON list of ids")


@dataclass
class DecodeOptions(Options):
    """``corelm tokenizer decode``: print the text of token ids."""

    ids: list[int] = field(metadata={"help": "token ids", "positional": True})
    model: str = option(DEFAULT_MODEL, _MODEL_HELP)

    def check(self) -> None:
        try:
            self.ids = [int(i) for i in self.ids]
        except ValueError:
            raise CorelmError(f"token ids must be integers, got {' '.join(map(str, self.ids))}") from None


SUBCOMMANDS = {"train": TrainTokenizerOptions, "encode": EncodeOptions, "decode": DecodeOptions}


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(
        prog="corelm tokenizer",
        description="Train a byte-level BPE or WordPiece tokenizer on text files, or encode/decode with a model's "
                    "tokenizer.")
    sub = ap.add_subparsers(dest="action", required=True, metavar="{train,encode,decode}")
    add_fields(sub.add_parser("train", help="train a new tokenizer on UTF-8 text files",
                              description="Train a tokenizer and write tokenizer.json + tokenizer_config.json "
                                          "(loadable by corelm and by transformers.AutoTokenizer).",
                              formatter_class=HelpFormatter), TrainTokenizerOptions)
    for name, cls in (("encode", EncodeOptions), ("decode", DecodeOptions)):
        what = cls.__doc__.split(": ", 1)[1].rstrip(".")
        add_fields(sub.add_parser(name, help=what, description=what.capitalize() + ".", formatter_class=HelpFormatter),
                   cls)
    return ap


def tokenizer(options: TrainTokenizerOptions | EncodeOptions | DecodeOptions) -> dict | str:
    """Train (``{"out", "kind", "vocab_size", "text_mb", "seconds"}``), encode (``{"ids", "tokens"}``: a token that
    is part of a multi-byte character is shown as ``<its raw spelling>``) or decode (the text)."""
    if isinstance(options, TrainTokenizerOptions):
        return _train(options)
    from corelm.api import load_tokenizer

    tok = load_tokenizer(options.model)
    if isinstance(options, EncodeOptions):
        text = sys.stdin.read() if options.text == "-" else options.text
        ids = tok.encode(text, add_special_tokens=options.special)
        # a token that is part of a multi-byte character decodes to U+FFFD: show its raw spelling instead
        shown = [tok.decode([i]) if "\ufffd" not in tok.decode([i]) else f"<{tok.id_to_token(i)}>" for i in ids]
        return {"ids": ids, "tokens": shown}
    bad = [i for i in options.ids if not 0 <= i < tok.vocab_size]
    if bad:
        raise CorelmError(f"token id {bad[0]} is outside the vocabulary (0..{tok.vocab_size - 1})")
    return tok.decode(options.ids)


def _train(options: TrainTokenizerOptions) -> dict:
    from corelm.tokenizer import train_tokenizer

    out = Path(options.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CorelmError(f"{out} exists and is not empty; choose another directory")
    t0 = time.perf_counter()
    tok = train_tokenizer(options.files, kind=options.kind, vocab_size=options.vocab_size,
                          min_frequency=options.min_frequency, show_progress=sys.stderr.isatty())
    with atomic_dir(out) as tmp:  # written aside, renamed into place: an interrupted run leaves no half tokenizer
        tok.save(tmp)
    return {"out": out, "kind": options.kind, "vocab_size": tok.vocab_size,
            "text_mb": sum(Path(f).stat().st_size for f in options.files) / 1e6, "seconds": time.perf_counter() - t0}


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    options = options_from(SUBCOMMANDS[args.action], args)
    result = tokenizer(options)
    if isinstance(options, TrainTokenizerOptions):
        print(f"trained {result['kind']} tokenizer: {result['vocab_size']} tokens from {result['text_mb']:.1f} MB of "
              f"text in {result['seconds']:.1f} s -> {result['out']}/")
    elif isinstance(options, EncodeOptions):
        if options.json:
            print(json.dumps(result["ids"]))
            return 0
        print(f"{len(result['ids'])} tokens")
        print("ids:    ", " ".join(map(str, result["ids"])))
        print("tokens: ", " ".join(repr(t) for t in result["tokens"]))
    else:
        print(result)
    return 0
