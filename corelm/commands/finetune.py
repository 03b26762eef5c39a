"""``corelm finetune``: classification, NER, instruction tuning, translation and summarization with full / head /
LoRA / AdaLoRA / adapters.

Examples::

    corelm finetune --model minilm-l6 --task classify --data reviews.csv --text-field text --label-field label \\
        --method lora --out runs/cls
    corelm finetune --model minilm-l6 --task ner --data train.conll --val dev.conll --method full --out runs/ner
    corelm finetune --model smollm2-135m-instruct --task sft --data chats.jsonl --method lora --out runs/sft
    corelm finetune --model minilm-l6 --task classify --data demo:packages --method adalora --target-rank 8 --out r
    corelm finetune --model minilm-l6 --task ner --data demo:ner --method adapter --adapter-size 64 --out runs/a
    corelm finetune --model t5-tiny.json --tokenizer data/en-de/tok --task translate --data data/en-de/train.jsonl \
        --method full --out runs/en-de                       # an encoder-decoder from scratch (docs/translation.md)

Every option is a field of :class:`corelm.finetune.run.FinetuneOptions` (``FinetuneArgs``), documented where it
is declared; ``corelm finetune ...`` is ``finetune(FinetuneOptions(...))``.
"""

from __future__ import annotations

import argparse
import json

from corelm.commands.args import options_from, parser_from
from corelm.finetune.run import FinetuneArgs, FinetuneOptions, finetune

__all__ = ["FinetuneArgs", "FinetuneOptions", "build_parser", "finetune", "main"]


def build_parser() -> argparse.ArgumentParser:
    return parser_from(
        FinetuneOptions, prog="corelm finetune",
        description="Fine-tune a model on a task through corelm's one training loop. Data files may be "
                    "demo:<set>[:<split>] (packages, ner, chat, summaries: built from the Python standard "
                    "library, see corelm/data/demo.py). The run directory holds corelm_task.json, the head "
                    "and adapter weights (or the whole model for --method full) and checkpoints/.")


def main(argv: list[str]) -> int:
    args = options_from(FinetuneOptions, build_parser().parse_args(argv))
    summary = finetune(args)
    status = 130 if summary.get("stopped") == "interrupted" else 0  # 130: like every command stopped by a signal
    if args.json:
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
