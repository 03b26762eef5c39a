"""What every command's input goes through: its arguments, its numbers and its stdin.

corelm's contract is that bad input is one line on stderr and exit status 2. :class:`Parser` makes
argparse keep it (a usage error is a :class:`CorelmError`, and ``type=float`` options take only finite
numbers); :func:`check_argv` and :func:`strict_stdin` make sure the text a command sees is UTF-8, once,
in :func:`corelm.cli.main`, instead of failing deep inside a tokenizer.

A command's options are a dataclass whose fields are documented where they are declared;
:func:`parser_from` builds its parser from them and :func:`options_from` turns the parsed arguments back
into the dataclass, so ``corelm <command> ...`` and ``<command>(<Command>Options(...))`` are one function.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import io
import math
import sys
import types
import typing
from dataclasses import MISSING
from typing import Any, NoReturn, TypeVar

from corelm.errors import CorelmError

T = TypeVar("T")


def finite_float(text: str) -> float:
    """``float(text)``, refusing ``nan``, ``inf`` and numbers too large for a float (``1e400``)."""
    value = float(text)  # a ValueError becomes argparse's "invalid float value: 'x'"
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (a :class:`CorelmError`) and whose floats are finite.

    ``type=float`` is mapped to :func:`finite_float` through argparse's type registry, so every float
    option of a command (and of its sub-commands, which are made with this class) is checked without
    naming a special type at each ``add_argument``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register("type", float, finite_float)

    def error(self, message: str) -> NoReturn:
        raise CorelmError(f"{message} (see {self.prog} --help)")


def check_argv(argv: list[str]) -> None:
    """Refuse an argument that is not UTF-8 text.

    Python hands over undecodable bytes of ``sys.argv`` as lone surrogates (PEP 383); they would
    reach a tokenizer or a file name and fail there with a traceback.
    """
    for index, arg in enumerate(argv, 1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError as exc:
            char = ord(arg[exc.start])
            what = f"invalid byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"lone surrogate U+{char:04X}"
            at = len(arg[:exc.start].encode("utf-8"))
            raise CorelmError(f"argument {index} is not UTF-8 text ({what} at offset {at})") from None


def _stdin_error(exc: UnicodeError) -> NoReturn:
    if not isinstance(exc, UnicodeDecodeError):  # the handler is meant for decoding only
        raise exc
    raise CorelmError(f"stdin is not UTF-8 text ({exc.reason}: 0x{exc.object[exc.start]:02x})")


codecs.register_error("corelm.stdin", _stdin_error)


def strict_stdin() -> None:
    """Decode stdin as strict UTF-8; a bad byte becomes a one-line :class:`CorelmError` where it is read.

    Python's default for stdin is the locale's encoding with ``surrogateescape``, which lets bad bytes
    through as lone surrogates. Only a real text stream is reconfigured (not a test's ``StringIO``).
    """
    stream = sys.stdin
    if not isinstance(stream, io.TextIOWrapper):
        return
    try:
        stream.reconfigure(encoding="utf-8", errors="corelm.stdin")
    except (io.UnsupportedOperation, ValueError):  # already read from: keep its encoding, make it strict
        stream.reconfigure(errors="corelm.stdin")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, except for on/off flags: ``--no-progress`` turns the
    progress bar off whatever "default: True" would suggest, so a flag's help says what it does; nor for an
    option without a default (its help says what happens without it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 or action.default is None:  # on/off flags; "default: None" says nothing
            return action.help
        return super()._get_help_string(action)


# ---- options several commands share: one definition each ------------------------------------------

DTYPES = ("fp32", "bf16", "fp16")
# THE precision policies of training (corelm.train.precision reads them from here): every training command's
# --precision offers these, from this one declaration
TRAIN_POLICIES = ("fp32", "tf32", "bf16-mixed", "fp16-mixed", "bf16-true")
PRECISION_HELP = ("precision policy: fp32; tf32 (fp32 with TensorFloat-32 matmuls on CUDA, the same as fp32 on CPU); "
                  "bf16-mixed or fp16-mixed (autocast, fp32 weights; fp16 with a dynamic GradScaler); bf16-true "
                  "(bf16 weights, gradients and optimizer state)")


TRACKERS = ("tensorboard", "wandb", "csv")
TRACKER_HELP = ("where the metrics go besides RUN/metrics.jsonl, repeatable or comma-separated: tensorboard "
                "(RUN/tensorboard), wandb (Weights & Biases, the optional wandb package; WANDB_MODE=offline needs no "
                "account), csv (RUN/metrics.csv); default tensorboard")


def resolve_trackers(names: list[str] | tuple[str, ...] | str | None, *, tensorboard: bool = True,
                     wandb: str | None = None) -> list[str]:
    """The trackers of a run: ``--tracker`` values (each may be a comma list; none given: tensorboard), without
    tensorboard under ``--no-tensorboard``, with wandb when a ``--wandb PROJECT`` is named.

    Raises:
        CorelmError: a name that is not one of :data:`TRACKERS`.
    """
    if isinstance(names, str):
        names = [names]
    out = []
    for part in (p.strip() for entry in (names or ["tensorboard"]) for p in entry.split(",")):
        if part not in TRACKERS:
            raise CorelmError(f"--tracker: unknown tracker {part!r} (choose from {', '.join(TRACKERS)})")
        if part not in out:
            out.append(part)
    if not tensorboard and "tensorboard" in out:
        out.remove("tensorboard")
    if wandb and "wandb" not in out:
        out.append("wandb")
    return out


def add_dtype(ap: argparse.ArgumentParser, default: str | None, what: str, auto: bool = True) -> None:
    """``--dtype`` for weights that are loaded (``auto``: bf16 where the CPU declares bf16 arithmetic,
    else fp32 -- see corelm.loading.default_dtype) or written (no ``auto``)."""
    choices = [*DTYPES, "auto"] if auto else list(DTYPES)
    ap.add_argument("--dtype", default=default, choices=choices,
                    help=f"{what}" + ("; auto: a quantized GGUF runs on its own blocks (corelm's kernels), "
                                      "other weights in bf16 where the CPU declares bf16 arithmetic, else fp32; "
                                      "a dtype dequantizes GGUF blocks to it" if auto else ""))


def add_precision(ap: argparse.ArgumentParser, default: str | None, what: str,
                  policies: tuple[str, ...] = TRAIN_POLICIES) -> None:
    """``--precision``: the training loop's precision policy (corelm.train.precision)."""
    ap.add_argument("--precision", default=default, choices=list(policies), help=what)


def device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")


def add_device(ap: argparse.ArgumentParser, default: str, what: str) -> None:
    """``--device``: where the model runs (``auto``: cuda when a GPU is visible, else cpu)."""
    ap.add_argument("--device", type=device, default=default, help=f"{what} (auto, cpu, cuda or cuda:N)")


THREADS_HELP = "torch CPU threads (default: OMP_NUM_THREADS if set, else the physical cores)"


def threads_option(help: str = THREADS_HELP) -> Any:
    """The ``--threads N`` field of every command that computes: ``threads: int | None = threads_option()``;
    :func:`set_threads` applies it. At least 1 (checked with the other fields)."""
    return option(None, help, metavar="N", threads=True)


def set_threads(threads: int | None) -> int:
    """Set torch's CPU threads to ``threads``, or by default to ``OMP_NUM_THREADS`` if set, else the physical
    cores; returns the count.

    One policy for every command (corelm.cpu.default_threads): torch's own default counts SMT siblings,
    and an OpenMP thread waiting on a busy sibling stalls every matmul of a bandwidth-bound decode.
    """
    import torch

    from corelm.cpu import default_threads

    if threads is None:
        threads = default_threads()
    torch.set_num_threads(threads)
    return threads


# ---- a command's options are a dataclass; its parser is built from the fields ----------------------

def option(default: Any = MISSING, help: str = "", **meta: Any) -> Any:
    """A documented options field: ``option(8, "sequences per step")`` is ``field(default=8, metadata={"help": ...})``
    (a list field is ``field(default_factory=list, metadata={"help": ...})``, which linters read as one).

    Other metadata keys read by :func:`parser_from`: ``positional`` (an argument, not ``--flag``), ``flag``
    (another option string, e.g. ``--type`` for a field ``qtype``), ``metavar``, ``choices``, ``nargs``,
    ``group`` (fields with the same group name are mutually exclusive), ``section`` (a titled block of
    ``--help``: fields with the same section are listed together under it), and ``dtype`` / ``precision`` /
    ``device`` (a dict of keyword arguments, or True) to route the field through :func:`add_dtype`,
    :func:`add_precision` or :func:`add_device`.
    """
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def redefault(options_cls: type, name: str, default: Any) -> Any:
    """The field ``name`` of the dataclass ``options_cls``, documented the same, with another default: how a
    command's options change a shared option's default (``max_new_tokens: int = redefault(SamplingOptions,
    "max_new_tokens", 512)`` in a subclass of ``SamplingOptions``)."""
    (f,) = [f for f in dataclasses.fields(options_cls) if f.name == name]
    return dataclasses.field(default=default, metadata=f.metadata, kw_only=f.kw_only)


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


def _kind(annotation: Any) -> tuple[Any, tuple | None, bool]:
    """``(scalar type, Literal choices or None, is a list)`` of a field's annotation; ``X | None`` is ``X``."""
    origin, params = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in params if a is not type(None)]
        return _kind(kinds[0]) if len(kinds) == 1 else (str, None, False)
    if origin is typing.Literal:
        return type(params[0]), params, False
    if origin in (list, tuple):
        kind, choices, _ = _kind(params[0]) if params else (str, None, False)
        return kind, choices, True
    return annotation, None, False


