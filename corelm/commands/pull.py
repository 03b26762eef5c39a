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

from corelm.commands.args import HelpFormatter, Parser
from corelm.errors import CorelmError


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(
        prog="corelm pull",
        description="Download a model from the Hugging Face Hub into the HF cache (HF_HOME, shared with "
                    "transformers): only the files corelm reads (config.json, safetensors, tokenizer and "
                    "generation files), or one GGUF file with every part of its split. Prints where the files "
                    "are and their size. The token is huggingface_hub's (HF_TOKEN or `hf auth login`); with "
                    "HF_HUB_OFFLINE=1 it only checks the cache.",
        formatter_class=HelpFormatter)
    ap.add_argument("repo", metavar="REPO",
                    help="org/name, org/name@revision (branch, tag or commit), or org/name[@revision]:file.gguf")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def human_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def main(argv: list[str]) -> int:
    from corelm.io import hub

    args = build_parser().parse_args(argv)
    spec = hub.parse_spec(args.repo)
    if spec is None:
        raise CorelmError(f"{args.repo!r} is not a Hugging Face repo id: give org/name[@revision][:file.gguf]")
    if args.no_progress:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    path = hub.download(spec)
    files = hub.files_of(path)
    size = sum(f.stat().st_size for f in files)  # snapshot entries are links into blobs/: stat follows them
    print(path)
    print(f"{len(files)} file(s), {human_bytes(size)}: corelm generate --model {spec} \"...\"")
    return 0
