"""The documentation: the mkdocs site builds without a warning, and README.md stays a short front page.

``mkdocs build --strict`` turns every warning into a failure: a link between pages that points
nowhere, a missing image, a page left out of the nav, or a docstring that mkdocstrings cannot render
for the API reference.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# The two commands a fresh machine needs, exactly as README.md has always opened.
FIRST_BLOCK = [
    "```bash",
    ("make demo    # fresh machine: creates .venv (CPU torch 2.13.0 + the embedded models), generates with "
     "SmolLM2-135M-Instruct"),
    ("make test    # fresh machine: same set-up, then the whole test suite (transformers is the numerical "
     "reference)"),
    "```",
]


def test_mkdocs_strict_build(tmp_path: Path) -> None:
    # NO_MKDOCS_2_WARNING silences mkdocs-material's end-of-life banner, which is not a build warning.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, (
        "mkdocs build --strict failed (mkdocs comes with the docs extra: pip install -e '.[docs]'):\n"
        + proc.stdout + proc.stderr
    )
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "api" / "api" / "index.html").is_file()


def test_readme_is_short_and_starts_with_the_two_commands() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the details belong in docs/"
    assert lines[0] == "# corelm"
    start = next(i for i, line in enumerate(lines) if line.strip())
    start = next(i for i in range(start + 1, len(lines)) if lines[i].strip())
    assert lines[start:start + len(FIRST_BLOCK)] == FIRST_BLOCK
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^demo:", makefile, re.MULTILINE) and re.search(r"^test:", makefile, re.MULTILINE)


def test_readme_links_resolve() -> None:
    text = README.read_text(encoding="utf-8")
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text)]
    local = [t for t in targets if t and not re.match(r"[a-z]+://", t)]
    assert any(t.startswith("docs/") for t in local)
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_example_files_are_small_and_used() -> None:
    """docs/examples/ ships only what the guides name, and stays small (it is part of every checkout)."""
    examples = [p for p in (ROOT / "docs" / "examples").iterdir() if p.name != "make_examples.py"]
    total = sum(p.stat().st_size for p in examples)
    assert total < 300_000, f"docs/examples/ holds {total:,} bytes; keep the example files small"
    pages = README.read_text(encoding="utf-8") + "".join(
        p.read_text(encoding="utf-8") for p in (ROOT / "docs").glob("*.md"))
    unused = [p.name for p in examples if f"docs/examples/{p.name}" not in pages]
    assert not unused, f"docs/examples/ files no guide names: {unused}"
