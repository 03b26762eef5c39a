"""``corelm <command>``: a tiny dispatch table, one module per command.

Each command module in :mod:`corelm.commands` exposes ``main(argv: list[str]) -> int`` and builds its
own ``argparse`` parser, so ``corelm <command> --help`` documents itself. A :class:`CorelmError`
(bad arguments, data, text that is not UTF-8, a full or read-only disk) becomes one line on stderr and
exit status 2, never a traceback. SIGTERM is handled like Ctrl-C: temporary outputs are removed, training
commands checkpoint first, and the exit status is 130.
"""

from __future__ import annotations

import importlib
import signal
import sys
import threading

from corelm.errors import CorelmError, close_names

EXIT_CODES = """exit status:
  0    success
  2    bad input (one line on stderr: arguments, data, a full or read-only disk)
  130  interrupted by Ctrl-C (SIGINT) or SIGTERM; what the command saves on interrupt is saved"""

# command -> (module under corelm.commands, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("generate", "continue a prompt with a language model (streams tokens)"),
    "chat": ("chat", "chat with an instruction model (interactive or --once)"),
    "models": ("models", "list presets and embedded models with parameter counts"),
    "pull": ("pull", "download a model from the Hugging Face Hub (org/name or org/name:file.gguf)"),
    "convert": ("convert", "convert a GGUF or HF checkpoint to an HF safetensors directory"),
    "tokenizer": ("tokenizer", "train or inspect tokenizers (byte-level BPE, WordPiece)"),
    "prepare": ("prepare", "tokenize a corpus into memory-mapped training shards"),
    "pretrain": ("pretrain", "pretrain a model (causal LM or masked LM), optionally with torchrun"),
    "finetune": ("finetune", "fine-tune: classification, NER, instruction tuning, translation (full/LoRA/...)"),
    "merge": ("merge", "fold LoRA/adapter weights into the base model"),
    "evaluate": ("evaluate", "perplexity, classification, NER, summarization and translation (BLEU) metrics"),
    "predict": ("predict", "run a fine-tuned classifier or tagger on text"),
    "translate": ("translate", "translate or summarize text with an encoder-decoder (T5, BART, Marian), beam search"),
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
    return "\n".join(lines + ["", EXIT_CODES])


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM takes Ctrl-C's path: every cleanup and "finally" runs


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
    from corelm.commands.args import check_argv, strict_stdin
    from corelm.io.atomic import disk_error

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    try:
        check_argv(rest)
        strict_stdin()
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
    except OSError as exc:  # the file system refusing a write that no command wraps: still one line
        reason = disk_error(exc)
        if reason is None:
            raise
        print(f"corelm {name}: error: {f'{exc.filename}: ' if exc.filename else ''}{reason}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
