"""What the commands that decode text share (``generate``, ``chat``): their model and sampling options,
loading the decoder with its one stderr line, and printing a stream with its stats line.

Not a command itself: commands import this module, never each other.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from corelm.commands.args import add_dtype
from corelm.errors import CorelmError
from corelm.presets import DEFAULT_MODEL


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """``--model`` and ``--dtype``, shared by the commands that load a decoder."""
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help="embedded model or preset name (see `corelm models`), a .gguf file, an HF checkpoint "
                         "directory, or a Hugging Face repo id org/name[@rev][:file.gguf|:QUANT] (from the local "
                         "cache; `corelm pull` downloads; an existing local path of the same spelling wins)")
    add_dtype(ap, "auto", "weight and compute dtype")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: OMP_NUM_THREADS if set, else the physical cores)")
    ap.add_argument("--compile", action="store_true",
                    help="decode through a torch.compile'd step of the model's forward (minutes to compile the "
                         "first time on a small CPU, seconds once cached; for float models, mainly on GPU)")


def add_sampling_args(ap: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    """The sampling options, shared by generate and chat; defaults are greedy decoding."""
    ap.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="generate at most this many tokens")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0 = greedy (deterministic); higher = more random")
    ap.add_argument("--top-p", type=float, default=1.0,
                    help="nucleus sampling: sample from the smallest set of tokens whose probability reaches p (0<p<=1)")
    ap.add_argument("--top-k", type=int, default=0, help="sample only from the k most likely tokens (0 = no limit)")
    ap.add_argument("--repetition-penalty", type=float, default=1.0,
                    help="divide the logits of tokens already present by this (>1 discourages repeats)")
    ap.add_argument("--seed", type=int, default=None, help="random seed for sampling (same seed, same text)")
    ap.add_argument("--stop", action="append", default=None, metavar="TEXT",
                    help="stop before this text (repeatable); it is not printed")
    ap.add_argument("--ignore-eos", action="store_true",
                    help="keep generating after the end-of-sequence token (for timing)")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of ``LLM.generate`` from parsed options, checked up front."""
    if args.max_new_tokens < 1:
        raise CorelmError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise CorelmError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise CorelmError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise CorelmError(f"--top-k must be >= 0, got {args.top_k}")
    if args.repetition_penalty <= 0:
        raise CorelmError(f"--repetition-penalty must be > 0, got {args.repetition_penalty}")
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "repetition_penalty": args.repetition_penalty, "seed": args.seed,
            "stop": args.stop, "ignore_eos": args.ignore_eos}


def load_llm(args: argparse.Namespace, model: str | None = None) -> Any:
    """Load ``--model`` (or ``model``) as a decoder, reporting the load time on stderr."""
    import torch

    import corelm
    from corelm.api import LLM
    from corelm.cpu import default_threads

    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise CorelmError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads or default_threads())
    model = model or args.model
    quantize = getattr(args, "quantize", None)
    t0 = time.perf_counter()
    llm = corelm.load(model, dtype=args.dtype, quantize=quantize)
    if not isinstance(llm, LLM):
        raise CorelmError(f"{model} is an encoder; generate and chat need a decoder (e.g. {DEFAULT_MODEL})")
    llm.compile = bool(getattr(args, "compile", False))
    print(f"[loaded {model} ({describe_decoder(llm.model, llm.compile)}) in {time.perf_counter() - t0:.1f} s]",
          file=sys.stderr, flush=True)
    return llm


def describe_decoder(model: Any, compile: bool = False) -> str:
    """What the load line says about the weights and the decode path: ``int4, C++ step``, ``bf16, PyTorch``."""
    from corelm.generate.step import KernelStep, step_for

    spec = getattr(model, "corelm_quantization", None)
    weights = str(next(model.parameters()).dtype).removeprefix("torch.")
    if spec:  # the storage, not the float dtype the layers compute in: int4 / int8, or a GGUF file's own blocks
        weights = "GGUF blocks as stored" if spec["method"] == "gguf" else spec["method"]
    path = "C++ step" if isinstance(step_for(model, compile=compile), KernelStep) else (
        "PyTorch, compiled" if compile else "PyTorch")
    return f"{weights}, {path}"


def print_stream(pieces: Any, stats: dict[str, float]) -> str:
    """Write text pieces to stdout as they come; then one stats line to stderr. Returns the text."""
    out = []
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        out.append(piece)
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(format_stats(stats), file=sys.stderr, flush=True)
    return "".join(out)


def format_stats(stats: dict[str, float]) -> str:
    if "acceptance_rate" in stats:  # speculative: one number for the whole run, plus what the drafts earned
        n, seconds = int(stats["new_tokens"]), stats["speculative_s"]
        return (f"[{n} tokens; prompt {int(stats['prompt_tokens'])} tokens; {n / seconds if seconds else 0:.3g} "
                f"tok/s overall; acceptance rate {stats['acceptance_rate']:.0%}; "
                f"{stats['tokens_per_target_call']:.2f} tokens per target pass]")
    n, decode_s = int(stats.get("new_tokens", 0)), stats.get("decode_s", 0.0)
    prompt, prefill_s = int(stats.get("prompt_tokens", 0)), stats.get("prefill_s", 0.0)
    # the first new token comes out of the prefill; the rest are decode steps
    rate = (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0
    prefill_rate = prompt / prefill_s if prefill_s > 0 else 0.0
    return (f"[{n} tokens; prompt {prompt} tokens at {prefill_rate:.3g} tok/s; "
            f"decode {rate:.3g} tok/s]")
