"""``corelm generate``: continue a prompt with a language model, streaming tokens to stdout.

Examples::

    corelm generate "The three laws of thermodynamics are"
    corelm generate --model path/to/model.gguf --temperature 0.7 --top-p 0.9 --max-new-tokens 64 "Once upon"
    corelm generate --quantize int4 "Once upon"            # packed int4 weights, fused decode path
    corelm generate --lookup 3 "Repeat: a b c d. a b"     # prompt-lookup speculative decoding
    corelm generate --draft smaller/model --draft-k 4 "Once upon"

The raw continuation goes to stdout as it is produced; a stats line (tokens, tokens/s) goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from corelm.errors import CorelmError
from corelm.presets import DEFAULT_MODEL


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """``--model`` and ``--dtype``, shared by the commands that load a decoder."""
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help="embedded model or preset name (see `corelm models`), a .gguf file or an HF checkpoint "
                         "directory")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                    help="weight and compute dtype (default: bf16 where the CPU declares bf16 arithmetic, else fp32; see corelm.api.default_dtype)")


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
    import corelm
    from corelm.api import LLM

    model = model or args.model
    quantize = getattr(args, "quantize", None)
    t0 = time.perf_counter()
    llm = corelm.load(model, dtype=args.dtype, quantize=quantize)
    if not isinstance(llm, LLM):
        raise CorelmError(f"{model} is an encoder; generate and chat need a decoder (e.g. {DEFAULT_MODEL})")
    kind = quantize or str(llm.dtype).removeprefix("torch.")
    print(f"[loaded {model} ({kind}) in {time.perf_counter() - t0:.1f} s]", file=sys.stderr, flush=True)
    return llm


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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="corelm generate",
        description="Continue a prompt (raw text, no chat template) and stream the continuation to stdout. "
                    "A stats line (tokens, tokens/s) goes to stderr.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("prompt", help="the text to continue ('-' reads it from stdin)")
    add_model_args(ap)
    add_sampling_args(ap)
    ap.add_argument("--beams", type=int, default=1,
                    help="beam search width (1 = off); beams are deterministic and ignore sampling options")
    ap.add_argument("--quantize", choices=["int8", "int4"], default=None,
                    help="quantize the weights after loading (int4 from a GGUF reuses its Q4 blocks); a "
                         "quantized llama decodes on the fused fast path")
    spec = ap.add_argument_group("speculative decoding (batch 1; greedy output equals plain greedy)")
    spec.add_argument("--draft", default=None, metavar="MODEL",
                      help="a smaller decoder with the same tokenizer proposes tokens the model verifies")
    spec.add_argument("--lookup", type=int, default=None, metavar="N",
                      help="prompt-lookup decoding: propose the tokens that followed the last N-gram earlier "
                           "in the text")
    spec.add_argument("--draft-k", type=int, default=4, metavar="K", help="tokens proposed per verification step")
    return ap


def check_speculative(args: argparse.Namespace) -> bool:
    """Whether ``--draft``/``--lookup`` was given; bad combinations raise one-line errors."""
    if args.draft is None and args.lookup is None:
        return False
    if args.draft is not None and args.lookup is not None:
        raise CorelmError("--draft and --lookup are two ways to propose tokens; give one of them")
    if args.beams > 1:
        raise CorelmError("speculative decoding (--draft/--lookup) does not combine with --beams")
    if args.lookup is not None and args.lookup < 1:
        raise CorelmError(f"--lookup must be at least 1, got {args.lookup}")
    if any(not s for s in args.stop or []):
        raise CorelmError("stop strings must be non-empty strings")
    if args.draft_k < 1:
        raise CorelmError(f"--draft-k must be at least 1, got {args.draft_k}")
    unsupported = [flag for flag, off in (("--top-p", args.top_p == 1.0), ("--top-k", args.top_k == 0),
                                          ("--repetition-penalty", args.repetition_penalty == 1.0)) if not off]
    if unsupported:
        raise CorelmError(f"speculative decoding samples with --temperature only; drop {', '.join(unsupported)}")
    return True


def speculative_pieces(llm: Any, ids: list[int], args: argparse.Namespace, kwargs: dict[str, Any],
                       stats: dict[str, float]) -> Any:
    """Text pieces of a speculative run (the tokens come in verified bursts); fills ``stats``."""
    import torch

    from corelm.compress.speculative import speculative_generate
    from corelm.generate.text import stream_text

    draft = load_llm(args, args.draft).model if args.draft is not None else None
    llm._check_length(ids, kwargs["max_new_tokens"])
    eos = None if args.ignore_eos else llm.tokenizer.eos_token_id
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    t0 = time.perf_counter()
    tokens, spec = speculative_generate(llm.model, ids, kwargs["max_new_tokens"], draft=draft, lookup=args.lookup,
                                        k=args.draft_k, temperature=args.temperature, eos_token_id=eos,
                                        generator=generator)
    if tokens and tokens[-1] == eos:
        tokens = tokens[:-1]  # like the engine: the end-of-sequence token is not part of the text
    stats.update(prompt_tokens=len(ids), new_tokens=len(tokens), speculative_s=time.perf_counter() - t0,
                 acceptance_rate=spec.acceptance_rate, tokens_per_target_call=spec.tokens_per_target_call)
    return stream_text(llm.tokenizer, iter(tokens), args.stop or [])


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    kwargs = sampling_kwargs(args)
    if args.beams < 1:
        raise CorelmError(f"--beams must be at least 1, got {args.beams}")
    speculative = check_speculative(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    llm = load_llm(args)
    stats: dict[str, float] = {}
    ids = llm.encode_prompt(prompt)
    if speculative:
        if llm.tokenizer is None:
            raise CorelmError(f"{args.model} has no tokenizer")
        pieces = speculative_pieces(llm, ids, args, kwargs, stats)
    else:
        pieces = llm.stream_ids(ids, num_beams=args.beams, stats=stats, **kwargs)
    print_stream(pieces, stats)
    return 0
