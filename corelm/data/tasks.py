"""Task data for fine-tuning and evaluation: classification, NER, chat (SFT) and summarization pairs.

Readers turn files into Python lists; encoders turn those into token ids and labels; :func:`collate`
pads a list of encoded examples into a batch. Nothing is silent about bad data: a malformed row raises
:class:`CorelmError` naming ``file:line``, or, with ``skip_bad=True``, is skipped and counted (the count
is returned and the commands print it).

Formats:

* classification: CSV with a header, or JSONL objects; ``text_field`` and ``label_field`` name the columns.
* NER: CoNLL columns (token first, tag last by default), blank lines between sentences, ``-DOCSTART-``
  lines ignored; tags in BIO/IOB2 (``scheme="iob1"`` converts IOB1 files such as CoNLL-2003's originals).
* chat: JSONL, one conversation per line, ``{"messages": [{"role": ..., "content": ...}, ...]}``
  (a bare list of messages is accepted too). Rendered through the model's own chat template; the loss is
  computed on assistant tokens only (the template's end-of-turn token included, so the model learns to stop).
* pairs (summarization): JSONL with ``source_field`` and ``target_field``.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from corelm.data.text import read_lines
from corelm.data.text import read_text as _read_text
from corelm.errors import CorelmError
from corelm.eval.ner import iob1_to_iob2, split_tag

IGNORE = -100  # label of positions that carry no loss (PyTorch cross_entropy's ignore_index)


@dataclass
class Rows:
    """What a reader returns: the examples, and how many bad rows were skipped."""

    items: list[Any] = field(default_factory=list)
    skipped: int = 0
    path: str = ""

    def note(self) -> str:
        return f"skipped {self.skipped} bad row(s) of {self.path}" if self.skipped else ""


class _BadRows:
    def __init__(self, path: Path, skip_bad: bool) -> None:
        self.path, self.skip_bad, self.count = path, skip_bad, 0

    def __call__(self, line: int, message: str) -> None:
        if not self.skip_bad:
            raise CorelmError(f"{self.path}:{line}: {message} (pass --skip-bad to skip such rows)")
        self.count += 1


def _open(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CorelmError(f"data file not found: {path}")
    return path


def _json_lines(path: Path, bad: _BadRows) -> Iterator[tuple[int, Any]]:
    for line_no, line in read_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            bad(line_no, f"invalid JSON ({exc.msg})")
            continue
        except RecursionError:
            bad(line_no, "invalid JSON (nested too deeply)")
            continue
        except ValueError as exc:  # e.g. an integer of more than 4300 digits
            bad(line_no, f"invalid JSON ({str(exc).split(';')[0]})")
            continue
        try:  # JSON may spell a lone surrogate ("\\ud800"), which is not text any tokenizer can take
            json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            bad(line_no, "a string holds a lone surrogate escape (\\ud800-\\udfff), which is not Unicode text")
            continue
        yield line_no, record


def _scalar_problem(name: str, value: Any) -> str | None:
    """Why a JSON value cannot be a text or a label (lists, objects, NaN), or None when it can."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"field {name!r} is {value}, not a text or label"
    if not isinstance(value, (str, int, float)):
        return f"field {name!r} is a JSON {'array' if isinstance(value, list) else 'object'}, not a text or label"
    return None


# ---------------------------------------------------------------------------------------------- readers

def read_classification(path: str | Path, text_field: str = "text", label_field: str = "label",
                        skip_bad: bool = False) -> Rows:
    """``(text, label)`` pairs from a CSV (with header) or JSONL file; labels are kept as strings.

    A JSONL number is a fine text or label (``1`` becomes ``"1"``); an array, an object or a non-finite
    number is a bad row, never stringified into a label nobody wrote.
    """
    path = _open(path)
    bad, rows = _BadRows(path, skip_bad), Rows(path=str(path))

    def take(line: int, record: Any) -> None:
        if not isinstance(record, dict):
            return bad(line, "expected an object with fields")
        text, label = record.get(text_field), record.get(label_field)
        if text is None or label is None:
            missing = text_field if text is None else label_field
            return bad(line, f"missing field {missing!r}")
        problem = _scalar_problem(text_field, text) or _scalar_problem(label_field, label)
        if problem:
            return bad(line, problem)
        if not str(text).strip() or not str(label).strip():
            return bad(line, "empty text or label")
        rows.items.append((str(text), str(label)))

    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        for line, record in _json_lines(path, bad):
            take(line, record)
    else:
        reader = csv.DictReader(line for _, line in read_lines(path))
        try:
            header = reader.fieldnames
        except csv.Error as exc:
            raise CorelmError(f"{path}:1: unreadable CSV header ({exc})") from None
        if not header or text_field not in header or label_field not in header:
            raise CorelmError(f"{path}:1: the header {header} lacks {text_field!r} or "
                              f"{label_field!r} (set --text-field/--label-field)")
        while True:
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:  # e.g. a field over the csv module's size limit
                bad(reader.line_num, f"unreadable CSV row ({exc})")
                continue
            if None in record:  # more cells than header columns
                bad(reader.line_num, f"{len(record) - 1 + len(record[None])} cells for {len(header)} columns")
                continue
            take(reader.line_num, record)
    rows.skipped = bad.count
    if not rows.items:
        raise CorelmError(f"{path}: no usable examples")
    return rows


