"""Fine-tuning runs: set up a task and a method, train with THE loop (``corelm.train.train``), load back.

Fine-tuning differs from pretraining only in setup, so this module is setup and nothing else:

1. **model**: the base model (``corelm.load``) under a task head -- :class:`SequenceClassifier` for
   ``classify``, :class:`TokenClassifier` for ``ner``, the LM itself for ``sft``;
2. **method** (what trains): ``full`` (everything), ``head`` (only the head), ``lora``, ``adalora`` or
   ``adapter`` (a transform of the backbone that freezes it and adds a few trainable parameters);
3. **data**: task readers and encoders from :mod:`corelm.data.tasks`, batched by the loop's resumable loader;
4. **loss**: cross-entropy over labels, entity tags or assistant tokens (plus AdaLoRA's regularizer).

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from corelm.data import tasks
from corelm.errors import CorelmError
from corelm.finetune.adalora import RankAllocator
from corelm.finetune.heads import SequenceClassifier, head_state_dict
from corelm.finetune.methods import (
    ADAPTER_FILE,
    HEAD_FILE,
    METHODS,
    TASK_FILE,
    TASKS,
    apply_method,
    backbone_of,
    build_task_model,
    pad_token_id,
)
from corelm.loading import load_parts

# Learning rates that work for each method at these model sizes (LoRA paper table 9: 2e-4..5e-4;
# BERT fine-tuning: 2e-5..5e-5; a linear probe or a fresh head tolerates 1e-3 and more).
DEFAULT_LR = {"full": 5e-5, "head": 2e-3, "lora": 5e-4, "adalora": 5e-4, "adapter": 1e-3}


@dataclass
class FinetuneArgs:
    """What a fine-tuning run does. Each field's comment is its ``--help`` text."""

    model: str                      # base model: embedded name, preset or path
    task: str                       # classify | ner | sft
    data: str                       # training file (CSV/JSONL, CoNLL or chat JSONL) or demo:<set>
    out: str                        # run directory to write
    val: str | None = None          # validation file (default: 10% of --data held out)
    method: str = "lora"            # full | head | lora | adalora | adapter
    text_field: str = "text"        # classification: column/field with the text
    label_field: str = "label"      # classification: column/field with the label
    targets: str | None = None      # LoRA/AdaLoRA: comma-separated linear names or all-linear (default: attention)
    rank: int = 8                   # LoRA rank r
    alpha: float = 16.0             # LoRA/AdaLoRA scale numerator (update is scaled by alpha / r)
    dropout: float = 0.0            # LoRA dropout on the low-rank branch
    init_rank: int = 12             # AdaLoRA: initial rank of every matrix
    target_rank: int = 4            # AdaLoRA: final average rank (budget = target_rank x matrices)
    adapter_size: int = 64          # adapter bottleneck width
    pooling: str | None = None      # classification pooling: cls | pooled | mean | last (default: mean/last)
    max_len: int = 128              # tokens per example (longer ones are truncated)
    batch_size: int = 16            # examples per optimizer step
    epochs: float = 3.0             # passes over the training data (ignored when --steps is given)
    steps: int | None = None        # optimizer steps (overrides --epochs)
    lr: float | None = None         # peak learning rate (default depends on --method)
    warmup_steps: int | None = None  # linear warmup (default: 6% of the steps)
    weight_decay: float = 0.01      # AdamW decoupled weight decay
    precision: str = "fp32"         # fp32 | bf16-mixed | bf16-true
    scheme: str = "iob2"            # NER tags in the files: iob2 (= BIO) or iob1
    skip_bad: bool = False          # skip malformed rows (and report how many) instead of stopping
    seed: int = 0                   # seed of data order, head init and dropout
    resume: bool = False            # continue the run in --out from its last checkpoint
    save_every: int = 0             # checkpoint every N steps (0: at the end only)
    progress: bool = True           # progress bars


def say(message: str) -> None:
    """Progress and facts go to stderr; reports go to stdout."""
    print(message, file=sys.stderr, flush=True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared tensors counted once)."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    return sum(p.numel() for p in seen.values() if p.requires_grad), total


# ------------------------------------------------------------------------------------------------ data

