"""``corelm prepare``: tokenize a corpus into memory-mapped token shards plus a manifest.

Examples::

    corelm prepare --corpus python-docs --out data/pydocs
    corelm prepare --tokenizer smollm2-135m-instruct data/*.txt corpus.jsonl --out data/tok
    corelm prepare --field content --val-fraction 0.02 dump.parquet --out data/dump
    corelm prepare --corpus cldr:en-de --out data/en-de        # a parallel corpus for finetune --task translate
    corelm prepare --corpus numbers:en-fr --out data/num-en-fr # number spellings (num2words), likewise
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from corelm.commands.args import Options, option, options_from, parser_from
from corelm.data.corpus import CORPORA
from corelm.data.prepare import prepare as prepare_data
from corelm.errors import CorelmError


@dataclass
class PrepareOptions(Options):
    """What ``corelm prepare`` tokenizes, and where it writes the shards."""

    out: str = option(help="output directory (created atomically)")
    inputs: list[str] = dataclasses.field(default_factory=list, metadata={
        "help": "text files (.txt/.md/...), .jsonl, .parquet, or folders of them", "positional": True})
    corpus: str | None = option(None, "embedded corpus: python-docs = docstrings of this Python's standard library "
                                      "(no download); cldr:<src>-<tgt> (e.g. cldr:en-de) = a parallel corpus of "
                                      "CLDR display names from the babel package, written as train/val/test JSONL "
                                      "pairs for finetune --task translate (corelm.data.parallel), not as shards; "
                                      "numbers:<src>-<tgt> (e.g. numbers:en-fr) = the same for numbers spelled out "
                                      "by the num2words package (20,000/300/500 distinct numbers below a million)",
                                metavar="|".join((*CORPORA, "cldr:SRC-TGT", "numbers:SRC-TGT")))
    tokenizer: str | None = option(None, "embedded model name (e.g. smollm2-135m-instruct), model directory or "
                                         "tokenizer.json; default: train a byte-level BPE on the corpus")
    train_tokenizer: int = option(8192, "vocabulary size of the BPE trained when --tokenizer is not given",
                                  metavar="VOCAB")
    field: str = option("text", "JSONL key / Parquet column that holds the text")
    val_fraction: float = option(0.01, "share of documents held out for validation")
    shard_tokens: int = option(100_000_000, "tokens per shard file")
    overwrite: bool = option(False, "replace an existing prepared directory")
    progress: bool = option(True, "the progress bar")


def build_parser() -> argparse.ArgumentParser:
    return parser_from(
        PrepareOptions, prog="corelm prepare",
        description="Tokenize text files, folders, JSONL or Parquet (or an embedded corpus), join documents "
                    "with EOS, and pack them into memory-mapped train/val token shards with a manifest.json "
                    "that `corelm pretrain --data` reads (tokenizer and vocabulary included).")


def prepare(options: PrepareOptions) -> dict:
    """Write the shards and ``manifest.json`` into ``options.out``; returns the manifest. ``--corpus cldr:<pair>``
    and ``--corpus numbers:<pair>`` write a parallel corpus instead and return its ``corpus.json``."""
    if options.corpus and options.corpus.startswith("cldr:"):
        from corelm.data.parallel import build_cldr

        if options.inputs:
            raise CorelmError("--corpus cldr:<pair> builds its corpus from CLDR alone; give no input files")
        return build_cldr(options.out, options.corpus.removeprefix("cldr:"), overwrite=options.overwrite)
    if options.corpus and options.corpus.startswith("numbers:"):
        from corelm.data.parallel import build_numbers

        if options.inputs:
            raise CorelmError("--corpus numbers:<pair> builds its corpus from num2words alone; give no input files")
        return build_numbers(options.out, options.corpus.removeprefix("numbers:"), overwrite=options.overwrite)
    return prepare_data(options.out, inputs=options.inputs, corpus=options.corpus, tokenizer=options.tokenizer,
                        train_tokenizer_vocab=options.train_tokenizer, field=options.field,
                        val_fraction=options.val_fraction, shard_tokens=options.shard_tokens,
                        progress=options.progress, overwrite=options.overwrite)


def main(argv: list[str]) -> int:
    args = options_from(PrepareOptions, build_parser().parse_args(argv))
    m = prepare(args)
    if "pairs" in m:  # a parallel corpus
        counts = ", ".join(f"{k} {v:,}" for k, v in m["pairs"].items())
        source = (f"CLDR {m['cldr']} (babel {m['babel']})" if "cldr" in m
                  else f"num2words {m['num2words']}, seed {m['seed']}")
        print(f"wrote {args.out}: {m['corpus']} pairs ({counts}) from {source}, and "
              "text.txt (both sides of train) for a tokenizer")
        return 0
    tr, va = m["splits"]["train"], m["splits"]["val"]
    print(f"wrote {args.out}: train {tr['tokens']:,} tokens ({tr['documents']:,} documents, {len(tr['shards'])} shard"
          f"{'s' if len(tr['shards']) != 1 else ''}), val {va['tokens']:,} tokens ({va['documents']:,} documents); "
          f"vocab {m['vocab_size']:,} ({m['dtype']}), tokenizer: {m['tokenizer_source']}, {m['seconds']} s")
    return 0