def read_conll(path: str | Path, token_col: int = 0, tag_col: int = -1, scheme: str = "iob2",
               skip_bad: bool = False) -> Rows:
    """Sentences ``(tokens, tags)`` from a CoNLL file (a bad line drops its whole sentence when skipped)."""
    if scheme not in ("iob2", "bio", "iob1"):
        raise CorelmError(f"unknown tagging scheme {scheme!r}; expected iob2 (= bio) or iob1")
    path = _open(path)
    bad, rows = _BadRows(path, skip_bad), Rows(path=str(path))
    tokens: list[str] = []
    tags: list[str] = []
    broken = False

    def flush() -> None:
        nonlocal tokens, tags, broken
        if tokens and not broken:
            rows.items.append((tokens, iob1_to_iob2(tags) if scheme == "iob1" else tags))
        tokens, tags, broken = [], [], False

    for line_no, line in read_lines(path):
        cols = line.split()
        if not cols:
            flush()
            continue
        if cols[0] == "-DOCSTART-":
            flush()
            continue
        if len(cols) < 2:
            bad(line_no, f"expected a token and a tag, got {line.strip()!r}")
            broken = True
            continue
        tag = cols[tag_col]
        prefix, kind = split_tag(tag)
        if prefix not in ("O", "B", "I") or (prefix != "O" and not kind) or (prefix == "O" and tag != "O"):
            bad(line_no, f"tag {tag!r} is not BIO (O, B-TYPE or I-TYPE)")
            broken = True
            continue
        tokens.append(cols[token_col])
        tags.append(tag)
    flush()
    rows.skipped = bad.count
    if not rows.items:
        raise CorelmError(f"{path}: no sentences")
    return rows


def read_chat(path: str | Path, skip_bad: bool = False) -> Rows:
    """Conversations (lists of ``{"role", "content"}``) with at least one assistant turn."""
    path = _open(path)
    bad, rows = _BadRows(path, skip_bad), Rows(path=str(path))
    for line, record in _json_lines(path, bad):
        messages = record.get("messages") if isinstance(record, dict) else record
        if not isinstance(messages, list) or not messages:
            bad(line, "expected {\"messages\": [...]} or a list of messages")
            continue
        ok = all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                 and isinstance(m.get("content"), str) for m in messages)
        if not ok:
            bad(line, "each message needs a role (system/user/assistant) and a string content")
        elif not any(m["role"] == "assistant" for m in messages):
            bad(line, "no assistant message to learn from")
        else:
            rows.items.append([{"role": m["role"], "content": m["content"]} for m in messages])
    rows.skipped = bad.count
    if not rows.items:
        raise CorelmError(f"{path}: no usable conversations")
    return rows


def read_pairs(path: str | Path, source_field: str = "text", target_field: str = "summary",
               skip_bad: bool = False) -> Rows:
    """``(source, target)`` pairs from JSONL, e.g. document -> summary."""
    path = _open(path)
    bad, rows = _BadRows(path, skip_bad), Rows(path=str(path))
    for line, record in _json_lines(path, bad):
        if not isinstance(record, dict) or not isinstance(record.get(source_field), str) \
                or not isinstance(record.get(target_field), str):
            bad(line, f"expected string fields {source_field!r} and {target_field!r}")
            continue
        rows.items.append((record[source_field], record[target_field]))
    rows.skipped = bad.count
    if not rows.items:
        raise CorelmError(f"{path}: no usable pairs")
    return rows


def read_text(path: str | Path) -> str:
    """A whole text file (for perplexity)."""
    return _read_text(_open(path))


# ---------------------------------------------------------------------------------------------- labels

def ner_labels(sentences: Sequence[tuple[list[str], list[str]]]) -> list[str]:
    """The tag set, ``O`` first, with ``B-X`` and ``I-X`` for every type seen."""
    kinds = sorted({split_tag(t)[1] for _, tags in sentences for t in tags} - {""})
    return ["O"] + [f"{p}-{k}" for k in kinds for p in ("B", "I")]


