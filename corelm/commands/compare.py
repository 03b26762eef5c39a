"""``corelm compare``: size on disk, memory, held-out perplexity and decode speed of model variants.

Each variant (an embedded name, a checkpoint directory -- float, pruned, distilled or
``corelm quantize`` output -- or a .gguf) is loaded in turn and measured the same way: weights
held in memory, bytes read per decoded token, perplexity over the first ``--tokens`` tokens of
``--data`` (sliding window), and greedy decode tokens/s on the fast path (after the first token;
quantized llama models on corelm's C++ kernels), all with the same thread count. Timings on a
shared machine are noisy: compare variants within one table, not across runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from corelm.commands.args import Options, option, options_from, parser_from, set_threads, threads_option
from corelm.data.text import read_text
from corelm.errors import CorelmError


@dataclass
class CompareOptions(Options):
    """The variants ``corelm compare`` measures, and how."""

    variants: list[str] = field(metadata={"help": "models to compare: embedded names, directories or .gguf files",
                                          "positional": True})
    data: str = option(help="held-out text file for perplexity")
    tokens: int = option(2048, "tokens of --data scored for perplexity")
    window: int = option(512, "perplexity window (stride = window / 2)")
    decode_tokens: int = option(64, "greedy tokens timed per variant (0: skip)")
    threads: int | None = threads_option()
    json: bool = option(False, "print one JSON object per variant instead of a table")


def build_parser() -> argparse.ArgumentParser:
    return parser_from(CompareOptions, prog="corelm compare", description=__doc__.splitlines()[0].strip("`"))


def _disk_bytes(source: str) -> int:
    from corelm.loading import locate
    from corelm.presets import PRESETS

    if source in PRESETS:  # random weights: nothing on disk
        return 0
    path = locate(source)  # embedded name, path, or a Hugging Face repo id in the cache
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin",
                                                                                              ".gguf"))
    return path.stat().st_size


def load_variant(source: str):
    from corelm.quant.io import is_quantized_dir, load_quantized_dir

    if is_quantized_dir(source):
        from corelm.api import load_tokenizer

        config, model = load_quantized_dir(source)
        return config, model, load_tokenizer(source)
    import corelm

    llm = corelm.load(source, dtype="fp32")
    return llm.config, llm.model, llm.tokenizer


def measure(source: str, text: str, args: CompareOptions) -> dict:
    from corelm.compress.prune import sparsity_of
    from corelm.eval.perplexity import perplexity
    from corelm.quant.transform import quantized_bytes

    t0 = time.perf_counter()
    config, model, tokenizer = load_variant(source)
    load_s = time.perf_counter() - t0
    if config.is_encoder:
        raise CorelmError(f"{source} is an encoder; compare measures decoders")
    ids = tokenizer.encode(text)[: args.tokens]
    if len(ids) < 16:
        raise CorelmError(f"{args.data} has too little text ({len(ids)} tokens)")
    with torch.inference_mode():
        ppl = perplexity(model, ids, window=min(args.window, config.max_seq_len))
    linears = [m.weight for m in model.modules() if type(m) is torch.nn.Linear]
    row = {"variant": source, "disk_MB": _disk_bytes(source) / 1e6, "memory_MB": quantized_bytes(model) / 1e6,
           "perplexity": ppl["perplexity"], "tokens": ppl["tokens"], "load_s": load_s,
           "sparsity": sum(sparsity_of(w) * w.numel() for w in linears) / max(1, sum(w.numel() for w in linears)),
           "quantization": getattr(model, "corelm_quantization", {}).get("method", "")}
    if args.decode_tokens and not config.is_encoder:
        row.update(_decode_speed(model, ids[:32], args.decode_tokens))
    return row


def _decode_speed(model: torch.nn.Module, prompt: list[int], n_tokens: int) -> dict:
    """Greedy decode speed on the path ``corelm generate`` takes (the model's step), prefill excluded."""
    from corelm.generate.engine import SamplingParams, stream
    from corelm.generate.step import weight_bytes

    params = SamplingParams(max_new_tokens=n_tokens, ignore_eos=True)
    list(stream(model, prompt, SamplingParams(max_new_tokens=4, ignore_eos=True)))  # warm-up
    n, start = 0, None
    for _ in stream(model, prompt, params):
        n += 1
        if start is None:  # decode speed: from the first token on (the prompt's prefill excluded)
            start = time.perf_counter()
    rate = (n - 1) / (time.perf_counter() - start) if n > 1 else float("nan")
    read = weight_bytes(model)
    return {"tok_s": rate, "read_MB": read / 1e6, "GB_s": read * rate / 1e9}


def compare(options: CompareOptions, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """One row of figures per variant (disk and memory MB, perplexity, sparsity, quantization, decode tok/s and
    GB/s); ``on_row`` sees each row as soon as it is measured."""
    set_threads(options.threads)
    data = Path(options.data)
    if not data.is_file():
        raise CorelmError(f"--data file not found: {data}")
    text = read_text(data)
    rows = []
    for i, source in enumerate(options.variants, 1):
        print(f"[{i}/{len(options.variants)}] measuring {source} ...", file=sys.stderr, flush=True)
        rows.append(measure(source, text, options))
        if on_row is not None:
            on_row(rows[-1])
    return rows


def main(argv: list[str]) -> int:
    args = options_from(CompareOptions, build_parser().parse_args(argv))
    data = Path(args.data)
    rows = compare(args, on_row=(lambda row: print(json.dumps(row), flush=True)) if args.json else None)
    if args.json:
        return 0
    from corelm.generate.step import cpu_capability

    print(f"{rows[0]['tokens']} held-out tokens of {data.name}; decode {args.decode_tokens} greedy tokens, "
          f"{torch.get_num_threads()} threads, CPU capability {cpu_capability()}")
    name_w = max(len(r["variant"]) for r in rows)
    print(f"{'variant':<{name_w}}  {'quant':>5} {'sparsity':>8} {'disk MB':>8} {'RAM MB':>7} {'perplexity':>10} "
          f"{'tok/s':>6} {'GB/s':>5}")
    for r in rows:
        print(f"{r['variant']:<{name_w}}  {r['quantization'] or '-':>5} {r['sparsity']:>8.1%} {r['disk_MB']:>8.0f} "
              f"{r['memory_MB']:>7.0f} {r['perplexity']:>10.3f} {r.get('tok_s', float('nan')):>6.1f} "
              f"{r.get('GB_s', float('nan')):>5.2f}")
    return 0
