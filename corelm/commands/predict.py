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

from corelm.commands.args import Parser, add_dtype
from corelm.errors import CorelmError


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="corelm predict", description="Run a fine-tuned classifier or tagger on text.",
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    ap.add_argument("--model", required=True, help="a classify or ner run directory written by corelm finetune")
    ap.add_argument("texts", nargs="+", help="texts to label; '-' reads one text per line from stdin")
    ap.add_argument("--top", type=int, default=5, help="classify: how many labels to show with probabilities")
    ap.add_argument("--json", action="store_true", help="one JSON object per text instead of readable lines")
    add_dtype(ap, "fp32", "weight dtype")
    return ap


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from corelm.finetune.run import predict
    from corelm.loading import is_run, load_run

    if args.top < 1:
        raise CorelmError(f"--top must be at least 1, got {args.top}")
    texts = [line.rstrip("\n") for line in sys.stdin if line.strip()] if args.texts == ["-"] else args.texts
    if not texts:
        raise CorelmError("no text given")
    if not is_run(args.model):
        raise CorelmError(f"{args.model} is not a fine-tuning run directory (corelm finetune --out DIR)")
    for item in predict(load_run(args.model, dtype=args.dtype), texts, top=args.top):
        if args.json:
            print(json.dumps(item, ensure_ascii=False))
        elif "label" in item:
            print(f"{item['label']}\t" + "  ".join(f"{label}={p:.3f}" for label, p in item["probabilities"].items())
                  + f"\t{item['text']}")
        else:
            print(" ".join(f"{w}/{t}" for w, t in zip(item["tokens"], item["tags"])))
            print("  entities: " + (", ".join(f"{e['text']} [{e['type']}]" for e in item["entities"]) or "none"))
    return 0
