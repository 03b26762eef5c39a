"""What every command's input goes through: its arguments, its numbers and its stdin.

corelm's contract is that bad input is one line on stderr and exit status 2. :class:`Parser` makes
argparse keep it (a usage error is a :class:`CorelmError`, and ``type=float`` options take only finite
numbers); :func:`check_argv` and :func:`strict_stdin` make sure the text a command sees is UTF-8, once,
in :func:`corelm.cli.main`, instead of failing deep inside a tokenizer.
"""

from __future__ import annotations

import argparse
import codecs
import io
import math
import sys
from typing import NoReturn

from corelm.errors import CorelmError


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
    progress bar off whatever "default: True" would suggest, so a flag's help says what it does."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0:  # store_true / store_false / count / help / version
            return action.help
        return super()._get_help_string(action)


# ---- options several commands share: one definition each ------------------------------------------

DTYPES = ("fp32", "bf16", "fp16")
TRAIN_POLICIES = ("fp32", "bf16-mixed", "fp16-mixed", "bf16-true")  # corelm.train.precision.POLICIES


def add_dtype(ap: argparse.ArgumentParser, default: str | None, what: str, auto: bool = True) -> None:
    """``--dtype`` for weights that are loaded (``auto``: bf16 where the CPU declares bf16 arithmetic,
    else fp32 -- see corelm.loading.default_dtype) or written (no ``auto``)."""
    choices = [*DTYPES, "auto"] if auto else list(DTYPES)
    ap.add_argument("--dtype", default=default, choices=choices,
                    help=f"{what}" + ("; auto: bf16 where the CPU declares bf16 arithmetic, else fp32" if auto else ""))


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