def _choices(f: dataclasses.Field, annotation: Any) -> tuple | list | None:
    """The values a field accepts, or None for any value of its type."""
    if "dtype" in f.metadata:
        return [*DTYPES, "auto"] if _meta(f, "dtype").get("auto", True) else list(DTYPES)
    if "precision" in f.metadata:
        return list(_meta(f, "precision").get("policies", TRAIN_POLICIES))
    return f.metadata.get("choices") or _kind(annotation)[1]


def _meta(f: dataclasses.Field, key: str) -> dict:
    value = f.metadata[key]
    return value if isinstance(value, dict) else {}


def _target(ap: argparse.ArgumentParser, f: dataclasses.Field, groups: dict, sections: dict) -> Any:
    """Where a field's argument is added: ``ap``, its ``section``'s titled block, or its mutually exclusive
    ``group`` (made once per name, in the section of its first field)."""
    target = ap
    if "section" in f.metadata:
        if f.metadata["section"] not in sections:
            sections[f.metadata["section"]] = ap.add_argument_group(f.metadata["section"])
        target = sections[f.metadata["section"]]
    if "group" in f.metadata:
        if f.metadata["group"] not in groups:
            groups[f.metadata["group"]] = target.add_mutually_exclusive_group()
        target = groups[f.metadata["group"]]
    return target


