"""``corelm plan``: memory, FLOPs, time, cost and energy of a model on an accelerator, before step 1.

Examples::

    corelm plan --model llama-3-8b --task pretrain --tokens 1e12 --hardware h100-sxm --count 64
    corelm plan --model llama-2-7b --task finetune --method lora --seq-len 4096 --batch 8 --hardware a100-80gb
    corelm plan --model smollm2-135m --task infer --context 8192 --batch 32 --hardware all
    corelm plan --config my_model.yaml --task pretrain --tokens 2e10 --budget-usd 5000
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from corelm.commands.args import Options, option, options_from, parser_from
from corelm.errors import CorelmError
from corelm.io.atomic import atomic_file
from corelm.plan import formulas as F
from corelm.plan import planner as P
from corelm.plan.hardware import get_hardware, hardware_ids, load_profile

GiB = F.GiB


@dataclass
class PlanOptions(Options):
    """The model, workload and hardware ``corelm plan`` predicts for."""

    model: str | None = option(None, "preset name (see `corelm models`), e.g. llama-3-8b", group="source")
    config: str | None = option(None, "a corelm config (YAML/JSON of ModelConfig fields) or a Hugging Face "
                                      "config.json", group="source")
    task: str = option("pretrain", "what to plan", choices=P.TASKS)
    method: str = option("full", "fine-tuning method (qlora = 4-bit NF4 base weights + LoRA)", choices=P.METHODS)
    tokens: float | None = option(None, "training tokens for the whole run (default: 20 per parameter, Chinchilla)")
    seq_len: int | None = option(None, "training sequence length (default: min(context, 4096))")
    batch: int | None = option(None, "global batch in sequences (pretrain default ~1M tokens/step; finetune 8) "
                                     "or concurrent sequences at inference (default 1)")
    micro_batch: int | None = option(None, "sequences per device per forward (default: choose)")
    context: int | None = option(None, "inference: tokens in the KV cache per sequence")
    new_tokens: int = option(256, "inference: tokens generated per sequence (timing)")
    hardware: str | None = option(None, f"catalog id, comma-separated ids, or 'all' ({', '.join(hardware_ids())}); "
                                        "default h100-sxm, or all with --budget-usd")
    count: int | None = option(None, "devices (default: the fewest that fit)")
    precision: str | None = option(None, "training precision policy (default: bf16-mixed where the device has bf16)",
                                   choices=list(F.PRECISIONS))
    dtype: str | None = option(None, "inference weight dtype (default: the device's fast 16-bit type)",
                               choices=list(F.DTYPE_BYTES))
    optimizer: str = option("adamw", "optimizer", choices=list(F.OPTIMIZER_BYTES))
    zero: int | None = option(None, "ZeRO stage 0-3 (3 = FSDP full shard; default: choose)")
    tp: int | None = option(None, "tensor-parallel degree (must divide the heads; default: choose)")
    recompute: str | None = option(None, "activation checkpointing (default: the least that fits)",
                                   choices=F.RECOMPUTE_MODES)
    lora_rank: int = option(16, "LoRA rank")
    lora_targets: str = option("all", "LoRA target matrices", choices=list(F.LORA_TARGETS))
    mfu: float | None = option(None, "time with this measured model-FLOPs utilization instead of the catalog's "
                                     "efficiency")
    price_usd: float | None = option(None, "override the price per device-hour")
    budget_usd: float | None = option(None, "what to rent: per device kind, the count that finishes soonest within "
                                            "this budget")
    max_count: int = option(64, "--budget-usd: the most devices of one kind you can rent at once")
    profile: str | None = option(None, "a profile saved by `corelm bench --save` (replaces the cpu row, or the row "
                                       "it names)")
    json: bool = option(False, "print one JSON object instead of the table")
    plot: str | None = option(None, "save a PNG: memory breakdown per device and a roofline with the operating "
                                    "points", metavar="PNG")

    def check(self) -> None:
        if self.model is not None and self.config is not None:
            raise CorelmError("give --model or --config, not both")
        if self.price_usd is not None and self.price_usd < 0:
            raise CorelmError(f"price must be >= 0, got {self.price_usd}")
        if self.count is not None and self.count < 1:
            raise CorelmError(f"count must be >= 1, got {self.count}")
        if self.budget_usd is not None:
            if self.task == "infer":
                raise CorelmError("--budget-usd plans training runs; for serving compare $/1M tokens with "
                                  "--hardware all")
            if self.max_count < 1:
                raise CorelmError(f"max-count must be >= 1, got {self.max_count}")


def build_parser() -> argparse.ArgumentParser:
    return parser_from(
        PlanOptions, prog="corelm plan",
        description="Predict memory per device (weights, gradients, optimizer, activations, logits, KV cache), "
                    "FLOPs, step time, total time, cost and energy of training, fine-tuning or serving a model, "
                    "and recommend a precision/parallelism/checkpointing layout that fits.")


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x / GiB:.1f}"


def _dur(s: float | None) -> str:
    if s is None:
        return "-"
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= n:
            return f"{s / n:.1f} {unit}"
    return f"{s:.2f} s" if s >= 0.01 else f"{s * 1e3:.2f} ms"


def _num(x: float | None, fmt: str = ",.0f") -> str:
    return "-" if x is None else format(x, fmt)


def render(p: P.Plan, budget: float | None = None) -> str:
    """The human table: one row per device kind, then the recommendation and reasons."""
    w = p.workload
    seq, batch, tokens = p.seq_len, p.batch, p.tokens
    lines = []
    head = (f"{p.model}: {p.params / 1e9:.3g}B parameters" if p.params >= 1e9 else
            f"{p.model}: {p.params / 1e6:.1f}M parameters")
    if w.task == "infer":
        ctx = w.context or seq
        lines.append(f"{head} · serve · context {ctx:,} · batch {batch} · KV cache "
                     f"{p.kv_cache_bytes / GiB:.2f} GiB · {p.flops_per_token:.3g} FLOPs/token forward")
        cols = ["device", "n", "fits", "weights", "kv", "activ", "logits", "total/usable GiB",
                "prefill", "decode tok/s", "bound", "$/1M tok"]
        rows = []
        for d in p.devices:
            m = d.memory_bytes
            made = batch * (ctx if d.decode_tokens_per_s is None else w.new_tokens)  # encoded or generated
            per_m = (d.cost_usd / made * 1e6) if d.cost_usd is not None else None
            rows.append([d.hardware, str(d.count), "yes" if d.fits else "NO", _gib(m.get("weights")),
                         _gib(m.get("kv_cache")), _gib(m.get("activations")), _gib(m.get("logits")),
                         f"{d.memory_total / GiB:.1f}/{d.usable_bytes / GiB:.1f}",
                         _dur(d.prefill_time_s), _num(d.decode_tokens_per_s), d.decode_bound or "-",
                         _num(per_m, ",.2f")])
    else:
        what = (f"{w.task} ({w.method}, {p.trainable_params / 1e6:,.1f}M trainable)" if w.task == "finetune"
                else w.task)
        lines.append(f"{head} · {what} · {tokens:.3g} tokens · seq {seq:,} · global batch {batch} · "
                     f"{p.train_flops:.3g} training FLOPs ({p.flops_per_token:.3g}/token = 6N + 12·L·H·Q·T)")
        cols = ["device", "n", "fits", "weights", "grads", "optim", "copy", "activ", "logits",
                "total/usable GiB", "step", "tok/s/dev", "MFU", "time", "cost $", "kWh"]
        rows = []
        for d in p.devices:
            m = d.memory_bytes
            rows.append([d.hardware, str(d.count), "yes" if d.fits else "NO",
                         _gib(m.get("weights", 0) + m.get("frozen", 0)) if m else "-", _gib(m.get("grads")),
                         _gib(m.get("optimizer")), _gib(m.get("compute_copy")), _gib(m.get("activations")),
                         _gib(m.get("logits")), f"{d.memory_total / GiB:.1f}/{d.usable_bytes / GiB:.1f}",
                         _dur(d.step_time_s), _num(d.tokens_per_s_per_device),
                         "-" if d.mfu is None else f"{d.mfu:.0%}", _dur(d.total_time_s),
                         _num(d.cost_usd), _num(d.energy_kwh)])
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]

    def fmt(r: list[str]) -> str:  # first column left-aligned, numbers right-aligned
        return "  ".join(v.rjust(wd) if i else v.ljust(wd) for i, (v, wd) in enumerate(zip(r, widths)))

    lines += ["", fmt(cols), fmt(["-" * wd for wd in widths])] + [fmt(r) for r in rows] + [""]
    fitting = [d for d in p.devices if d.fits]
    if budget is not None:
        ok = [d for d in fitting if d.cost_usd is not None and d.cost_usd <= budget]
        if ok:
            best = ok[0]
            lines.append(f"Rent: {best.count}× {best.hardware_name} — {_dur(best.total_time_s)}, "
                         f"${best.cost_usd:,.0f} of your ${budget:,.0f} budget.")
        else:
            cheapest = min(fitting, key=lambda d: d.cost_usd, default=None)
            lines.append(f"Nothing fits a ${budget:,.0f} budget" + (
                f"; the cheapest is {cheapest.count}× {cheapest.hardware} at ${cheapest.cost_usd:,.0f}."
                if cheapest else "."))
    for d in p.devices:
        if d.fits:
            lines.append(f"{d.hardware} ×{d.count}: {d.recommendation}")
            if d.command or d.command_note:  # training: the corelm command line of that layout, or why none
                lines.append(f"  run: {d.command}" if d.command else f"  no corelm command: {d.command_note}")
        else:
            lines.append(f"{d.hardware} ×{d.count}: does not fit — {d.reason}")
    return "\n".join(lines)


def plan(options: PlanOptions) -> P.Plan:
    """The plan (``.to_dict()`` is what ``--json`` prints); with ``options.plot``, the PNG is saved too."""
    from corelm.loading import config_for

    cfg = config_for(options.model, options.config)
    profile = load_profile(options.profile) if options.profile else None
    hw = options.hardware or ("all" if options.budget_usd is not None else "h100-sxm")
    ids = hardware_ids() if hw == "all" else [h.strip() for h in hw.split(",") if h.strip()]
    rows = [get_hardware(h, profile) for h in ids]
    if options.price_usd is not None:
        for r in rows:
            r.usd_per_hour = options.price_usd
    o = options
    w = P.Workload(task=o.task, method=o.method, seq_len=o.seq_len, batch=o.batch, tokens=o.tokens, context=o.context,
                   new_tokens=o.new_tokens, precision=o.precision, dtype=o.dtype, optimizer=o.optimizer, zero=o.zero,
                   tp=o.tp, recompute=o.recompute, micro_batch=o.micro_batch, lora_rank=o.lora_rank,
                   lora_targets=o.lora_targets, mfu=o.mfu)
    if options.budget_usd is not None:
        p = P.plan_budget(cfg, w, rows, options.budget_usd, max_count=options.max_count)
    else:
        p = P.plan(cfg, w, rows, options.count)
    if options.plot:
        from corelm.plan.plots import plot_plan

        with atomic_file(options.plot) as tmp:
            plot_plan(p, cfg, rows, str(tmp))
    return p


def main(argv: list[str]) -> int:
    args = options_from(PlanOptions, build_parser().parse_args(argv))
    p = plan(args)
    if args.json:
        print(json.dumps(p.to_dict(), indent=2, default=str))
    else:
        print(render(p, args.budget_usd))
        if args.plot:
            print(f"\nplot saved to {args.plot}", file=sys.stderr)
    return 0
