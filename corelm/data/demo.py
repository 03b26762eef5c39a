"""Demo task data built from real text, so every fine-tuning and evaluation command runs out of the box.

The source is the docstrings of the Python standard library installed with the interpreter, read with
``ast`` (nothing is imported or executed). How each set is built:

* ``packages`` (classification, CSV ``text,label``): the first paragraph of each docstring (module, class
  or function) of four packages with distinct subjects -- ``asyncio``, ``email``, ``turtle``, ``unittest``
  -- labelled with the package it came from. Docstrings of fewer than 6 words are dropped.
* ``summaries`` (summarization, JSONL ``text,summary``): docstrings with a one-line summary and a body of at
  least 12 words, from ``json``, ``logging``, ``pathlib``, ``email``, ``asyncio``, ``unittest``, ``argparse``,
  ``http``, ``tarfile`` and ``zipfile``; the body is the text, the summary line the reference.
* ``chat`` (instruction tuning, JSONL messages): for functions and classes of the same packages, the
  user asks ``What does `module.name` do? Answer in one sentence.`` and the assistant answers with the
  docstring's summary line.
* ``ner`` (CoNLL, IOB2): *generated* sentences from templates with person, place and organisation names
  (PER, LOC, ORG; multi-word names give ``I-`` tags), seeded.
* ``text`` (perplexity): the docstrings of the ``json`` and ``pathlib`` packages, one after another.

Every set is split deterministically by a hash of the text (train 70%, val 10%, test 20%; NER has
train/dev/test), so the held-out splits never overlap with training. Files are written once per Python
version to a cache directory and named ``demo:<set>[:<split>]`` on the command line, e.g.
``--data demo:packages --val demo:packages:val``.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import os
import random
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from corelm import cache
from corelm.errors import CorelmError, close_names

CLASSIFY_PACKAGES = ("asyncio", "email", "turtle", "unittest")
SUMMARY_PACKAGES = ("json", "logging", "pathlib", "email", "asyncio", "unittest", "argparse", "http",
                    "tarfile", "zipfile")
TEXT_PACKAGES = ("json", "pathlib")
SETS = {  # name -> (file pattern, default split, splits)
    "packages": ("packages-{}.csv", "train", ("train", "val", "test")),
    "summaries": ("summaries-{}.jsonl", "test", ("train", "val", "test")),
    "chat": ("chat-{}.jsonl", "train", ("train", "val", "test")),
    "ner": ("ner-{}.conll", "train", ("train", "dev", "test")),
    "text": ("text-{}.txt", "all", ("all",)),
}
_VERSION = 1  # bump when the recipe changes, so stale caches are rebuilt


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def docstrings(package: str) -> list[tuple[str, str]]:
    """``(qualified name, docstring)`` of the module, classes and functions of a stdlib package (tests excluded)."""
    root = _stdlib() / package
    files = sorted(root.rglob("*.py")) if root.is_dir() else [_stdlib() / f"{package}.py"]
    out = []
    for path in files:
        rel = path.relative_to(_stdlib()).with_suffix("")
        if any(part in ("test", "tests") for part in rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        module = ".".join(rel.parts).removesuffix(".__init__")
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    name = module if isinstance(node, ast.Module) else f"{module}.{node.name}"
                    out.append((name, doc))
    return out


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _split(key: str) -> str:
    """Deterministic split of an example by a hash of its text: 70% train, 10% val, 20% test."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 10
    return "train" if bucket < 7 else "val" if bucket == 7 else "test"


def build_packages() -> dict[str, list[dict[str, str]]]:
    splits: dict[str, list[dict[str, str]]] = {"train": [], "val": [], "test": []}
    seen = set()
    for package in CLASSIFY_PACKAGES:
        for _, doc in docstrings(package):
            text = _one_line(doc.strip().split("\n\n")[0])
            if len(text.split()) < 6 or text in seen:
                continue
            seen.add(text)
            splits[_split(text)].append({"text": text, "label": package})
    return splits


def _summary_pairs() -> list[tuple[str, str, str]]:
    """``(name, summary line, body)`` of docstrings that have both."""
    out, seen = [], set()
    for package in SUMMARY_PACKAGES:
        for name, doc in docstrings(package):
            head, _, body = doc.strip().partition("\n\n")
            summary, body = _one_line(head), _one_line(body)
            if "\n" in head.strip() or len(summary.split()) < 4 or len(body.split()) < 12 or summary in seen:
                continue
            seen.add(summary)
            out.append((name, summary, body))
    return out


def build_summaries() -> dict[str, list[dict[str, str]]]:
    splits: dict[str, list[dict[str, str]]] = {"train": [], "val": [], "test": []}
    for _, summary, body in _summary_pairs():
        splits[_split(summary)].append({"text": body, "summary": summary})
    return splits


def build_chat() -> dict[str, list[dict]]:
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for name, summary, _ in _summary_pairs():
        if len(summary) > 160:
            continue
        messages = [{"role": "user", "content": f"What does `{name}` do? Answer in one sentence."},
                    {"role": "assistant", "content": summary}]
        splits[_split(name)].append({"messages": messages})
    return splits


