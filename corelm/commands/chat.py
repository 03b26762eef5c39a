"""``corelm chat``: talk to an instruction model, streaming its replies.

Interactive by default (multi-turn; ``/reset`` starts over, ``/exit`` or end-of-input quits);
``--once "question"`` answers one message and exits. Prompts go through the model's own chat
template, rendered exactly once. ``--json-schema``, ``--json``, ``--regex`` or ``--grammar`` constrain
every reply (docs/structured-output.md).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from corelm.commands.args import option, options_from, parser_from, redefault
from corelm.commands.decoding import ModelOptions, SamplingOptions, load_llm, print_stream
from corelm.errors import CorelmError

HELP = "commands: /reset (forget the conversation), /exit (quit; Ctrl-D works too)"


@dataclass
class ChatOptions(SamplingOptions, ModelOptions):
    """The conversation ``corelm chat`` starts, the model and how tokens are chosen."""

    once: str | None = option(None, "answer this one message and exit (non-interactive)", metavar="MESSAGE")
    system: str | None = option(None, "a system message (default: the template's own default, if it has one)")
    max_new_tokens: int = redefault(SamplingOptions, "max_new_tokens", 512)

    def check(self) -> None:
        super().check()
        if self.once is not None and not self.once.strip():
            raise CorelmError("--once needs a non-empty message")


def build_parser() -> argparse.ArgumentParser:
    return parser_from(
        ChatOptions, prog="corelm chat",
        description="Chat with an instruction model using its chat template. Interactive unless --once is given; "
                    "in the interactive loop, /reset clears the conversation and /exit (or Ctrl-D) quits.")


def chat(options: ChatOptions) -> list[dict[str, str]]:
    """Load the model and talk: answer ``options.once``, or each line of stdin until ``/exit`` or its end.

    Replies stream to stdout, each followed by a stats line on stderr. Returns the conversation's messages
    (``role`` and ``content``; after ``/reset``, those since).
    """
    llm = load_llm(options)
    if llm.tokenizer is None or not llm.tokenizer.chat_template:
        raise CorelmError(f"{options.model} has no chat template; use `corelm generate` for raw continuation")
    start = [{"role": "system", "content": options.system}] if options.system else []
    messages = list(start)
    kwargs = options.sampling_kwargs()

    def reply(text: str) -> None:
        messages.append({"role": "user", "content": text})
        stats: dict[str, float] = {}
        prompt = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = llm.tokenizer.encode(prompt, add_special_tokens=False)
        answer = print_stream(llm.stream_ids(ids, stats=stats, **kwargs), stats)
        messages.append({"role": "assistant", "content": answer})

    if options.once is not None:
        reply(options.once)
        return messages
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
            return messages
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return messages
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


def main(argv: list[str]) -> int:
    chat(options_from(ChatOptions, build_parser().parse_args(argv)))
    return 0
