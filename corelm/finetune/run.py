"""Fine-tuning runs: set up a task and a method, train with THE loop (``corelm.train.train``), load back.

Fine-tuning differs from pretraining only in setup, so this module is setup and nothing else:

1. **model**: the base model (``corelm.load``) under a task head -- :class:`SequenceClassifier` for
   ``classify``, :class:`TokenClassifier` for ``ner``, the LM itself for ``sft``;
2. **method** (what trains): ``full`` (everything), ``head`` (only the head), ``lora``, ``adalora`` or
   ``adapter`` (a transform of the backbone that freezes it and adds a few trainable parameters);
3. **task** (:mod:`corelm.finetune.tasks`, one object per ``--task``): reading and encoding the data, the
   loss (cross-entropy over labels, entity tags or assistant tokens), validation metrics and predictions;
   batched by the loop's resumable loader, plus AdaLoRA's regularizer on the loss.

A run directory holds ``corelm_task.json`` (task, method, base model, labels, method settings), the
head's weights ``head.safetensors``, and either the whole fine-tuned model (``full``: ``config.json`` +
``model.safetensors`` + tokenizer, a normal corelm model dir) or only ``adapter.safetensors`` with the
LoRA/AdaLoRA/adapter weights over the base model named in ``corelm_task.json``. :func:`load_run` reads it
back for ``evaluate``, ``predict`` and ``merge``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from corelm.commands.args import TRACKER_HELP, Options, option, resolve_trackers, set_threads, threads_option
from corelm.data import tasks
from corelm.errors import CorelmError
from corelm.finetune.adalora import RankAllocator
from corelm.finetune.heads import head_state_dict
from corelm.finetune.methods import (
    ADAPTER_FILE,
    HEAD_FILE,
    METHODS,
    TASK_FILE,
    apply_method,
    backbone_of,
    build_task_model,
    pad_token_id,
)
from corelm.finetune.tasks import (  # noqa: F401 - forward_items, sft_loss, tags_from_logits: public here too
    TASKS,
    DataOptions,
    Task,
    forward_items,
    get_task,
    sft_loss,
    tags_from_logits,
)
from corelm.loading import fresh_model, load_parts

# Learning rates that work for each method at these model sizes (LoRA paper table 9: 2e-4..5e-4;
# BERT fine-tuning: 2e-5..5e-5; a linear probe or a fresh head tolerates 1e-3 and more).
DEFAULT_LR = {"full": 5e-5, "head": 2e-3, "lora": 5e-4, "adalora": 5e-4, "adapter": 1e-3}


@dataclass
class FinetuneArgs(Options):
    """What a fine-tuning run does. Each field's ``help`` is its ``--help`` text (``corelm finetune`` is
    :func:`finetune` over these fields; ``FinetuneOptions`` is the same class under the commands' naming)."""

    model: str = option(help="base model: embedded name, preset or path (with --tokenizer: a preset or config file)")
    task: str = option(help="what the head learns and how the data is read, scored and predicted "
                            "(corelm.finetune.tasks)", choices=tuple(TASKS))
    data: str = option(help="training file (CSV/JSONL, CoNLL or chat JSONL) or demo:<set>")
    out: str = option(help="run directory to write")
    tokenizer: str | None = option(None, "train from scratch: --model is a preset or config file whose random "
                                         "initial weights get this tokenizer's vocabulary (tokenizer.json or its "
                                         "directory, e.g. from corelm tokenizer train)")
    val: str | None = option(None, "validation file (default: 10% of --data held out)")
    method: str = option("lora", "what trains: everything (full), the head only, or LoRA / AdaLoRA / adapter "
                                 "weights over the frozen backbone", choices=METHODS)
    text_field: str = option("text", "classification: column/field with the text")
    label_field: str = option("label", "classification: column/field with the label")
    targets: str | None = option(None, "LoRA/AdaLoRA: linear layers to adapt, by name, separated by commas; "
                                       "attention and mlp name the family's layers (mlp of a MoE includes its "
                                       "experts), all-linear every block linear (a MoE's experts too, not its routers) "
                                       "(default: attention)")
    rank: int = option(8, "LoRA rank r")
    alpha: float = option(16.0, "LoRA/AdaLoRA scale numerator (update is scaled by alpha / r)")
    dropout: float = option(0.0, "LoRA dropout on the low-rank branch")
    init_rank: int = option(12, "AdaLoRA: initial rank of every matrix")
    target_rank: int = option(4, "AdaLoRA: final average rank (budget = target_rank x matrices)")
    adapter_size: int = option(64, "adapter bottleneck width")
    pooling: str | None = option(None, "classification pooling (default: mean for encoders, last for decoders)",
                                 choices=("cls", "pooled", "mean", "last"))
    max_len: int = option(128, "tokens per example (longer ones are truncated)")
    batch_size: int = option(16, "examples per optimizer step")
    epochs: float = option(3.0, "passes over the training data (ignored when --steps is given)")
    steps: int | None = option(None, "optimizer steps (overrides --epochs)")
    lr: float | None = option(None, "peak learning rate (default depends on --method)")
    warmup_steps: int | None = option(None, "linear warmup (default: 6% of the steps)")
    weight_decay: float = option(0.01, "AdamW decoupled weight decay")
    precision: str = option("fp32", "precision policy of the training loop (fp16-mixed: with loss scaling)",
                            precision=True)
    scheme: str = option("iob2", "NER tags in the files: iob2 (= bio) or iob1", choices=("iob2", "bio", "iob1"))
    skip_bad: bool = option(False, "skip malformed rows (and report how many) instead of stopping")
    seed: int = option(0, "seed of data order, head init and dropout")
    resume: bool = option(False, "continue the run in --out from its last checkpoint")
    save_every: int = option(0, "checkpoint every N steps (0: at the end only)")
    eval_every: int = option(0, "evaluate on the validation set every N steps (0: before and after training only)")
    progress: bool = option(True, "progress bars")
    wandb: str | None = option(None, "also log to this Weights & Biases project (optional wandb package)")
    tracker: list[str] | None = field(default=None, metadata={"help": TRACKER_HELP})
    json: bool = option(False, "print the final summary as one JSON object")
    threads: int | None = threads_option()

    def check(self) -> None:
        if self.scheme == "bio":  # the same tags under their other name
            self.scheme = "iob2"
        resolve_trackers(self.tracker, wandb=self.wandb)  # a bad --tracker fails before the model loads
        if self.tokenizer and self.method != "full":  # a LoRA run over random weights could never be loaded again
            raise CorelmError("--tokenizer trains a new model from random weights: use --method full")


