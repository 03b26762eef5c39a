"""``corelm prune``: weight pruning (magnitude or Wanda, unstructured or N:M) or structured pruning
(whole layers, KV groups, query heads, MLP channels) into a checkpoint directory.

Wanda (Sun et al. 2023) scores each weight by ``|W| * ||X||`` with input-activation norms measured
on ``--calib`` text. The result is a dense model with zeros: it loads, evaluates, quantizes and
exports like any checkpoint. On CPU, sparse weights do not make matmuls faster (PyTorch's 2:4
kernels are CUDA-only); weight pruning here is about size after compression and about quality.

``--structure`` removes whole rows and columns instead (see ``corelm.compress.prune.prune_structured``):
the result is a smaller llama config, which is what makes a CPU faster.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from corelm.commands.args import HelpFormatter, Parser, add_precision
from corelm.data.text import read_text
from corelm.errors import CorelmError
from corelm.io.atomic import atomic_dir


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(
        prog="corelm prune",
        description="Zero the least important weights of every linear layer (the LM head stays dense), or with "
                    "--structure remove whole layers / KV groups / query heads / MLP channels for a smaller dense model.",
        formatter_class=HelpFormatter)
    ap.add_argument("--model", required=True, help="embedded model name, .gguf file or checkpoint directory")
    ap.add_argument("--method", default="wanda", choices=["magnitude", "wanda"],
                    help="weight pruning: magnitude = smallest |W| per row; wanda = smallest |W| * ||X|| per row "
                         "(--structure always scores on --calib activations)")
    ap.add_argument("--sparsity", type=float, default=0.5,
                    help="fraction removed, in [0, 1): of each row's weights, or with --structure of each structure")
    ap.add_argument("--pattern", default=None, help="N:M semi-structured sparsity, e.g. 2:4 (overrides --sparsity)")
    ap.add_argument("--structure", default=None,
                    help="structured pruning of a llama model: layers, kv-groups (a KV head with its query heads), "
                         "heads (query heads, the same number per KV group) or channels (MLP); the fraction is "
                         "--sparsity, or give several with their own, e.g. channels=0.25,kv-groups=0.34. "
                         "Scored by each structure's output norm on --calib text; writes a smaller dense model")
    ap.add_argument("--multiple-of", type=int, default=32,
                    help="with --structure channels: MLP channels kept are a multiple of this (int4 groups divide it)")
    ap.add_argument("--calib", default=None, help="text file for the activation statistics (Wanda, --structure)")
    ap.add_argument("--recover-steps", type=int, default=0,
                    help="with --structure: fine-tune the pruned model this many steps on the whole --calib text, "
                         "distilling the unpruned model (0: no recovery)")
    ap.add_argument("--recover-lr", type=float, default=1e-4, help="recovery: peak learning rate")
    ap.add_argument("--recover-batch-size", type=int, default=4, help="recovery: windows of 256 tokens per step")
    add_precision(ap, "fp32", "recovery: precision policy (bf16-mixed ran 2.2x faster than fp32 on an AVX512_BF16 CPU)",
                  ("fp32", "bf16-mixed", "bf16-true"))
    ap.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens read from --calib")
    ap.add_argument("--out", required=True, help="directory to write (must not exist or be empty, unless --overwrite)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    return ap


def calibration_batches(tokenizer, path: str | Path, n_tokens: int, seq_len: int = 256) -> list[torch.Tensor]:
    """``(1, seq_len)`` id windows from the first ``n_tokens`` tokens of a text file."""
    path = Path(path)
    if not path.is_file():
        raise CorelmError(f"calibration file not found: {path}")
    ids = tokenizer.encode(read_text(path))[:n_tokens]
    if len(ids) < 16:
        raise CorelmError(f"{path} has only {len(ids)} tokens; calibration needs some text")
    return [torch.tensor([ids[i:i + seq_len]]) for i in range(0, len(ids), seq_len) if len(ids[i:i + seq_len]) > 1]


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    import corelm
    from corelm.compress.prune import parse_pattern, parse_structures, prune_model
    from corelm.io.hf import save_hf_dir
    from corelm.quant.io import is_quantized_dir

    if not 0.0 <= args.sparsity < 1.0:
        raise CorelmError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    parse_pattern(args.pattern)
    structures = None
    if args.structure is not None:
        structures = parse_structures(args.structure, args.sparsity)
        if args.pattern:
            raise CorelmError("--structure removes whole structures; it cannot be combined with --pattern")
        if args.method == "magnitude":
            raise CorelmError("--structure scores structures by their output on --calib; --method magnitude is "
                              "for weight pruning")
        for name, ratio in structures.items():
            if not 0.0 < ratio < 1.0:
                raise CorelmError(f"the fraction of {name} removed must be in (0, 1), got {ratio}")
        if args.multiple_of < 1:
            raise CorelmError(f"--multiple-of must be a positive integer, got {args.multiple_of}")
        if not args.calib:
            raise CorelmError("--structure needs --calib TEXT_FILE (structures are scored on its activations)")
        if args.recover_steps < 0 or args.recover_batch_size < 1 or args.recover_lr <= 0:
            raise CorelmError("--recover-steps must be >= 0, --recover-batch-size >= 1 and --recover-lr > 0")
    elif args.recover_steps:
        raise CorelmError("--recover-steps needs --structure (fine-tuning would refill the zeros of weight pruning)")
    if structures is None and args.method == "wanda" and not args.calib:
        raise CorelmError("--method wanda needs --calib TEXT_FILE (or use --method magnitude)")
    if is_quantized_dir(args.model):
        raise CorelmError(f"{args.model} is quantized; prune the float model, then quantize the result")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise CorelmError(f"{out} exists and is not empty; choose another directory or pass --overwrite")
    t0 = time.perf_counter()
    llm = corelm.load(args.model, dtype="fp32")
    if structures is not None:
        return _structured(llm, args, structures, out, t0)
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


def _structured(llm, args, structures: dict[str, float], out: Path, t0: float) -> int:
    """``--structure``: score, remove, write a smaller dense checkpoint."""
    from corelm.compress.prune import planned_config, prune_structured, recover
    from corelm.io.hf import save_hf_dir

    if llm.config.family != "llama":
        raise CorelmError(f"structured pruning supports llama-family models; {args.model} is {llm.config.family}")
    c0, c1 = llm.config, planned_config(llm.config, structures, args.multiple_of)
    shape = ", ".join(f"{k} {getattr(c0, k)}->{getattr(c1, k)}" for k in ("n_layer", "n_head", "n_kv_head", "d_ff")
                      if getattr(c0, k) != getattr(c1, k))
    calib = calibration_batches(llm.tokenizer, args.calib, args.calib_tokens)
    print(f"pruning {args.model} (structured: {shape}) on {sum(b.shape[1] for b in calib)} calibration tokens ...",
          file=sys.stderr)
    with torch.inference_mode(False):
        model, report = prune_structured(llm.model, structures, calib, multiple_of=args.multiple_of,
                                         progress=lambda msg: print(f"  {msg}", file=sys.stderr))
        if args.recover_steps:
            ids = llm.tokenizer.encode(read_text(args.calib))
            print(f"  recovery: {args.recover_steps} steps x {args.recover_batch_size} x 256 tokens of {args.calib} "
                  f"({len(ids)} tokens), distilling the unpruned model, {args.precision}", file=sys.stderr)
            rec = recover(model, llm.model, ids, args.recover_steps, batch_size=args.recover_batch_size,
                          lr=args.recover_lr, precision=args.precision)
            print(f"  recovery loss {rec['first_loss']:.3f} -> {rec['last_loss']:.3f}", file=sys.stderr)
    for step in report["steps"]:
        if "removed_layers" in step:
            print(f"  removed layers {', '.join(map(str, step['removed_layers']))} (of 0-{step['units'] - 1})",
                  file=sys.stderr)
    with atomic_dir(out) as tmp:
        save_hf_dir(model, model.config, tmp, tokenizer=llm.tokenizer)
    print(f"wrote {out}/: {shape}; {report['params_before'] / 1e6:.1f}M -> {report['params_after'] / 1e6:.1f}M "
          f"parameters ({1 - report['params_after'] / report['params_before']:.1%} fewer) "
          f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0
