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
    from corelm.data import tasks
    from corelm.eval.ner import entities
    from corelm.finetune.run import forward_items, tags_from_logits
    from corelm.loading import is_run, load_run

    if args.top < 1:
        raise CorelmError(f"--top must be at least 1, got {args.top}")
    texts = [line.rstrip("\n") for line in sys.stdin if line.strip()] if args.texts == ["-"] else args.texts
    if not texts:
        raise CorelmError("no text given")
    if not is_run(args.model):
        raise CorelmError(f"{args.model} is not a fine-tuning run directory (corelm finetune --out DIR)")
    run = load_run(args.model, dtype=args.dtype)
    task, max_len = run.task["task"], run.task["max_len"]
    if task == "classify":
        encoded = [{"input_ids": tasks.encode_text(run.tokenizer, t, max_len)} for t in texts]
        probs = [x.softmax(-1) for x in forward_items(run.model, encoded, run.pad_id)]
        for text, p in zip(texts, probs):
            top = sorted(zip(run.labels, p.tolist()), key=lambda x: -x[1])[:args.top]
            if args.json:
                print(json.dumps({"text": text, "label": top[0][0], "probabilities": dict(top)}, ensure_ascii=False))
            else:
                print(f"{top[0][0]}\t" + "  ".join(f"{label}={prob:.3f}" for label, prob in top) + f"\t{text}")
    elif task == "ner":
        words = [t.split() for t in texts]
        encoded = [tasks.encode_words(run.tokenizer, w, max_len) for w in words]
        tags = tags_from_logits(forward_items(run.model, encoded, run.pad_id), encoded, [len(w) for w in words],
                                run.labels)
        for ws, ts in zip(words, tags):
            spans = [(kind, " ".join(ws[a:b + 1])) for _, kind, a, b in entities(ts)]
            if args.json:
                print(json.dumps({"tokens": ws, "tags": ts, "entities": [{"type": k, "text": t} for k, t in spans]},
                                 ensure_ascii=False))
            else:
                print(" ".join(f"{w}/{t}" for w, t in zip(ws, ts)))
                print("  entities: " + (", ".join(f"{t} [{k}]" for k, t in spans) or "none"))
    else:
        raise CorelmError(f"{args.model} is an {task} run; use corelm generate/chat --model for language models "
                          "(after corelm merge for LoRA runs)")
    return 0
