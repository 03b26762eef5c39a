"""Prefill and batched-decode speed of corelm's C++ step against llama.cpp, side by side in one run.

Same GGUF files (the embedded SmolLM2-135M-Instruct Q4_1, and ``--gguf`` more, e.g. a Q4_K_M made by
``llama-quantize``), 1 and 2 threads, variants alternating round by round (A B C A B C ...), median
of the rounds:

- prefill of a T-token prompt (``--prompt 128 512``) on :class:`~corelm.generate.step.KernelStep`:
  ``default`` (what ``corelm generate`` does), ``int`` (every token on the integer kernels),
  ``panels`` (every matmul on dequantized panels and the panel GEMM, see ``corelm/kernels/gemm.h``),
  and on request ``fp32``, ``int16``, ``bf16``, ``aten`` (the panel GEMM's arithmetic, ``CORELM_GEMM``), against
  ``llama-bench -p T``;
- decode of ``--rows`` rows at once (the server's batched step): tokens/s of all rows together, and
  the cost of a step relative to one row's, against ``llama-bench -n N`` (one row).

    python benchmarks/prefill.py --llama-bench /path/llama-bench --gguf /tmp/smollm2-Q4_K_M.gguf

``--prefetch default 0`` times the decode with the kernels' prefetch as the CPU has it and turned off,
alternating (``CORELM_PREFETCH``, see :func:`corelm.kernels.prefetch`).

``--llama-bench-decode`` adds a second llama.cpp build for decode only: on an AMX Xeon, llama.cpp's native
build (AMX on) crashed on multi-token batches, so its prompts cannot be timed, while its one-token decode
can; the decode ratio is then taken against the faster of the two builds. ``scripts/build_llamacpp.sh``
builds both from the llama.cpp sources vendored in llama-cpp-python.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

VARIANTS = {"default": {}, "int": {"CORELM_GEMM_ROWS": "1000000"}, "panels": {"CORELM_GEMM_ROWS": "1"},
            "fp32": {"CORELM_GEMM": "fp32"}, "int16": {"CORELM_GEMM": "int16"},
            "int8": {"CORELM_GEMM": "int8"}, "amx": {"CORELM_GEMM": "amx"}, "bf16": {"CORELM_GEMM": "bf16"},
            "aten": {"CORELM_GEMM": "aten"}}
DEFAULT_VARIANTS = ["default", "int", "panels"]


def _env(settings: dict[str, str]) -> None:
    """The C++ step reads these at every matmul: a variant switches without reloading the model."""
    os.environ.pop("CORELM_GEMM_ROWS", None)
    os.environ.pop("CORELM_GEMM", None)
    os.environ.update(settings)


class Corelm:
    def __init__(self, path: Path) -> None:
        from corelm.generate.step import KernelStep, step_for
        from corelm.loading import load_parts

        self.model = load_parts(path).model
        self.step = step_for(self.model)
        if not isinstance(self.step, KernelStep):
            raise SystemExit(f"{path.name} does not run on the C++ step here")
        self.kind = getattr(self.model, "corelm_quantization", "?")

    def prefill(self, n: int) -> float:
        ids = [(i * 7919) % 40000 + 10 for i in range(n)]  # any tokens: the cost does not depend on them
        cache = self.step.new_cache(1, n + 8)
        t0 = time.perf_counter()
        self.step.prefill(cache, [ids])
        return n / (time.perf_counter() - t0)

    def decode(self, rows: int, n: int, depth: int = 4) -> float:
        """n decode steps of ``rows`` rows, each after ``depth`` prompt tokens (attention reads them all)."""
        cache = self.step.new_cache(rows, depth + n + 16)
        self.step.prefill(cache, [[(i * 7919) % 40000 + 10 for i in range(depth)]] * rows)
        tokens = torch.ones(rows, dtype=torch.long)
        t0 = time.perf_counter()
        for i in range(n):
            self.step.decode(cache, tokens, torch.full((rows,), depth + i))
        return rows * n / (time.perf_counter() - t0)


def llama_bench(binary: str, path: Path, threads: int, prompt: int = 0, gen: int = 0, depth: int = 0) -> float:
    cmd = [binary, "-m", str(path), "-p", str(prompt), "-n", str(gen), "-t", str(threads), "-r", "1", "-o", "json"]
    if depth:
        cmd += ["-d", str(depth)]  # decode after a context of that many tokens
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"


def require_kernels(kernels) -> None:
    """Build corelm's kernels when this source has none (~40 s), or stop with one line saying why not."""
    if not kernels.load():
        sys.exit(f"corelm's C++ kernels are not available: {kernels.load_error()}")


