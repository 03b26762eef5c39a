"""Tensor parallelism (TP x 2) against data parallelism (DDP x 2) on CPU with gloo: step time of the same
global batch, alternating launches (DDP, TP, DDP, TP, ...), median per layout.

What this measures is gloo on one machine, not NVLink: gloo moves tensors through shared memory and TCP
loopback with CPU copies, and on a 2-core machine the two processes also share the cores. DDP all-reduces the
gradients once per step (overlapped with backward in buckets); TP all-reduces the (B, T, d) activations twice
per block in forward and twice in backward, and each of its processes runs the whole batch on half of every
matrix. So TP is expected to lose here; it exists for models whose weights do not fit one device.

    python benchmarks/parallel_cpu.py [--rounds 3] [--steps 10] [--d-model 256] [--layers 4]

Each launch is ``torchrun --nproc-per-node 2`` of this file as a worker, one thread per process; a
single-process run (one thread, the whole batch) is timed in the same rotation for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(mode: str, out: Path, spec: dict) -> None:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from corelm.config import ModelConfig
    from corelm.models import build_model
    from corelm.train.distributed import init_distributed, shutdown_distributed
    from corelm.train.loop import TrainConfig, train

    torch.set_num_threads(1)
    info = init_distributed("cpu") if mode != "none" else None
    rank, world = (info.rank, info.world_size) if info else (0, 1)
    torch.manual_seed(0)
    model = build_model(ModelConfig(family="llama", vocab_size=spec["vocab"], d_model=spec["d_model"],
                                    n_layer=spec["layers"], n_head=8, n_kv_head=8, d_ff=spec["d_model"] * 3,
                                    max_seq_len=spec["seq"]))
    data = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"] + 1), generator=torch.Generator().manual_seed(1))
    rows = data[rank::world] if mode == "ddp" else data  # the same global batch: DDP splits it, TP does not

    class Batches:
        def __next__(self) -> torch.Tensor:
            return rows

    def loss_fn(m, batch):
        logits = m(batch[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()), int(batch[:, 1:].numel())

    cfg = TrainConfig(max_steps=spec["steps"], lr=1e-3, warmup_steps=1, parallel=mode, progress=False,
                      tensorboard=False, measure_mfu=False, out=str(out))
    train(model, loss_fn, Batches(), cfg, dist=info)
    if info:
        shutdown_distributed()


def launch(mode: str, out: Path, spec: dict) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [__file__, "--worker", mode, "--out", str(out), "--spec", json.dumps(spec)]
    cmd = ([sys.executable, *args] if mode == "none" else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args])
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in rows if "step_time_s" in r][2:]  # the first steps warm up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--worker", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--spec", default=None)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, Path(a.out), json.loads(a.spec))
        return
    spec = {"vocab": 4096, "d_model": a.d_model, "layers": a.layers, "batch": a.batch, "seq": a.seq,
            "steps": a.steps}
    import torch

    print(f"llama {a.layers} x {a.d_model}, 8 heads, vocab 4096, global batch {a.batch} x {a.seq}, AdamW fp32; "
          f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}")
    times: dict[str, list[float]] = {"ddp": [], "tp": [], "none": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for mode in ("ddp", "tp", "none"):
                times[mode] += launch(mode, Path(tmp) / f"{mode}{r}", spec)
    print(f"{'layout':<26}{'median step (s)':>16}{'min':>8}{'max':>8}{'tokens/s':>10}")
    names = {"ddp": "DDP x 2 (gloo)", "tp": "TP x 2 (gloo)", "none": "1 process, 1 thread"}
    for mode, ts in times.items():
        med = statistics.median(ts)
        print(f"{names[mode]:<26}{med:>16.3f}{min(ts):>8.3f}{max(ts):>8.3f}{a.batch * a.seq / med:>10,.0f}")
    print(f"TP x 2 / DDP x 2 step time: {statistics.median(times['tp']) / statistics.median(times['ddp']):.2f}x "
          f"(load {os.getloadavg()[0]:.1f} at the end)")


if __name__ == "__main__":
    main()
