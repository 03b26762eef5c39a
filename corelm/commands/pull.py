"""``corelm pull``: download a model from the Hugging Face Hub into the standard HF cache.

Examples::

    corelm pull Qwen/Qwen2.5-0.5B-Instruct
    corelm pull Qwen/Qwen2.5-0.5B-Instruct-GGUF:qwen2.5-0.5b-instruct-q4_k_m.gguf
    corelm pull HuggingFaceTB/SmolLM2-135M-Instruct@main

Every command's ``--model`` takes the same spelling and downloads what is missing by itself;
``pull`` is the explicit step (before going offline, or to update a cached revision to the Hub's
current commit), with a progress bar.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corelm.commands.args import Options, as_options, option, options_from, parser_from
from corelm.errors import CorelmError


@dataclass
class PullOptions(Options):
    """What ``corelm pull`` downloads."""

    repo: str = option(help="org/name, org/name@revision (branch, tag or commit), or org/name[@revision]:file.gguf",
                       positional=True, metavar="REPO")
    progress: bool = option(True, "progress bars")

    def check(self) -> None:
        from corelm.io import hub

        if hub.parse_spec(self.repo) is None:
            raise CorelmError(f"{self.repo!r} is not a Hugging Face repo id: give org/name[@revision][:file.gguf]")


def build_parser() -> argparse.ArgumentParser:
    return parser_from(
        PullOptions, prog="corelm pull",
        description="Download a model from the Hugging Face Hub into the HF cache (HF_HOME, shared with "
                    "transformers): only the files corelm reads (config.json, safetensors, tokenizer and "
                    "generation files), or one GGUF file with every part of its split. Prints where the files "
                    "are and their size. The token is huggingface_hub's (HF_TOKEN or `hf auth login`); with "
                    "HF_HUB_OFFLINE=1 it only checks the cache.")


def human_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def pull(options: PullOptions | str, *args: Any, **kwargs: Any) -> Path:
    """Download ``options.repo`` into the HF cache (offline, find it there); returns the snapshot directory, or
    the GGUF file (the first part of a split one). ``pull("org/name")`` is ``pull(PullOptions("org/name"))``."""
    from corelm.io import hub

    options = as_options(PullOptions, options, args, kwargs)
    if options.progress:
        return hub.download(hub.parse_spec(options.repo))
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        return hub.download(hub.parse_spec(options.repo))
    finally:
        if not was_disabled:  # a library call leaves huggingface_hub's global setting as it found it
            enable_progress_bars()


def main(argv: list[str]) -> int:
    from corelm.io import hub

    options = options_from(PullOptions, build_parser().parse_args(argv))
    path = pull(options)
    files = hub.files_of(path)
    size = sum(f.stat().st_size for f in files)  # snapshot entries are links into blobs/: stat follows them
    print(path)
    print(f"{len(files)} file(s), {human_bytes(size)}: corelm generate --model {hub.parse_spec(options.repo)} \"...\"")
    return 0