# one dispatch over the kinds of field (bool, list, choices, shared builders), a few lines each
def add_fields(ap: argparse.ArgumentParser, options_cls: type) -> argparse.ArgumentParser:  # noqa: C901
    """Add one argument per field of the dataclass ``options_cls`` to ``ap`` (see :func:`parser_from`)."""
    hints = typing.get_type_hints(options_cls)
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    sections: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(options_cls):
        if not f.init:
            continue
        helptext = f.metadata.get("help", "").replace("%", "%%")
        default, flag = _default(f), _flag(f)
        target = _target(ap, f, groups, sections)
        if "dtype" in f.metadata:
            add_dtype(target, default, helptext, **_meta(f, "dtype"))
            continue
        if "precision" in f.metadata:
            add_precision(target, default, helptext, **_meta(f, "precision"))
            continue
        if "device" in f.metadata:
            add_device(target, default, helptext)
            continue
        kind, _, many = _kind(hints[f.name])
        kwargs: dict[str, Any] = {"help": helptext}
        for key in ("metavar", "nargs"):
            if key in f.metadata:
                kwargs[key] = f.metadata[key]
        if kind is bool and not many:
            if default is True:  # on by default: the flag turns it off, and its help says so
                target.add_argument("--no-" + flag[2:], dest=f.name, action="store_false",
                                    help=f"turn off: {helptext} (on by default)")
            else:
                target.add_argument(flag, dest=f.name, action="store_true", help=helptext)
            continue
        if kind in (int, float):
            kwargs["type"] = kind
        choices = _choices(f, hints[f.name])
        if choices is not None:
            kwargs["choices"] = list(choices)
        if f.metadata.get("positional"):
            if many:
                kwargs.setdefault("nargs", "+" if default is MISSING or default else "*")
            elif default is not MISSING:
                kwargs.setdefault("nargs", "?")
            if default is not MISSING:
                kwargs["default"] = default
            target.add_argument(f.name, **kwargs)
            continue
        if many and "nargs" not in kwargs:
            kwargs["action"] = "append"  # --stop a --stop b
        if default is MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        target.add_argument(flag, dest=f.name, **kwargs)
    return ap