def read_examples(task: str, path: str, args: FinetuneArgs) -> tasks.Rows:
    from corelm.data.demo import resolve

    path = resolve(path)
    if task == "classify":
        rows = tasks.read_classification(path, args.text_field, args.label_field, args.skip_bad)
    elif task == "ner":
        rows = tasks.read_conll(path, scheme=args.scheme, skip_bad=args.skip_bad)
    else:
        rows = tasks.read_chat(path, args.skip_bad)
    if rows.skipped:
        say(rows.note())
    return rows


def encode_examples(task: str, items: list, tokenizer: Any, labels: list[str], max_len: int,
                    source: str = "") -> list[dict[str, Any]]:
    """Token ids and labels of every example, per task."""
    index = {label: i for i, label in enumerate(labels)}

    def label_id(label: str) -> int:
        if label not in index:
            raise CorelmError(f"{source}: label {label!r} does not occur in the training data "
                              f"(known: {', '.join(labels)})")
        return index[label]

    if task == "classify":
        return [{"input_ids": tasks.encode_text(tokenizer, text, max_len), "labels": label_id(label)}
                for text, label in items]
    if task == "ner":
        return [tasks.encode_words(tokenizer, words, max_len, [label_id(t) for t in tags]) for words, tags in items]
    return [tasks.encode_chat(tokenizer, messages, max_len) for messages in items]


# ------------------------------------------------------------------------------------------------ model

# ------------------------------------------------------------------------------------------------ losses

def classify_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if "features" in batch:  # frozen backbone: pooled features computed once (see _feature_items)
        return model.classifier(model.dropout(batch["features"]))
    return model(batch["input_ids"], batch["attention_mask"])


def classify_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    logits = classify_logits(model, batch)
    loss = F.cross_entropy(logits.float(), batch["labels"])
    acc = (logits.argmax(-1) == batch["labels"]).float().mean()
    return loss, {"n_tokens": int(batch["labels"].numel()), "acc": float(acc)}


def ner_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    logits = model(batch["input_ids"], batch["attention_mask"])  # (B, T, C)
    labels = batch["labels"]
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=tasks.IGNORE)
    return loss, {"n_tokens": int((labels != tasks.IGNORE).sum())}


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Next-token cross-entropy on assistant tokens only.

    Logits are computed only where a label exists (hidden states -> LM head on the selected rows): the
    ``(B, T, vocab)`` logits tensor of a 49k vocabulary would dominate memory for nothing.
    """
    lm = getattr(model, "module", model)
    hidden = lm.hidden_states(batch["input_ids"])  # (B, T, d)
    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    keep = targets != tasks.IGNORE
    logits = lm.lm_head(hidden[:, :-1][keep])  # (n, V)
    loss = F.cross_entropy(logits.float(), targets[keep])
    return loss, {"n_tokens": int(keep.sum())}


LOSSES = {"classify": classify_loss, "ner": ner_loss, "sft": sft_loss}


# ------------------------------------------------------------------------------------------------ eval

@torch.no_grad()
def forward_items(model: nn.Module, items: list[dict[str, Any]], pad_id: int, batch_size: int = 32,
                  progress: bool = False, desc: str = "eval") -> list[torch.Tensor]:
    """Logits of every encoded example, in the original order: ``(C,)`` per text or ``(T_i, C)`` per token."""
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = [torch.empty(0)] * len(items)
    for idx in _batches(items, batch_size, progress, desc):
        batch = tasks.collate([items[i] for i in idx], pad_id)
        logits = model(batch["input_ids"], batch["attention_mask"]).float()
        for row, i in enumerate(idx):
            out[i] = logits[row] if logits.dim() == 2 else logits[row, :len(items[i]["input_ids"])]
    model.train(was_training)
    return out


def tags_from_logits(logits: list[torch.Tensor], items: list[dict[str, Any]], n_words: list[int],
                     labels: list[str]) -> list[list[str]]:
    """The tag of every word (from its first sub-word); words cut off by ``max_len`` get ``O``."""
    out: list[list[str]] = [["O"] * n for n in n_words]
    for i, (item, row) in enumerate(zip(items, logits)):
        pred = row.argmax(-1).tolist()
        for pos, word in enumerate(item["word_index"]):
            if word >= 0:
                out[i][word] = labels[pred[pos]]
    return out


@torch.no_grad()
def mean_loss(model: nn.Module, loss_fn: Any, items: list[dict[str, Any]], pad_id: int,
              batch_size: int = 16) -> float:
    """Token-weighted mean loss of ``loss_fn`` over encoded examples."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for idx in tasks.length_sorted_batches(items, batch_size):
        loss, info = loss_fn(model, tasks.collate([items[i] for i in idx], pad_id))
        total += float(loss) * info["n_tokens"]
        count += info["n_tokens"]
    model.train(was_training)
    return total / max(count, 1)