def main() -> None:
    from corelm.presets import embedded_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, nargs="*", default=[], help="more GGUF files (the embedded Q4_1 is first)")
    ap.add_argument("--llama-bench", help="llama.cpp's llama-bench binary (adds llama.cpp to the tables)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prompt", type=int, nargs="+", default=[128, 512], help="prompt lengths to prefill")
    ap.add_argument("--llama-bench-decode",
                    help="a second llama-bench timed on decode only (e.g. a native AMX build that crashes on prompts)")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8], help="batched decode rows")
    ap.add_argument("--tokens", type=int, default=64, help="decode steps per measurement")
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS),
                    help="fp32 / int16 / int8 / amx / bf16 / aten: the panel GEMM's arithmetic (CORELM_GEMM, gemm.h); "
                         "int16 and int8 need an AVX-512 VNNI build, amx also a CPU that declares AMX-INT8, bf16 "
                         "the avx512bf16 build")
    ap.add_argument("--prefetch", nargs="+", default=["default"],
                    help="decode with each of these CORELM_PREFETCH byte counts, alternating ('default': "
                         "the CPU's own, kernels.prefetch()), e.g. --prefetch default 0")
    ap.add_argument("--depth", type=int, nargs="*", default=[],
                    help="also decode one row after this many context tokens (llama-bench -d), e.g. --depth 2000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-decode", action="store_true", help="skip the decode tables (--depth still runs)")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # each table as soon as it is measured
    cpu = torch.backends.cpu.get_cpu_capability()
    from corelm import kernels

    os.environ.pop("CORELM_PREFETCH", None)
    os.environ.pop("CORELM_GEMM", None)
    require_kernels(kernels)
    print(f"ATen capability {cpu}; kernels {kernels.isa()} (prefetch {kernels.prefetch()} bytes ahead, panel GEMM "
          f"{torch.ops.corelm.gemm()}); "
          f"load average before {load_average()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for path in [embedded_path("smollm2-135m-instruct"), *args.gguf]:
        model = Corelm(path)
        model.prefill(16), model.decode(2, 4)  # warm-up
        for threads in args.threads:
            torch.set_num_threads(threads)
            pre: dict[tuple[str, int], list[float]] = {}
            dec: dict[tuple[str, int], list[float]] = {}
            deep: dict[tuple[str, int], list[float]] = {}  # decode after a context: (who, depth)
            for r in range(args.rounds):  # alternating: the machine's noise lands on every variant alike
                for n in args.prompt:
                    for v in args.variants:
                        _env(VARIANTS[v])
                        pre.setdefault((f"corelm {v}", n), []).append(model.prefill(n))
                        _progress(f"corelm {v}", n, pre)
                    _env({})
                    if args.llama_bench:
                        pre.setdefault(("llama.cpp", n), []).append(llama_bench(args.llama_bench, path, threads, n))
                        _progress("llama.cpp", n, pre)
                if not args.no_decode:
                    for pf in args.prefetch:
                        who = "corelm" if pf == "default" else f"corelm prefetch {pf}"
                        if pf != "default":
                            os.environ["CORELM_PREFETCH"] = pf
                        for rows in args.rows:
                            dec.setdefault((who, rows), []).append(model.decode(rows, args.tokens))
                            _progress(f"{who} rows", rows, dec)
                        os.environ.pop("CORELM_PREFETCH", None)
                    if args.llama_bench:
                        dec.setdefault(("llama.cpp", 1), []).append(
                            llama_bench(args.llama_bench, path, threads, gen=args.tokens))
                    if args.llama_bench_decode:
                        dec.setdefault(("llama.cpp decode-only build", 1), []).append(
                            llama_bench(args.llama_bench_decode, path, threads, gen=args.tokens))
                for d in args.depth:
                    deep.setdefault(("corelm", d), []).append(model.decode(1, args.tokens, depth=d))
                    _progress("corelm", d, deep)
                    if args.llama_bench:
                        deep.setdefault(("llama.cpp", d), []).append(
                            llama_bench(args.llama_bench, path, threads, gen=args.tokens, depth=d))
                        _progress("llama.cpp", d, deep)
                print(f"{path.name} t={threads} round {r + 1} (load {load_average()})", file=sys.stderr, flush=True)
            _report(path.name, model.kind, threads, pre, dec, args.rounds)
            _report_depth(deep)


def _report_depth(deep: dict) -> None:
    if not deep:
        return
    print("| decode after | corelm tok/s (median) | min-max | llama.cpp | vs llama.cpp |\n|---|---|---|---|---|")
    for (who, d), s in deep.items():
        if who != "corelm":
            continue
        ref = statistics.median(deep[("llama.cpp", d)]) if ("llama.cpp", d) in deep else None
        ours = statistics.median(s)
        ratio = f"{ours / ref:.2f}x" if ref else "-"
        print(f"| {d} tokens | {ours:.0f} | {min(s):.0f}-{max(s):.0f} | {f'{ref:.0f}' if ref else '-'} | {ratio} |")


def _progress(who: str, n: int, table: dict) -> None:
    print(f"  {who} {n}: {table[(who.removesuffix(' rows'), n)][-1]:.1f} tok/s", file=sys.stderr, flush=True)


def _report(name: str, kind: str, threads: int, pre: dict, dec: dict, rounds: int) -> None:
    med = {k: statistics.median(v) for k, v in {**pre, **dec}.items()}
    print(f"\n{name} ({kind}), {threads} threads, median of {rounds} alternating rounds, load {load_average()}")
    print("| prefill | tokens | tok/s (median) | min-max | vs llama.cpp |\n|---|---|---|---|---|")
    for (who, n), s in pre.items():
        ref = med.get(("llama.cpp", n))
        ratio = f"{med[(who, n)] / ref:.2f}x" if ref else "-"
        print(f"| {who} | {n} | {med[(who, n)]:.0f} | {min(s):.0f}-{max(s):.0f} | {ratio} |")
    if not dec:
        return
    peers = [med[k] for k in (("llama.cpp", 1), ("llama.cpp decode-only build", 1)) if k in med]
    ref = max(peers) if peers else None  # the faster llama.cpp build
    print("| decode | rows | tok/s, all rows (median) | min-max | step cost vs 1 row "
          "| vs llama.cpp 1 row (faster build) |")
    print("|---|---|---|---|---|---|")
    for (who, rows), s in dec.items():
        one = med.get((who, 1)) if who.startswith("corelm") else None
        cost = f"{rows * one / med[(who, rows)]:.2f}x" if one else "-"
        ratio = f"{med[(who, rows)] / ref:.2f}x" if ref else "-"
        print(f"| {who} | {rows} | {med[(who, rows)]:.0f} | {min(s):.0f}-{max(s):.0f} | {cost} | {ratio} |")


if __name__ == "__main__":
    main()
