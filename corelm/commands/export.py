"""``corelm export``: write a corelm model as a GGUF file that llama.cpp loads.

A quantized checkpoint from ``corelm quantize --method int4 --group-size 32`` is written as Q4_1
from its own 4-bit blocks; float models are written as F32/F16 or block-quantized to Q8_0/Q4_0/Q4_1.
The tokenizer (byte-level BPE) and chat template travel in the file's metadata.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from corelm.commands.args import HelpFormatter, Parser
from corelm.errors import CorelmError
from corelm.io.atomic import write_errors


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="corelm export", description=__doc__.splitlines()[0].strip("`"),
                formatter_class=HelpFormatter)
    ap.add_argument("source", help="checkpoint directory (float or `corelm quantize` output), .gguf or embedded name")
    ap.add_argument("out", help="output .gguf file (written atomically)")
    ap.add_argument("--type", dest="qtype", default=None, choices=["F32", "F16", "Q8_0", "Q4_0", "Q4_1"],
                    help="tensor type of the weight matrices (default: Q4_1 for int4 checkpoints, Q8_0 for int8, "
                         "else F16)")
    ap.add_argument("--tokenizer-pre", default="smollm",
                    help="llama.cpp pre-tokenizer name written to the file (smollm for SmolLM2's vocabulary)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return ap


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from corelm.io.gguf_export import export_gguf
    from corelm.quant.io import is_quantized_dir, load_quantized_dir

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise CorelmError(f"{out} exists; choose another file or pass --overwrite")
    t0 = time.perf_counter()
    if is_quantized_dir(args.source):
        from corelm.api import load_tokenizer

        config, model = load_quantized_dir(args.source)
        tokenizer = load_tokenizer(args.source)
        method = model.corelm_quantization["method"]
        qtype = args.qtype or {"int4": "Q4_1", "int8": "Q8_0"}[method]
    else:
        import corelm

        llm = corelm.load(args.source, dtype="fp32")
        config, model, tokenizer, qtype = llm.config, llm.model, llm.tokenizer, args.qtype or "F16"
    if config.family != "llama":
        raise CorelmError(f"GGUF export writes llama-family models; {args.source} is {config.family}")
    with write_errors(out):  # a full or read-only disk: one line naming the file
        path = export_gguf(model, out, qtype, tokenizer=tokenizer, tokenizer_pre=args.tokenizer_pre,
                           name=config.name or None)
    print(f"wrote {path} ({qtype}, {path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    return 0
