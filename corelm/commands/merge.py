"""``corelm merge``: fold a LoRA/AdaLoRA run's low-rank updates into the base weights.

Example::

    corelm merge runs/sft --out runs/sft-merged     # then: corelm generate --model runs/sft-merged

The output is a normal model directory (config.json, model.safetensors, tokenizer) and, for classify/ner
runs, still a run (head.safetensors + corelm_task.json with method ``full``). Before saving, the merged
model's outputs are compared with the unmerged ones on a probe input and the difference is printed.
Bottleneck adapters are nonlinear and cannot be folded; they are refused.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from corelm.commands.args import Options, option, options_from, parser_from, set_threads, threads_option
from corelm.errors import CorelmError
from corelm.io.atomic import atomic_dir


@dataclass
class MergeOptions(Options):
    """Which run ``corelm merge`` folds, and where the merged model goes."""

    run: str = option(help="run directory written by corelm finetune (method lora, adalora or head)", positional=True)
    out: str = option(help="directory for the merged model (must not exist or be empty)")
    dtype: str = option("fp32", "dtype of the saved weights", dtype={"auto": False})
    threads: int | None = threads_option()


def build_parser() -> argparse.ArgumentParser:
    return parser_from(MergeOptions, prog="corelm merge", description=__doc__.split("\n\n")[0].strip("`"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)


def merge(options: MergeOptions, report: Callable[[str], None] = print) -> dict:
    """Fold the run's low-rank updates into its base weights and write ``options.out``.

    Returns ``{"out", "method", "max_difference", "output_scale"}``: the largest change of the model's outputs
    on a probe input, which ``report`` is told before the files are written.
    """
    from corelm.finetune.lora import merge_lora
    from corelm.finetune.methods import HEAD_FILE, TASK_FILE, backbone_of
    from corelm.io.hf import save_hf_dir
    from corelm.loading import is_run, load_run

    set_threads(options.threads)
    if not is_run(options.run):
        raise CorelmError(f"{options.run} is not a fine-tuning run directory (no {TASK_FILE})")
    out = Path(options.out)
    if out.exists() and any(out.iterdir()):
        raise CorelmError(f"{out} exists and is not empty")
    run = load_run(options.run)
    method = run.task["method"]
    if method == "adapter":
        raise CorelmError("bottleneck adapters are nonlinear (h + up(gelu(down(h)))) and cannot be folded into the "
                          "base weights; use the run directory as it is")
    if method == "full":
        raise CorelmError(f"{options.run} is a full fine-tune: it already is a complete model directory")
    backbone = backbone_of(run.model)
    probe = torch.randint(0, run.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    # an encoder-decoder reads the probe as its source and half of it as the target so far
    inputs = (probe, probe[:, :8]) if run.config.is_seq2seq else (probe,)
    with torch.no_grad():
        before = run.model(*inputs).float()
        merge_lora(backbone)
        after = run.model(*inputs).float()
    diff = float((before - after).abs().max())
    scale = float(before.abs().max())
    report(f"merged {method}: max |output difference| on a probe input = {diff:.3g} (outputs up to {scale:.3g})")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[options.dtype]
    run.model.to(dtype)
    # write next to the target and rename at the end: an interrupted merge leaves nothing half-written
    with atomic_dir(out) as tmp:
        save_hf_dir(backbone, run.config, tmp, run.tokenizer)
        if backbone is not run.model:
            shutil.copy2(Path(options.run) / HEAD_FILE, tmp / HEAD_FILE)
            task = {**run.task, "method": "full", "base": ".", "merged_from": str(Path(options.run).resolve()),
                    "merged_method": method}
            (tmp / TASK_FILE).write_text(json.dumps(task, indent=2) + "\n")
    return {"out": out, "method": method, "max_difference": diff, "output_scale": scale}


def main(argv: list[str]) -> int:
    result = merge(options_from(MergeOptions, build_parser().parse_args(argv)))
    print(f"wrote {result['out']}")
    return 0
