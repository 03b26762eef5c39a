"""``corelm bench``: measure this machine, and check the planner against real corelm steps.

Examples::

    corelm bench                                          # matmul peak per dtype, memory bandwidth
    corelm bench --save profile.json                      # ... saved for `corelm plan --profile profile.json`
    corelm bench --model gpt2-tiny --train                # real training steps: predicted vs measured
    corelm bench --model smollm2-135m-instruct --decode   # measured tokens/s vs the bandwidth bound

On a shared CPU the wall clock measures the neighbours as much as the code, so CPU timings are also
given in *CPU-seconds per thread* (process CPU time ÷ threads): the time the step takes with the
cores to itself. Predictions use matmul/bandwidth probes measured the same way, between the steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass

from corelm.commands.args import Options, option, options_from, parser_from, set_threads, threads_option
from corelm.errors import CorelmError

GiB = 1024**3


@dataclass
class BenchOptions(Options):
    """What ``corelm bench`` measures."""

    model: str | None = option(None, "preset or embedded model (default gpt2-tiny for --train, "
                                     "smollm2-135m-instruct for --decode)")
    config: str | None = option(None, "a model config file instead of --model (for --train)")
    train: bool = option(False, "run real training steps and compare with the planner")
    decode: bool = option(False, "run greedy decoding and compare with the bandwidth bound")
    batch: int = option(8, "--train: sequences per step")
    seq_len: int = option(256, "--train: tokens per sequence")
    steps: int = option(4, "--train: optimizer steps (the first is not timed)")
    precision: str | None = option(None, "--train: precision policy (default fp32 on CPU, bf16-mixed on GPU)",
                                   precision={"policies": ("fp32", "bf16-mixed", "fp16-mixed", "bf16-true")})
    new_tokens: int = option(64, "--decode: tokens to generate")
    dtype: str = option("auto", "--decode: weight dtype", dtype=True)
    device: str = option("auto", "where to measure", device=True)
    threads: int | None = threads_option()
    quick: bool = option(False, "shorter measurements (less precise)")
    profile: str | None = option(None, "read calibrated efficiencies from a saved profile (e.g. train_efficiency)")
    save: str | None = option(None, "save the measured profile (and train efficiency) for `corelm plan --profile`",
                              metavar="JSON")
    json: bool = option(False, "print one JSON object")


def build_parser() -> argparse.ArgumentParser:
    return parser_from(
        BenchOptions, prog="corelm bench",
        description="Measure this machine (matmul FLOP/s per dtype, memory bandwidth), run real corelm "
                    "training steps or decoding, and print predicted vs measured peak memory, step time "
                    "and tokens/s with the error.")


def _say(msg: str) -> None:
    print(f"… {msg}", file=sys.stderr, flush=True)


def _err(pred: float, meas: float) -> str:
    return f"{(pred / meas - 1) * 100:+.1f}%" if meas else "n/a"


def _bytes(x: float) -> str:
    return f"{x / 2**20:,.0f} MiB" if x < GiB else f"{x / GiB:.2f} GiB"


def run_train(args: BenchOptions, device: str, profile: dict | None) -> dict:
    from corelm.loading import config_for
    from corelm.plan import bench as B
    from corelm.plan import formulas as F
    from corelm.plan.hardware import cpu_row, get_hardware

    cfg = config_for(args.model or ("gpt2-tiny" if not args.config else None), args.config)
    if cfg.is_encoder:
        raise CorelmError("--train benchmarks decoders (causal LM); pick a gpt2/llama model")
    for name in ("batch", "seq_len", "steps"):
        if getattr(args, name) < 1:
            raise CorelmError(f"--{name.replace('_', '-')} must be >= 1")
    if args.seq_len > cfg.max_seq_len:
        raise CorelmError(f"--seq-len {args.seq_len} exceeds {cfg.name}'s context of {cfg.max_seq_len}")
    precision = args.precision or ("fp32" if device == "cpu" else "bf16-mixed")
    F.check_precision(precision)
    # Refuse before step 1 what the planner says cannot fit (a shared machine must not be pushed into swap/OOM).
    need = B.predict_train(cfg, cpu_row(), batch=args.batch, seq_len=args.seq_len, precision=precision)["peak_bytes"]
    have = B.available_memory_bytes(device)
    if need > 0.8 * have:
        raise CorelmError(f"the planner predicts {need / GiB:.1f} GiB for this step but only {have / GiB:.1f} GiB "
                          f"is available on {device}; lower --batch or --seq-len")
    _say(f"training {cfg.name}: {args.steps} steps of batch {args.batch} × {args.seq_len} ({precision}) "
         f"in a fresh process")
    m = B.measure_train(cfg, batch=args.batch, seq_len=args.seq_len, steps=args.steps, precision=precision,
                        device=device, progress=_say)
    cpu = device == "cpu"
    # The machine as measured between the steps: matmul rate (CPU-time based on CPU) and bandwidth.
    peak = statistics.median(m["probe_cpu_flops"] if cpu else m["probe_flops"])
    wall_peak = statistics.median(m["probe_flops"])
    hw = cpu_row() if cpu else get_hardware(B._gpu_id()) if B._gpu_id() != "cpu" else cpu_row()
    compute = ("fp32" if precision == "fp32"
               else {"bf16-mixed": "bf16", "fp16-mixed": "fp16", "bf16-true": "bf16"}[precision])
    hw.peak_tflops = {**hw.peak_tflops, compute: peak / 1e12}
    if profile and profile.get("train_efficiency"):
        hw.train_efficiency = float(profile["train_efficiency"])
    # What the matmul library keeps per GEMM shape on this CPU: measured, then part of the prediction.
    kernel_buffers = B.measure_kernel_buffers(cfg, batch=args.batch, seq_len=args.seq_len, precision=precision,
                                              device=device)
    pred = B.predict_train(cfg, hw, batch=args.batch, seq_len=args.seq_len, precision=precision,
                           kernel_buffers=kernel_buffers)
    steps = m["cpu_step_times"] if cpu else m["step_times"]
    step = statistics.median(steps[1:] if len(steps) > 1 else steps)
    wall = statistics.median(m["step_times"][1:] or m["step_times"])
    hw_flops = F.train_flops_per_token(cfg, args.seq_len) * args.batch * args.seq_len
    return {"model": cfg.name, "params": m["params"], "batch": args.batch, "seq_len": args.seq_len,
            "precision": precision, "device": device,
            "peak_bytes": {"predicted": pred["peak_bytes"], "measured": m["peak_bytes"],
                           "rss_measured": m["rss_peak_bytes"], "components": pred["memory"]},
            "step_s": {"predicted": pred["step_s"], "measured": step, "wall_measured": wall,
                       "timing": "cpu-seconds per thread" if cpu else "wall"},
            "matmul_peak_measured": peak, "train_efficiency_used": hw.train_efficiency,
            # MFU by the one definition (wall clock, as the training loop logs it); the CPU-time view
            # (contention-free) is the efficiency the planner is calibrated with.
            "mfu": F.mfu(F.train_flops_per_token(cfg, args.seq_len), args.batch * args.seq_len / wall, wall_peak),
            "train_efficiency_measured": hw_flops / (step * peak),
            "step_times": m["step_times"], "cpu_step_times": m["cpu_step_times"]}


def run_decode(args: BenchOptions, device: str) -> dict:
    import torch

    import corelm
    from corelm.generate.engine import SamplingParams, generate_stream
    from corelm.generate.step import ModelStep
    from corelm.plan import bench as B

    name = args.model or "smollm2-135m-instruct"
    if args.new_tokens < 2:
        raise CorelmError("--new-tokens must be >= 2")
    _say(f"loading {name}")
    llm = corelm.load(name, dtype=args.dtype, device=device)
    if not hasattr(llm, "generate"):
        raise CorelmError(f"{name} is an encoder; --decode needs a decoder")
    model, cfg = llm.model, llm.model.config
    prompt = list(range(100, 116))
    mid = len(prompt) + args.new_tokens // 2
    _say("predicting: GEMV bandwidth per weight shape, KV-cache read bandwidth, ATen ops per step × overhead")
    with torch.inference_mode():
        step = ModelStep(model)  # the planner models PyTorch's ATen ops: time the model's own forward
        cache = step.new_cache(1, mid + 1)
        step.prefill(cache, [list(range(mid))])
        tok, pos = torch.tensor([1], device=device), torch.tensor([mid], device=device)
        pred = B.predict_decode(model, cfg, mid, lambda: step.decode(cache, tok, pos), device)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    _say("decoding through corelm.generate.engine (one warm-up run, then measured runs)")
    for _ in generate_stream(model, [prompt], SamplingParams(max_new_tokens=4, ignore_eos=True)):
        pass
    runs = []
    for _ in range(2 if args.quick else 3):
        stamps = []
        for _step in generate_stream(model, [prompt], params):
            stamps.append((time.perf_counter(), time.process_time()))
        n = len(stamps) - 1  # tokens after the first (which the prefill produced)
        wall = (stamps[-1][0] - stamps[0][0]) / n
        cpu_s = (stamps[-1][1] - stamps[0][1]) / torch.get_num_threads() / n
        runs.append((wall, cpu_s))
    cpu = device == "cpu"
    per_token = statistics.median(r[1] if cpu else r[0] for r in runs)
    return {"model": name, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "device": device, "threads": torch.get_num_threads(), "bytes_per_token": pred["bytes_per_token"],
            "prediction": pred,
            "tokens_per_s": {"predicted": pred["tokens_per_s"], "measured": 1 / per_token,
                             "bandwidth_bound": pred["bandwidth_bound_tokens_per_s"],
                             "wall_measured": 1 / statistics.median(r[0] for r in runs),
                             "timing": "cpu-seconds per thread" if cpu else "wall"},
            "achieved_bandwidth": pred["bytes_per_token"] / per_token}


def bench(options: BenchOptions) -> dict:
    """The measurements: ``machine`` (matmul FLOP/s per dtype, bandwidth; unless only --train/--decode run),
    ``train`` and ``decode`` (predicted vs measured); with ``save``, the profile is written too."""
    import torch

    from corelm.plan import bench as B
    from corelm.plan.hardware import load_profile

    device = options.device if options.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    set_threads(options.threads)
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise CorelmError(f"unknown device {device!r}; expected cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CorelmError("--device cuda: no CUDA device is visible to torch")
    given = load_profile(options.profile) if options.profile else None
    out: dict = {}
    if not (options.train or options.decode) or options.save:
        out["machine"] = B.measure_profile(device, quick=options.quick, progress=_say)
        if device == "cpu":
            out["kernels"] = _kernels()
    if options.train:
        out["train"] = run_train(options, device, given)
    if options.decode:
        out["decode"] = run_decode(options, device)
    if options.save:
        prof = dict(out["machine"])
        if "train" in out:
            prof["train_efficiency"] = out["train"]["train_efficiency_measured"]
            prof["train_efficiency_model"] = out["train"]["model"]
        if "decode" in out:  # what a decode step's GEMVs stream, as a fraction of the read bandwidth
            pr = out["decode"]["prediction"]
            prof["bandwidth_efficiency"] = min(1.0, pr["gemv_bandwidth"] / prof["bandwidth_bytes_s"])
        B.save_profile(prof, options.save)
    return out


def _kernels() -> dict:
    """Which build of corelm's C++ kernels this CPU runs, its many-token GEMM and its decode prefetch; on a
    CPU that declares AMX, also the verdict of the tile check (:func:`corelm.kernels.amx_verdict`)."""
    import torch

    from corelm import kernels

    if not kernels.load(build_if_missing=False):
        return {"build": None, "why": kernels.load_error()}
    out = {"build": kernels.isa(), "panel_gemm": torch.ops.corelm.gemm(), "prefetch_bytes": kernels.prefetch()}
    if kernels.amx_declared():
        out["amx"] = kernels.amx_verdict()
    return out


def main(argv: list[str]) -> int:
    args = options_from(BenchOptions, build_parser().parse_args(argv))
    out = bench(args)
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    print(render(out))
    if args.save:
        hw = out.get("machine", {}).get("hardware", "cpu")
        print(f"\nprofile saved to {args.save} (use: corelm plan --profile {args.save} --hardware {hw} ...)")
    return 0


def render(out: dict) -> str:
    lines = []
    if "machine" in out:
        m = out["machine"]
        lines.append(f"machine: {m['name']}, torch {m['torch']}")
        for dt, f in m["matmul_flops"].items():
            n = m.get("matmul_sizes", {}).get(dt, m["matmul_size"])
            note = "   (no fast kernel: measured small)" if n != m["matmul_size"] else ""
            lines.append(f"  matmul {dt:<5} {n:>4}×{n:<4}   {f / 1e9:10,.1f} GFLOP/s{note}")
        lines.append(f"  read bandwidth          {m['bandwidth_bytes_s'] / 1e9:10,.1f} GB/s")
    if "kernels" in out:
        k = out["kernels"]
        if k["build"]:
            lines.append(f"  corelm kernels: {k['build']} build, panel GEMM {k['panel_gemm']}, decode prefetch "
                         f"{k['prefetch_bytes']} bytes ahead")
            if "amx" in k:
                lines.append(f"  AMX tiles: {'on' if k['amx']['ok'] else 'off'} ({k['amx']['reason']})")
        else:
            lines.append(f"  corelm kernels: not loaded ({k['why']})")
    if "train" in out:
        t = out["train"]
        pb, st = t["peak_bytes"], t["step_s"]
        lines += ["", (f"train {t['model']} ({t['params'] / 1e6:.1f}M params), batch {t['batch']} × {t['seq_len']}, "
                      f"{t['precision']}, {t['device']}"),
                  f"  {'':<22}{'predicted':>12}{'measured':>12}{'error':>9}",
                  (f"  {'peak memory':<22}{_bytes(pb['predicted']):>12}{_bytes(pb['measured']):>12}"
                  f"{_err(pb['predicted'], pb['measured']):>9}   (live bytes, of which matmul library buffers "
                  f"{_bytes(pb['components'].get('kernel_buffers', 0))}; RSS high-water "
                  f"{_bytes(pb['rss_measured'])})"),
                  (f"  {'step time':<22}{st['predicted']:>11.3f}s{st['measured']:>11.3f}s"
                  f"{_err(st['predicted'], st['measured']):>9}   ({st['timing']}; wall {st['wall_measured']:.3f} s)"),
                  (f"  matmul peak measured between steps: {t['matmul_peak_measured'] / 1e9:,.1f} GFLOP/s; "
                  f"efficiency used {t['train_efficiency_used']:.2f}, measured {t['train_efficiency_measured']:.2f}; "
                  f"MFU {t['mfu']:.0%}")]
    if "decode" in out:
        d = out["decode"]
        tk, pr = d["tokens_per_s"], d["prediction"]
        lines += ["", (f"decode {d['model']} ({d['dtype']}, {d['device']}, {d['threads']} threads): "
                      f"{d['bytes_per_token'] / 1e6:,.1f} MB read per token"),
                  f"  {'':<22}{'predicted':>12}{'measured':>12}{'error':>9}",
                  (f"  {'tokens/s':<22}{tk['predicted']:>12,.1f}{tk['measured']:>12,.1f}"
                  f"{_err(tk['predicted'], tk['measured']):>9}   "
                  f"({tk['timing']}; wall {tk['wall_measured']:.1f} tok/s)"),
                  (f"  model per token: weights {pr['weights_s'] * 1e3:.1f} ms at the measured GEMV bandwidth "
                  f"{pr['gemv_bandwidth'] / 1e9:.1f} GB/s + KV {pr['kv_s'] * 1e3:.2f} ms + {pr['aten_ops']} ATen ops × "
                  f"{pr['op_overhead_s'] * 1e6:.1f} µs = {pr['overhead_s'] * 1e3:.1f} ms"),
                  (f"  pure bandwidth bound (read {pr['read_bandwidth'] / 1e9:.1f} GB/s): "
                  f"{tk['bandwidth_bound']:,.1f} tok/s; achieved by decode {d['achieved_bandwidth'] / 1e9:.1f} GB/s")]
    return "\n".join(lines)
