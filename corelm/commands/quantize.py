"""``corelm quantize``: weight-only quantization of a model, to a checkpoint directory or a GGUF file.

``--method int8`` / ``int4`` write a directory with portable quantized values (int8 weights, int4
nibbles), scales and zeros in ``model.safetensors``; int4 weights are repacked for the running CPU
when loaded. From a GGUF source (the embedded SmolLM2 is Q4_1), int4 group 32 takes the file's 4-bit
blocks as they are.

``--method Q4_K_M`` (or another of llama.cpp's mixes: ``Q5_K_M``, ``Q6_K``, ``Q8_0``, ``Q4_0``, ...)
writes a ``.gguf`` file as ``llama-quantize`` does without an importance matrix: the same type per
tensor and the arithmetic of its reference quantizers (:mod:`corelm.quant.gguf_quantize`), from the
model's float weights (a GGUF source is dequantized first). corelm runs the file on its own block
kernels; llama.cpp reads it too.
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
    out_dir: str | Path = field(metadata={
        "help": "directory to write (must not exist or be empty, unless --overwrite); a .gguf file for a GGUF method",
        "positional": True})
    method: Literal["int8", "int4", "Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q8_0", "Q5_0", "Q5_1", "Q4_0",
                    "Q4_1", "IQ4_XS", "IQ4_NL"] = option(
        "int8", "int8: one scale per output channel; int4: one scale and zero per group of columns; Q4_K_M ... IQ4_NL: "
                "a GGUF file with llama.cpp's mix of that name (the type llama-quantize gives each tensor)")
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
                    "asymmetric) and write a checkpoint directory that corelm.load() and corelm generate read; "
                    "or, with --method Q4_K_M (another llama.cpp mix), write a GGUF file as llama-quantize does.")


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
    returns the directory (or the .gguf file). ``quantize(source, out_dir, method="int8", ...)`` is
    ``quantize(QuantizeOptions(...))``."""
    import torch

    from corelm.loading import load_parts
    from corelm.quant.io import save_quantized_dir
    from corelm.quant.layers import check_group_size
    from corelm.quant.transform import quantize_model

    options = as_options(QuantizeOptions, options, args, kwargs)
    set_threads(options.threads)
    source, method, group_size, head = options.source, options.method, options.group_size, options.head
    out = Path(options.out_dir)
    if method not in ("int8", "int4") or out.suffix == ".gguf":
        return _quantize_gguf(options, out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not options.overwrite:
        raise CorelmError(f"{out} exists and is not empty; choose another directory or pass --overwrite")
    if method == "int4" or head == "int4":
        check_group_size(group_size * 2, group_size)  # validates the value before loading anything
    # the checkpoint's own dtype: each matrix is quantized from it and freed (an fp32 copy would double bf16)
    loaded = load_parts(source, dtype="fp32", checkpoint_dtype=True)
    if loaded.config.is_encoder:
        raise CorelmError("corelm quantize writes decoders; encoders quantize in memory with "
                          "corelm.load(..., quantize=...)")
    gguf = gguf_source(source)  # its matrices are read from it one at a time (load_parts left them there)
    from tqdm import tqdm

    def bar(layers):
        return tqdm(layers, desc=f"quantizing to {method}", unit="layer", file=sys.stderr, leave=False)

    quantize_model(loaded.model, method, group_size=group_size, head=head, from_gguf=gguf, progress=bar,
                   dtype=torch.float32, reuse_blocks=not options.requantize)
    with atomic_dir(out) as tmp:
        save_quantized_dir(loaded.model, loaded.config, tmp, loaded.tokenizer)
    return out


def _quantize_gguf(options: QuantizeOptions, out: Path) -> Path:
    """``--method`` a GGUF mix: the model's float weights -> ``out`` (.gguf) through :func:`export_gguf`."""
    import corelm
    from corelm.io.atomic import write_errors
    from corelm.io.gguf_export import export_gguf
    from corelm.quant.gguf_quantize import MIXES

    if options.method not in MIXES:
        raise CorelmError(f"a .gguf output takes a GGUF method ({', '.join(MIXES)}), not {options.method}")
    if out.suffix != ".gguf":
        raise CorelmError(f"--method {options.method} writes a GGUF file: name it *.gguf, not {out.name}")
    if out.exists() and not options.overwrite:
        raise CorelmError(f"{out} exists; choose another file or pass --overwrite")
    loaded = corelm.load(options.source, dtype="fp32")
    if loaded.config.is_encoder:
        raise CorelmError("GGUF files hold decoders; encoders quantize in memory with corelm.load(..., quantize=...)")
    with write_errors(out):  # a full or read-only disk: one line naming the file
        return export_gguf(loaded.model, out, options.method, tokenizer=loaded.tokenizer,
                           name=loaded.config.name or None)


def _gguf_summary(path: Path) -> str:
    """``Q4_K_M: 90 Q5_0, 16 Q4_K, ...`` -- the mix and how many matrices each type holds."""
    from collections import Counter

    from corelm.io.gguf import read_gguf
    from corelm.quant.gguf_quantize import MIX_NAMES

    gguf = read_gguf(path)
    try:
        kinds = Counter(t.qtype.name for t in gguf.tensors.values() if len(t.shape) >= 2)
        mix = MIX_NAMES.get(gguf.metadata.get("general.file_type"), "?")
    finally:
        gguf.close()
    return f"{mix}: " + ", ".join(f"{n} {k}" for k, n in kinds.most_common())


def main(argv: list[str]) -> int:
    args = options_from(QuantizeOptions, build_parser().parse_args(argv))
    t0 = time.perf_counter()
    out = quantize(args)
    if out.is_file():
        print(f"wrote {out} ({_gguf_summary(out)}; {out.stat().st_size / 1e6:.0f} MB) in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
        return 0
    size = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    weights = (out / "model.safetensors").stat().st_size / 1e6
    print(f"wrote {out}/ ({args.method}{f', group {args.group_size}' if args.method == 'int4' else ''}; "
          f"weights {weights:.0f} MB, {size:.0f} MB in all) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0
