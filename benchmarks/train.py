"""Training throughput of corelm's GPT-2 against transformers' ``GPT2LMHeadModel``, side by side in one run.

Same config (6 layers x 384, 6 heads, vocab 8192, no dropout), same batch (B=8, T=256), same
precision, same optimizer (torch AdamW, foreach) and the same step: forward, fp32 cross-entropy,
backward, clip to 1.0, AdamW step. Every (model, precision) pair alternates round by round
(A B C D A B C D ...), a few steps each; the median step time gives tokens/s. MFU is model FLOPs
(6N + 12·L·d·T per token, PaLM appendix B, from ``corelm.plan.formulas``) over the matmul peak of the
precision's compute dtype, measured in this same run with the planner's ``corelm.plan.bench.measure_matmul``
(square 2048² matmuls on a CPU) before and after the steps. A last row per precision runs corelm's own loop
(``corelm.train.train``) on the same model and data, so the loop's overhead is visible too.

Clocks: on a CPU the default is ``--clock cpu``, process CPU-seconds per thread (user + system, so page
faults count), the time the work takes with the cores to itself; a shared machine's wall clock mostly
measures the neighbours (``corelm bench`` measures the same way). The wall-clock tokens/s is printed next
to it, with the load average. With several threads the CPU clock also counts OpenMP threads spinning at
barriers while a sibling is descheduled; ``OMP_WAIT_POLICY=PASSIVE`` keeps that out.

``--profile`` adds one profiled step per (model, precision) after the timing: time by phase (forward,
loss, backward, clip, optimizer) and by kind of op (matmuls, attention, casts, copies and fills, norms,
activations, the loss's softmax, elementwise, optimizer), from ``torch.profiler`` self times.

    python benchmarks/train.py                                   # fp32 and bf16-mixed, eager
    python benchmarks/train.py --precision bf16-mixed --profile
    python benchmarks/train.py --compile                         # both models under torch.compile
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F

PRECISIONS = ("fp32", "bf16-mixed", "bf16-true")
PHASES = ("forward", "loss", "backward", "clip", "optimizer")
# profiler op name (prefix) -> kind of work, first match wins
OP_KINDS = (
    ("aten::mm", "matmul"), ("aten::addmm", "matmul"), ("aten::bmm", "matmul"), ("aten::baddbmm", "matmul"),
    ("aten::_scaled_dot_product", "attention"), ("aten::_softmax", "attention"),
    ("aten::_log_softmax", "loss softmax"), ("aten::nll_loss", "loss softmax"),
    ("aten::_foreach", "optimizer"), ("aten::addcdiv_", "optimizer"), ("aten::addcmul_", "optimizer"),
    ("aten::lerp_", "optimizer"), ("aten::sqrt", "optimizer"), ("aten::linalg_vector_norm", "clip"),
    ("aten::copy_", "casts/copies"), ("aten::_to_copy", "casts/copies"), ("aten::clone", "casts/copies"),
    ("aten::contiguous", "casts/copies"), ("aten::cat", "casts/copies"),
    ("aten::fill_", "fills"), ("aten::zero_", "fills"), ("aten::zeros", "fills"),
    ("aten::native_layer_norm", "layernorm"), ("aten::gelu", "activation"), ("aten::tanh", "activation"),
    ("aten::pow", "activation"), ("aten::sum", "reductions (bias grads)"),
    ("aten::embedding", "embedding"), ("aten::index", "embedding"),
    ("aten::add", "elementwise"), ("aten::mul", "elementwise"), ("aten::div", "elementwise"),
    ("aten::sub", "elementwise"), ("aten::masked_fill", "elementwise"), ("aten::where", "elementwise"),
)


def build_pair(
    vocab: int, n_layer: int, d: int, n_head: int, ctx: int
) -> tuple[torch.nn.Module, torch.nn.Module, object]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from corelm.config import ModelConfig
    from corelm.models import build_model

    cfg = ModelConfig(family="gpt2", vocab_size=vocab, n_layer=n_layer, n_head=n_head, d_model=d, max_seq_len=ctx)
    torch.manual_seed(0)
    ours = build_model(cfg)
    hf_cfg = GPT2Config(vocab_size=vocab, n_positions=ctx, n_embd=d, n_layer=n_layer, n_head=n_head,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                        bos_token_id=0, eos_token_id=0)
    hf_cfg._attn_implementation = "sdpa"
    theirs = GPT2LMHeadModel(hf_cfg)
    return ours, theirs, cfg


def make_step(model: torch.nn.Module, forward, precision: str, device: str = "cpu"):
    """One training step of ``model`` under ``precision``; phases are named for the profiler."""
    from torch.profiler import record_function

    from corelm.train.optim import build_optimizer
    from corelm.train.precision import Precision

    policy = Precision(precision, device)
    policy.apply(model)
    model.train()
    opt = build_optimizer(model, lr=3e-4, weight_decay=0.1)

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        with policy.autocast():
            with record_function("forward"):
                logits = forward(x)
            with record_function("loss"):
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        with record_function("backward"):
            loss.backward()
        with record_function("clip"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        with record_function("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def op_kind(name: str) -> str:
    for prefix, kind in OP_KINDS:
        if name.startswith(prefix):
            return kind
    return "other"


def profile_step(step: Callable, x: torch.Tensor, y: torch.Tensor,
                 n: int = 2) -> tuple[dict[str, float], dict[str, float]]:
    """Shares of ``n`` steps' profiled time, by phase and by kind of op (self times of aten ops)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step(x, y)
    events = prof.key_averages()
    phases = {e.key: e.cpu_time_total for e in events if e.key in PHASES}
    kinds: dict[str, float] = defaultdict(float)
    for e in events:
        if e.key.startswith("aten::"):
            kinds[op_kind(e.key)] += e.self_cpu_time_total
    total_phase, total_ops = sum(phases.values()) or 1.0, sum(kinds.values()) or 1.0
    return ({k: phases.get(k, 0.0) / total_phase for k in PHASES},
            {k: v / total_ops for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])})


