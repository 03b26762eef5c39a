"""``corelm export``: write a corelm model as a GGUF file that llama.cpp loads.

Every decoder family corelm reads is written under the llama.cpp architecture that runs it (Llama,
Mistral without a window, Mixtral, Qwen2/3 and their MoE models, Phi-3, Gemma 1-3, OLMo 2); a config
llama.cpp cannot represent is refused with one line naming the feature.

A quantized checkpoint from ``corelm quantize --method int4 --group-size 32`` is written as Q4_1
from its own 4-bit blocks; float models are written as F32/F16/BF16 or block-quantized to one of
llama.cpp's mixes (Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, ...; ``corelm quantize --method`` writes the same files).
The tokenizer (byte-level BPE) and chat template travel in the file's metadata.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from corelm.commands.args import Options, option, options_from, parser_from, set_threads, threads_option
from corelm.errors import CorelmError
from corelm.io.atomic import write_errors


@dataclass
class ExportOptions(Options):
    """What ``corelm export`` writes to GGUF, and how."""

    source: str = option(help="checkpoint directory (float or `corelm quantize` output), .gguf or embedded name",
                         positional=True)
    out: str | Path = field(metadata={"help": "output .gguf file (written atomically)", "positional": True})
    qtype: Literal["F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q5_0", "Q5_1",
                   "Q4_0", "Q4_1", "IQ4_XS", "IQ4_NL"] | None = option(
        None, "F32/F16/BF16, or a llama.cpp mix that picks each matrix's block type as llama-quantize does (default: "
              "Q4_1 for int4 checkpoints, Q8_0 for int8, else F16)", flag="--type")
    tokenizer_pre: str = option("smollm", "llama.cpp pre-tokenizer name written to the file (smollm for SmolLM2's "
                                          "vocabulary)")
    overwrite: bool = option(False, "replace an existing output file")
    threads: int | None = threads_option()


def build_parser() -> argparse.ArgumentParser:
    return parser_from(ExportOptions, prog="corelm export", description=__doc__.splitlines()[0].strip("`"))


def export(options: ExportOptions) -> dict:
    """Write ``options.source`` as the GGUF file ``options.out``; returns ``{"path", "qtype", "bytes", "seconds"}``."""
    from corelm.io.gguf_export import export_gguf
    from corelm.quant.io import is_quantized_dir, load_quantized_dir

    set_threads(options.threads)
    out = Path(options.out)
    if out.exists() and not options.overwrite:
        raise CorelmError(f"{out} exists; choose another file or pass --overwrite")
    t0 = time.perf_counter()
    if is_quantized_dir(options.source):
        from corelm.api import load_tokenizer

        config, model = load_quantized_dir(options.source)
        tokenizer = load_tokenizer(options.source)
        method = model.corelm_quantization["method"]
        qtype = options.qtype or {"int4": "Q4_1", "int8": "Q8_0"}[method]
    else:
        import corelm

        llm = corelm.load(options.source, dtype="fp32")
        config, model, tokenizer, qtype = llm.config, llm.model, llm.tokenizer, options.qtype or "F16"
    with write_errors(out):  # a full or read-only disk: one line naming the file
        path = export_gguf(model, out, qtype, tokenizer=tokenizer, tokenizer_pre=options.tokenizer_pre,
                           name=config.name or None)
    return {"path": path, "qtype": qtype, "bytes": path.stat().st_size, "seconds": time.perf_counter() - t0}


def main(argv: list[str]) -> int:
    result = export(options_from(ExportOptions, build_parser().parse_args(argv)))
    print(f"wrote {result['path']} ({result['qtype']}, {result['bytes'] / 1e6:.0f} MB) in {result['seconds']:.1f} s",
          file=sys.stderr)
    return 0
