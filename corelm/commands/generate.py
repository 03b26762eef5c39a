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

from corelm.commands.args import HelpFormatter, Parser
from corelm.commands.decoding import (
    add_model_args,
    add_sampling_args,
    load_llm,
    print_stream,
    sampling_kwargs,
)
from corelm.errors import CorelmError


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(
        prog="corelm generate",
        description="Continue a prompt (raw text, no chat template) and stream the continuation to stdout. "
                    "A stats line (tokens, tokens/s) goes to stderr.",
        formatter_class=HelpFormatter)
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

    from corelm.generate.speculative import speculative_generate
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