def clocks(device: torch.device, threads: int) -> Callable[[], tuple[float, float]]:
    """(wall seconds, process CPU-seconds per thread) now."""
    def now() -> tuple[float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time() / threads
    return now


def run_loop(model_cfg, data: torch.Tensor, precision: str, args, dev: torch.device, now) -> list[tuple[float, float]]:
    """Per-step (wall, cpu) times of corelm's own loop on a fresh corelm model (after a warm-up call)."""
    from corelm.config import ModelConfig
    from corelm.models import build_model
    from corelm.objectives import causal_lm_loss
    from corelm.train import TrainConfig, train
    from corelm.train.distributed import DistInfo

    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**model_cfg.to_dict(), "extra": {}})).to(dev)
    batches = iter(lambda: data, None)
    info = DistInfo(device=dev)

    def cfg(n: int) -> TrainConfig:
        return TrainConfig(max_steps=n, precision=precision, compile=args.compile, progress=False,
                           tensorboard=False, measure_mfu=False)

    train(model, causal_lm_loss, batches, cfg(2), dist=info)
    out = []
    for _ in range(args.rounds):
        (w0, c0) = now()
        train(model, causal_lm_loss, batches, cfg(args.steps), dist=info)
        (w1, c1) = now()
        out.append(((w1 - w0) / args.steps, (c1 - c0) / args.steps))
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--precision", default="fp32,bf16-mixed",
                    help=f"comma-separated policies, each measured in this run ({', '.join(PRECISIONS)})")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    ap.add_argument("--steps", type=int, default=3, help="steps per model per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=("cpu", "wall"), default=None,
                    help="what tokens/s and MFU are computed from (default: cpu on a CPU, wall on CUDA)")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--no-loop", action="store_true", help="skip the corelm.train.train rows")
    ap.add_argument("--profile", action="store_true", help="print where one step's time goes, per row")
    ap.add_argument("--malloc", choices=("keep", "default"), default="keep",
                    help="keep: corelm.cpu.keep_freed_memory() for the whole process, both models (corelm's loop "
                         "sets it when it starts: the corelm loop rows always run with it)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    args.precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    bad = [p for p in args.precisions if p not in PRECISIONS]
    if bad or not args.precisions:
        ap.error(f"--precision: expected a comma list of {', '.join(PRECISIONS)}")
    args.clock = args.clock or ("wall" if args.device.startswith("cuda") else "cpu")
    return args


def measure_peaks(dtypes: set[str], dev: torch.device) -> dict[str, tuple[float, float]]:
    """(wall-clock, cpu-clock) matmul FLOP/s per dtype name: a wall-clock one and the planner's measurement."""
    from corelm.plan.bench import measure_matmul
    from corelm.train.tracking import measure_matmul_peak

    n = 2048 if dev.type == "cpu" else 8192
    names = {"fp32": torch.float32, "bf16": torch.bfloat16}
    return {d: (measure_matmul_peak(names[d], n=n, seconds=1.0, device=dev.type),
                measure_matmul(d, n=n, seconds=1.0, device=dev.type)) for d in dtypes}


def print_profiles(profiles: dict[str, tuple[dict[str, float], dict[str, float]]]) -> None:
    names = list(profiles)
    print("\nwhere one step's time goes (torch.profiler; phases: share of the step; ops: share of aten self time)")
    kinds: list[str] = []
    for _, by_kind in profiles.values():
        kinds += [k for k in by_kind if k not in kinds]
    print(f"{'':26}" + "".join(f"{n:>24}" for n in names))
    for k in PHASES:
        print(f"{'phase ' + k:26}" + "".join(f"{profiles[n][0][k]:24.1%}" for n in names))
    for k in kinds:
        print(f"{'op ' + k:26}" + "".join(f"{profiles[n][1].get(k, 0.0):24.1%}" for n in names))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.malloc == "keep":
        from corelm.cpu import keep_freed_memory

        keep_freed_memory()

    from corelm.plan.formulas import train_flops_per_token
    from corelm.train.precision import Precision

    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).to(dev)
    x, y = data[:, :-1], data[:, 1:]
    steps: dict[str, Callable] = {}
    cfg = None
    for prec in args.precisions:  # a fresh pair per precision: the same initial weights (seed 0) each time
        ours, theirs, cfg = build_pair(args.vocab, args.layers, args.width, args.heads, args.seq)
        ours.to(dev)
        theirs.to(dev)
        f_ours = torch.compile(ours) if args.compile else ours
        f_theirs = torch.compile(theirs) if args.compile else theirs
        steps[f"corelm {prec}"] = make_step(ours, f_ours, prec, dev.type)
        steps[f"transformers {prec}"] = make_step(theirs, lambda ids, m=f_theirs: m(input_ids=ids).logits,
                                                  prec, dev.type)
    now = clocks(dev, args.threads)
    dtype_names = {"fp32" if Precision(p).compute_dtype == torch.float32 else "bf16" for p in args.precisions}
    peaks = [measure_peaks(dtype_names, dev)]
    for name, step in steps.items():  # warm-up (and compilation)
        w0, _ = now()
        for _ in range(2):
            step(x, y)
        print(f"warm-up {name}: {now()[0] - w0:.1f} s", flush=True)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in steps}
    loads = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for name, step in steps.items():
            for _ in range(args.steps):
                w0, c0 = now()
                step(x, y)
                w1, c1 = now()
                times[name].append((w1 - w0, c1 - c0))
        loads.append(os.getloadavg()[0])
        print(f"round {r + 1}/{args.rounds} ({args.clock} clock): "
              + ", ".join(f"{k} {statistics.median(t[args.clock == 'cpu'] for t in v):.3f} s/step"
                          for k, v in times.items()), flush=True)
    peaks.append(measure_peaks(dtype_names, dev))
    peak = {d: (max(p[d][0] for p in peaks), max(p[d][1] for p in peaks)) for d in dtype_names}
    profiles = {name: profile_step(step, x, y) for name, step in steps.items()} if args.profile else {}
    if not args.no_loop:
        for prec in args.precisions:
            times[f"corelm loop {prec}"] = run_loop(cfg, data, prec, args, dev, now)

    fpt = train_flops_per_token(cfg, args.seq)
    tokens = args.batch * args.seq
    where = (f"{torch.backends.cpu.get_cpu_capability()} CPU" if dev.type == "cpu" else torch.cuda.get_device_name())
    from corelm.plan.bench import machine_name

    print(f"\nGPT-2 {args.layers}x{args.width}, vocab {args.vocab}, B={args.batch}, T={args.seq}, AdamW, "
          f"{'compiled' if args.compile else 'eager'}, {args.threads} threads, {where}: {machine_name(dev.type)}")
    print(f"load average (1 min) during the rounds: {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs; "
          f"malloc {args.malloc}")
    for d, (pw, pc) in sorted(peak.items()):
        print(f"measured {d} matmul peak: {pc / 1e9:.1f} GFLOP/s (cpu clock), {pw / 1e9:.1f} (wall clock)")
    print(f"model FLOPs/token {fpt / 1e6:.1f} M; tokens/s and MFU from the {args.clock} clock "
          f"(MFU against the peak of the row's compute dtype on the same clock)")
    col = 1 if args.clock == "cpu" else 0
    print(f"{'':28} {'s/step (median)':>16} {'spread':>14} {'tokens/s':>10} {'MFU':>7} {'wall tok/s':>11}")
    for name, v in times.items():
        prec = name.split()[-1]
        d = "fp32" if Precision(prec).compute_dtype == torch.float32 else "bf16"
        sel = [t[col] for t in v]
        med = statistics.median(sel)
        tps = tokens / med
        print(f"{name:28} {med:16.3f} {min(sel):6.3f}-{max(sel):6.3f} {tps:10.0f} {tps * fpt / peak[d][col]:7.1%} "
              f"{tokens / statistics.median(t[0] for t in v):11.0f}")
    for prec in args.precisions:
        base = statistics.median(t[col] for t in times[f"transformers {prec}"])
        ratio = base / statistics.median(t[col] for t in times[f"corelm {prec}"])
        line = f"{prec}: corelm / transformers {ratio:.2f}x tokens/s (same step)"
        if f"corelm loop {prec}" in times:
            loop = statistics.median(t[col] for t in times[f"corelm loop {prec}"])
            line += f"; corelm's loop / transformers {base / loop:.2f}x"
        print(line)
    if profiles:
        print_profiles(profiles)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
