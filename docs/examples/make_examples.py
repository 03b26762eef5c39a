"""Rebuild the example files the guides use, from text nobody in corelm wrote.

    python docs/examples/make_examples.py

* ``corpus.txt`` / ``corpus.jsonl``: docstrings of standard-library modules (read with ``ast``,
  nothing imported), the kind of text ``corelm prepare --corpus python-docs`` extracts.
* ``calib.txt``: ``pydoc`` text of two standard-library modules (calibration for ``corelm prune``).
* ``heldout.txt``: CPython's ``LICENSE.txt``, never used for calibration or training.
* ``dev8.conll``: the first 8 sentences of ``demo:ner:dev`` (no ``-DOCSTART-`` line);
  ``chat-val12.jsonl``: the first 12 conversations of ``demo:chat:val``.
* ``bad.csv``: a CSV whose second line is not UTF-8 (the quickstart's error example).

The small hand-written files (``my_model.yaml``, ``gpt2-6x384.yaml``, ``gpt2-8x512.yaml``,
``key.txt``) are not generated: they are ModelConfig fields and a placeholder API key.
"""

from __future__ import annotations

import ast
import json
import pydoc
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS_MODULES = ["textwrap", "shlex", "fnmatch", "glob", "bisect", "heapq", "calendar", "difflib"]
JSONL_MODULES = ["colorsys", "keyword"]
CALIB_MODULES = ["textwrap", "shlex", "fnmatch", "bisect", "heapq", "calendar"]


def docstrings(module: str) -> list[str]:
    """Every module, class and function docstring of one standard-library source file, in order."""
    tree = ast.parse((STDLIB / f"{module}.py").read_text(encoding="utf-8"))
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return [d.strip() for d in (ast.get_docstring(n) for n in nodes) if d and d.strip()]


def main() -> None:
    docs = [d for m in CORPUS_MODULES for d in docstrings(m)]
    (HERE / "corpus.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    with (HERE / "corpus.jsonl").open("w", encoding="utf-8") as f:
        for d in (d for m in JSONL_MODULES for d in docstrings(m)):
            f.write(json.dumps({"text": d}) + "\n")
    calib = [pydoc.plain(pydoc.render_doc(__import__(m), renderer=pydoc.plaintext)) for m in CALIB_MODULES]
    (HERE / "calib.txt").write_text("\n".join(calib), encoding="utf-8")
    (HERE / "heldout.txt").write_text((STDLIB / "LICENSE.txt").read_text(encoding="utf-8"), encoding="utf-8")

    from corelm.data.demo import resolve

    sentences = Path(resolve("demo:ner:dev")).read_text(encoding="utf-8").strip().split("\n\n")
    sentences = [s for s in sentences if not s.startswith("-DOCSTART-")][:8]
    (HERE / "dev8.conll").write_text("\n\n".join(sentences) + "\n", encoding="utf-8")
    chats = Path(resolve("demo:chat:val")).read_text(encoding="utf-8").splitlines()[:12]
    (HERE / "chat-val12.jsonl").write_text("\n".join(chats) + "\n", encoding="utf-8")
    (HERE / "bad.csv").write_bytes(b"text,label\n\"caf\xe9 au lait\",drink\n")


if __name__ == "__main__":
    sys.exit(main())
