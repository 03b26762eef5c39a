"""Decode speed and memory of a MoE on corelm's C++ step with float routed experts against quantized ones.

A random MoE (d_model 512, 4 layers, 8 heads of 64 with 4 key/value heads, 8 SwiGLU experts of width
``--expert-width`` per layer, top 2, vocabulary 8192: the experts are most of the weights) is quantized
int4 (the q8 head) four ways that differ only in the routed experts: kept as fp32 stacks, as bf16 stacks
(what ``quantize="int4"`` gave before experts were quantized: the stacks in the load dtype, bf16 on an
AVX512_BF16 CPU), int8 per expert, int4 per expert. Each decodes ``--tokens`` greedy tokens after a
16-token prompt on :class:`~corelm.generate.step.KernelStep`, the variants alternating round by round, at
each thread count of ``--threads``; the median of ``--rounds`` is reported with the model's bytes (every
parameter and buffer, :func:`corelm.quant.transform.quantized_bytes`) and the bytes one token reads
(attention, router, the head and 2 of 8 experts per layer; x tok/s = the bandwidth achieved).

    python benchmarks/moe_experts.py --threads 1 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

SHAPES = {"family": "moe", "vocab_size": 8192, "d_model": 512, "n_layer": 4, "n_head": 8, "n_kv_head": 4,
          "d_ff": 1024, "max_seq_len": 512, "n_experts": 8, "n_experts_per_tok": 2, "norm_topk_prob": True,
          "tie_embeddings": False}
VARIANTS = ("fp32 experts", "bf16 experts", "int8 experts", "int4 experts")


def build(variant: str, expert_width: int) -> torch.nn.Module:
    from corelm.config import ModelConfig
    from corelm.models import build_model
    from corelm.quant.experts import quantize_experts
    from corelm.quant.transform import quantize_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(**SHAPES, moe_d_ff=expert_width)).eval()
    with torch.no_grad():  # off the init (norm weights of 1, routers of std 0.02: near-ties), as a trained model is
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("mlp.gate.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    experts = [f"model.layers.{i}.mlp.experts" for i in range(SHAPES["n_layer"])]
    quantize_model(model, "int4", skip=experts)  # everything else int4 (q8 head), the experts still floats
    method = variant.split()[0]
    if method in ("int8", "int4"):
        quantize_experts(model, method)
        model.corelm_quantization["experts"] = True
    elif method == "bf16":
        for block in model.model.layers:
            block.mlp.experts.to(torch.bfloat16)
    return model


def token_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode token reads: every tensor but the embedding table and the experts, plus top_k of
    each layer's n_experts experts."""
    from corelm.generate.step import weight_bytes

    total = weight_bytes(model)
    for block in model.model.layers:
        experts = block.mlp.experts
        size = sum(t.numel() * t.element_size() for t in [*experts.parameters(), *experts.buffers()])
        total -= size - size * SHAPES["n_experts_per_tok"] // SHAPES["n_experts"]
    return total


def decode(step, batch: int, n: int) -> float:
    """Seconds the ``n - 1`` greedy decode steps of ``batch`` rows (16-token prompts, one per row) took."""
    prompts = [list(range(100 + 16 * b, 116 + 16 * b)) for b in range(batch)]
    cache = step.new_cache(batch, 16 + n)
    with torch.inference_mode():
        toks = step.prefill(cache, prompts).argmax(-1)
        t0 = time.perf_counter()
        for i in range(n - 1):
            toks = step.decode(cache, toks, torch.full((batch,), 16 + i)).argmax(-1)
        return time.perf_counter() - t0


def _cpu() -> str:
    """The CPU's model name (``/proc/cpuinfo``) and the instruction set ATen dispatches to."""
    name = "?"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="rows decoded together")
    parser.add_argument("--expert-width", type=int, default=1024)
    args = parser.parse_args()
    from corelm.generate.step import KernelStep, kernel_step_supported
    from corelm.quant.transform import quantized_bytes

    models = {v: build(v, args.expert_width) for v in VARIANTS}
    for v, m in models.items():
        assert kernel_step_supported(m) is None, (v, kernel_step_supported(m))
    steps = {v: KernelStep(m) for v, m in models.items()}
    runs = [(t, b) for t in args.threads for b in args.batch]
    times: dict[tuple[int, int, str], list[float]] = {}
    for threads, batch in runs:
        torch.set_num_threads(threads)
        for step in steps.values():
            decode(step, batch, 8)  # warm-up
        for _ in range(args.rounds):
            for v, step in steps.items():
                seconds = decode(step, batch, args.tokens)
                times.setdefault((threads, batch, v), []).append(batch * (args.tokens - 1) / seconds)
    print(f"random MoE d_model 512, 4 layers, 8 experts of width {args.expert_width}, top 2, vocab 8192; "
          f"attention and head int4/q8; {args.tokens} tokens per row; {_cpu()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    print("| experts | model MB | MB read per token | threads | rows | tok/s (median) | range | GB/s (1 row) "
          "| vs fp32 experts |")
    print("|---|---|---|---|---|---|---|---|---|")
    for threads, batch in runs:
        base = statistics.median(times[(threads, batch, VARIANTS[0])])
        for v, m in models.items():
            xs = times[(threads, batch, v)]
            med, mb = statistics.median(xs), token_bytes(m) / 1e6
            gbs = f"{med * mb / 1e3:.2f}" if batch == 1 else "-"
            print(f"| {v} | {quantized_bytes(m) / 1e6:.1f} | {mb:.1f} | {threads} | {batch} | {med:.1f} | "
                  f"{min(xs):.1f}-{max(xs):.1f} | {gbs} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
