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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from corelm.commands.args import Options, option, options_from, parser_from, set_threads, threads_option
from corelm.data.text import read_text
from corelm.errors import CorelmError
from corelm.io.atomic import atomic_dir


@dataclass(kw_only=True)
class PruneOptions(Options):
    """What ``corelm prune`` removes from which model, and where the result goes."""

    model: str = option(help="embedded model name, .gguf file or checkpoint directory")
    method: Literal["magnitude", "wanda"] = option(
        "wanda", "weight pruning: magnitude = smallest |W| per row; wanda = smallest |W| * ||X|| per row "
                 "(--structure always scores on --calib activations)")
    sparsity: float = option(0.5, "fraction removed, in [0, 1): of each row's weights, or with --structure of each "
                                  "structure")
    pattern: str | None = option(None, "N:M semi-structured sparsity, e.g. 2:4 (overrides --sparsity)")
    structure: str | None = option(
        None, "structured pruning of a llama model: layers, kv-groups (a KV head with its query heads), heads (query "
              "heads, the same number per KV group) or channels (MLP); the fraction is --sparsity, or give several "
              "with their own, e.g. channels=0.25,kv-groups=0.34. Scored by each structure's output norm on --calib "
              "text; writes a smaller dense model")
    multiple_of: int = option(32, "with --structure channels: MLP channels kept are a multiple of this (int4 groups "
                                  "divide it)")
    calib: str | None = option(None, "text file for the activation statistics (Wanda, --structure)")
    recover_steps: int = option(0, "with --structure: fine-tune the pruned model this many steps on the whole --calib "
                                   "text, distilling the unpruned model (0: no recovery)")
    recover_lr: float = option(1e-4, "recovery: peak learning rate")
    recover_batch_size: int = option(4, "recovery: windows of 256 tokens per step")
    precision: str = option("fp32", "recovery: precision policy (bf16-mixed ran 2.2x faster than fp32 on an "
                                    "AVX512_BF16 CPU)", precision={"policies": ("fp32", "bf16-mixed", "bf16-true")})
    calib_tokens: int = option(4096, "calibration tokens read from --calib")
    out: str = option(help="directory to write (must not exist or be empty, unless --overwrite)")
    overwrite: bool = option(False, "replace an existing non-empty --out")
    threads: int | None = threads_option()

    def check(self) -> None:
        from corelm.compress.prune import parse_pattern

        if not 0.0 <= self.sparsity < 1.0:
            raise CorelmError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        parse_pattern(self.pattern)
        if self.structure is not None:
            structures = self.structures()
            if self.pattern:
                raise CorelmError("--structure removes whole structures; it cannot be combined with --pattern")
            if self.method == "magnitude":
                raise CorelmError("--structure scores structures by their output on --calib; --method magnitude is "
                                  "for weight pruning")
            for name, ratio in structures.items():
                if not 0.0 < ratio < 1.0:
                    raise CorelmError(f"the fraction of {name} removed must be in (0, 1), got {ratio}")
            if self.multiple_of < 1:
                raise CorelmError(f"--multiple-of must be a positive integer, got {self.multiple_of}")
            if not self.calib:
                raise CorelmError("--structure needs --calib TEXT_FILE (structures are scored on its activations)")
            if self.recover_steps < 0 or self.recover_batch_size < 1 or self.recover_lr <= 0:
                raise CorelmError("--recover-steps must be >= 0, --recover-batch-size >= 1 and --recover-lr > 0")
        elif self.recover_steps:
            raise CorelmError("--recover-steps needs --structure "
                              "(fine-tuning would refill the zeros of weight pruning)")
        if self.structure is None and self.method == "wanda" and not self.calib:
            raise CorelmError("--method wanda needs --calib TEXT_FILE (or use --method magnitude)")

    def structures(self) -> dict[str, float] | None:
        """``--structure`` as {structure: fraction removed}, or None for weight pruning."""
        from corelm.compress.prune import parse_structures

        return None if self.structure is None else parse_structures(self.structure, self.sparsity)


def build_parser() -> argparse.ArgumentParser:
    return parser_from(
        PruneOptions, prog="corelm prune",
        description="Zero the least important weights of every linear layer (the LM head stays dense), or with "
                    "--structure remove whole layers / KV groups / query heads / MLP channels "
                    "for a smaller dense model.")


def calibration_batches(tokenizer, path: str | Path, n_tokens: int, seq_len: int = 256) -> list[torch.Tensor]:
    """``(1, seq_len)`` id windows from the first ``n_tokens`` tokens of a text file."""
    path = Path(path)
    if not path.is_file():
        raise CorelmError(f"calibration file not found: {path}")
    ids = tokenizer.encode(read_text(path))[:n_tokens]
    if len(ids) < 16:
        raise CorelmError(f"{path} has only {len(ids)} tokens; calibration needs some text")
    return [torch.tensor([ids[i:i + seq_len]]) for i in range(0, len(ids), seq_len) if len(ids[i:i + seq_len]) > 1]


