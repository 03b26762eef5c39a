"""docs/course.md maps the course's concepts to corelm's code: every ``file:function`` it names exists, is defined
in that file, and every concept the course teaches has a row."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
PAGE = ROOT / "docs" / "course.md"
REF = re.compile(r"`(corelm/[\w/]+\.py):([A-Za-z_][\w.]*)`")
CONCEPTS = ["attention", "multi-head", "learned positions", "sinusoidal", "RoPE", "layer norm", "RMSNorm",
            "feed-forward", "SwiGLU", "dropout", "cross-entropy", "Adam", "AdamW", "SGD with momentum", "MLM", "NSP",
            "CLM", "LoRA", "AdaLoRA", "adapters", "mixed precision", "GradScaler", "DDP", "FSDP",
            "tensor parallelism", "pipeline parallelism", "quantization", "pruning", "distillation", "BLEU", "ROUGE",
            "F1", "KV cache", "beam search", "speculative decoding"]


def test_every_referenced_function_exists_in_its_file():
    refs = REF.findall(PAGE.read_text())
    assert len(refs) >= 60, len(refs)
    missing = []
    for path, name in refs:
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        obj = module
        for part in name.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is None:
            missing.append(f"{path}:{name} does not exist")
            continue
        source = inspect.getsourcefile(inspect.unwrap(obj))
        if Path(source).resolve() != (ROOT / path).resolve():  # defined there, not imported from elsewhere
            missing.append(f"{path}:{name} is defined in {source}")
    assert not missing, "\n".join(missing)


def test_every_course_concept_has_a_row():
    rows = [line for line in PAGE.read_text().splitlines() if line.startswith("| ") and REF.search(line)]
    text = "\n".join(rows).lower()
    assert [c for c in CONCEPTS if c.lower() not in text] == []
