"""Memory, load time and decode speed of a MoE GGUF file loaded on its blocks against loaded as bf16.

``--layers`` layers of Qwen1.5-MoE-A2.7B's shapes (d_model 2048, 16 heads, 60 experts of width 1408,
top 4, a shared expert of width 5632, q/k/v biases; vocabulary 4096, random weights, routers of std 0.5)
are written as a ``Q4_K_M`` GGUF file by corelm's own export (once: ``--file`` is reused when it exists;
about 7 minutes a layer on a 2-core Zen 4). Each load runs in a fresh process, alternating: the default
load (the experts on the file's blocks, the C++ step) and ``dtype="bf16"`` (every tensor dequantized,
the PyTorch step: what the default load did before MoE files could run on their blocks). Per load: the
seconds, the bytes of the model's tensors, the resident memory after loading and after decoding 32
greedy tokens at 1 thread (the C++ step adds its interleaved copy of each quantized matrix), the peak,
and the decode tok/s.

    python benchmarks/moe_gguf_load.py --layers 1 --rounds 2
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

SHAPES = {"family": "moe", "vocab_size": 4096, "d_model": 2048, "n_head": 16, "n_kv_head": 16, "d_ff": 5632,
          "max_seq_len": 512, "n_experts": 60, "n_experts_per_tok": 4, "moe_d_ff": 1408, "shared_expert_d_ff": 5632,
          "norm_topk_prob": False, "qkv_bias": True, "tie_embeddings": False, "rope_theta": 1e6, "norm_eps": 1e-6}


def write(path: Path, layers: int) -> None:
    import torch

    from corelm.config import ModelConfig
    from corelm.io.gguf_export import export_gguf
    from corelm.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(**SHAPES, n_layer=layers)).eval()
    with torch.no_grad():  # routers off their init: distinct experts per token
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    export_gguf(model, path, "Q4_K_M")


def _rss() -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) / 1e6


def measure(path: str, dtype: str | None) -> dict:
    """One load and decode, in this process (run by main in a fresh one)."""
    import resource

    import torch

    import corelm
    from corelm.commands.decoding import describe_decoder
    from corelm.generate.step import step_for
    from corelm.quant.transform import quantized_bytes

    t0 = time.perf_counter()
    model = corelm.load(path, dtype=dtype).model
    out = {"load_s": time.perf_counter() - t0, "tensors_gb": quantized_bytes(model) / 1e9, "rss_load_gb": _rss()}
    step = step_for(model)
    out["path"] = describe_decoder(model)
    torch.set_num_threads(1)
    cache = step.new_cache(1, 64)
    with torch.inference_mode():
        tok = step.prefill(cache, [list(range(10, 26))]).argmax(-1)
        t0 = time.perf_counter()
        for i in range(32):
            tok = step.decode(cache, tok, torch.tensor([16 + i])).argmax(-1)
        out["tok_s"] = 32 / (time.perf_counter() - t0)
    out["rss_decode_gb"] = _rss()
    out["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--file", default=None, help="the GGUF file (written when missing)")
    parser.add_argument("--measure", nargs=2, metavar=("FILE", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], None if args.measure[1] == "default" else args.measure[1])))
        return
    path = Path(args.file or f"moe-{args.layers}l-Q4_K_M.gguf")
    if not path.exists():
        write(path, args.layers)
    runs: dict[str, list[dict]] = {"default": [], "bf16": []}
    for _ in range(args.rounds):
        for dtype, results in runs.items():
            done = subprocess.run([sys.executable, __file__, "--measure", str(path), dtype], check=True,
                                  capture_output=True, text=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{args.layers} layer(s) of Qwen1.5-MoE-A2.7B's shapes, {path.name} {path.stat().st_size / 1e9:.3f} GB, "
          f"{os.cpu_count()} CPUs, load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| load | path | s | tensors GB | RSS after load GB | RSS after decode GB | peak GB "
          "| decode tok/s (1 thread) |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype, xs in runs.items():
        med = {k: statistics.median(x[k] for x in xs) for k in xs[0] if k != "path"}
        print(f"| {dtype} | {xs[0]['path']} | {med['load_s']:.1f} | {med['tensors_gb']:.3f} | "
              f"{med['rss_load_gb']:.2f} | {med['rss_decode_gb']:.2f} | {med['peak_gb']:.2f} | {med['tok_s']:.1f} |")


if __name__ == "__main__":
    main()