_PER = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Guido van Rossum", "Linus Torvalds", "Marie Curie",
        "Barbara Liskov", "Donald Knuth", "Tim Peters", "Raymond Hettinger", "Ken Thompson", "Katherine Johnson",
        "Dennis Ritchie", "Margaret Hamilton", "John McCarthy", "Frances Allen"]
_LOC = ["Amsterdam", "Paris", "New York", "San Francisco", "Berlin", "Tokyo", "Cape Town", "Buenos Aires",
        "London", "Nairobi", "Sao Paulo", "Mumbai", "Helsinki", "Los Angeles", "Kuala Lumpur", "Oslo"]
_ORG = ["Python Software Foundation", "Bell Labs", "IBM", "Microsoft", "the Linux Foundation", "CERN",
        "Mozilla", "NASA", "Google", "the Apache Software Foundation", "Red Hat", "the European Commission"]
_TEMPLATES = [
    "{PER} visited {LOC} last spring .",
    "{PER} joined {ORG} in {LOC} .",
    "The team at {ORG} hired {PER} .",
    "{ORG} opened a new office in {LOC} .",
    "In {LOC} , {PER} gave a talk about compilers .",
    "{PER} and {PER} met at {ORG} .",
    "A conference in {LOC} was sponsored by {ORG} .",
    "{PER} moved from {LOC} to {LOC} .",
    "Engineers from {ORG} and {ORG} released the code .",
    "Yesterday {PER} said the release was ready .",
    "The library was first written in {LOC} .",
    "{ORG} thanked {PER} for the patch .",
]


def build_ner(seed: int = 1234) -> dict[str, list[tuple[list[str], list[str]]]]:
    """Sentences from :data:`_TEMPLATES` with names drawn at random (seeded); 600 / 150 / 150."""
    rng = random.Random(seed)
    names = {"PER": _PER, "LOC": _LOC, "ORG": _ORG}
    sizes = {"train": 600, "dev": 150, "test": 150}
    splits: dict[str, list] = {}
    for split, n in sizes.items():
        sentences = []
        for _ in range(n):
            tokens, tags = [], []
            for word in rng.choice(_TEMPLATES).split():
                if word.startswith("{") and word.endswith("}"):
                    kind = word[1:-1]
                    parts = rng.choice(names[kind]).split()
                    tokens += parts
                    tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(parts) - 1)
                else:
                    tokens.append(word)
                    tags.append("O")
            sentences.append((tokens, tags))
        splits[split] = sentences
    return splits


def build_text() -> str:
    return "\n\n".join(doc for package in TEXT_PACKAGES for _, doc in docstrings(package))


def write_demo(out_dir: str | Path) -> Path:
    """Write every demo set into ``out_dir``; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in build_packages().items():
        with (out / f"packages-{split}.csv").open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(rows)
    for name, builder in (("summaries", build_summaries), ("chat", build_chat)):
        for split, rows in builder().items():
            (out / f"{name}-{split}.jsonl").write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    for split, sentences in build_ner().items():
        blocks = ["-DOCSTART- -X- O O\n"]
        blocks += ["".join(f"{tok} {tag}\n" for tok, tag in zip(tokens, tags)) for tokens, tags in sentences]
        (out / f"ner-{split}.conll").write_text("\n".join(blocks), encoding="utf-8")
    (out / "text-all.txt").write_text(build_text(), encoding="utf-8")
    return out


def demo_dir() -> Path:
    """The cache directory of the demo files, built on first use (atomically: concurrent callers are safe)."""
    base = cache.cache_subdir("demo")  # private and checked: the files are read back as training data
    final = base / f"demo-v{_VERSION}-py{sys.version_info.major}{sys.version_info.minor}"
    if not (final / "text-all.txt").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=base))
        try:
            write_demo(tmp)
            os.replace(tmp, final)  # one atomic rename
        except OSError:  # another process renamed its copy first: use that one
            pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve(spec: str) -> str:
    """``demo:<set>[:<split>]`` -> the path of that demo file; any other string is returned unchanged."""
    if not spec.startswith("demo:"):
        return spec
    _, name, *rest = spec.split(":")
    if name not in SETS:
        raise CorelmError(f"unknown demo set {name!r}{close_names(name, list(SETS))}; "
                          f"available: {', '.join(SETS)}")
    pattern, default, splits = SETS[name]
    split = rest[0] if rest else default
    if split not in splits:
        raise CorelmError(f"demo set {name!r} has splits {', '.join(splits)}, not {split!r}")
    return str(demo_dir() / pattern.format(split))


if __name__ == "__main__":  # python -m corelm.data.demo DIR: write the demo files somewhere to look at them
    target = write_demo(sys.argv[1] if len(sys.argv) > 1 else "demo-data")
    for path in sorted(target.iterdir()):
        print(f"{path}  {sum(1 for _ in path.open(encoding='utf-8'))} lines")