def prune(options: PruneOptions) -> dict:
    """Prune ``options.model`` and write ``options.out``; returns the report with ``out`` and ``seconds`` added
    (weight pruning: ``layers``, ``weights``, ``zeros``; structured: ``params_before``, ``params_after``,
    ``steps``, ``shape``)."""
    import corelm
    from corelm.compress.prune import prune_model
    from corelm.io.hf import save_hf_dir
    from corelm.quant.io import is_quantized_dir

    set_threads(options.threads)
    structures = options.structures()
    if is_quantized_dir(options.model):
        raise CorelmError(f"{options.model} is quantized; prune the float model, then quantize the result")
    out = Path(options.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not options.overwrite:
        raise CorelmError(f"{out} exists and is not empty; choose another directory or pass --overwrite")
    t0 = time.perf_counter()
    llm = corelm.load(options.model, dtype="fp32")
    if structures is not None:
        return _structured(llm, options, structures, out, t0)
    calib = (calibration_batches(llm.tokenizer, options.calib, options.calib_tokens)
             if options.method == "wanda" else None)
    print(f"pruning {options.model} ({options.method}, "
          f"{options.pattern or f'{options.sparsity:.0%} unstructured'})"
          f"{f' on {sum(b.shape[1] for b in calib)} calibration tokens' if calib else ''} ...", file=sys.stderr)
    with torch.inference_mode(False):
        report = prune_model(llm.model, options.method, options.sparsity, options.pattern, calibration=calib)
    with atomic_dir(out) as tmp:
        save_hf_dir(llm.model, llm.config, tmp, tokenizer=llm.tokenizer)
    return {**report, "out": out, "seconds": time.perf_counter() - t0}


def main(argv: list[str]) -> int:
    report = prune(options_from(PruneOptions, build_parser().parse_args(argv)))
    out, seconds = report["out"], report["seconds"]
    if "shape" in report:
        print(f"wrote {out}/: {report['shape']}; {report['params_before'] / 1e6:.1f}M -> "
              f"{report['params_after'] / 1e6:.1f}M parameters "
              f"({1 - report['params_after'] / report['params_before']:.1%} fewer) in {seconds:.1f} s", file=sys.stderr)
    else:
        print(f"wrote {out}/: {report['layers']} layers, {report['zeros'] / report['weights']:.1%} of their weights "
              f"zero ({report['zeros'] / 1e6:.1f}M of {report['weights'] / 1e6:.1f}M) in {seconds:.1f} s",
              file=sys.stderr)
    return 0


def _structured(llm, options: PruneOptions, structures: dict[str, float], out: Path, t0: float) -> dict:
    """``--structure``: score, remove, write a smaller dense checkpoint."""
    from corelm.compress.prune import planned_config, prune_structured, recover
    from corelm.io.hf import save_hf_dir

    if llm.config.family != "llama":
        raise CorelmError(f"structured pruning supports llama-family models; {options.model} is {llm.config.family}")
    c0, c1 = llm.config, planned_config(llm.config, structures, options.multiple_of)
    shape = ", ".join(f"{k} {getattr(c0, k)}->{getattr(c1, k)}" for k in ("n_layer", "n_head", "n_kv_head", "d_ff")
                      if getattr(c0, k) != getattr(c1, k))
    calib = calibration_batches(llm.tokenizer, options.calib, options.calib_tokens)
    print(f"pruning {options.model} (structured: {shape}) on {sum(b.shape[1] for b in calib)} calibration tokens ...",
          file=sys.stderr)
    with torch.inference_mode(False):
        model, report = prune_structured(llm.model, structures, calib, multiple_of=options.multiple_of,
                                         progress=lambda msg: print(f"  {msg}", file=sys.stderr))
        if options.recover_steps:
            ids = llm.tokenizer.encode(read_text(options.calib))
            print(f"  recovery: {options.recover_steps} steps x {options.recover_batch_size} x 256 tokens "
                  f"of {options.calib} ({len(ids)} tokens), distilling the unpruned model, {options.precision}",
                  file=sys.stderr)
            rec = recover(model, llm.model, ids, options.recover_steps, batch_size=options.recover_batch_size,
                          lr=options.recover_lr, precision=options.precision)
            print(f"  recovery loss {rec['first_loss']:.3f} -> {rec['last_loss']:.3f}", file=sys.stderr)
    for step in report["steps"]:
        if "removed_layers" in step:
            print(f"  removed layers {', '.join(map(str, step['removed_layers']))} (of 0-{step['units'] - 1})",
                  file=sys.stderr)
    with atomic_dir(out) as tmp:
        save_hf_dir(model, model.config, tmp, tokenizer=llm.tokenizer)
    return {**report, "shape": shape, "out": out, "seconds": time.perf_counter() - t0}
