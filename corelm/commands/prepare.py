"""``corelm prepare``: tokenize a corpus into memory-mapped token shards plus a manifest.

Examples::

    corelm prepare --corpus python-docs --out data/pydocs
    corelm prepare --tokenizer smollm2-135m-instruct data/*.txt corpus.jsonl --out data/tok
    corelm prepare --field content --val-fraction 0.02 dump.parquet --out data/dump
"""

from __future__ import annotations

import argparse

from corelm.commands.args import HelpFormatter, Parser
from corelm.data.corpus import CORPORA
from corelm.data.prepare import prepare


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(
        prog="corelm prepare",
        description="Tokenize text files, folders, JSONL or Parquet (or an embedded corpus), join documents "
                    "with EOS, and pack them into memory-mapped train/val token shards with a manifest.json "
                    "that `corelm pretrain --data` reads (tokenizer and vocabulary included).",
        formatter_class=HelpFormatter)
    ap.add_argument("inputs", nargs="*", help="text files (.txt/.md/...), .jsonl, .parquet, or folders of them")
    ap.add_argument("--out", required=True, help="output directory (created atomically)")
    ap.add_argument("--corpus", choices=CORPORA, default=None,
                    help="embedded corpus: python-docs = docstrings of this Python's standard library (no download)")
    ap.add_argument("--tokenizer", default=None,
                    help="embedded model name (e.g. smollm2-135m-instruct), model directory or tokenizer.json; "
                         "default: train a byte-level BPE on the corpus")
    ap.add_argument("--train-tokenizer", type=int, default=8192, metavar="VOCAB",
                    help="vocabulary size of the BPE trained when --tokenizer is not given")
    ap.add_argument("--field", default="text", help="JSONL key / Parquet column that holds the text")
    ap.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out for validation")
    ap.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing prepared directory")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    m = prepare(args.out, inputs=args.inputs, corpus=args.corpus, tokenizer=args.tokenizer,
                train_tokenizer_vocab=args.train_tokenizer, field=args.field, val_fraction=args.val_fraction,
                shard_tokens=args.shard_tokens, progress=not args.no_progress, overwrite=args.overwrite)
    tr, va = m["splits"]["train"], m["splits"]["val"]
    print(f"wrote {args.out}: train {tr['tokens']:,} tokens ({tr['documents']:,} documents, {len(tr['shards'])} shard"
          f"{'s' if len(tr['shards']) != 1 else ''}), val {va['tokens']:,} tokens ({va['documents']:,} documents); "
          f"vocab {m['vocab_size']:,} ({m['dtype']}), tokenizer: {m['tokenizer_source']}, {m['seconds']} s")
    return 0
