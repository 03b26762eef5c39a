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
from pathlib import Path

from corelm.commands.args import HelpFormatter, Parser
from corelm.errors import CorelmError
from corelm.io.atomic import atomic_dir
from corelm.presets import DEFAULT_MODEL


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(
        prog="corelm tokenizer",
        description="Train a byte-level BPE or WordPiece tokenizer on text files, or encode/decode with a model's "
                    "tokenizer.")
    sub = ap.add_subparsers(dest="action", required=True, metavar="{train,encode,decode}")

    train = sub.add_parser("train", help="train a new tokenizer on UTF-8 text files",
                           description="Train a tokenizer and write tokenizer.json + tokenizer_config.json "
                                       "(loadable by corelm and by transformers.AutoTokenizer).",
                           formatter_class=HelpFormatter)
    train.add_argument("files", nargs="+", help="UTF-8 text files to learn from")
    train.add_argument("--kind", choices=["bpe", "wordpiece"], default="bpe",
                       help="bpe: GPT-2-style byte-level BPE (any text, no unknown tokens); "
                            "wordpiece: BERT-style, lowercased, adds [CLS] ... [SEP]")
    train.add_argument("--vocab-size", type=int, default=8192, help="target vocabulary size, special tokens included")
    train.add_argument("--min-frequency", type=int, default=2, help="a merge must occur at least this often")
    train.add_argument("--out", required=True, help="output directory")

    for name, helptext in (("encode", "print the token ids (and tokens) of a text"),
                           ("decode", "print the text of token ids")):
        p = sub.add_parser(name, help=helptext, description=helptext.capitalize() + ".")
        p.add_argument("--model", default=DEFAULT_MODEL,
                       help="embedded model or preset name, .gguf file, checkpoint directory or tokenizer.json")
        if name == "encode":
            p.add_argument("text", help="the text ('-' reads stdin)")
            p.add_argument("--special", action="store_true",
                           help="add the model's special tokens around the text (e.g. [CLS] ... [SEP])")
            p.add_argument("--json", action="store_true", help="print only a JSON list of ids")
        else:
            p.add_argument("ids", nargs="+", help="token ids")
    return ap


def _train(args: argparse.Namespace) -> int:
    from corelm.tokenizer import train_tokenizer

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CorelmError(f"{out} exists and is not empty; choose another directory")
    t0 = time.perf_counter()
    tok = train_tokenizer(args.files, kind=args.kind, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                          show_progress=sys.stderr.isatty())
    with atomic_dir(out) as tmp:  # written aside, renamed into place: an interrupted run leaves no half tokenizer
        tok.save(tmp)
    size = sum(Path(f).stat().st_size for f in args.files) / 1e6
    print(f"trained {args.kind} tokenizer: {tok.vocab_size} tokens from {size:.1f} MB of text in "
          f"{time.perf_counter() - t0:.1f} s -> {out}/")
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.action == "train":
        return _train(args)
    from corelm.api import load_tokenizer

    tok = load_tokenizer(args.model)
    if args.action == "encode":
        text = sys.stdin.read() if args.text == "-" else args.text
        ids = tok.encode(text, add_special_tokens=args.special)
        if args.json:
            print(json.dumps(ids))
            return 0
        print(f"{len(ids)} tokens")
        print("ids:    ", " ".join(map(str, ids)))
        # a token that is part of a multi-byte character decodes to U+FFFD: show its raw spelling instead
        shown = [tok.decode([i]) if "\ufffd" not in tok.decode([i]) else f"<{tok.id_to_token(i)}>" for i in ids]
        print("tokens: ", " ".join(repr(t) for t in shown))
        return 0
    try:
        ids = [int(i) for i in args.ids]
    except ValueError:
        raise CorelmError(f"token ids must be integers, got {' '.join(args.ids)}") from None
    bad = [i for i in ids if not 0 <= i < tok.vocab_size]
    if bad:
        raise CorelmError(f"token id {bad[0]} is outside the vocabulary (0..{tok.vocab_size - 1})")
    print(tok.decode(ids))
    return 0