FinetuneOptions = FinetuneArgs


def say(message: str) -> None:
    """Progress and facts go to stderr; reports go to stdout."""
    print(message, file=sys.stderr, flush=True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared tensors counted once)."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    return sum(p.numel() for p in seen.values() if p.requires_grad), total


# ------------------------------------------------------------------------------------------------ data

def read_examples(task: Task, path: str, args: FinetuneArgs) -> tasks.Rows:
    from corelm.data.demo import resolve

    rows = task.read(resolve(path), data_options(args))
    if rows.skipped:
        say(rows.note())
    return rows


def data_options(args: FinetuneArgs) -> DataOptions:
    return DataOptions(args.text_field, args.label_field, args.scheme, args.skip_bad)


def encode_examples(task: str, items: list, tokenizer: Any, labels: list[str], max_len: int,
                    source: str = "") -> list[dict[str, Any]]:
    """Token ids and labels of every example of the task named ``task``."""
    return get_task(task).encode(items, tokenizer, labels, max_len, source)


# ------------------------------------------------------------------------------------------------ run

class _Extra:
    """AdaLoRA's allocator state, saved with each checkpoint for exact resume."""

    def __init__(self, allocator: RankAllocator | None) -> None:
        self.allocator = allocator

    def state_dict(self) -> dict[str, Any]:
        return self.allocator.state_dict() if self.allocator else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.allocator and state:
            self.allocator.load_state_dict(state)