def parser_from(options_cls: type, prog: str, description: str | None = None, *,
                formatter_class: type = HelpFormatter, **parser_kwargs: Any) -> Parser:
    """The command-line parser of an options dataclass: its fields are the arguments, their documentation the help.

    - a field ``max_steps`` is ``--max-steps`` (``metadata["flag"]`` names another), or a positional
      argument with ``metadata["positional"]``; a field without a default is a required option;
    - the annotation gives the type: ``int`` and ``float`` (finite) are converted, ``bool`` is an on/off flag
      (``--x`` when it defaults to False, ``--no-x`` when it defaults to True), ``list[str]`` collects
      several values (``nargs`` for a positional, repeated ``--x`` for an option), ``Literal[...]`` or
      ``metadata["choices"]`` restricts the values;
    - ``metadata["dtype"|"precision"|"device"]`` makes the field the shared ``--dtype``, ``--precision`` or
      ``--device`` option of :func:`add_dtype`, :func:`add_precision`, :func:`add_device`.

    ``options_from(options_cls, parser.parse_args(argv))`` gives the dataclass back.
    """
    ap = Parser(prog=prog, description=description, formatter_class=formatter_class, **parser_kwargs)
    return add_fields(ap, options_cls)


def options_from(options_cls: type[T], namespace: argparse.Namespace) -> T:
    """The options dataclass of parsed arguments (its ``__post_init__`` validates them)."""
    return options_cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(options_cls) if f.init})


def check_choices(options: Any) -> None:
    """Refuse, as a one-line :class:`CorelmError`, a field value outside the field's choices (what argparse
    checks on the command line, checked again for options made in Python)."""
    hints = typing.get_type_hints(type(options))
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if value is None or value is _default(f):
            continue
        if f.metadata.get("threads") and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise CorelmError(f"{_flag(f)} must be a whole number of at least 1, got {value!r}")
        if "device" in f.metadata:
            try:
                device(value)
            except argparse.ArgumentTypeError as exc:
                raise CorelmError(f"{_flag(f)} {exc}") from None
            continue
        choices = _choices(f, hints[f.name])
        values = value if isinstance(value, (list, tuple)) else [value]
        bad = [v for v in values if choices is not None and v not in choices]
        if bad:
            raise CorelmError(f"{_flag(f)}: invalid choice {bad[0]!r} (choose from {', '.join(map(str, choices))})")


class Options:
    """Base of the commands' options dataclasses: validates choices after ``__init__``, then :meth:`check`."""

    def __post_init__(self) -> None:
        check_choices(self)
        self.check()

    def check(self) -> None:
        """Raise :class:`CorelmError` with a one-line message for values that cannot work together."""


def as_options(options_cls: type[T], given: Any, args: tuple, kwargs: dict) -> T:
    """``given`` when it is an ``options_cls`` already, else ``options_cls(given, *args, **kwargs)``: a library
    function takes its options dataclass, or the same values as positional and keyword arguments."""
    if isinstance(given, options_cls):
        if args or kwargs:
            raise TypeError(f"pass either a {options_cls.__name__} or its fields, not both")
        return given
    return options_cls(given, *args, **kwargs)
