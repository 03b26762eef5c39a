"""Classification metrics: accuracy, precision/recall/F1 (per class, macro, micro, weighted), confusion matrix.

Pure Python over label lists so the same functions score sentence labels, token labels and entity
matches (``corelm.eval.ner`` reuses :func:`prf_from_counts`). Definitions follow scikit-learn's
``precision_recall_fscore_support``: a ratio whose denominator is zero is 0 (``zero_division=0``), and
``weighted`` averages per-class scores by true support.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any


def accuracy(y_true: Sequence[Hashable], y_pred: Sequence[Hashable]) -> float:
    """Fraction of positions where ``y_pred`` equals ``y_true``."""
    _check_lengths(y_true, y_pred)
    return sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true) if y_true else 0.0


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def prf_from_counts(tp: int, n_pred: int, n_true: int) -> tuple[float, float, float]:
    """Precision, recall and F1 from true positives, predicted count and true count."""
    p, r = _ratio(tp, n_pred), _ratio(tp, n_true)
    return p, r, _ratio(2 * p * r, p + r)


def averages(per_class: dict[Any, dict[str, float]], tp: int, n_pred: int, n_true: int) -> dict[str, dict]:
    """Micro, macro and weighted averages of a per-class table.

    Args:
        per_class: class -> {"precision", "recall", "f1", "support"}.
        tp, n_pred, n_true: totals over classes, for the micro average.
    """
    classes = list(per_class.values())
    support = sum(c["support"] for c in classes)
    micro_p, micro_r, micro_f = prf_from_counts(tp, n_pred, n_true)
    out = {"micro": {"precision": micro_p, "recall": micro_r, "f1": micro_f, "support": support}}
    for name, weight in (("macro", lambda c: 1.0), ("weighted", lambda c: c["support"])):
        total = sum(weight(c) for c in classes)
        out[name] = {k: _ratio(sum(weight(c) * c[k] for c in classes), total) for k in ("precision", "recall", "f1")}
        out[name]["support"] = support
    return out


def confusion_matrix(y_true: Sequence[Hashable], y_pred: Sequence[Hashable],
                     labels: Sequence[Hashable]) -> list[list[int]]:
    """``m[i][j]`` = number of examples of true class ``labels[i]`` predicted as ``labels[j]``."""
    _check_lengths(y_true, y_pred)
    index = {label: i for i, label in enumerate(labels)}
    m = [[0] * len(labels) for _ in labels]
    for t, p in zip(y_true, y_pred):
        if t in index and p in index:
            m[index[t]][index[p]] += 1
    return m


def classification_report(y_true: Sequence[Hashable], y_pred: Sequence[Hashable],
                          labels: Sequence[Hashable] | None = None) -> dict[str, Any]:
    """Accuracy, per-class and averaged P/R/F1 and the confusion matrix, as a JSON-ready dict.

    Args:
        y_true: Gold labels.
        y_pred: Predicted labels, same length.
        labels: Class order for the table and the matrix (default: sorted union of both lists).
    """
    _check_lengths(y_true, y_pred)
    labels = list(labels) if labels is not None else sorted(set(y_true) | set(y_pred), key=str)
    n_true, n_pred = Counter(y_true), Counter(y_pred)
    tp = Counter(t for t, p in zip(y_true, y_pred) if t == p)
    per_class = {}
    for label in labels:
        p, r, f = prf_from_counts(tp[label], n_pred[label], n_true[label])
        per_class[str(label)] = {"precision": p, "recall": r, "f1": f, "support": n_true[label]}
    totals = (sum(tp[c] for c in labels), sum(n_pred[c] for c in labels), sum(n_true[c] for c in labels))
    return {
        "accuracy": accuracy(y_true, y_pred),
        "n": len(y_true),
        "per_class": per_class,
        **averages(per_class, *totals),
        "labels": [str(c) for c in labels],
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels),
    }


def format_table(report: dict[str, Any], title: str = "class") -> str:
    """Render a report from :func:`classification_report` or ``ner.entity_report`` as a text table."""
    rows = [(name, c) for name, c in report["per_class"].items()]
    rows += [(f"{avg} avg", report[avg]) for avg in ("micro", "macro", "weighted")]
    width = max([len(title)] + [len(name) for name, _ in rows])
    lines = [f"{title:<{width}}  precision  recall     f1  support"]
    for i, (name, c) in enumerate(rows):
        if i == len(report["per_class"]):
            lines.append("")
        lines.append(f"{name:<{width}}  {c['precision']:9.4f}  {c['recall']:6.4f}  {c['f1']:.4f}  {c['support']:7d}")
    if "accuracy" in report:
        lines += ["", f"accuracy {report['accuracy']:.4f} on {report['n']} examples"]
    if "confusion_matrix" in report:
        labels = report["labels"]
        w = max(5, *(len(x) for x in labels))
        lines += ["", "confusion matrix (rows: true, columns: predicted)",
                  " " * w + "  " + "  ".join(f"{x[:w]:>{w}}" for x in labels)]
        for label, row in zip(labels, report["confusion_matrix"]):
            lines.append(f"{label[:w]:>{w}}  " + "  ".join(f"{v:>{w}d}" for v in row))
    return "\n".join(lines)


def _check_lengths(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"gold and predicted labels differ in length: {len(a)} != {len(b)}")
