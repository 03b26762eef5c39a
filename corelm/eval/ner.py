"""Entity-level NER scoring, equal to ``seqeval`` in both of its modes.

An entity counts as correct only when its type *and* its exact token span match a gold entity.

Two ways to read a tag sequence into entities (both are tested against ``seqeval``):

* **lenient** (``strict=False``, seqeval's default, the CoNLL ``conlleval`` rules): an ``I-X`` that does
  not continue an ``X`` entity starts a new one, so ``O I-LOC`` yields a LOC entity.
* **strict** (``strict=True``, seqeval ``mode="strict", scheme=IOB2``): an entity is ``B-X`` followed by
  ``I-X`` tokens; a stray ``I-X`` is invalid and yields nothing.

seqeval#23 is the classic surprise of the lenient default; reports always state which mode was used.
IOB1 data (CoNLL-2003's original files) is converted to IOB2 by :func:`iob1_to_iob2` before scoring.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from corelm.eval.metrics import averages, prf_from_counts

Entity = tuple[int, str, int, int]  # (sentence index, type, first token, last token)


def split_tag(tag: str) -> tuple[str, str]:
    """``"B-PER" -> ("B", "PER")``, ``"O" -> ("O", "")``."""
    if tag == "O" or not tag:
        return "O", ""
    prefix, _, kind = tag.partition("-")
    return prefix, kind


def iob1_to_iob2(tags: Sequence[str]) -> list[str]:
    """IOB1 (``B-`` only between adjacent same-type entities) -> IOB2 (every entity starts with ``B-``)."""
    out, prev = [], "O"
    for tag in tags:
        prefix, kind = split_tag(tag)
        if prefix == "I" and split_tag(prev)[1] != kind:
            tag = f"B-{kind}"
        out.append(tag)
        prev = tag
    return out


def entities(tags: Sequence[str], strict: bool = False, sentence: int = 0) -> list[Entity]:
    """Spans of one tag sequence (BIO/IOB2, lenient mode also reads IOBES ``E-``/``S-``)."""
    spans: list[Entity] = []
    start, kind = None, ""  # the open entity, if any

    def close(end: int) -> None:
        nonlocal start
        if start is not None:
            spans.append((sentence, kind, start, end))
        start = None

    for i, tag in enumerate(tags):
        prefix, t = split_tag(tag)
        continues = start is not None and t == kind and prefix in ("I", "E")
        if continues:
            if prefix == "E":
                close(i)
            continue
        close(i - 1)
        if prefix in ("B", "S") or (prefix in ("I", "E") and not strict):
            start, kind = i, t
            if prefix in ("S", "E"):
                close(i)
    close(len(tags) - 1)
    return spans


def entity_report(y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]],
                  strict: bool = False) -> dict[str, Any]:
    """Per-type and averaged entity precision/recall/F1, like ``seqeval.metrics.classification_report``.

    Args:
        y_true: Gold tag sequences, one per sentence.
        y_pred: Predicted tag sequences, same shapes.
        strict: Strict IOB2 entity reading (see the module docstring); lenient otherwise.

    Returns:
        ``{"mode", "per_class": {type: {precision, recall, f1, support}}, "micro", "macro", "weighted",
        "token_accuracy"}``; types are the sorted union of gold and predicted entity types.
    """
    if len(y_true) != len(y_pred) or any(len(a) != len(b) for a, b in zip(y_true, y_pred)):
        raise ValueError("gold and predicted tag sequences differ in shape")
    gold = {e for i, tags in enumerate(y_true) for e in entities(tags, strict, i)}
    pred = {e for i, tags in enumerate(y_pred) for e in entities(tags, strict, i)}
    n_true = Counter(e[1] for e in gold)
    n_pred = Counter(e[1] for e in pred)
    tp = Counter(e[1] for e in gold & pred)
    per_class = {}
    for kind in sorted(set(n_true) | set(n_pred)):
        p, r, f = prf_from_counts(tp[kind], n_pred[kind], n_true[kind])
        per_class[kind] = {"precision": p, "recall": r, "f1": f, "support": n_true[kind]}
    n_tokens = sum(len(s) for s in y_true)
    correct = sum(a == b for s, t in zip(y_true, y_pred) for a, b in zip(s, t))
    return {
        "mode": "strict IOB2" if strict else "lenient (conlleval)",
        "per_class": per_class,
        **averages(per_class, len(gold & pred), len(pred), len(gold)),
        "token_accuracy": correct / n_tokens if n_tokens else 0.0,
    }


def token_report(y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Per-tag precision/recall/F1/support over tokens (``B-LOC`` ... ``O``), like sklearn's
    ``classification_report`` on the flattened tag lists.

    The entity-level report (:func:`entity_report`) is the score NER is compared by; this one shows where
    tags go wrong -- e.g. a model that finds entities' first tokens (``B-``) but cuts them short (``I-``).

    Returns:
        ``{"per_class": {tag: {precision, recall, f1, support}}, "micro", "macro", "weighted", "accuracy",
        "n", "labels"}``; tags are the sorted union of gold and predicted tags (``B-*``, ``I-*``, then ``O``).
    """
    from corelm.eval.metrics import classification_report

    if len(y_true) != len(y_pred) or any(len(a) != len(b) for a, b in zip(y_true, y_pred)):
        raise ValueError("gold and predicted tag sequences differ in shape")
    report = classification_report([t for s in y_true for t in s], [t for s in y_pred for t in s])
    del report["confusion_matrix"]  # a tag-by-tag matrix is wider than a terminal for a handful of types
    return report