def _batches(items: list, batch_size: int, progress: bool, desc: str) -> Any:
    batches = tasks.length_sorted_batches(items, batch_size)
    if progress:
        from tqdm import tqdm

        return tqdm(batches, desc=desc, unit="batch", file=sys.stderr, leave=False)
    return batches


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

    if args.task not in TASKS:
        raise CorelmError(f"unknown task {args.task!r}; expected one of {', '.join(TASKS)}")
    if args.method not in METHODS:
        raise CorelmError(f"unknown method {args.method!r}; expected one of {', '.join(METHODS)}")
    torch.manual_seed(args.seed)

    # data first (bad files fail fast): labels come from the training set; without --val, 10% is held out
    train_rows = read_examples(args.task, args.data, args)
    items = list(train_rows.items)
    if args.val:
        val_items = read_examples(args.task, args.val, args).items
        val_source = args.val
    else:
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(args.seed)).tolist()
        n_val = max(1, len(items) // 10) if len(items) >= 10 else 0
        val_items = [items[i] for i in order[:n_val]]
        items = [items[i] for i in order[n_val:]]
        val_source = f"{n_val} examples held out of {args.data}"
    if args.task == "classify":  # one class: the loss is zero from the first step and nothing is learned
        classes = sorted({label for _, label in items})
        if len(classes) < 2:
            raise CorelmError(f"{args.data}: every training example has the label {classes[0]!r}; a classifier needs "
                              f"at least two classes (is --label-field {args.label_field!r} the right column?)")

    loaded = load_parts(args.model, dtype="fp32")
    config, tokenizer = loaded.config, loaded.tokenizer
    if tokenizer is None:
        raise CorelmError(f"{args.model} has no tokenizer; fine-tuning needs one")
    if args.task == "sft" and config.is_encoder:
        raise CorelmError("--task sft needs a decoder (e.g. smollm2-135m-instruct), not an encoder")
    max_len = min(args.max_len, config.max_seq_len)
    pad_id = pad_token_id(tokenizer)
    if args.task == "classify":
        labels = sorted({label for _, label in items})
    elif args.task == "ner":
        labels = tasks.ner_labels(items)
    else:
        labels = []
    train_set = encode_examples(args.task, items, tokenizer, labels, max_len, args.data)
    val_set = encode_examples(args.task, val_items, tokenizer, labels, max_len, args.val or args.data)

    # model and method
    model = build_task_model(args.task, loaded.model, config, labels, args.pooling)
    settings = {"targets": args.targets, "rank": args.rank, "alpha": args.alpha, "dropout": args.dropout,
                "init_rank": args.init_rank, "target_rank": args.target_rank, "size": args.adapter_size}
    method_info = apply_method(model, config, args.method, settings)
    trainable, total = count_parameters(model)
    say(f"{args.task} / {args.method} on {args.model}: {len(train_set)} training examples, validation: "
        f"{val_source}" + (f", labels: {', '.join(labels)}" if args.task == "classify" else ""))
    say(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

    steps = args.steps or max(1, math.ceil(args.epochs * len(train_set) / args.batch_size))
    loss_fn = LOSSES[args.task]
    train_items = train_set
    if args.task == "classify" and args.method == "head":
        # The backbone is frozen, so its pooled output per example never changes: compute it once
        # instead of once per epoch (a linear probe). Evaluation still runs the whole model.
        train_items = _feature_items(model, train_set, pad_id, args.progress)

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

    def eval_fn(m: nn.Module) -> dict[str, float]:
        if not val_set:
            return {}
        return evaluate_items(args.task, m, val_set, val_items, labels, pad_id)

    task_info = {
        "task": args.task, "method": args.method, "labels": labels,
        "base": "." if args.method == "full" else _base_reference(args.model),
        "family": config.family, "is_encoder": config.is_encoder, "max_len": max_len,
        "pooling": getattr(model, "pooling", None), "method_config": method_info,
        "fields": {"text": args.text_field, "label": args.label_field} if args.task == "classify" else None,
        "args": asdict(args),
    }

    def export_fn(state: dict[str, torch.Tensor], out_dir: Path) -> None:
        save_run_files(model, config, tokenizer, task_info, allocator, out_dir, state)

    cfg = TrainConfig(max_steps=steps, lr=lr, warmup_steps=args.warmup_steps if args.warmup_steps is not None
                      else max(1, steps * 6 // 100), weight_decay=args.weight_decay, beta2=0.999,
                      precision=args.precision, seed=args.seed, out=args.out, save_every=args.save_every,
                      resume=args.out if args.resume else None, progress=args.progress, tensorboard=False,
                      measure_mfu=False, keep_last=2)
    before = eval_fn(model)  # the untrained value of every validation metric, for comparison
    if before:
        say("before training: " + ", ".join(f"{k}={v:.4f}" for k, v in before.items()))
    batches = ResumableLoader(train_items, min(args.batch_size, len(train_items)),
                              lambda b: tasks.collate(b, pad_id) if "input_ids" in b[0] else _stack_features(b),
                              seed=args.seed)
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


@torch.no_grad()
def _feature_items(model: SequenceClassifier, items: list[dict[str, Any]], pad_id: int,
                   progress: bool) -> list[dict[str, Any]]:
    model.eval()
    out: list[dict[str, Any]] = [{} for _ in items]
    for idx in _batches(items, 32, progress, "features"):
        batch = tasks.collate([items[i] for i in idx], pad_id)
        feats = model.features(batch["input_ids"], batch["attention_mask"])
        for row, i in enumerate(idx):
            out[i] = {"features": feats[row].clone(), "labels": items[i]["labels"]}
    model.train()
    return out


def _stack_features(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {"features": torch.stack([it["features"] for it in items]),
            "labels": torch.tensor([it["labels"] for it in items], dtype=torch.long)}


def evaluate_items(task: str, model: nn.Module, encoded: list[dict[str, Any]], raw: list, labels: list[str],
                   pad_id: int, progress: bool = False) -> dict[str, Any]:
    """Validation metrics of a task model: loss plus accuracy (classify) or entity F1 (ner), one pass."""
    from corelm.eval.metrics import accuracy
    from corelm.eval.ner import entity_report

    if task == "sft":
        return {"val_loss": mean_loss(model, sft_loss, encoded, pad_id)}
    logits = forward_items(model, encoded, pad_id, progress=progress)
    if task == "classify":
        stacked = torch.stack(logits)
        gold = torch.tensor([it["labels"] for it in encoded])
        return {"val_loss": float(F.cross_entropy(stacked, gold)),
                "val_acc": accuracy([labels[i] for i in stacked.argmax(-1).tolist()], [label for _, label in raw])}
    flat = torch.cat(logits)
    gold = torch.tensor([t for it in encoded for t in it["labels"]])
    pred = tags_from_logits(logits, encoded, [len(w) for w, _ in raw], labels)
    return {"val_loss": float(F.cross_entropy(flat, gold, ignore_index=tasks.IGNORE)),
            "val_f1": entity_report([t for _, t in raw], pred)["micro"]["f1"]}


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
    from corelm.eval.ner import entities

    if top < 1:
        raise CorelmError(f"top must be at least 1, got {top}")
    task, max_len = run.task["task"], run.task["max_len"]
    with torch.inference_mode():
        if task == "classify":
            encoded = [{"input_ids": tasks.encode_text(run.tokenizer, t, max_len)} for t in texts]
            out = []
            for text, logits in zip(texts, forward_items(run.model, encoded, run.pad_id, batch_size)):
                ranked = sorted(zip(run.labels, logits.softmax(-1).tolist()), key=lambda x: -x[1])[:top]
                out.append({"text": text, "label": ranked[0][0], "probabilities": dict(ranked)})
            return out
        if task == "ner":
            words = [t.split() for t in texts]
            encoded = [tasks.encode_words(run.tokenizer, w, max_len) for w in words]
            tags = tags_from_logits(forward_items(run.model, encoded, run.pad_id, batch_size), encoded,
                                    [len(w) for w in words], run.labels)
            return [{"tokens": ws, "tags": ts,
                     "entities": [{"type": kind, "text": " ".join(ws[a:b + 1])} for _, kind, a, b in entities(ts)]}
                    for ws, ts in zip(words, tags)]
    raise CorelmError(f"{run.path} is an {task} run; use corelm generate/chat --model for language models "
                      "(after corelm merge for LoRA runs)")
