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

from corelm.commands.args import HelpFormatter, Parser
from corelm.errors import CorelmError
from corelm.io.atomic import atomic_file
from corelm.plan import formulas as F
from corelm.plan import planner as P
from corelm.plan.hardware import get_hardware, hardware_ids, load_profile

GiB = F.GiB


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(
        prog="corelm plan",
        description="Predict memory per device (weights, gradients, optimizer, activations, logits, KV cache), "
                    "FLOPs, step time, total time, cost and energy of training, fine-tuning or serving a model, "
                    "and recommend a precision/parallelism/checkpointing layout that fits.",
        formatter_class=HelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="preset name (see `corelm models`), e.g. llama-3-8b")
    src.add_argument("--config", default=None,
                     help="a corelm config (YAML/JSON of ModelConfig fields) or a Hugging Face config.json")
    ap.add_argument("--task", default="pretrain", choices=P.TASKS, help="what to plan")
    ap.add_argument("--method", default="full", choices=P.METHODS,
                    help="fine-tuning method (qlora = 4-bit NF4 base weights + LoRA)")
    ap.add_argument("--tokens", type=float, default=None,
                    help="training tokens for the whole run (default: 20 per parameter, Chinchilla)")
    ap.add_argument("--seq-len", type=int, default=None, help="training sequence length (default: min(context, 4096))")
    ap.add_argument("--batch", type=int, default=None,
                    help="global batch in sequences (pretrain default ~1M tokens/step; finetune 8) "
                         "or concurrent sequences at inference (default 1)")
    ap.add_argument("--micro-batch", type=int, default=None, help="sequences per device per forward (default: choose)")
    ap.add_argument("--context", type=int, default=None, help="inference: tokens in the KV cache per sequence")
    ap.add_argument("--new-tokens", type=int, default=256, help="inference: tokens generated per sequence (timing)")
    ap.add_argument("--hardware", default=None,
                    help=f"catalog id, comma-separated ids, or 'all' ({', '.join(hardware_ids())}); "
                         "default h100-sxm, or all with --budget-usd")
    ap.add_argument("--count", type=int, default=None, help="devices (default: the fewest that fit)")
    ap.add_argument("--precision", default=None, choices=list(F.PRECISIONS),
                    help="training precision policy (default: bf16-mixed where the device has bf16)")
    ap.add_argument("--dtype", default=None, choices=list(F.DTYPE_BYTES),
                    help="inference weight dtype (default: the device's fast 16-bit type)")
    ap.add_argument("--optimizer", default="adamw", choices=list(F.OPTIMIZER_BYTES), help="optimizer")
    ap.add_argument("--zero", type=int, default=None, help="ZeRO stage 0-3 (3 = FSDP full shard; default: choose)")
    ap.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (must divide the heads; default: choose)")
    ap.add_argument("--recompute", default=None, choices=F.RECOMPUTE_MODES,
                    help="activation checkpointing (default: the least that fits)")
    ap.add_argument("--lora-rank", type=int, default=16, help="LoRA rank")
    ap.add_argument("--lora-targets", default="all", choices=list(F.LORA_TARGETS), help="LoRA target matrices")
    ap.add_argument("--mfu", type=float, default=None,
                    help="time with this measured model-FLOPs utilization instead of the catalog's efficiency")
    ap.add_argument("--price-usd", type=float, default=None, help="override the price per device-hour")
    ap.add_argument("--budget-usd", type=float, default=None,
                    help="what to rent: per device kind, the count that finishes soonest within this budget")
    ap.add_argument("--max-count", type=int, default=64,
                    help="--budget-usd: the most devices of one kind you can rent at once")
    ap.add_argument("--profile", default=None,
                    help="a profile saved by `corelm bench --save` (replaces the cpu row, or the row it names)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--plot", default=None, metavar="PNG",
                    help="save a PNG: memory breakdown per device and a roofline with the operating points")
    return ap


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
        else:
            lines.append(f"{d.hardware} ×{d.count}: does not fit — {d.reason}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from corelm.loading import config_for

    args = build_parser().parse_args(argv)
    cfg = config_for(args.model, args.config)
    profile = load_profile(args.profile) if args.profile else None
    hw = args.hardware or ("all" if args.budget_usd is not None else "h100-sxm")
    ids = hardware_ids() if hw == "all" else [h.strip() for h in hw.split(",") if h.strip()]
    rows = [get_hardware(h, profile) for h in ids]
    if args.price_usd is not None:
        if args.price_usd < 0:
            raise CorelmError(f"price must be >= 0, got {args.price_usd}")
        for r in rows:
            r.usd_per_hour = args.price_usd
    if args.count is not None and args.count < 1:
        raise CorelmError(f"count must be >= 1, got {args.count}")
    w = P.Workload(task=args.task, method=args.method, seq_len=args.seq_len, batch=args.batch, tokens=args.tokens,
                   context=args.context, new_tokens=args.new_tokens, precision=args.precision, dtype=args.dtype,
                   optimizer=args.optimizer, zero=args.zero, tp=args.tp, recompute=args.recompute,
                   micro_batch=args.micro_batch, lora_rank=args.lora_rank, lora_targets=args.lora_targets,
                   mfu=args.mfu)
    if args.budget_usd is not None:
        if args.task == "infer":
            raise CorelmError("--budget-usd plans training runs; for serving compare $/1M tokens with --hardware all")
        if args.max_count < 1:
            raise CorelmError(f"max-count must be >= 1, got {args.max_count}")
        p = P.plan_budget(cfg, w, rows, args.budget_usd, max_count=args.max_count)
    else:
        p = P.plan(cfg, w, rows, args.count)
    if args.plot:
        from corelm.plan.plots import plot_plan

        with atomic_file(args.plot) as tmp:
            plot_plan(p, cfg, rows, str(tmp))
    if args.json:
        print(json.dumps(p.to_dict(), indent=2, default=str))
    else:
        print(render(p, args.budget_usd))
        if args.plot:
            print(f"\nplot saved to {args.plot}", file=sys.stderr)
    return 0
