"""Planner vs measurement on this machine: peak memory and step time of real corelm training steps
(forward + backward + AdamW through corelm.train.loop) for several model sizes, and decode tokens/s.

Each size runs in a fresh subprocess (peak memory is per process). Memory: live bytes from glibc's
allocator (mallinfo2, sampled) — the CPU analogue of torch.cuda.max_memory_allocated — with the RSS
high-water mark next to it. Time: CPU-seconds per thread (the machine is shared; the wall clock
measures the neighbours), with the matmul peak probed the same way between the steps.

The step-time model is FLOPs ÷ (measured matmul peak × train_efficiency). train_efficiency is a
parameter: it is *calibrated on one model* (the first size) and the others are predictions.

    .venv/bin/python benchmarks/plan_calibration.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from corelm.config import ModelConfig
from corelm.plan import bench as B
from corelm.plan import formulas as F
from corelm.plan.hardware import cpu_row


def sizes(quick: bool) -> list[ModelConfig]:
    shapes = [("gpt2", 6, 384), ("gpt2", 4, 256), ("gpt2", 8, 512), ("llama", 6, 384), ("gpt2", 12, 768)]
    if quick:
        shapes = shapes[:4]
    out = []
    for fam, n_layer, d in shapes:
        extra = {"d_ff": 1024, "n_kv_head": 2} if fam == "llama" else {}
        out.append(ModelConfig(family=fam, name=f"{fam}-{n_layer}x{d}", vocab_size=8192, n_layer=n_layer,
                               n_head=d // 64, d_model=d, max_seq_len=256, **extra))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 sizes instead of 5")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per worker (1: CPU time is pure work; several threads spin-wait "
                         "at barriers when a shared machine deschedules one of them)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {B.machine_name()}, torch {torch.__version__}", flush=True)
    rows, efficiency = [], None
    for cfg in sizes(args.quick):
        m = B.measure_train(cfg, batch=args.batch, seq_len=args.seq_len, steps=args.steps, threads=args.threads)
        peak = statistics.median(m["probe_cpu_flops"])
        step = statistics.median(m["cpu_step_times"][1:])
        hw_flops = F.train_flops_per_token(cfg, args.seq_len) * args.batch * args.seq_len
        measured_eff = hw_flops / (step * peak)
        if efficiency is None:
            efficiency = measured_eff  # calibrate on the first size
        hw = cpu_row()
        hw.peak_tflops = {"fp32": peak / 1e12}
        hw.train_efficiency = efficiency
        kernel_buffers = B.measure_kernel_buffers(cfg, batch=args.batch, seq_len=args.seq_len, threads=args.threads)
        pred = B.predict_train(cfg, hw, batch=args.batch, seq_len=args.seq_len, kernel_buffers=kernel_buffers)
        row = {"model": cfg.name, "params": m["params"], "mem_pred": pred["peak_bytes"], "mem_live": m["peak_bytes"],
               "mem_rss": m["rss_peak_bytes"], "step_pred": pred["step_s"], "step_meas": step,
               "step_wall": statistics.median(m["step_times"][1:]), "peak_flops": peak,
               "efficiency": measured_eff, "calibration": len(rows) == 0}
        rows.append(row)
        print(f"{cfg.name:<12} {m['params'] / 1e6:5.1f}M  memory pred {pred['peak_bytes'] / 2**20:7.0f} MiB  "
              f"live {m['peak_bytes'] / 2**20:7.0f} MiB ({(pred['peak_bytes'] / m['peak_bytes'] - 1) * 100:+5.1f}%)  "
              f"RSS {m['rss_peak_bytes'] / 2**20:7.0f} MiB "
              f"({(pred['peak_bytes'] / m['rss_peak_bytes'] - 1) * 100:+5.1f}%)  "
              f"step pred {pred['step_s']:6.2f}s meas {step:6.2f}s ({(pred['step_s'] / step - 1) * 100:+5.1f}%)"
              f"{' [calibration]' if row['calibration'] else ''}  wall {row['step_wall']:.2f}s  "
              f"peak {peak / 1e9:.0f} GFLOP/s  efficiency {measured_eff:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
