"""``corelm convert``: a GGUF file or HF checkpoint -> an HF-layout safetensors directory.

The output (``config.json``, ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``)
loads in ``transformers.AutoModelForCausalLM.from_pretrained`` and in ``corelm.load``. GGUF weights
are dequantized (to ``--dtype``) and their Q/K rows un-permuted back to HF order.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from corelm.commands.args import HelpFormatter, Parser, add_dtype
from corelm.errors import CorelmError
from corelm.io.atomic import atomic_dir


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(
        prog="corelm convert",
        description="Convert a .gguf file (llama architecture) or an HF checkpoint directory to an HF-layout "
                    "directory with model.safetensors, config.json, tokenizer.json and tokenizer_config.json.",
        formatter_class=HelpFormatter)
    ap.add_argument("source", help="a .gguf file, an HF checkpoint directory, or an embedded model name")
    ap.add_argument("out_dir", help="directory to write (must not exist or be empty, unless --overwrite)")
    add_dtype(ap, "fp32", "dtype of the written weights (GGUF blocks are dequantized to it)", auto=False)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty out_dir")
    return ap


def convert(source: str, out_dir: str | Path, dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Load ``source`` with :func:`corelm.load` and write it as an HF directory.

    The files are written into a temporary sibling directory that is renamed into place at the
    end, so an interrupted conversion leaves nothing that looks like a checkpoint.
    """
    import corelm
    from corelm.io.hf import save_hf_dir

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CorelmError(f"{out} exists and is not empty; choose another directory or pass --overwrite")
    loaded = corelm.load(source, dtype=dtype)
    with atomic_dir(out) as tmp:
        save_hf_dir(loaded.model, loaded.config, tmp, tokenizer=loaded.tokenizer)
    return out


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    out = convert(args.source, args.out_dir, args.dtype, args.overwrite)
    files = sorted(p.name for p in out.iterdir())
    size = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    print(f"wrote {out}/ ({', '.join(files)}; {size:.0f} MB) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0
