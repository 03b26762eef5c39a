"""``corelm <command>``: a tiny dispatch table, one module per command.

Each command module in :mod:`corelm.commands` exposes ``main(argv: list[str]) -> int`` and builds its
own ``argparse`` parser, so ``corelm <command> --help`` documents itself. A :class:`CorelmError`
becomes one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import importlib
import sys

from corelm.errors import CorelmError, close_names

# command -> (module under corelm.commands, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("generate", "continue a prompt with a language model (streams tokens)"),
    "chat": ("chat", "chat with an instruction model (interactive or --once)"),
    "models": ("models", "list presets and embedded models with parameter counts"),
    "convert": ("convert", "convert a GGUF or HF checkpoint to an HF safetensors directory"),
    "tokenizer": ("tokenizer", "train or inspect tokenizers (byte-level BPE, WordPiece)"),
    "prepare": ("prepare", "tokenize a corpus into memory-mapped training shards"),
    "pretrain": ("pretrain", "pretrain a model (causal LM or masked LM), optionally with torchrun"),
    "finetune": ("finetune", "fine-tune: classification, NER, instruction tuning (full/LoRA/AdaLoRA/adapter)"),
    "merge": ("merge", "fold LoRA/adapter weights into the base model"),
    "evaluate": ("evaluate", "perplexity, classification, NER, summarization metrics"),
    "predict": ("predict", "run a fine-tuned classifier or tagger on text"),
    "serve": ("serve", "OpenAI-compatible HTTP server with a web chat page"),
    "plan": ("plan", "memory, FLOPs, time and cost of a model on an accelerator"),
    "bench": ("bench", "measure this machine: matmul peak, bandwidth, a real train/decode step"),
    "quantize": ("quantize", "weight-only int8/int4 quantization"),
    "prune": ("prune", "magnitude / Wanda pruning, unstructured or N:M"),
    "distill": ("distill", "knowledge distillation from a teacher into a student"),
    "export": ("export", "export a model to GGUF"),
    "compare": ("compare", "size, memory, perplexity and speed of several model variants"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: corelm <command> [options]   (corelm <command> --help for details)", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from corelm import __version__

        print(f"corelm {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"corelm: error: unknown command {name!r}{close_names(name, list(COMMANDS))}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"corelm.commands.{COMMANDS[name][0]}")
        return int(module.main(rest) or 0)
    except CorelmError as exc:
        print(f"corelm {name}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
