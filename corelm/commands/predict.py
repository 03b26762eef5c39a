"""``corelm predict``: run a fine-tuned classifier or tagger on text.

Examples::

    corelm predict --model runs/cls "this product is great"            # label + probabilities
    corelm predict --model runs/ner "Grace Hopper visited Paris ."      # tags and entities
    echo "one text per line" | corelm predict --model runs/cls -
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field

from corelm.commands.args import Options, option, options_from, parser_from, set_threads, threads_option
from corelm.errors import CorelmError


@dataclass
class PredictOptions(Options):
    """What ``corelm predict`` labels, and how."""

    model: str = option(help="a classify or ner run directory written by corelm finetune")
    texts: list[str] = field(metadata={"help": "texts to label; '-' reads one text per line from stdin",
                                       "positional": True})
    top: int = option(5, "classify: how many labels to show with probabilities")
    json: bool = option(False, "one JSON object per text instead of readable lines")
    dtype: str = option("fp32", "weight dtype", dtype=True)
    threads: int | None = threads_option()

    def check(self) -> None:
        if self.top < 1:
            raise CorelmError(f"--top must be at least 1, got {self.top}")


def build_parser() -> argparse.ArgumentParser:
    return parser_from(PredictOptions, prog="corelm predict",
                       description="Run a fine-tuned classifier or tagger on text.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])


def predict(options: PredictOptions) -> list[dict]:
    """One result per text of ``options.texts`` ('-': the lines of stdin): ``label`` and ``probabilities`` for a
    classifier, ``tokens``, ``tags`` and ``entities`` for a tagger."""
    from corelm.finetune.run import predict as run_predict
    from corelm.loading import is_run, load_run

    set_threads(options.threads)
    texts = ([line.rstrip("\n") for line in sys.stdin if line.strip()] if options.texts == ["-"]
             else list(options.texts))
    if not texts:
        raise CorelmError("no text given")
    if not is_run(options.model):
        raise CorelmError(f"{options.model} is not a fine-tuning run directory (corelm finetune --out DIR)")
    return list(run_predict(load_run(options.model, dtype=options.dtype), texts, top=options.top))


def main(argv: list[str]) -> int:
    args = options_from(PredictOptions, build_parser().parse_args(argv))
    for item in predict(args):
        if args.json:
            print(json.dumps(item, ensure_ascii=False))
        elif "value" in item:  # regression
            print(f"{item['value']:.6g}\t{item['text']}")
        elif "label" in item:
            print(f"{item['label']}\t" + "  ".join(f"{label}={p:.3f}" for label, p in item["probabilities"].items())
                  + f"\t{item['text']}")
        else:
            print(" ".join(f"{w}/{t}" for w, t in zip(item["tokens"], item["tags"])))
            print("  entities: " + (", ".join(f"{e['text']} [{e['type']}]" for e in item["entities"]) or "none"))
    return 0