def finetune(args: FinetuneArgs) -> dict[str, Any]:
    """Run one fine-tuning job end to end; returns a summary (also written to ``corelm_task.json``).

    Raises:
        CorelmError: bad arguments or data (one line for the CLI).
    """
    from corelm.train import ResumableLoader, TrainConfig, train

    set_threads(args.threads)
    task = get_task(args.task)
    if args.method not in METHODS:
        raise CorelmError(f"unknown method {args.method!r}; expected one of {', '.join(METHODS)}")
    torch.manual_seed(args.seed)

    # data first (bad files fail fast): labels come from the training set; without --val, 10% is held out
    train_rows = read_examples(task, args.data, args)
    items = list(train_rows.items)
    if args.val:
        val_items = read_examples(task, args.val, args).items
        val_source = args.val
    else:
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(args.seed)).tolist()
        n_val = max(1, len(items) // 10) if len(items) >= 10 else 0
        val_items = [items[i] for i in order[:n_val]]
        items = [items[i] for i in order[n_val:]]
        val_source = f"{n_val} examples held out of {args.data}"
    task.check_data(items, args.data, data_options(args))

    loaded = fresh_model(args.model, args.tokenizer) if args.tokenizer else load_parts(args.model, dtype="fp32")
    config, tokenizer = loaded.config, loaded.tokenizer
    if tokenizer is None:
        raise CorelmError(f"{args.model} has no tokenizer; fine-tuning needs one")
    task.check_model(config)
    max_len = min(args.max_len, config.max_seq_len)
    pad_id = pad_token_id(tokenizer)
    labels = task.labels(items)
    train_set = task.encode(items, tokenizer, labels, max_len, args.data)
    val_set = task.encode(val_items, tokenizer, labels, max_len, args.val or args.data)

    # model and method
    model = build_task_model(args.task, loaded.model, config, labels, args.pooling)
    settings = {"targets": args.targets, "rank": args.rank, "alpha": args.alpha, "dropout": args.dropout,
                "init_rank": args.init_rank, "target_rank": args.target_rank, "size": args.adapter_size}
    method_info = apply_method(model, config, args.method, settings)
    trainable, total = count_parameters(model)
    say(f"{args.task} / {args.method} on {args.model}: {len(train_set)} training examples, validation: "
        f"{val_source}" + (f", labels: {', '.join(labels)}" if task.show_labels else ""))
    say(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

    steps = args.steps or max(1, math.ceil(args.epochs * len(train_set) / args.batch_size))
    say(f"{steps} steps of {args.batch_size} examples ({max(1, len(train_set) // args.batch_size)} steps per epoch)")
    loss_fn = task.loss
    train_items = task.train_items(model, train_set, args.method, pad_id, args.progress)

    allocator = None
    if args.method == "adalora":
        allocator = RankAllocator(backbone_of(model), args.target_rank, steps)
        base_loss = loss_fn

        def loss_fn(m: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
            loss, info = base_loss(m, batch)
            return loss + allocator.regularizer(), info

    lr = args.lr or DEFAULT_LR[args.method]

    def optimizer_fn(m: nn.Module) -> torch.optim.Optimizer:
        from corelm.train.optim import build_optimizer

        opt = build_optimizer(m, lr, args.weight_decay, (0.9, 0.999))
        if allocator is not None:
            allocator.attach(opt)
        return opt

    batches = ResumableLoader(train_items, min(args.batch_size, len(train_items)),
                              lambda b: task.collate(b, pad_id), seed=args.seed)

    def eval_fn(m: nn.Module) -> dict[str, float]:
        if not val_set:
            return {}
        metrics = task.evaluate(m, val_set, val_items, labels, pad_id)
        if args.eval_every and batches.epoch + batches.cursor > 0:  # during training: a dev report
            epoch = batches.epoch + batches.cursor / len(train_items)
            say(f"dev at epoch {epoch:.2f}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics

    task_info = {
        "task": args.task, "method": args.method, "labels": labels,
        "base": "." if args.method == "full" else _base_reference(args.model),
        "family": config.family, "is_encoder": config.is_encoder, "max_len": max_len,
        "pooling": getattr(model, "pooling", None), "method_config": method_info,
        "fields": task.fields(data_options(args)),
        "args": asdict(args),
    }

    def export_fn(state: dict[str, torch.Tensor], out_dir: Path) -> None:
        save_run_files(model, config, tokenizer, task_info, allocator, out_dir, state)

    cfg = TrainConfig(max_steps=steps, lr=lr, warmup_steps=args.warmup_steps if args.warmup_steps is not None
                      else max(1, steps * 6 // 100), weight_decay=args.weight_decay, beta2=0.999,
                      precision=args.precision, seed=args.seed, out=args.out, save_every=args.save_every,
                      resume=args.out if args.resume else None, progress=args.progress, eval_every=args.eval_every,
                      measure_mfu=False, keep_last=2, wandb=args.wandb,
                      tracker=args.tracker)
    before = eval_fn(model)  # the untrained value of every validation metric, for comparison
    if before:
        say("before training: " + ", ".join(f"{k}={v:.4f}" for k, v in before.items()))
    result = train(model, loss_fn, batches, cfg, eval_fn=eval_fn, export_fn=export_fn,
                   extra_state=_Extra(allocator), optimizer_fn=optimizer_fn, run_config=task_info)
    summary = {"steps": result.step, "stopped": result.stopped, "train_loss": result.losses[-1][1] if result.losses
               else None, **{k: v for k, v in result.last_metrics.items() if k.startswith("val")}}
    summary.update({f"{k}_before": v for k, v in before.items()})
    if allocator is not None:
        summary["ranks"] = allocator.ranks()
        summary["total_rank"] = sum(summary["ranks"].values())
    summary["trainable_parameters"], summary["total_parameters"] = trainable, total
    if args.out and result.checkpoint:
        (Path(args.out) / "finetune_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _base_reference(name: str) -> str:
    """The base model as ``corelm.load`` will find it later: names stay names, paths become absolute."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


# ------------------------------------------------------------------------------------------------ files

def save_run_files(model: nn.Module, config: Any, tokenizer: Any, task_info: dict[str, Any],
                   allocator: RankAllocator | None, out_dir: Path,
                   state: dict[str, torch.Tensor] | None = None) -> None:
    """Write a run directory's files (used as the training loop's checkpoint export)."""
    from corelm.io.atomic import save_safetensors
    from corelm.io.hf import save_hf_dir

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = state if state is not None else model.state_dict()
    backbone = backbone_of(model)
    info = dict(task_info)
    if task_info["method"] == "full":
        save_hf_dir(backbone, config, out_dir, tokenizer)
    else:
        tokenizer.save(out_dir)
        prefix = "backbone." if backbone is not model else ""
        adapter = {k[len(prefix):]: v.detach().contiguous() for k, v in state.items()
                   if k.startswith(prefix) and ("lora_" in k or "adapter_" in k)}
        if adapter:
            save_safetensors(adapter, str(out_dir / ADAPTER_FILE))
    if backbone is not model:
        save_safetensors({k: v.detach().contiguous() for k, v in head_state_dict(model).items()},
                  str(out_dir / HEAD_FILE))
    if allocator is not None:
        info["method_config"] = {**info["method_config"], "ranks": allocator.ranks()}
    tmp = out_dir / f".{TASK_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, out_dir / TASK_FILE)


def predict(run: Any, texts: list[str], top: int = 5, batch_size: int = 32) -> list[dict[str, Any]]:
    """Label texts with a fine-tuned classifier or tagger: what ``corelm predict`` prints, as data.

    Args:
        run: a :class:`corelm.loading.Run` of task ``classify`` or ``ner`` (``load_run(dir)``).
        texts: one text per item (``ner``: words separated by spaces).
        top: ``classify``: how many labels to return with their probabilities.
    Returns:
        ``classify``: ``{"text", "label", "probabilities": {label: p, ...}}`` (the ``top`` most likely);
        ``ner``: ``{"tokens", "tags", "entities": [{"type", "text"}, ...]}``; one dict per text.
    Raises:
        CorelmError: an ``sft`` run (use ``corelm.load`` and ``generate``), or ``top < 1``.
    """
    if top < 1:
        raise CorelmError(f"top must be at least 1, got {top}")
    with torch.inference_mode():
        return get_task(run.task["task"]).predict(run, texts, top, batch_size)
