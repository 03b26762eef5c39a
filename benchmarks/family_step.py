"""Decode speed of a quantized Gemma 2 / OLMo 2 / MoE / Llama on corelm's C++ step against the PyTorch step.

A random model of SmolLM2-135M's shapes (d_model 576, 30 layers, 9 query and 3 key/value heads, d_ff
1536, vocabulary 49152) in the chosen family's block (Gemma 2: sandwich norms, GeGLU, soft-caps
50/30, alternating 4096-token windows; OLMo 2: norms after each sub-layer, QK norm over the whole
projection; MoE: 8 SwiGLU experts of width 512, top 2, quantized per expert), quantized int4 or int8,
decodes ``--tokens`` greedy tokens after a 16-token prompt on :class:`~corelm.generate.step.KernelStep`
(what ``step_for`` now picks) and on :class:`~corelm.generate.step.ModelStep` (the eager PyTorch
forward these families fell back to), the two alternating round by round; the median of ``--rounds``
is reported with the bandwidth achieved (weight bytes read per token x tokens/s; the bytes count every
expert, so a MoE's figure overstates it). Both steps greedy-decode the same tokens (checked).

    python benchmarks/family_step.py --family gemma2 --method int4 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

SHAPES = {"vocab_size": 49152, "d_model": 576, "n_layer": 30, "n_head": 9, "n_kv_head": 3, "d_ff": 1536,
          "max_seq_len": 2048, "rope_theta": 100000.0, "tie_embeddings": True, "norm_eps": 1e-5}
FAMILIES = {
    "gemma2": {"family": "gemma", "sandwich_norm": True, "attn_softcap": 50.0, "final_softcap": 30.0,
               "query_pre_attn_scalar": 64, "sliding_window": 4096,
               "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(30)]},
    "olmo2": {"family": "olmo2"},
    # Qwen3-MoE's block at SmolLM2's width: 8 experts of width 512, top 2 (routed experts quantized per expert)
    "moe": {"family": "moe", "n_experts": 8, "n_experts_per_tok": 2, "moe_d_ff": 512, "norm_topk_prob": True},
    "llama": {"family": "llama"},
}


def build(family: str, method: str) -> torch.nn.Module:
    from corelm.config import ModelConfig
    from corelm.loading import quantize_model
    from corelm.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(**SHAPES, **FAMILIES[family])).eval()
    with torch.no_grad():  # off the init (norm weights of 0 or 1), as a trained model is
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return quantize_model(model, method)


def decode(step, prompt: list[int], n: int) -> tuple[list[int], float]:
    """Greedy tokens after ``prompt`` and the seconds the ``n - 1`` decode steps took."""
    cache = step.new_cache(1, len(prompt) + n)
    with torch.inference_mode():
        out = [int(step.prefill(cache, [prompt])[0].argmax())]
        t0 = time.perf_counter()
        for i in range(n - 1):
            logits = step.decode(cache, torch.tensor([out[-1]]), torch.tensor([len(prompt) + i]))
            out.append(int(logits[0].argmax()))
        return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=list(FAMILIES), default="gemma2")
    parser.add_argument("--method", choices=["int4", "int8"], default="int4")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from corelm.generate.step import KernelStep, ModelStep, kernel_step_supported, weight_bytes

    model = build(args.family, args.method)
    why = kernel_step_supported(model)
    assert why is None, why
    steps = {"C++ step": KernelStep(model), "PyTorch step": ModelStep(model)}
    prompt = list(range(100, 116))
    tokens = {name: decode(step, prompt, 8)[0] for name, step in steps.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            out, seconds = decode(step, prompt, args.tokens)
            tokens[name] = out
            times[name].append((args.tokens - 1) / seconds)
    gb = weight_bytes(model) / 1e9
    print(f"{args.family} {args.method}, SmolLM2-135M shapes, {args.tokens} tokens, {args.threads} threads, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; weights read per token {gb * 1e3:.0f} MB")
    print("| step | tok/s (median) | range | GB/s |")
    print("|---|---|---|---|")
    for name, xs in times.items():
        med = statistics.median(xs)
        print(f"| {name} | {med:.1f} | {min(xs):.1f}-{max(xs):.1f} | {med * gb:.2f} |")
    ratio = statistics.median(times["C++ step"]) / statistics.median(times["PyTorch step"])
    same = tokens["C++ step"] == tokens["PyTorch step"]
    print(f"C++ / PyTorch: {ratio:.2f}x; greedy tokens equal: {same}")


if __name__ == "__main__":
    main()
