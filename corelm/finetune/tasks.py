"""Fine-tuning tasks as objects: what differs between classification, NER and SFT, behind one interface.

A :class:`Task` knows its data and its objective, nothing about methods or the training loop:

* ``read`` a file into examples, ``labels`` of the training set, ``check`` that data and model fit the task;
* ``encode`` examples into token ids and labels (``collate`` pads them into a batch);
* ``loss(model, batch)`` -- the loss the one training loop (:func:`corelm.train.train`) minimizes;
* ``evaluate`` -- the validation metrics logged during training (``val_loss`` plus ``val_acc``/``val_f1``);
* ``report`` -- the full report of ``corelm evaluate`` (tables + JSON), ``predict`` -- what ``corelm predict``
  prints, as data.

:data:`TASKS` is the one table from a task's name (``--task``) to its object; :mod:`corelm.finetune.run`
looks tasks up there and never switches on their names.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from corelm.data import tasks as data
from corelm.errors import CorelmError
from corelm.models import head_logits


@dataclass
class DataOptions:
    """How task files are read (the fields of :class:`corelm.finetune.run.FinetuneArgs` of the same names)."""

    text_field: str = "text"        # classification: column/field with the text
    label_field: str = "label"      # classification: column/field with the label
    scheme: str = "iob2"            # NER: tags in the files, iob2 (= bio) or iob1
    skip_bad: bool = False          # skip malformed rows instead of stopping


# ------------------------------------------------------------------------------------------------ helpers

@torch.no_grad()
def forward_items(model: nn.Module, items: list[dict[str, Any]], pad_id: int, batch_size: int = 32,
                  progress: bool = False, desc: str = "eval") -> list[torch.Tensor]:
    """Logits of every encoded example, in the original order: ``(C,)`` per text or ``(T_i, C)`` per token."""
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = [torch.empty(0)] * len(items)
    for idx in batches(items, batch_size, progress, desc):
        batch = data.collate([items[i] for i in idx], pad_id)
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
    for idx in data.length_sorted_batches(items, batch_size):
        loss, info = loss_fn(model, data.collate([items[i] for i in idx], pad_id))
        total += float(loss) * info["n_tokens"]
        count += info["n_tokens"]
    model.train(was_training)
    return total / max(count, 1)


def batches(items: list, batch_size: int, progress: bool, desc: str) -> Any:
    """Length-sorted index batches, behind a progress bar when asked."""
    order = data.length_sorted_batches(items, batch_size)
    if progress:
        from tqdm import tqdm

        return tqdm(order, desc=desc, unit="batch", file=sys.stderr, leave=False)
    return order


def _label_ids(labels: list[str], source: str) -> Any:
    index = {label: i for i, label in enumerate(labels)}

    def label_id(label: str) -> int:
        if label not in index:
            raise CorelmError(f"{source}: label {label!r} does not occur in the training data "
                              f"(known: {', '.join(labels)})")
        return index[label]

    return label_id


# ------------------------------------------------------------------------------------------------ tasks

class Task:
    """What one fine-tuning task reads, trains on, measures and predicts (subclasses fill it in)."""

    name: ClassVar[str]
    show_labels: ClassVar[bool] = False  # name the labels in the run's opening line

    def read(self, path: str, options: DataOptions) -> data.Rows:
        """The examples of a task file (``path`` already resolved from ``demo:`` names)."""
        raise NotImplementedError

    def labels(self, items: list) -> list[str]:
        """The label set a model head is built for, from the training examples (none for ``sft``)."""
        return []

    def check_data(self, items: list, source: str, options: DataOptions) -> None:
        """Raise :class:`CorelmError` when the training examples cannot teach this task (before any loading)."""

    def check_model(self, config: Any) -> None:
        """Raise :class:`CorelmError` when the base model cannot serve this task."""

    def fields(self, options: DataOptions) -> dict[str, str] | None:
        """The data fields saved in ``corelm_task.json`` (``evaluate`` reads files the same way)."""
        return None

    def encode(self, items: list, tokenizer: Any, labels: list[str], max_len: int,
               source: str = "") -> list[dict[str, Any]]:
        """Token ids and labels of every example."""
        raise NotImplementedError

    def train_items(self, model: nn.Module, encoded: list[dict[str, Any]], method: str, pad_id: int,
                    progress: bool) -> list[dict[str, Any]]:
        """What the training batches are drawn from (the encoded examples unless a task can precompute)."""
        return encoded

    def collate(self, items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        """A batch of :meth:`train_items` entries."""
        return data.collate(items, pad_id)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        """``(mean loss, {"n_tokens": ...})`` of one batch: the training objective."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, encoded: list[dict[str, Any]], raw: list, labels: list[str],
                 pad_id: int, progress: bool = False) -> dict[str, float]:
        """Validation metrics in one pass: ``val_loss`` plus the task's own (``val_acc``, ``val_f1``)."""
        return {"val_loss": mean_loss(model, self.loss, encoded, pad_id)}

    def report(self, run: Any, items: list, max_len: int, *, source: str = "", batch_size: int = 32,
               progress: bool = False, strict: bool = False) -> tuple[dict[str, Any], str]:
        """``corelm evaluate``'s report of a fine-tuned run on labelled examples: ``(JSON-ready dict, table)``."""
        raise CorelmError(f"corelm evaluate has no labelled report for {self.name} runs "
                          "(use --task perplexity or summarize)")

    def predict(self, run: Any, texts: list[str], top: int = 5, batch_size: int = 32) -> list[dict[str, Any]]:
        """What ``corelm predict`` prints for each text, as data."""
        raise CorelmError(f"{run.path} is an {self.name} run; use corelm generate/chat --model for language "
                          "models (after corelm merge for LoRA runs)")


