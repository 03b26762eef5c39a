"""``corelm plan --plot``: memory breakdown per device and a roofline with the model's operating points.

Roofline (Williams, Waterman & Patterson 2009): attainable FLOP/s = min(peak, intensity × bandwidth),
intensity = FLOPs ÷ bytes moved from memory. Operating points, each one pass over the weights:
- decode at batch b: 2N·b FLOPs (+ attention) per step over the weights + the KV cache read once;
- prefill of T tokens: the forward FLOPs of T tokens over the weights + the KV cache written;
- a training micro-step: 6N FLOPs per token × tokens over three weight reads (forward, two backward
  matmuls) + the saved activations written once and read once.
"""

from __future__ import annotations

from corelm.config import ModelConfig
from corelm.plan import formulas as F
from corelm.plan.hardware import Hardware
from corelm.plan.planner import Plan

COLORS = {"weights": "#4c72b0", "frozen": "#8172b2", "grads": "#dd8452", "optimizer": "#c44e52",
          "compute_copy": "#937860", "optimizer_temp": "#da8bc3", "activations": "#55a868", "logits": "#ccb974",
          "kv_cache": "#64b5cd"}


def operating_points(cfg: ModelConfig, p: Plan, hw: Hardware) -> list[tuple[str, float, float]]:
    """(label, FLOPs per byte, FLOPs per step) for the plan's workload on ``hw``."""
    w = p.workload
    wdt = w.dtype or (hw.fastest_16bit or "fp32")
    weights = F.matmul_params(cfg) * F.DTYPE_BYTES.get(wdt, 2)
    ctx = w.context or p.seq_len
    points = []
    for b in sorted({1, max(1, p.batch)} if w.task == "infer" else {1}):
        kv = F.kv_cache_bytes(cfg, ctx, b, "bf16" if wdt not in ("fp32",) else "fp32")
        flops = b * F.decode_flops_per_token(cfg, ctx - 1)
        points.append((f"decode, batch {b}", flops / (weights + kv), flops))
    prefill = F.prefill_flops(cfg, ctx, 1)
    points.append((f"prefill {ctx:,} tokens", prefill / (weights + F.kv_cache_bytes(cfg, ctx, 1)), prefill))
    if w.task != "infer":
        micro = next((d.layout.micro_batch for d in p.devices if d.layout), 1)
        tokens = micro * p.seq_len
        flops = F.train_flops_per_token(cfg, p.seq_len) * tokens
        acts = cfg.n_layer * F.activation_bytes_per_layer(cfg, p.seq_len, micro)
        points.append((f"train step, micro-batch {micro}", flops / (3 * weights + 2 * acts), flops))
    return points


def plot_plan(p: Plan, cfg: ModelConfig, rows: list[Hardware], path: str) -> None:
    """Save a two-panel PNG at ``path``: memory per device (stacked, GiB) and the roofline of ``rows[0]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_roof) = plt.subplots(1, 2, figsize=(13, 5.2))
    devices = p.devices
    comps: list[str] = []
    for d in devices:
        comps += [k for k, v in d.memory_bytes.items() if v > 0 and k not in comps]
    x = range(len(devices))
    bottom = [0.0] * len(devices)
    for comp in comps:
        vals = [d.memory_bytes.get(comp, 0.0) / F.GiB for d in devices]
        ax_mem.bar(x, vals, bottom=bottom, label=comp.replace("_", " "), color=COLORS.get(comp))
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, d in enumerate(devices):
        usable = (d.usable_bytes or d.capacity_bytes) / F.GiB
        ax_mem.plot([i - 0.4, i + 0.4], [usable, usable], color="black", lw=1.5)
        ax_mem.text(i, max(bottom[i], usable) * 1.02, "fits" if d.fits else "no fit", ha="center", fontsize=8,
                    color="green" if d.fits else "red")
    ax_mem.set_xticks(list(x), [f"{d.hardware}\n×{d.count}" for d in devices], fontsize=8,
                      rotation=45 if len(devices) > 5 else 0)
    ax_mem.set_ylabel("GiB per device (black line: usable memory)")
    ax_mem.set_title(f"{p.model}: memory per device ({p.workload.task})")
    ax_mem.legend(fontsize=8)

    hw = rows[0]
    dtype = hw.fastest_16bit or "fp32"
    peak = hw.peak_flops(dtype) * hw.matmul_efficiency
    bw = hw.bandwidth_gbs * 1e9 * hw.bandwidth_efficiency
    points = operating_points(cfg, p, hw)
    lo = min(0.5, min(i for _, i, _ in points) / 2)
    hi = max(peak / bw * 20, max(i for _, i, _ in points) * 2)
    xs = [lo * (hi / lo) ** (k / 200) for k in range(201)]
    ax_roof.loglog(xs, [min(peak, xv * bw) for xv in xs], color="black", lw=2,
                   label=f"{hw.id} {dtype}: {peak / 1e12:,.1f} TFLOP/s, {bw / 1e9:,.0f} GB/s")
    ax_roof.axvline(peak / bw, color="gray", ls=":", lw=1)
    for label, intensity, _ in points:
        attain = min(peak, intensity * bw)
        ax_roof.plot([intensity], [attain], "o", ms=8, label=f"{label} ({intensity:,.0f} FLOP/B)")
    ax_roof.set_xlabel("arithmetic intensity (FLOPs per byte of memory traffic)")
    ax_roof.set_ylabel("attainable FLOP/s")
    ax_roof.set_title(f"roofline of {hw.name}: {p.model}")
    ax_roof.legend(fontsize=8, loc="lower right")
    ax_roof.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


