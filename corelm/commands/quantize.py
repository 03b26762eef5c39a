"""``corelm quantize``: weight-only int8 / int4 quantization of a model into a checkpoint directory.

The directory holds portable quantized values (int8 weights, int4 nibbles), scales and zeros in
``model.safetensors``; int4 weights are repacked for the running CPU when loaded. From a GGUF
source (the embedded SmolLM2 is Q4_1), int4 group 32 takes the file's 4-bit blocks as they are.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from corelm.commands.args import Options, as_options, option, options_from, parser_from, set_threads, threads_option
from corelm.errors import CorelmError
from corelm.io.atomic import atomic_dir


@dataclass
class QuantizeOptions(Options):
    """What ``corelm quantize`` reads, how it quantizes, and where it writes."""

    source: str = option(help="embedded model name, .gguf file or HF checkpoint directory", positional=True)
    out_dir: str | Path = field(metadata={"help": "directory to write (must not exist or be empty, unless --overwrite)",
                                          "positional": True})
    method: Literal["int8", "int4"] = option(
        "int8", "int8: one scale per output channel; int4: one scale and zero per group of columns")
    group_size: Literal[32, 64, 128] = option(
        32, "int4 only: input columns sharing a scale and zero (smaller = more accurate, larger file)")
    head: Literal["int8", "int4"] = option(
        "int8", "quantization of the output head (shared with the token embedding when tied)")
    requantize: bool = option(False, "from a GGUF source, quantize the dequantized weights again instead of reusing "
                                     "the file's Q4_0/Q4_1 blocks")
    overwrite: bool = option(False, "replace an existing non-empty out_dir")
    threads: int | None = threads_option()


def build_parser() -> argparse.ArgumentParser:
    return parser_from(
        QuantizeOptions, prog="corelm quantize",
        description="Quantize a model's linear layers to int8 (per output channel) or int4 (group-wise, "
                    "asymmetric) and write a checkpoint directory that corelm.load() and corelm generate read.")


def gguf_source(source: str) -> Path | None:
    """The GGUF file behind ``source`` (an embedded GGUF model or a .gguf path), else None."""
    from corelm.loading import locate
    from corelm.presets import PRESETS

    if source in PRESETS:
        return None
    path = locate(source)  # embedded name, path, or a Hugging Face repo id (`org/name:file.gguf`)
    return path if path.suffix == ".gguf" and path.is_file() else None


def quantize(options: QuantizeOptions | str, *args: Any, **kwargs: Any) -> Path:
    """Load ``options.source``, quantize it, write ``options.out_dir`` atomically (temporary sibling, then rename);
    returns the directory. ``quantize(source, out_dir, method="int8", ...)`` is ``quantize(QuantizeOptions(...))``."""
    import corelm
    from corelm.quant.io import save_quantized_dir
    from corelm.quant.layers import check_group_size
    from corelm.quant.transform import quantize_model

    options = as_options(QuantizeOptions, options, args, kwargs)
    set_threads(options.threads)
    source, method, group_size, head = options.source, options.method, options.group_size, options.head
    out = Path(options.out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not options.overwrite:
        raise CorelmError(f"{out} exists and is not empty; choose another directory or pass --overwrite")
    if method == "int4" or head == "int4":
        check_group_size(group_size * 2, group_size)  # validates the value before loading anything
    loaded = corelm.load(source, dtype="fp32")
    if loaded.config.is_encoder:
        raise CorelmError("corelm quantize writes decoders; encoders quantize in memory with "
                          "corelm.load(..., quantize=...)")
    gguf = None if options.requantize else gguf_source(source)
    from tqdm import tqdm

    def bar(layers):
        return tqdm(layers, desc=f"quantizing to {method}", unit="layer", file=sys.stderr, leave=False)

    quantize_model(loaded.model, method, group_size=group_size, head=head, from_gguf=gguf, progress=bar)
    with atomic_dir(out) as tmp:
        save_quantized_dir(loaded.model, loaded.config, tmp, loaded.tokenizer)
    return out


def main(argv: list[str]) -> int:
    args = options_from(QuantizeOptions, build_parser().parse_args(argv))
    t0 = time.perf_counter()
    out = quantize(args)
    size = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    weights = (out / "model.safetensors").stat().st_size / 1e6
    print(f"wrote {out}/ ({args.method}{f', group {args.group_size}' if args.method == 'int4' else ''}; "
          f"weights {weights:.0f} MB, {size:.0f} MB in all) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0