class Classification(Task):
    """One label per text: a :class:`~corelm.finetune.heads.SequenceClassifier` over pooled hidden states."""

    name = "classify"
    show_labels = True

    def read(self, path: str, options: DataOptions) -> data.Rows:
        return data.read_classification(path, options.text_field, options.label_field, options.skip_bad)

    def labels(self, items: list) -> list[str]:
        return sorted({label for _, label in items})

    def check_data(self, items: list, source: str, options: DataOptions) -> None:
        classes = self.labels(items)  # one class: the loss is zero from the first step and nothing is learned
        if len(classes) < 2:
            raise CorelmError(f"{source}: every training example has the label {classes[0]!r}; a classifier needs "
                              f"at least two classes (is --label-field {options.label_field!r} the right column?)")

    def fields(self, options: DataOptions) -> dict[str, str] | None:
        return {"text": options.text_field, "label": options.label_field}

    def encode(self, items: list, tokenizer: Any, labels: list[str], max_len: int,
               source: str = "") -> list[dict[str, Any]]:
        label_id = _label_ids(labels, source)
        return [{"input_ids": data.encode_text(tokenizer, text, max_len), "labels": label_id(label)}
                for text, label in items]

    def train_items(self, model: nn.Module, encoded: list[dict[str, Any]], method: str, pad_id: int,
                    progress: bool) -> list[dict[str, Any]]:
        if method != "head":
            return encoded
        # The backbone is frozen, so its pooled output per example never changes: compute it once
        # instead of once per epoch (a linear probe). Evaluation still runs the whole model.
        model.eval()
        out: list[dict[str, Any]] = [{} for _ in encoded]
        with torch.no_grad():
            for idx in batches(encoded, 32, progress, "features"):
                batch = data.collate([encoded[i] for i in idx], pad_id)
                feats = model.features(batch["input_ids"], batch["attention_mask"])
                for row, i in enumerate(idx):
                    out[i] = {"features": feats[row].clone(), "labels": encoded[i]["labels"]}
        model.train()
        return out

    def collate(self, items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        if "input_ids" in items[0]:
            return data.collate(items, pad_id)
        return {"features": torch.stack([it["features"] for it in items]),
                "labels": torch.tensor([it["labels"] for it in items], dtype=torch.long)}

    def logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "features" in batch:  # frozen backbone: pooled features computed once (see train_items)
            # computed in fp32 before the loop applied the precision policy: the head takes them in its dtype
            features = batch["features"].to(model.classifier.weight.dtype)
            return model.classifier(model.dropout(features))
        return model(batch["input_ids"], batch["attention_mask"])

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = self.logits(model, batch)
        loss = F.cross_entropy(logits.float(), batch["labels"])
        acc = (logits.argmax(-1) == batch["labels"]).float().mean()
        return loss, {"n_tokens": int(batch["labels"].numel()), "acc": float(acc)}

    def evaluate(self, model: nn.Module, encoded: list[dict[str, Any]], raw: list, labels: list[str],
                 pad_id: int, progress: bool = False) -> dict[str, float]:
        from corelm.eval.metrics import accuracy

        stacked = torch.stack(forward_items(model, encoded, pad_id, progress=progress))
        gold = torch.tensor([it["labels"] for it in encoded])
        return {"val_loss": float(F.cross_entropy(stacked, gold)),
                "val_acc": accuracy([labels[i] for i in stacked.argmax(-1).tolist()], [label for _, label in raw])}

    def report(self, run: Any, items: list, max_len: int, *, source: str = "", batch_size: int = 32,
               progress: bool = False, strict: bool = False) -> tuple[dict[str, Any], str]:
        from corelm.eval.metrics import classification_report, format_table

        unknown = sorted({label for _, label in items} - set(run.labels))
        if unknown:
            raise CorelmError(f"{source}: label(s) {', '.join(map(repr, unknown))} are not among the model's "
                              f"labels ({', '.join(run.labels)})")
        encoded = self.encode(items, run.tokenizer, run.labels, max_len, source)
        logits = forward_items(run.model, encoded, run.pad_id, batch_size, progress)
        pred = [run.labels[int(x.argmax())] for x in logits]
        report = classification_report([label for _, label in items], pred, labels=run.labels)
        return report, format_table(report, "label")

    def predict(self, run: Any, texts: list[str], top: int = 5, batch_size: int = 32) -> list[dict[str, Any]]:
        encoded = [{"input_ids": data.encode_text(run.tokenizer, t, run.task["max_len"])} for t in texts]
        out = []
        for text, logits in zip(texts, forward_items(run.model, encoded, run.pad_id, batch_size)):
            ranked = sorted(zip(run.labels, logits.softmax(-1).tolist()), key=lambda x: -x[1])[:top]
            out.append({"text": text, "label": ranked[0][0], "probabilities": dict(ranked)})
        return out


def _target(value: str, source: str) -> float:
    """A regression target: a finite number (``read_classification`` keeps labels as text)."""
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not math.isfinite(number):
        raise CorelmError(f"{source}: regression target {value!r} is not a finite number")
    return number


class Regression(Task):
    """A real number per text: a one-output :class:`~corelm.finetune.heads.SequenceClassifier` head trained with
    the mean squared error ``mean((f(x) - y)^2)`` (least squares; the Gaussian negative log-likelihood up to
    constants). Data: a text field and a numeric target field (``--text-field``/``--label-field``)."""

    name = "regression"

    def read(self, path: str, options: DataOptions) -> data.Rows:
        return data.read_classification(path, options.text_field, options.label_field, options.skip_bad)

    def labels(self, items: list) -> list[str]:
        return ["value"]  # the head's one output unit

    def check_data(self, items: list, source: str, options: DataOptions) -> None:
        for _, value in items:
            _target(value, source)

    def fields(self, options: DataOptions) -> dict[str, str] | None:
        return {"text": options.text_field, "label": options.label_field}

    def encode(self, items: list, tokenizer: Any, labels: list[str], max_len: int,
               source: str = "") -> list[dict[str, Any]]:
        return [{"input_ids": data.encode_text(tokenizer, text, max_len), "target": _target(value, source)}
                for text, value in items]

    def collate(self, items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        batch = data.collate(items, pad_id)
        batch["target"] = torch.tensor([it["target"] for it in items], dtype=torch.float32)  # (B,)
        return batch

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        pred = model(batch["input_ids"], batch["attention_mask"])[:, 0].float()  # (B,)
        return F.mse_loss(pred, batch["target"]), {"n_tokens": int(batch["target"].numel())}

    def _errors(self, model: nn.Module, encoded: list[dict[str, Any]], pad_id: int, batch_size: int = 32,
                progress: bool = False) -> dict[str, float]:
        pred = torch.stack(forward_items(model, encoded, pad_id, batch_size, progress))[:, 0]  # (N,)
        err = pred - torch.tensor([it["target"] for it in encoded])
        mse = float(err.pow(2).mean())
        return {"mse": mse, "rmse": math.sqrt(mse), "mae": float(err.abs().mean()), "n": len(encoded)}

    def evaluate(self, model: nn.Module, encoded: list[dict[str, Any]], raw: list, labels: list[str],
                 pad_id: int, progress: bool = False) -> dict[str, float]:
        errors = self._errors(model, encoded, pad_id, progress=progress)
        return {"val_loss": errors["mse"], "val_mae": errors["mae"]}

    def report(self, run: Any, items: list, max_len: int, *, source: str = "", batch_size: int = 32,
               progress: bool = False, strict: bool = False) -> tuple[dict[str, Any], str]:
        report = self._errors(run.model, self.encode(items, run.tokenizer, run.labels, max_len, source), run.pad_id,
                              batch_size, progress)
        return report, (f"mse {report['mse']:.4f}  rmse {report['rmse']:.4f}  mae {report['mae']:.4f}  "
                        f"on {report['n']} examples")

    def predict(self, run: Any, texts: list[str], top: int = 5, batch_size: int = 32) -> list[dict[str, Any]]:
        encoded = [{"input_ids": data.encode_text(run.tokenizer, t, run.task["max_len"])} for t in texts]
        return [{"text": text, "value": float(out[0])}
                for text, out in zip(texts, forward_items(run.model, encoded, run.pad_id, batch_size))]


class TokenClassification(Task):
    """A BIO tag per word (NER): a :class:`~corelm.finetune.heads.TokenClassifier` on each word's first sub-word."""

    name = "ner"

    def read(self, path: str, options: DataOptions) -> data.Rows:
        return data.read_conll(path, scheme=options.scheme, skip_bad=options.skip_bad)

    def labels(self, items: list) -> list[str]:
        return data.ner_labels(items)

    def encode(self, items: list, tokenizer: Any, labels: list[str], max_len: int,
               source: str = "") -> list[dict[str, Any]]:
        label_id = _label_ids(labels, source)
        return [data.encode_words(tokenizer, words, max_len, [label_id(t) for t in tags]) for words, tags in items]

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = model(batch["input_ids"], batch["attention_mask"])  # (B, T, C)
        labels = batch["labels"]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=data.IGNORE)
        return loss, {"n_tokens": int((labels != data.IGNORE).sum())}

    def evaluate(self, model: nn.Module, encoded: list[dict[str, Any]], raw: list, labels: list[str],
                 pad_id: int, progress: bool = False) -> dict[str, float]:
        from corelm.eval.ner import entity_report

        logits = forward_items(model, encoded, pad_id, progress=progress)
        flat = torch.cat(logits)
        gold = torch.tensor([t for it in encoded for t in it["labels"]])
        pred = tags_from_logits(logits, encoded, [len(w) for w, _ in raw], labels)
        return {"val_loss": float(F.cross_entropy(flat, gold, ignore_index=data.IGNORE)),
                "val_f1": entity_report([t for _, t in raw], pred)["micro"]["f1"]}

    def tag(self, run: Any, sentences: list[list[str]], max_len: int, batch_size: int = 32,
            progress: bool = False) -> list[list[str]]:
        """The predicted tag of every word of pre-split sentences."""
        encoded = [data.encode_words(run.tokenizer, words, max_len) for words in sentences]
        logits = forward_items(run.model, encoded, run.pad_id, batch_size, progress)
        return tags_from_logits(logits, encoded, [len(w) for w in sentences], run.labels)

    def report(self, run: Any, items: list, max_len: int, *, source: str = "", batch_size: int = 32,
               progress: bool = False, strict: bool = False) -> tuple[dict[str, Any], str]:
        from corelm.eval.metrics import format_table
        from corelm.eval.ner import entity_report, token_report

        pred = self.tag(run, [w for w, _ in items], max_len, batch_size, progress)
        gold = [t for _, t in items]
        report = entity_report(gold, pred, strict=strict)
        report["token_report"] = token_report(gold, pred)
        table = (format_table(report, "entity") + f"\n\ntoken accuracy {report['token_accuracy']:.4f}; "
                 f"entity matching: {report['mode']}; {len(items)} sentences\n\n"
                 "per tag (token level)\n" + format_table(report["token_report"], "tag"))
        return report, table

    def predict(self, run: Any, texts: list[str], top: int = 5, batch_size: int = 32) -> list[dict[str, Any]]:
        from corelm.eval.ner import entities

        words = [t.split() for t in texts]
        tags = self.tag(run, words, run.task["max_len"], batch_size)
        return [{"tokens": ws, "tags": ts,
                 "entities": [{"type": kind, "text": " ".join(ws[a:b + 1])} for _, kind, a, b in entities(ts)]}
                for ws, ts in zip(words, tags)]


class CausalLM(Task):
    """Instruction tuning (SFT): next-token prediction on the assistant turns of chat-template conversations."""

    name = "sft"

    def read(self, path: str, options: DataOptions) -> data.Rows:
        return data.read_chat(path, options.skip_bad)

    def check_model(self, config: Any) -> None:
        if config.is_encoder:
            raise CorelmError("--task sft needs a decoder (e.g. smollm2-135m-instruct), not an encoder")

    def encode(self, items: list, tokenizer: Any, labels: list[str], max_len: int,
               source: str = "") -> list[dict[str, Any]]:
        return [data.encode_chat(tokenizer, messages, max_len) for messages in items]

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        return sft_loss(model, batch)


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Next-token cross-entropy on assistant tokens only.

    Logits are computed only where a label exists (hidden states -> LM head on the selected rows): the
    ``(B, T, vocab)`` logits tensor of a 49k vocabulary would dominate memory for nothing.
    """
    lm = getattr(model, "module", model)
    hidden = lm.hidden_states(batch["input_ids"])  # (B, T, d)
    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    keep = targets != data.IGNORE
    logits = head_logits(lm, hidden[:, :-1][keep])  # (n, V), soft-capped where the forward caps
    loss = F.cross_entropy(logits.float(), targets[keep])
    return loss, {"n_tokens": int(keep.sum())}


class Seq2SeqTask(Task):
    """Source text -> target text with an encoder-decoder (T5, BART, Marian): translation.

    Data: source/target pairs (:func:`corelm.data.parallel.read_parallel`: JSONL, CSV or TSV; ``--text-field`` and
    ``--label-field`` name the columns, by default ``source``/``target``, ``text``/``summary`` and alike). Both
    sides are tokenized with the model's tokenizer and end in its EOS token. The objective is teacher forcing
    (Sutskever et al. 2014; Vaswani et al. 2017): the decoder reads ``[start] y_1 .. y_{n-1}`` and is trained
    with cross-entropy to write ``y_1 .. y_n EOS``; the padding of the labels is :data:`~corelm.data.tasks.IGNORE`
    (-100), so it carries no loss. The validation metrics are the teacher-forced loss and next-token accuracy and
    ``val_exact``, the share of examples whose greedy translation equals the reference token for token;
    ``corelm evaluate --task translate`` scores beam-search translations with BLEU and chrF.
    """

    name = "translate"

    def read(self, path: str, options: DataOptions) -> data.Rows:
        from corelm.data.parallel import read_parallel

        # the generic defaults ("text"/"label") mean: take the file's own source/target names
        source = None if options.text_field == "text" else options.text_field
        target = None if options.label_field == "label" else options.label_field
        return read_parallel(path, source, target, options.skip_bad)

    def check_model(self, config: Any) -> None:
        if not config.is_seq2seq:
            raise CorelmError(f"--task {self.name} needs an encoder-decoder (T5, BART, Marian), not a {config.family} "
                              "model")

    def fields(self, options: DataOptions) -> dict[str, str] | None:
        return {"text": options.text_field, "label": options.label_field}

    def encode(self, items: list, tokenizer: Any, labels: list[str], max_len: int,
               source: str = "") -> list[dict[str, Any]]:
        eos = tokenizer.eos_token_id

        def ids(text: str) -> list[int]:  # the tokenizer's own specials (BART: <s> .. </s>), EOS last in any case
            out = data.encode_text(tokenizer, text, max_len)
            return out if eos is None or (out and out[-1] == eos) else out[: max_len - 1] + [eos]

        return [{"input_ids": ids(src), "labels": ids(tgt)} for src, tgt in items]

    def collate(self, items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        """Sources right-padded with ``pad_id`` (``attention_mask`` marks them), targets with IGNORE."""
        batch = data.collate([{"input_ids": it["input_ids"]} for it in items], pad_id)
        labels = torch.full((len(items), max(len(it["labels"]) for it in items)), data.IGNORE, dtype=torch.long)
        for row, it in enumerate(items):
            labels[row, : len(it["labels"])] = torch.tensor(it["labels"], dtype=torch.long)
        batch["labels"] = labels  # (B, T_dec)
        return batch

    @staticmethod
    def decoder_inputs(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
        """``labels (B, T)`` shifted right behind the decoder start token; label padding becomes the pad id."""
        config = getattr(model, "module", model).config
        start = torch.full_like(labels[:, :1], config.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)  # (B, T)
        return shifted.masked_fill(shifted == data.IGNORE, config.pad_token_id or 0)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        labels = batch["labels"]
        logits = model(batch["input_ids"], self.decoder_inputs(model, labels), batch["attention_mask"])  # (B, T, V)
        keep = labels != data.IGNORE
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=data.IGNORE)
        acc = (logits.argmax(-1) == labels)[keep].float().mean()
        return loss, {"n_tokens": int(keep.sum()), "acc": float(acc)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, encoded: list[dict[str, Any]], raw: list, labels: list[str],
                 pad_id: int, progress: bool = False) -> dict[str, float]:
        from corelm.generate.seq2seq import Seq2SeqParams, generate

        was_training = model.training
        model.eval()
        total = correct = exact = count = 0.0
        for idx in batches(encoded, 32, progress, "eval"):
            batch = self.collate([encoded[i] for i in idx], pad_id)
            loss, info = self.loss(model, batch)
            total += float(loss) * info["n_tokens"]
            correct += info["acc"] * info["n_tokens"]
            count += info["n_tokens"]
            gold = batch["labels"]
            out = generate(model, batch["input_ids"], batch["attention_mask"],
                           Seq2SeqParams(max_new_tokens=gold.shape[1]))[:, 1:]  # greedy, (B, <= T_dec)
            width = min(out.shape[1], gold.shape[1])
            same = (out[:, :width] == gold[:, :width]) | (gold[:, :width] == data.IGNORE)
            exact += float((same.all(1) & (gold[:, width:] == data.IGNORE).all(1)).sum())
        model.train(was_training)
        return {"val_loss": total / max(count, 1), "val_acc": correct / max(count, 1),
                "val_exact": exact / max(len(encoded), 1)}

    def predict(self, run: Any, texts: list[str], top: int = 5, batch_size: int = 32) -> list[dict[str, Any]]:
        raise CorelmError(f"{run.path} is a {self.name} run; use corelm translate --model {run.path} TEXT")


class Summarization(Seq2SeqTask):
    """Document -> summary with an encoder-decoder: the same data, objective and metrics as :class:`Seq2SeqTask`
    (``corelm evaluate --task summarize`` reports ROUGE first)."""

    name = "summarize"


TASKS: dict[str, Task] = {task.name: task for task in (Classification(), TokenClassification(), CausalLM(),
                                                       Regression(), Seq2SeqTask(), Summarization())}


def get_task(name: str) -> Task:
    """The task registered as ``name`` (a one-line :class:`CorelmError` for an unknown one)."""
    if name not in TASKS:
        raise CorelmError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    return TASKS[name]
