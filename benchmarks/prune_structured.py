"""Structured pruning: held-out perplexity and decode speed of pruned models against their parent, one run.

The first model is the reference (unpruned); every other one is a directory written by
``corelm prune --structure ...``. For each: the shape it has, its parameters, the sliding-window
perplexity of ``--data`` (the same function as ``corelm evaluate --task perplexity``, window 1024,
stride 512) and greedy decode tokens/s, timed alternately over ``--rounds`` rounds (median), so all
models see the same machine load. With ``--quantize int8`` (or int4) each model is also timed after
``corelm.load(..., quantize=...)``, on the engine's decode step (``corelm.generate.step``).

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/prune_structured.py smollm2-135m-instruct \\
        out/c25 out/g33 out/l4 --data heldout.txt --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

PROMPT = "<|im_start|>user\nExplain how a CPU cache works.<|im_end|>\n<|im_start|>assistant\n"


def decode_rate(model: torch.nn.Module, ids: list[int], n: int) -> float:
    """Greedy decode tokens/s after the first token (prefill excluded), on the step the engine picks
    (corelm's C++ step for quantized models, as ``corelm.load(..., quantize=...)`` + ``.generate``)."""
    from corelm.generate.engine import SamplingParams, stream

    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    t_first = None
    count = 0
    for _ in stream(model, ids, params):
        count += 1
        if t_first is None:
            t_first = time.perf_counter()
    return (count - 1) / (time.perf_counter() - t_first)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="reference model first, then pruned checkpoint directories")
    ap.add_argument("--data", required=True, help="held-out text file (not the calibration text)")
    ap.add_argument("--decode-tokens", type=int, default=64, help="greedy tokens per timed run")
    ap.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--quantize", default=None, choices=["int8", "int4"], help="also time each model quantized")
    ap.add_argument("--no-ppl", action="store_true", help="skip perplexity (timing only)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import corelm
    from corelm.compress.prune import llama_param_count
    from corelm.eval.perplexity import perplexity

    llms = {m: corelm.load(m, dtype="fp32") for m in args.models}
    ids = llms[args.models[0]].tokenizer.encode(PROMPT)
    rows = {}
    for name, llm in llms.items():
        c = llm.config
        row = {"shape": f"{c.n_layer}L {c.n_head}/{c.n_kv_head}h {c.d_ff}ff", "params": llama_param_count(c)}
        if not args.no_ppl:
            text = llm.tokenizer.encode(Path(args.data).read_text())
            row.update(perplexity(llm.model, text, window=1024, stride=512))
            print(f"{name}: ppl {row['perplexity']:.2f} on {row['tokens']} tokens", file=sys.stderr, flush=True)
        rows[name] = row
    variants = {(m, None): llms[m].model for m in args.models}
    if args.quantize:
        for m in args.models:
            variants[(m, args.quantize)] = corelm.load(m, dtype="fp32", quantize=args.quantize).model
    rates: dict[tuple, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for model in variants.values():  # warm-up: first-call allocations, lazy init
            decode_rate(model, ids, 4)
        for r in range(args.rounds):
            for key, model in variants.items():
                rates[key].append(decode_rate(model, ids, args.decode_tokens))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    ref = args.models[0]
    base_params = rows[ref]["params"]
    print(f"held-out {args.data}: {rows[ref].get('tokens', '-')} tokens (window 1024, stride 512); decode "
          f"{args.decode_tokens} greedy tokens, {args.threads} thread(s), median of {args.rounds} alternating rounds, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    head = f"{'model':<22}{'shape':<22}{'params':>8}{'removed':>9}{'ppl':>8}{'tok/s':>8}{'speedup':>9}"
    if args.quantize:
        head += f"{args.quantize + ' tok/s':>12}{'speedup':>9}"
    print(head)
    for m in args.models:
        row = rows[m]
        fp = statistics.median(rates[(m, None)])
        line = (f"{m:<22}{row['shape']:<22}{row['params'] / 1e6:>7.1f}M{1 - row['params'] / base_params:>9.1%}"
                f"{row.get('perplexity', float('nan')):>8.2f}{fp:>8.1f}"
                f"{fp / statistics.median(rates[(ref, None)]):>8.2f}x")
        if args.quantize:
            q = statistics.median(rates[(m, args.quantize)])
            line += f"{q:>12.1f}{q / statistics.median(rates[(ref, args.quantize)]):>8.2f}x"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