# ---------------------------------------------------------------------------------------------- encoders

def special_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids a tokenizer's post-processor puts before and after a text (``[CLS]``/``[SEP]`` for BERT)."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    start = next((i for i in range(len(full)) if full[i:i + len(plain)] == plain), 0)
    return full[:start], full[start + len(plain):]


def encode_text(tokenizer: Any, text: str, max_len: int) -> list[int]:
    """Token ids of one text with the tokenizer's special tokens, truncated to ``max_len``."""
    prefix, suffix = special_ids(tokenizer)
    body = tokenizer.encode(text, add_special_tokens=False)[:max_len - len(prefix) - len(suffix)]
    return prefix + body + suffix


def encode_words(tokenizer: Any, words: Sequence[str], max_len: int,
                 word_labels: Sequence[int] | None = None) -> dict[str, list[int]]:
    """Sub-word ids of a pre-split sentence, with the label of each word on its *first* sub-word.

    Later sub-words and special tokens get :data:`IGNORE` (no loss, no prediction) -- the alignment of
    BERT's NER recipe (Devlin et al. 2019, section 5.3). Words are encoded one by one; a leading space is
    added before every word but the first, which is what byte-level BPE tokenizers expect.

    Returns:
        ``{"input_ids", "labels", "word_index"}``; ``word_index[i]`` is the word whose first sub-word is at
        position ``i`` or -1. Words cut off by ``max_len`` are absent (predicted ``O`` downstream).
    """
    prefix, suffix = special_ids(tokenizer)
    budget = max_len - len(prefix) - len(suffix)
    ids, labels, word_index = list(prefix), [IGNORE] * len(prefix), [-1] * len(prefix)
    for i, word in enumerate(words):
        pieces = tokenizer.encode(word if i == 0 else " " + word, add_special_tokens=False)
        if len(ids) - len(prefix) + len(pieces) > budget:
            break
        if not pieces:  # a word the tokenizer drops entirely (e.g. a control character)
            continue
        ids += pieces
        labels += [word_labels[i] if word_labels is not None else IGNORE] + [IGNORE] * (len(pieces) - 1)
        word_index += [i] + [-1] * (len(pieces) - 1)
    return {"input_ids": ids + suffix, "labels": labels + [IGNORE] * len(suffix),
            "word_index": word_index + [-1] * len(suffix)}


def chat_segments(tokenizer: Any, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into ``(text, is_assistant)`` segments.

    Each assistant turn's segment is what the template adds after the generation prompt: its content and
    end-of-turn marker. Requires a template whose rendering of a prefix of the conversation is a prefix
    of the rendering of the whole (true of ChatML and Llama templates); otherwise a CorelmError.
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise CorelmError("the chat template does not render conversations incrementally; "
                              "cannot locate the assistant tokens")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return [(text, is_assistant) for text, is_assistant in segments if text]


def encode_chat(tokenizer: Any, messages: list[dict[str, str]], max_len: int) -> dict[str, list[int]]:
    """Ids of a conversation and labels that are the ids on assistant tokens and :data:`IGNORE` elsewhere.

    Segments are encoded one at a time, exactly as at inference time, when the prompt is encoded and the
    answer tokens are generated after it. Labels are *not* shifted: the loss shifts them.
    """
    ids: list[int] = []
    labels: list[int] = []
    for text, is_assistant in chat_segments(tokenizer, messages):
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        labels += piece if is_assistant else [IGNORE] * len(piece)
    return {"input_ids": ids[:max_len], "labels": labels[:max_len]}


def collate(items: list[dict[str, Any]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into ``input_ids``/``attention_mask`` ``(B, T)`` and ``labels``.

    ``labels`` is ``(B,)`` for sequence labels (an int per example) and ``(B, T)`` padded with
    :data:`IGNORE` for per-token labels.
    """
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        ids[row, :n] = torch.tensor(it["input_ids"], dtype=torch.long)
        mask[row, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if "labels" in items[0]:
        if isinstance(items[0]["labels"], int):
            batch["labels"] = torch.tensor([it["labels"] for it in items], dtype=torch.long)
        else:
            labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
            for row, it in enumerate(items):
                labels[row, :len(it["labels"])] = torch.tensor(it["labels"], dtype=torch.long)
            batch["labels"] = labels
    return batch


def length_sorted_batches(items: Sequence[dict[str, Any]], batch_size: int) -> list[list[int]]:
    """Index batches of similar lengths (evaluation: less padding, same results)."""
    order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
