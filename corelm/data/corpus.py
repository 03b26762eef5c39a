"""Embedded corpora: text that ships with the running Python, so a pretraining demo needs no download.

``python-docs``: every docstring of the standard library (modules, classes, functions), extracted with
``ast`` (no module is imported or executed). Each function or class becomes one document that starts
with its signature, e.g.::

    def read_text(self, encoding=None, errors=None):
        \"\"\"Open the file in text mode, read it, and close the file.\"\"\"

so a model trained on it learns to continue ``def read_file`` with a plausible docstring.
"""

from __future__ import annotations

import ast
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

from corelm.errors import CorelmError, close_names

CORPORA = ("python-docs",)
# Directories of the standard library that are tests, vendored packages or tooling, not docs.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3",
              "ensurepip", "turtledemo", "tkinter", "idlelib", "pydoc_data", "_pydecimal"}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files in a fixed (sorted) order."""
    root = stdlib_dir()
    return sorted(p for p in root.rglob("*.py")
                  if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]) and not p.name.startswith("test_"))


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> str:
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(b) for b in node.bases)
        return f"class {node.name}({bases}):" if bases else f"class {node.name}:"
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    ret = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    return f"{prefix} {node.name}({ast.unparse(node.args)}){ret}:"


def _quote(doc: str, indent: str) -> str:
    lines = doc.strip().replace('"""', "'''").splitlines()
    body = "\n".join((indent + line) if line.strip() else "" for line in lines[1:])
    return f'{indent}"""{lines[0]}' + (f"\n{body}\n{indent}" if len(lines) > 1 else "") + '"""'


def python_docs(min_chars: int = 20) -> Iterator[str]:
    """Yield one document per documented module, class and function of the standard library."""
    root = stdlib_dir()
    for path in stdlib_files():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences in old modules
                tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        doc = ast.get_docstring(tree)
        if doc and len(doc) >= min_chars:
            yield f"# module {module}\n{_quote(doc, '')}"
        yield from _walk(tree.body, "")


def _walk(body: list[ast.stmt], indent: str) -> Iterator[str]:
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 20 and not node.name.startswith("_"):
                yield f"{_signature(node)}\n{_quote(doc, '    ')}"
            if isinstance(node, ast.ClassDef):
                yield from _walk(node.body, indent)


def corpus_documents(name: str) -> Iterator[str]:
    """Documents of an embedded corpus by name."""
    if name == "python-docs":
        return python_docs()
    raise CorelmError(f"unknown corpus {name!r}{close_names(name, list(CORPORA))}; available: {', '.join(CORPORA)}")


def corpus_description(name: str) -> str:
    return f"{name}: docstrings of the Python {sys.version.split()[0]} standard library at {stdlib_dir()}"
