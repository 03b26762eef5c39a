"""``corelm finetune``: classification, NER and instruction tuning with full / head / LoRA / AdaLoRA / adapters.

Examples::

    corelm finetune --model minilm-l6 --task classify --data reviews.csv --text-field text --label-field label \\
        --method lora --out runs/cls
    corelm finetune --model minilm-l6 --task ner --data train.conll --val dev.conll --method full --out runs/ner
    corelm finetune --model smollm2-135m-instruct --task sft --data chats.jsonl --method lora --out runs/sft
    corelm finetune --model minilm-l6 --task classify --data demo:packages --method adalora --target-rank 8 --out r
    corelm finetune --model minilm-l6 --task ner --data demo:ner --method adapter --adapter-size 64 --out runs/a

Every option comes from :class:`corelm.finetune.run.FinetuneArgs`, whose field comments are the help text.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re

from corelm.commands.args import Parser
from corelm.finetune.run import METHODS, FinetuneArgs
from corelm.finetune.tasks import TASKS
from corelm.train.precision import POLICIES

_CHOICES = {"task": tuple(TASKS), "method": METHODS, "pooling": ("cls", "pooled", "mean", "last"),
            "precision": POLICIES, "scheme": ("iob2", "bio", "iob1")}


def field_help(cls: type) -> dict[str, str]:
    """``{field: comment}`` from the dataclass source: the declaration's comment is the documentation."""
    helps = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=#]+(?:= [^#]+)?#\s*(.*)$", line)
        if m:
            helps[m.group(1)] = m.group(2).strip().replace("%", "%%")  # argparse formats help with %
    return helps


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(
        prog="corelm finetune",
        description="Fine-tune a model on a task through corelm's one training loop. Data files may be "
                    "demo:<set>[:<split>] (packages, ner, chat, summaries: built from the Python standard "
                    "library, see corelm/data/demo.py). The run directory holds corelm_task.json, the head "
                    "and adapter weights (or the whole model for --method full) and checkpoints/.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = field_help(FinetuneArgs)
    for f in dataclasses.fields(FinetuneArgs):
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING
        if f.type in ("bool", bool):
            if f.default:
                ap.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                help=f"turn off: {helps.get(f.name, '')}")
            else:
                ap.add_argument(flag, action="store_true", help=helps.get(f.name))
            continue
        kind = float if "float" in str(f.type) else int if "int" in str(f.type) else str
        text = helps.get(f.name, "")
        if not required and f.default is not None:
            text += f" (default: {f.default})"
        ap.add_argument(flag, type=kind, required=required, choices=_CHOICES.get(f.name),
                        default=None if required else f.default, help=text)
    ap.add_argument("--json", action="store_true", help="print the final summary as one JSON object")
    return ap


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    as_json = args.json
    del args.json
    if args.scheme == "bio":
        args.scheme = "iob2"
    from corelm.finetune.run import finetune

    summary = finetune(FinetuneArgs(**vars(args)))
    status = 130 if summary.get("stopped") == "interrupted" else 0  # 130: like every command stopped by a signal
    if as_json:
        print(json.dumps(summary))
        return status
    done = "interrupted; checkpoint of the run in" if status else "run written to"
    print(f"{done} {args.out} ({summary['steps']} steps)")
    # each validation metric of the task (val_loss, val_acc, val_f1, ...) before and after training
    metrics = [k for k in summary if k.startswith("val_") and not k.endswith("_before") and k != "val_ppl"]
    for key in ["train_loss", *(name for k in metrics for name in (f"{k}_before", k)), "total_rank"]:
        if summary.get(key) is not None:
            print(f"  {key:<16} {summary[key]:.4f}" if isinstance(summary[key], float) else
                  f"  {key:<16} {summary[key]}")
    if "ranks" in summary:
        print("  AdaLoRA ranks per matrix: " + " ".join(str(r) for r in summary["ranks"].values()))
    return status
