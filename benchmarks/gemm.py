"""One many-token GEMM of corelm's kernels at SmolLM2-135M's shapes, each panel arithmetic alternating.

``torch.ops.corelm.qlinear_blocks`` / ``qlinear`` on random valid blocks of the formats a Q4_K_M and
a Q4_1 file hold (q/o 576x576 Q5_0, gate/up 1536x576 Q5_0, down 576x1536 Q4_K and Q6_K, the head
49152x576 Q8_0, corelm's int4 1536x576), ``T`` tokens, with ``CORELM_GEMM`` switched between
``fp32``, ``int16``, ``int8``, ``amx`` (where the CPU has it), ``bf16`` and ``aten`` round by round
(A B C A B C ...); median ms and GFLOP/s.

    python benchmarks/gemm.py --threads 1 2 --tokens 128 512
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

QK = 32
# (name, ggml type, bytes per block, values per block)
FORMATS = {"Q5_0": (6, 22, 32), "Q8_0": (8, 34, 32), "Q4_K": (12, 144, 256), "Q6_K": (14, 210, 256)}
SHAPES = [("q/o", "Q5_0", 576, 576), ("gate/up", "Q5_0", 1536, 576), ("down", "Q4_K", 576, 1536),
          ("down", "Q6_K", 576, 1536), ("head", "Q8_0", 49152, 576), ("gate/up", "int4", 1536, 576)]


def blocks(kind: str, n: int, k: int) -> torch.Tensor:
    """(n, row bytes) random bytes with small fp16 scales where each format keeps them."""
    _, nbytes, per = FORMATS[kind]
    g = np.random.default_rng(0)
    b = g.integers(0, 256, size=(n, k // per, nbytes), dtype=np.uint8)
    half = g.uniform(1e-4, 5e-4, size=(n, k // per, 1)).astype(np.float16).view(np.uint8)
    if kind == "Q6_K":
        b[..., 208:210] = half
    else:
        b[..., 0:2] = half
        if kind == "Q4_K":
            b[..., 2:4] = half
    return torch.from_numpy(b.reshape(n, -1))


def operator(kind: str, n: int, k: int):
    from corelm import kernels
    from corelm.quant import layers

    if kind == "int4":
        q, scale, zero = layers.quantize_int4_groupwise(torch.randn(n, k), QK)
        packed, s = kernels.pack_blocks(q), torch.stack([scale, zero], -1).contiguous()
        return lambda x: torch.ops.corelm.qlinear(x, packed, s)
    b, t = blocks(kind, n, k), FORMATS[kind][0]
    return lambda x: torch.ops.corelm.qlinear_blocks(x, b, t)


def main() -> None:
    from corelm import kernels

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--modes", nargs="+", default=None, help="default: every arithmetic this build has")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if not kernels.load():
        raise SystemExit(f"corelm's kernels are not available: {kernels.load_error()}")
    level = torch.ops.corelm.isa()
    modes = args.modes or {"avx512bf16": ["fp32", "int16", "int8", "bf16", "aten"],
                           "avx512vnni": ["fp32", "int16", "int8", "aten"]}.get(level, ["fp32", "aten"])
    os.environ.pop("CORELM_GEMM", None)
    if args.modes is None and torch.ops.corelm.gemm() == "amx":  # the tiles passed kernels.amx_verdict
        modes.insert(modes.index("int8"), "amx")
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"
    print(f"kernels {level}, default GEMM {torch.ops.corelm.gemm()}; load average {load}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n{threads} threads: median ms (GFLOP/s) of {args.rounds} alternating rounds")
        print("| matrix | N x K | T | " + " | ".join(modes) + " |\n|---|---|---|" + "---|" * len(modes))
        for name, kind, n, k in SHAPES:
            op = operator(kind, n, k)
            for t in args.tokens:
                x = torch.randn(t, k)
                reps = max(1, int(2e9 / (2 * t * n * k)))  # ~2 GFLOP a measurement
                times: dict[str, list[float]] = {m: [] for m in modes}
                for m in modes:  # warm-up
                    os.environ["CORELM_GEMM"] = m
                    op(x)
                for _ in range(args.rounds):
                    for m in modes:
                        os.environ["CORELM_GEMM"] = m
                        t0 = time.perf_counter()
                        for _ in range(reps):
                            op(x)
                        times[m].append((time.perf_counter() - t0) / reps)
                cells = []
                for m in modes:
                    med = statistics.median(times[m])
                    cells.append(f"{med * 1e3:.2f} ({2 * t * n * k / med / 1e9:.0f})")
                print(f"| {name} {kind} | {n} x {k} | {t} | " + " | ".join(cells) + " |", flush=True)
        os.environ.pop("CORELM_GEMM", None)


if __name__ == "__main__":
    sys.exit(main())
