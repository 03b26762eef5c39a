"""Decode speed of a llama.cpp K-quant file (Q4_K_M) on corelm's native block kernels, against the
same file dequantized to floats and against llama.cpp, side by side in one run.

The file is made by llama.cpp's own quantizer (``llama-quantize``, built from the llama.cpp vendored in
the llama-cpp-python 0.3.36 sdist), by default from the embedded SmolLM2-135M-Instruct Q4_1 GGUF with
``--allow-requantize`` (its values are the Q4_1 file's, requantized; SmolLM2's 576-wide matrices are not
whole 256-value super-blocks, so the quantizer writes Q5_0/Q8_0 for those and Q4_K/Q6_K for the
1536-wide ``ffn_down``). Variants, alternating round by round, median of the rounds:

- ``corelm native``: each matrix on its own blocks (:mod:`corelm.quant.kquant`), corelm's C++ step;
- ``corelm dequant``: the file dequantized to ``--dtype`` (bf16: what such files loaded as before);
- ``llama.cpp``: ``llama-bench -n N -p 0 -r 1`` on the same file (its tg figure), when ``--llama-bench``
  names the binary.

    python benchmarks/decode_kquant.py --quantize /path/llama-quantize --llama-bench /path/llama-bench
    python benchmarks/decode_kquant.py --gguf model-Q4_K_M.gguf      # an existing file
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

PROMPT = "Explain how a CPU cache works."


def make_q4_k_m(quantize: str, out: Path, threads: int) -> Path:
    from corelm.presets import embedded_path

    if not out.exists():
        subprocess.run([quantize, "--allow-requantize", str(embedded_path("smollm2-135m-instruct")), str(out),
                        "Q4_K_M", str(threads)], check=True, capture_output=True)
    return out


class Corelm:
    def __init__(self, path: Path, native: bool, dtype: str, label: str | None = None) -> None:
        from corelm.generate.step import KernelStep, step_for, weight_bytes
        from corelm.loading import load_parts
        from corelm.quant import kquant

        t0 = time.perf_counter()
        loaded = load_parts(path) if native else load_parts(path, dtype=dtype)  # native: the default load
        self.model = loaded.model
        if native and label is None:
            assert any(isinstance(m, kquant.GGUFBlockLinear) for m in self.model.modules()), "not on its blocks"
        self.ids = loaded.tokenizer.encode(PROMPT) if loaded.tokenizer is not None else list(range(1, 9))
        step = step_for(self.model)
        kind = label or ("native" if native else f"{dtype} dequant")
        self.name = f"corelm {kind} ({'C++ step' if isinstance(step, KernelStep) else 'model step'})"
        self.bytes = weight_bytes(self.model)
        self.load_s = time.perf_counter() - t0
        self.run(4)  # warm-up

    def run(self, n: int) -> float:
        from corelm.generate.engine import SamplingParams, stream

        t_first = None
        count = 0
        for _ in stream(self.model, self.ids, SamplingParams(max_new_tokens=n, ignore_eos=True)):
            if t_first is None:
                t_first = time.perf_counter()
            count += 1
        return (count - 1) / (time.perf_counter() - t_first)  # decode tokens after the first


class LlamaBench:
    def __init__(self, binary: str, path: Path, threads: int) -> None:
        self.cmd = [binary, "-m", str(path), "-p", "0", "-t", str(threads), "-r", "1", "-o", "json"]
        self.name, self.bytes, self.load_s = "llama.cpp (llama-bench tg)", path.stat().st_size, 0.0

    def run(self, n: int) -> float:
        out = subprocess.run([*self.cmd, "-n", str(n)], check=True, capture_output=True, text=True).stdout
        return float(json.loads(out)[0]["avg_ts"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, help="a K-quant GGUF (default: make SmolLM2 Q4_K_M with --quantize)")
    ap.add_argument("--quantize", help="llama.cpp's llama-quantize binary")
    ap.add_argument("--llama-bench", help="llama.cpp's llama-bench binary (adds llama.cpp to the table)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/smollm2-135m-instruct-Q4_K_M.gguf"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default="bf16", help="dtype of the dequantized variant")
    ap.add_argument("--with-q4-1", action="store_true",
                    help="add corelm's int4 path on the embedded Q4_1 file the Q4_K_M file was made from")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = args.gguf or make_q4_k_m(args.quantize, args.out, args.threads)

    from corelm.io.gguf import read_gguf

    f = read_gguf(path)
    types = Counter(t.qtype.name for t in f.tensors.values() if len(t.shape) == 2)
    f.close()
    variants = [Corelm(path, True, args.dtype), Corelm(path, False, args.dtype)]
    if args.with_q4_1:
        from corelm.presets import embedded_path

        variants.append(Corelm(embedded_path("smollm2-135m-instruct"), True, args.dtype, label="int4, Q4_1 file"))
    if args.llama_bench:
        variants.append(LlamaBench(args.llama_bench, path, args.threads))
    speeds: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(args.rounds):  # A B C A B C ...: the machine's noise lands on every variant alike
        for v in variants:
            speeds[v.name].append(v.run(args.tokens))
        print(f"round {r + 1}: " + ", ".join(f"{k} {s[-1]:.1f}" for k, s in speeds.items()), file=sys.stderr,
              flush=True)
    cpu = torch.backends.cpu.get_cpu_capability()
    print(f"{path.name}: matrices {dict(types)}; {args.threads} threads, {args.tokens} tokens, median of "
          f"{args.rounds} alternating rounds; ATen capability {cpu}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    base = statistics.median(speeds[variants[0].name])
    print("| variant | tok/s (median) | min-max | weights MB | GB/s | vs native |\n|---|---|---|---|---|---|")
    for v in variants:
        s = speeds[v.name]
        med = statistics.median(s)
        print(f"| {v.name} | {med:.1f} | {min(s):.1f}-{max(s):.1f} | {v.bytes / 1e6:.0f} | "
              f"{v.bytes * med / 1e9:.1f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
