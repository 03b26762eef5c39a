"""What a run shows and leaves behind: progress bar, ``metrics.jsonl``, ``resolved_config.json`` (the run's whole
configuration), a loss-curve PNG, and the trackers a run names (``--tracker tensorboard,wandb,csv``): TensorBoard
event files (the configuration as a text entry), a Weights & Biases run (``wandb`` is an optional dependency;
``WANDB_MODE=offline`` logs without an account or a network, for ``wandb sync`` later; the configuration is the
run's config) and ``metrics.csv`` (one ``step,metric,value`` row per number).

MFU (model FLOPs utilisation) is achieved FLOP/s over the *measured* matmul peak of this device;
FLOPs per token come from ``corelm.plan.formulas.train_flops_per_token`` (PaLM appendix B).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from corelm.errors import CorelmError


def measure_matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 0.5,
                        device: str = "cpu") -> float:
    """Achieved FLOP/s of a square matmul on this device: the peak MFU is measured against."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(2):
        a @ b
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def require_wandb() -> Any:
    """The ``wandb`` module, or a one-line :class:`CorelmError` saying how to get it (check before a run starts)."""
    try:
        import wandb
    except ImportError:
        raise CorelmError("--wandb needs the optional wandb package: pip install wandb "
                          "(WANDB_MODE=offline logs without an account)") from None
    return wandb


def scalar_name(key: str) -> str:
    """The name a metric is plotted under: ``val_loss`` -> ``val/loss``, ``loss`` -> ``train/loss``."""
    return key.replace("val_", "val/") if key.startswith("val_") else f"train/{key}"


class Tracker:
    """Logs metrics of one run (rank 0 only; other ranks get a silent tracker).

    Args:
        run_dir: where ``metrics.jsonl``, ``tensorboard/`` and ``loss.png`` go (``None``: print only).
        total_steps: for the progress bar's ETA.
        start_step: the step a resumed run starts from; ``metrics.jsonl`` lines beyond it (written
            after the checkpoint that is being resumed) are dropped so the curve has no duplicates.
        enabled: False on non-zero ranks.
        progress: show a live progress bar.
        tensorboard: write TensorBoard event files.
        wandb: a Weights & Biases project to log the same scalars to (``None``: none). A resumed run
            continues the W&B run whose id is kept in ``run_dir/wandb_run_id.txt``.
        csv: also write ``metrics.csv``, one ``step,metric,value`` row per number.
        config: the run's resolved configuration: written to ``resolved_config.json``, shown by TensorBoard as
            text and by W&B beside the curves.
    """

    def __init__(self, run_dir: str | Path | None, total_steps: int, *, start_step: int = 0, enabled: bool = True,
                 progress: bool = True, tensorboard: bool = True, wandb: str | None = None, csv: bool = False,
                 config: dict[str, Any] | None = None) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir) if run_dir else None
        self._bar = self._tb = self._jsonl = self._wandb = self._csv = None
        if not enabled:
            return
        if self.run_dir:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = _reopen(self.run_dir / "metrics.jsonl", start_step, _jsonl_step)
            if csv:
                self._csv = _reopen(self.run_dir / "metrics.csv", start_step, _csv_step, header="step,metric,value")
            if config is not None:
                text = json.dumps(config, indent=2, default=str)
                (self.run_dir / "resolved_config.json").write_text(text + "\n")
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=start_step + 1)
                except ImportError:  # tensorboard is a declared dependency, but stay usable without it
                    self._tb = None
                if self._tb is not None and config is not None:  # indented: TensorBoard's text tab is markdown
                    self._tb.add_text("config", "    " + text.replace("\n", "\n    "), start_step)
        if wandb:
            self._wandb = _start_wandb(wandb, self.run_dir, config)
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             desc="train")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record one step's metrics (``step`` and ``loss`` at least for training steps)."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        if self._jsonl:
            self._jsonl.write(json.dumps(record) + "\n")
        scalars = {scalar_name(k): v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        if self._csv:
            self._csv.write("".join(f"{step},{k},{v!r}\n" for k, v in record.items()
                                    if k != "step" and isinstance(v, (int, float))))
        if self._tb:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=step)

    def progress(self, step: int, postfix: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)
            self._bar.refresh()

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._jsonl:
            self._jsonl.close()
        if self._csv:
            self._csv.close()
        if self.run_dir:
            plot_loss(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")


def _jsonl_step(line: bytes) -> Any:
    record = json.loads(line)
    return record.get("step", 0) if isinstance(record, dict) else None


def _csv_step(line: bytes) -> Any:
    return int(line.split(b",", 1)[0])


def _reopen(path: Path, start_step: int, step_of: Callable[[bytes], Any], header: str | None = None) -> Any:
    """Open a metrics file for appending, keeping only the lines of steps up to ``start_step`` (a resumed run
    rewrites what came after its checkpoint); a torn, foreign or non-UTF-8 line is dropped, never a crash."""
    kept = [header] if header else []
    if path.is_file():
        for line in path.read_bytes().splitlines():
            try:
                step, text = step_of(line), line.decode()
            except (ValueError, RecursionError):
                continue
            if type(step) is int and step <= start_step:
                kept.append(text)
    path.write_text("".join(k + "\n" for k in kept))
    return open(path, "a", buffering=1)  # closed in Tracker.close()


def _start_wandb(project: str, run_dir: Path | None, config: dict[str, Any] | None) -> Any:
    """A W&B run logging into ``run_dir`` (resumed when the directory names one)."""
    wandb = require_wandb()
    id_file = run_dir / "wandb_run_id.txt" if run_dir else None
    run_id = id_file.read_text().strip() or None if id_file and id_file.is_file() else None
    run = wandb.init(project=project, dir=str(run_dir) if run_dir else None, config=config or {}, id=run_id,
                     resume="allow")
    if id_file:
        id_file.write_text(f"{run.id}\n")
    return run


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def plot_loss(metrics_path: str | Path, out_png: str | Path) -> Path | None:
    """Plot training (and validation) loss from ``metrics.jsonl`` into a PNG; ``None`` if nothing to plot."""
    metrics_path = Path(metrics_path)
    if not metrics_path.is_file():
        return None
    train, val = [], []
    for line in metrics_path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r.get("loss"), (int, float)):
            train.append((r["step"], r["loss"]))
        if isinstance(r.get("val_loss"), (int, float)):
            val.append((r["step"], r["val_loss"]))
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", lw=1.5, ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(out_png).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out_png)
    return Path(out_png)
