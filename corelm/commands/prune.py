"""``corelm prune``: magnitude or Wanda pruning (unstructured or N:M) into a checkpoint directory.

Wanda (Sun et al. 2023) scores each weight by ``|W| * ||X||`` with input-activation norms measured
on ``--calib`` text. The result is a dense model with zeros: it loads, evaluates, quantizes and
exports like any checkpoint. On CPU, sparse weights do not make matmuls faster (PyTorch's 2:4
kernels are CUDA-only); pruning here is about size after compression and about quality.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from corelm.errors import CorelmError
from corelm.io.atomic import atomic_dir


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="corelm prune",
        description="Zero the least important weights of every linear layer (the LM head stays dense).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", required=True, help="embedded model name, .gguf file or checkpoint directory")
    ap.add_argument("--method", default="wanda", choices=["magnitude", "wanda"],
                    help="magnitude: smallest |W| per row; wanda: smallest |W| * ||X|| per row")
    ap.add_argument("--sparsity", type=float, default=0.5, help="fraction of each row to zero, in [0, 1)")
    ap.add_argument("--pattern", default=None, help="N:M semi-structured sparsity, e.g. 2:4 (overrides --sparsity)")
    ap.add_argument("--calib", default=None, help="text file for Wanda's activation statistics")
    ap.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens read from --calib")
    ap.add_argument("--out", required=True, help="directory to write (must not exist or be empty, unless --overwrite)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    return ap


def calibration_batches(tokenizer, path: str | Path, n_tokens: int, seq_len: int = 256) -> list[torch.Tensor]:
    """``(1, seq_len)`` id windows from the first ``n_tokens`` tokens of a text file."""
    path = Path(path)
    if not path.is_file():
        raise CorelmError(f"calibration file not found: {path}")
    ids = tokenizer.encode(path.read_text(errors="replace"))[:n_tokens]
    if len(ids) < 16:
        raise CorelmError(f"{path} has only {len(ids)} tokens; calibration needs some text")
    return [torch.tensor([ids[i:i + seq_len]]) for i in range(0, len(ids), seq_len) if len(ids[i:i + seq_len]) > 1]


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    import corelm
    from corelm.compress.prune import parse_pattern, prune_model
    from corelm.compress.quant import is_quantized_dir
    from corelm.io.hf import save_hf_dir

    if not 0.0 <= args.sparsity < 1.0:
        raise CorelmError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    parse_pattern(args.pattern)
    if args.method == "wanda" and not args.calib:
        raise CorelmError("--method wanda needs --calib TEXT_FILE (or use --method magnitude)")
    if is_quantized_dir(args.model):
        raise CorelmError(f"{args.model} is quantized; prune the float model, then quantize the result")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise CorelmError(f"{out} exists and is not empty; choose another directory or pass --overwrite")
    t0 = time.perf_counter()
    llm = corelm.load(args.model, dtype="fp32")
    calib = calibration_batches(llm.tokenizer, args.calib, args.calib_tokens) if args.method == "wanda" else None
    print(f"pruning {args.model} ({args.method}, "
          f"{args.pattern or f'{args.sparsity:.0%} unstructured'})"
          f"{f' on {sum(b.shape[1] for b in calib)} calibration tokens' if calib else ''} ...", file=sys.stderr)
    with torch.inference_mode(False):
        report = prune_model(llm.model, args.method, args.sparsity, args.pattern, calibration=calib)
    with atomic_dir(out) as tmp:
        save_hf_dir(llm.model, llm.config, tmp, tokenizer=llm.tokenizer)
    print(f"wrote {out}/: {report['layers']} layers, {report['zeros'] / report['weights']:.1%} of their weights "
          f"zero ({report['zeros'] / 1e6:.1f}M of {report['weights'] / 1e6:.1f}M) in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    return 0
