"""``corelm convert``: a GGUF file or HF checkpoint -> an HF-layout safetensors directory.

The output (``config.json``, ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``)
loads in ``transformers.AutoModelForCausalLM.from_pretrained`` and in ``corelm.load``. GGUF weights
are dequantized (to ``--dtype``) and their Q/K rows un-permuted back to HF order.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corelm.commands.args import Options, as_options, option, options_from, parser_from, set_threads, threads_option
from corelm.errors import CorelmError
from corelm.io.atomic import atomic_dir


@dataclass
class ConvertOptions(Options):
    """What ``corelm convert`` reads and writes."""

    source: str = option(help="a .gguf file, an HF checkpoint directory, or an embedded model name", positional=True)
    out_dir: str | Path = field(metadata={"help": "directory to write (must not exist or be empty, unless --overwrite)",
                                          "positional": True})
    dtype: str = option("fp32", "dtype of the written weights (GGUF blocks are dequantized to it)",
                        dtype={"auto": False})
    overwrite: bool = option(False, "replace an existing non-empty out_dir")
    threads: int | None = threads_option()


def build_parser() -> argparse.ArgumentParser:
    return parser_from(
        ConvertOptions, prog="corelm convert",
        description="Convert a .gguf file (llama architecture) or an HF checkpoint directory to an HF-layout "
                    "directory with model.safetensors, config.json, tokenizer.json and tokenizer_config.json.")


def convert(options: ConvertOptions | str, *args: Any, **kwargs: Any) -> Path:
    """Load ``options.source`` with :func:`corelm.load` and write it as an HF directory; returns the directory.

    ``convert(source, out_dir, dtype="fp32", overwrite=False)`` is ``convert(ConvertOptions(...))``.
    The files are written into a temporary sibling directory that is renamed into place at the
    end, so an interrupted conversion leaves nothing that looks like a checkpoint.
    """
    import corelm
    from corelm.io.hf import save_hf_dir

    options = as_options(ConvertOptions, options, args, kwargs)
    set_threads(options.threads)
    out = Path(options.out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not options.overwrite:
        raise CorelmError(f"{out} exists and is not empty; choose another directory or pass --overwrite")
    loaded = corelm.load(options.source, dtype=options.dtype)
    with atomic_dir(out) as tmp:
        save_hf_dir(loaded.model, loaded.config, tmp, tokenizer=loaded.tokenizer)
    return out


def main(argv: list[str]) -> int:
    options = options_from(ConvertOptions, build_parser().parse_args(argv))
    t0 = time.perf_counter()
    out = convert(options)
    files = sorted(p.name for p in out.iterdir())
    size = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    print(f"wrote {out}/ ({', '.join(files)}; {size:.0f} MB) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0
