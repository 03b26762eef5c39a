"""``corelm chat``: talk to an instruction model, streaming its replies.

Interactive by default (multi-turn; ``/reset`` starts over, ``/exit`` or end-of-input quits);
``--once "question"`` answers one message and exits. Prompts go through the model's own chat
template, rendered exactly once.
"""

from __future__ import annotations

import argparse
import sys

from corelm.commands.args import HelpFormatter, Parser
from corelm.commands.decoding import (
    add_model_args,
    add_sampling_args,
    load_llm,
    print_stream,
    sampling_kwargs,
)
from corelm.errors import CorelmError

HELP = "commands: /reset (forget the conversation), /exit (quit; Ctrl-D works too)"


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(
        prog="corelm chat",
        description="Chat with an instruction model using its chat template. Interactive unless --once is given; "
                    "in the interactive loop, /reset clears the conversation and /exit (or Ctrl-D) quits.",
        formatter_class=HelpFormatter)
    ap.add_argument("--once", metavar="MESSAGE", default=None,
                    help="answer this one message and exit (non-interactive)")
    ap.add_argument("--system", default=None,
                    help="a system message (default: the template's own default, if it has one)")
    add_model_args(ap)
    add_sampling_args(ap, max_new_tokens=512)
    return ap


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    kwargs = sampling_kwargs(args)
    if args.once is not None and not args.once.strip():
        raise CorelmError("--once needs a non-empty message")
    llm = load_llm(args)
    if llm.tokenizer is None or not llm.tokenizer.chat_template:
        raise CorelmError(f"{args.model} has no chat template; use `corelm generate` for raw continuation")
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)

    def reply(text: str) -> None:
        messages.append({"role": "user", "content": text})
        stats: dict[str, float] = {}
        prompt = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = llm.tokenizer.encode(prompt, add_special_tokens=False)
        answer = print_stream(llm.stream_ids(ids, stats=stats, **kwargs), stats)
        messages.append({"role": "assistant", "content": answer})

    if args.once is not None:
        reply(args.once)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(HELP, file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            if interactive:
                print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            messages[:] = list(start)
            print("[conversation cleared]", file=sys.stderr, flush=True)
            continue
        if text.startswith("/") and " " not in text:
            print(f"unknown command {text}; {HELP}", file=sys.stderr, flush=True)
            continue
        try:
            reply(text)
        except CorelmError as exc:  # e.g. the conversation outgrew the context window
            messages.pop()
            print(f"error: {exc}", file=sys.stderr, flush=True)
