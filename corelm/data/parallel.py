"""Parallel text for encoder-decoders: reading source/target pairs, and a real corpus built offline.

**Reading** (:func:`read_parallel`): JSONL objects, CSV with a header, or TSV (with a header naming the
fields, or two bare columns ``source<TAB>target``). Without explicit field names the first present of
``source, text, src`` is the source and of ``target, summary, label, tgt`` the target, so translation
pairs and the summarization files of :mod:`corelm.data.tasks` read alike.

**Building** (:func:`build_cldr`): the Unicode Common Locale Data Repository (CLDR) names every language,
territory, currency and script, and the months and weekdays, in each of its locales. The ``babel``
package ships CLDR's data; pairing the English and, say, German display name of each code gives a
parallel corpus of ~1,400 short phrases that needs no download and is the same on every machine with
the same babel version (recorded in ``corpus.json``). ``"Central African Republic"`` ->
``"Zentralafrikanische Republik"``, ``"Swiss German"`` -> ``"Schweizerdeutsch"``: the phrases are short, but
a model must learn word order, compounding and inflection to translate the held-out ones.

Splits are deterministic by a hash of the source phrase (80% train, 10% val, 10% test), so a held-out
phrase never occurs in training; a source with two different translations (e.g. a name shared by a
language and a script) keeps its first, by category order then code.

**Number spellings** (:func:`build_numbers`): the same integer spelled out by the ``num2words`` package
in two languages, ``"three hundred and twenty-seven"`` -> ``"trois cent vingt-sept"``. Unlike CLDR's names,
the mapping is compositional (a few dozen words and the rules that join them), nothing is spelled the same
in both languages (so copying the source scores ~0), and the corpus can be as large as wanted. The
numbers are drawn with a fixed seed: first a digit count (1 to ``max_digits``, uniform, so small numbers
are not swamped by six-digit ones), then a number of that many digits; distinct numbers, then cut into
train/val/test, so no number is in two splits.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from pathlib import Path
from typing import Any

from corelm.data.tasks import Rows, _BadRows, _json_lines, _open
from corelm.data.text import read_lines
from corelm.errors import CorelmError

SOURCE_FIELDS = ("source", "text", "src")
TARGET_FIELDS = ("target", "summary", "label", "tgt")
CLDR_CATEGORIES = ("languages", "territories", "currencies", "scripts", "months", "days")


def _pick(names: list[str] | None, given: str | None, defaults: tuple[str, ...]) -> str | None:
    if given is not None:
        return given if names is None or given in names else None
    return next((n for n in defaults if names is None or n in names), None)


def read_parallel(path: str | Path, source_field: str | None = None, target_field: str | None = None,
                  skip_bad: bool = False) -> Rows:
    """``(source, target)`` string pairs of a JSONL, CSV or TSV file (see the module docstring).

    Raises:
        CorelmError: a missing file or field, a malformed row (unless ``skip_bad``), no usable pair.
    """
    path = _open(path)
    bad, rows = _BadRows(path, skip_bad), Rows(path=str(path))

    def take(line: int, src: Any, tgt: Any) -> None:
        if not isinstance(src, str) or not isinstance(tgt, str):
            return bad(line, "source and target must be strings")
        if not src.strip() or not tgt.strip():
            return bad(line, "empty source or target")
        rows.items.append((src.strip(), tgt.strip()))

    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        for line, record in _json_lines(path, bad):
            if not isinstance(record, dict):
                bad(line, "expected an object with fields")
                continue
            src_name = _pick(list(record), source_field, SOURCE_FIELDS)
            tgt_name = _pick(list(record), target_field, TARGET_FIELDS)
            if src_name is None or tgt_name is None:
                want = (source_field or "/".join(SOURCE_FIELDS)) if src_name is None else \
                    (target_field or "/".join(TARGET_FIELDS))
                bad(line, f"missing field {want!r}")
                continue
            take(line, record[src_name], record[tgt_name])
    else:
        _read_table(path, source_field, target_field, bad, take)
    rows.skipped = bad.count
    if not rows.items:
        raise CorelmError(f"{path}: no usable source/target pairs")
    return rows


def _read_table(path: Path, source_field: str | None, target_field: str | None, bad: _BadRows, take: Any) -> None:
    """CSV (header required) or TSV (header, or two bare columns)."""
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    reader = csv.reader((line for _, line in read_lines(path)), delimiter=delimiter)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise CorelmError(f"{path}:1: unreadable header ({exc})") from None
    if header is None:
        raise CorelmError(f"{path}: empty file")
    src_name, tgt_name = _pick(header, source_field, SOURCE_FIELDS), _pick(header, target_field, TARGET_FIELDS)
    if src_name is not None and tgt_name is not None:
        columns = header.index(src_name), header.index(tgt_name)
    elif delimiter == "\t" and len(header) == 2 and source_field is None and target_field is None:
        columns = (0, 1)  # a bare two-column TSV: the first line is a pair too
        take(1, header[0], header[1])
    else:
        raise CorelmError(f"{path}:1: the header {header} names no source/target column (set --text-field/"
                          "--label-field; a TSV without a header must have exactly two columns)")
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            bad(reader.line_num, f"unreadable row ({exc})")
            continue
        if not cells:
            continue
        if len(cells) != len(header):
            bad(reader.line_num, f"{len(cells)} cells for {len(header)} columns")
            continue
        take(reader.line_num, cells[columns[0]], cells[columns[1]])


# ---- a corpus derived from CLDR (babel) ------------------------------------------------------------


def _split(text: str) -> str:
    """80% train, 10% val, 10% test, by a hash of the source phrase."""
    bucket = int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % 10
    return "train" if bucket < 8 else "val" if bucket == 8 else "test"


def _names(locale: Any, category: str) -> dict[str, str]:
    """``code -> display name`` of one CLDR category in one babel ``Locale``."""
    if category in ("months", "days"):  # the stand-alone wide forms ("January", "Monday")
        return {str(k): v for k, v in getattr(locale, category)["stand-alone"]["wide"].items()}
    return {str(k): v for k, v in getattr(locale, category).items()}


def cldr_pairs(source_lang: str, target_lang: str) -> list[dict[str, str]]:
    """Every CLDR name both locales have: ``{"source", "target", "category", "code"}``, sources unique.

    Raises:
        CorelmError: ``babel`` is not installed, or a locale is unknown to it.
    """
    try:
        from babel import Locale, UnknownLocaleError
    except ImportError:
        raise CorelmError("the CLDR corpus is read from the babel package: pip install babel") from None
    try:
        src, tgt = Locale.parse(source_lang), Locale.parse(target_lang)
    except (UnknownLocaleError, ValueError) as exc:
        raise CorelmError(f"unknown CLDR locale: {exc}") from None
    pairs, seen = [], set()
    for category in CLDR_CATEGORIES:
        a, b = _names(src, category), _names(tgt, category)
        for code in sorted(set(a) & set(b)):
            source, target = " ".join(a[code].split()), " ".join(b[code].split())
            if source and target and source not in seen:
                seen.add(source)
                pairs.append({"source": source, "target": target, "category": category, "code": code})
    return pairs


def build_cldr(out: str | Path, pair: str = "en-de", overwrite: bool = False) -> dict[str, Any]:
    """Write ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` (``{"source", "target", "category", "code"}``), ``text.txt``
    (both sides of the training pairs, one phrase a line: what a tokenizer is trained on) and ``corpus.json``
    (languages, counts, babel and CLDR versions) into ``out``.

    Args:
        pair: ``<source>-<target>`` CLDR locales, e.g. ``en-de``, ``en-fr``, ``de-zh_Hant``.
    Returns:
        the contents of ``corpus.json``.
    """
    source_lang, target_lang, out = _pair_and_out("CLDR", pair, out, overwrite)
    pairs = cldr_pairs(source_lang, target_lang)
    splits: dict[str, list[dict[str, str]]] = {"train": [], "val": [], "test": []}
    for p in pairs:
        splits[_split(p["source"])].append(p)
    import babel

    info = {"corpus": f"cldr:{pair}", "source_lang": source_lang, "target_lang": target_lang,
            "babel": babel.__version__, "cldr": _cldr_version(), "categories": list(CLDR_CATEGORIES),
            "pairs": {k: len(v) for k, v in splits.items()}}
    _write_corpus(out, splits, info)
    return info


def _write_corpus(out: Path, splits: dict[str, list[dict[str, Any]]], info: dict[str, Any]) -> None:
    from corelm.io.atomic import atomic_dir

    with atomic_dir(out) as tmp:
        for name, rows in splits.items():
            (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                               encoding="utf-8")
        (tmp / "text.txt").write_text("".join(f"{r['source']}\n{r['target']}\n" for r in splits["train"]),
                                      encoding="utf-8")
        (tmp / "corpus.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _pair_and_out(kind: str, pair: str, out: str | Path, overwrite: bool) -> tuple[str, str, Path]:
    source_lang, sep, target_lang = pair.partition("-")
    if not sep or not source_lang or not target_lang:
        raise CorelmError(f"a {kind} pair is <source>-<target>, e.g. en-de; got {pair!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CorelmError(f"{out} exists and is not empty; choose another directory or pass --overwrite")
    return source_lang, target_lang, out


# ---- number spellings (num2words) -------------------------------------------------------------------

NUMBER_SPLITS = {"train": 20000, "val": 300, "test": 500}


def _spell(lang: str) -> Any:
    """``n -> words`` in ``lang`` (``"digits"``: the numeral itself)."""
    if lang == "digits":
        return str
    try:
        from num2words import CONVERTER_CLASSES, num2words
    except ImportError:
        raise CorelmError("the number-spelling corpus is written by the num2words package: pip install num2words") \
            from None
    if lang not in CONVERTER_CLASSES:
        raise CorelmError(f"num2words has no language {lang!r} (it has {', '.join(sorted(CONVERTER_CLASSES))})")
    return lambda n: " ".join(num2words(n, lang=lang).split())


def sample_numbers(count: int, max_digits: int = 6, seed: int = 0) -> list[int]:
    """``count`` distinct integers of 1 to ``max_digits`` digits, the digit count uniform; the same for a seed."""
    if count > 10 ** max_digits // 2:
        raise CorelmError(f"{count:,} distinct numbers of up to {max_digits} digits would be most of them; ask fewer")
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < count:
        digits = rng.randint(1, max_digits)
        n = rng.randrange(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits)
        if n not in seen:
            seen.add(n)
            out.append(n)
    return out


def number_pairs(source_lang: str, target_lang: str, count: int, max_digits: int = 6,
                 seed: int = 0) -> list[dict[str, Any]]:
    """``count`` pairs ``{"source", "target", "number"}``: distinct numbers spelled in the two languages."""
    src, tgt = _spell(source_lang), _spell(target_lang)
    return [{"source": src(n), "target": tgt(n), "number": n} for n in sample_numbers(count, max_digits, seed)]


def build_numbers(out: str | Path, pair: str = "en-fr", overwrite: bool = False, seed: int = 0,
                  max_digits: int = 6, sizes: dict[str, int] | None = None) -> dict[str, Any]:
    """Write a number-spelling corpus, laid out as :func:`build_cldr`'s: ``train/val/test.jsonl``
    (``{"source", "target", "number"}``), ``text.txt`` and ``corpus.json``.

    Args:
        pair: ``<source>-<target>`` num2words languages (``en-fr``, ``en-de``, ``de-en``, ...); ``digits`` as the
            source writes the numeral (``327`` -> ``trois cent vingt-sept``).
        seed: the draw of the numbers; the same seed and sizes give the same files.
        max_digits: numbers go up to ``10 ** max_digits - 1``.
        sizes: pairs per split (default :data:`NUMBER_SPLITS`: 20,000 / 300 / 500).
    Returns:
        the contents of ``corpus.json``.
    """
    source_lang, target_lang, out = _pair_and_out("number", pair, out, overwrite)
    sizes = dict(sizes or NUMBER_SPLITS)
    pairs = number_pairs(source_lang, target_lang, sum(sizes.values()), max_digits, seed)
    splits, start = {}, 0
    for name, size in sizes.items():
        splits[name], start = pairs[start:start + size], start + size
    info = {"corpus": f"numbers:{pair}", "source_lang": source_lang, "target_lang": target_lang,
            "num2words": _dist_version("num2words"), "seed": seed,
            "max_digits": max_digits, "pairs": {k: len(v) for k, v in splits.items()}}
    _write_corpus(out, splits, info)
    return info


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _cldr_version() -> str | None:
    try:
        from babel.core import get_cldr_version
    except ImportError:  # older babel
        return None
    return str(get_cldr_version())
