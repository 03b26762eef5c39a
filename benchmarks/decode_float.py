"""Float decode: corelm's C++ step against the model's PyTorch forward, as ``corelm generate`` runs them.

The embedded SmolLM2-135M-Instruct loaded with ``--dtype fp32`` and ``--dtype bf16``; each variant (dtype x
path x threads) is one ``corelm generate`` process (N new tokens, EOS ignored), the variants alternating
round by round, the stats line's decode tok/s collected; the median, the range and the weight bandwidth
(weight bytes read per step x tok/s, :func:`corelm.generate.step.weight_bytes`) are printed. The C++ step
is the default path of a float model; ``CORELM_STEP=pytorch`` keeps the PyTorch forward (ATen's OpenMP
kernels). ``--neighbour`` runs one busy Python process beside the whole measurement (another job holding a
core of a small machine): an OpenMP region ends in a barrier that a descheduled thread holds up, corelm's
pool does not wait for a worker that is not running.

    python benchmarks/decode_float.py                       # 3 rounds, 128 tokens, 2 and 1 threads
    python benchmarks/decode_float.py --neighbour --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import statistics
import subprocess
import sys

PROMPT = "The capital of France is"
STATS = re.compile(r"decode ([0-9.]+) tok/s")
LOADED = re.compile(r"\[loaded .* \((.*)\) in")


def run(dtype: str, path: str, threads: int, tokens: int) -> tuple[float, str]:
    env = dict(os.environ)
    env.pop("CORELM_STEP", None)
    if path == "pytorch":
        env["CORELM_STEP"] = "pytorch"
    cmd = [sys.executable, "-m", "corelm", "generate", PROMPT, "--dtype", dtype, "--threads", str(threads),
           "--max-new-tokens", str(tokens), "--ignore-eos"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return float(STATS.search(out.stderr).group(1)), LOADED.search(out.stderr).group(1)


def weight_gb(dtype: str) -> float:
    import corelm
    from corelm.generate.step import weight_bytes

    return weight_bytes(corelm.load("smollm2-135m-instruct", dtype=dtype).model) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--neighbour", action="store_true", help="one busy process beside the runs")
    args = parser.parse_args()
    variants = list(itertools.product(args.dtypes, ["kernels", "pytorch"], args.threads))
    rates: dict[tuple, list[float]] = {v: [] for v in variants}
    paths: dict[tuple, str] = {}
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.neighbour else None
    try:
        for r in range(args.rounds):
            for v in variants if r % 2 == 0 else variants[::-1]:
                rate, paths[v] = run(*v, args.tokens)
                rates[v].append(rate)
                print(f"round {r + 1} {v}: {rate:.3g} tok/s", file=sys.stderr, flush=True)
    finally:
        if busy is not None:
            busy.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                busy.wait(5)
    gb = {d: weight_gb(d) for d in args.dtypes}
    print(f"load line | threads | decode tok/s median (range) | weights GB/s | C++ step / PyTorch "
          f"({args.rounds} rounds, {args.tokens} tokens{', one busy neighbour process' if args.neighbour else ''})")
    for dtype, threads in itertools.product(args.dtypes, args.threads):
        mine, theirs = (statistics.median(rates[dtype, p, threads]) for p in ("kernels", "pytorch"))
        for p in ("kernels", "pytorch"):
            v, med = (dtype, p, threads), statistics.median(rates[dtype, p, threads])
            ratio = f"{mine / theirs:.2f}x" if p == "kernels" else ""
            print(f"{paths[v]} | {threads} | {med:.3g} ({min(rates[v]):.3g}-{max(rates[v]):.3g}) | "
                  f"{med * gb[dtype]:.1f} | {ratio}")


if __name__ == "__main__":
    main()
