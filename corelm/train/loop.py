"""THE training loop of corelm: pretraining, fine-tuning and distillation all run through :func:`train`.

What differs between those is only *setup*: the model, the batches, which parameters have
``requires_grad``, which transforms were applied to the model, and the loss function. The loop owns
everything else: AdamW with decoupled weight decay, warmup + cosine schedule, gradient accumulation and
clipping, the precision policy, activation checkpointing, ``torch.compile``, DDP/FSDP/TP/PP, evaluation,
throughput/MFU, tracking, atomic checkpoints, exact resume, SIGINT/SIGTERM and non-finite steps.

How a caller plugs in (a fine-tuning method, say)::

    from corelm.train import TrainConfig, ResumableLoader, train

    model = build_model(config)                      # or load pretrained weights
    apply_lora(model, targets=["q_proj", "v_proj"])  # any transform, applied before train()
    for name, p in model.named_parameters():         # select what trains: requires_grad
        p.requires_grad = "lora_" in name

    batches = ResumableLoader(train_set, batch_size=8, collate=my_collate, seed=cfg.seed)

    def loss_fn(model, batch):                        # model may be a DDP/compiled wrapper: call model(...)
        logits = model(batch["input_ids"])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)
        return loss, {"n_tokens": int((batch["labels"] != -100).sum()), "acc": ...}   # or just an int

    def eval_fn(model):                               # optional: called under no_grad in eval mode
        return {"val_loss": ..., "val_acc": ...}

    result = train(model, loss_fn, batches, TrainConfig(max_steps=300, lr=2e-4, out="runs/lora"),
                   eval_fn=eval_fn,
                   export_fn=lambda state, out_dir: save_adapter(state, out_dir),  # what a checkpoint holds
                   extra_state=label_maps)            # anything with state_dict()/load_state_dict()

``loss_fn`` returns the mean loss of the micro-batch and either the number of tokens (or examples) it
covers or a dict of metrics that may hold ``n_tokens``; other numeric metrics are averaged and logged.
Micro-batch losses are averaged (each divided by ``grad_accum``), so keep micro-batches equal-sized.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from corelm.commands.args import PRECISION_HELP, TRACKER_HELP, resolve_trackers
from corelm.cpu import keep_freed_memory
from corelm.errors import CorelmError
from corelm.plan.formulas import mfu
from corelm.train.checkpoint import ExportFn, latest_checkpoint, load_checkpoint, save_checkpoint
from corelm.train.distributed import DistInfo, all_reduce_mean, apply_ddp, apply_fsdp, find_blocks
from corelm.train.loss_info import split_loss_info
from corelm.train.optim import build_optimizer, lr_factor, set_lr
from corelm.train.precision import Precision
from corelm.train.tracking import Tracker, measure_matmul_peak

OPTIMIZERS = ("adamw", "sgd")
PARALLEL = ("none", "ddp", "fsdp", "tp", "pp", "fsdp+tp", "pp+tp")  # the last four: corelm.train.parallel
LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, "int | dict[str, Any]"]]


class Batches(Protocol):
    """An endless batch iterator whose position can be saved (see :class:`ResumableLoader`)."""

    def __next__(self) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainConfig:
    """Run arguments of the loop. Each field's ``metadata["help"]`` is its ``--help`` text."""

    max_steps: int = field(default=100, metadata={"help": "optimizer steps to run (the schedule's length)"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate, reached after warmup"})
    min_lr_ratio: float = field(
        default=0.1, metadata={"help": "cosine decays the learning rate to this fraction of the peak"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warmup steps"})
    optimizer: str = field(
        default="adamw", metadata={"help": "adamw | sgd (SGD with momentum; its weight decay is an L2 term)"})
    momentum: float = field(default=0.9, metadata={"help": "sgd: heavy-ball momentum coefficient"})
    weight_decay: float = field(
        default=0.1, metadata={"help": "decoupled AdamW decay on matrices (not norms/biases/embeddings)"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW first-moment decay"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW second-moment decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this (0: no clipping)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    precision: str = field(default="fp32", metadata={"help": PRECISION_HELP})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    activation_checkpointing: bool = field(
        default=False, metadata={"help": "recompute block activations in backward to save memory"})
    parallel: str = field(
        default="none", metadata={"help": "none | ddp | fsdp | tp | pp | fsdp+tp | pp+tp (launch with torchrun)"})
    tp_size: int = field(
        default=2, metadata={"help": "fsdp+tp, pp+tp: processes per tensor-parallel group (tp and pp use every "
                                     "process)"})
    sequence_parallel: bool = field(
        default=False, metadata={"help": "tp, fsdp+tp: also split norms and residual stream along the sequence"})
    pp_microbatches: int = field(default=0, metadata={"help": "pp: micro-batches per batch (0: one per stage)"})
    pp_schedule: str = field(default="1f1b", metadata={"help": "pp: gpipe | 1f1b"})
    eval_every: int = field(default=0, metadata={"help": "evaluate every N steps (0: only at the end)"})
    log_every: int = field(default=1, metadata={"help": "write metrics every N steps"})
    save_every: int = field(
        default=0, metadata={"help": "checkpoint every N steps (0: only at the end / on interrupt)"})
    keep_last: int = field(default=3, metadata={"help": "checkpoints kept on disk"})
    seed: int = field(default=0, metadata={"help": "seed of every RNG the loop draws from"})
    max_bad_steps: int = field(default=5, metadata={"help": "stop after this many consecutive non-finite losses"})
    out: str | None = field(
        default=None, metadata={"help": "run directory (checkpoints, metrics.jsonl, tensorboard/, loss.png)"})
    resume: str | None = field(default=None, metadata={"help": "run or checkpoint directory to continue from"})
    progress: bool = field(default=True, metadata={"help": "live progress bar"})
    tracker: list[str] | None = field(default=None, metadata={"help": TRACKER_HELP})
    tensorboard: bool = field(default=True, metadata={"help": "write TensorBoard event files"})
    wandb: str | None = field(
        default=None, metadata={"help": "also log to this Weights & Biases project (optional package; rank 0): "
                                        "--tracker wandb logs to project corelm"})
    measure_mfu: bool = field(default=True, metadata={"help": "measure this device's matmul peak once and log MFU"})

    def __post_init__(self) -> None:
        if self.max_steps <= 0 or self.grad_accum <= 0:
            raise CorelmError("max_steps and grad_accum must be positive")
        if self.parallel not in PARALLEL:
            raise CorelmError(f"unknown parallelism {self.parallel!r}; expected {', '.join(PARALLEL[:-1])} or "
                              f"{PARALLEL[-1]}")
        if self.optimizer not in OPTIMIZERS:
            raise CorelmError(f"unknown optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        if not 0.0 <= self.momentum < 1.0:
            raise CorelmError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.pp_schedule not in ("gpipe", "1f1b"):
            raise CorelmError(f"unknown pipeline schedule {self.pp_schedule!r}; expected gpipe or 1f1b")
        Precision(self.precision)  # validates the policy name
        self.tracker = resolve_trackers(self.tracker, tensorboard=self.tensorboard, wandb=self.wandb)


@dataclass
class TrainResult:
    """What a run did: the final step, the losses it logged, why it stopped."""

    step: int
    losses: list[tuple[int, float]] = field(default_factory=list)
    skipped_steps: int = 0
    stopped: str = "done"           # done | interrupted
    checkpoint: Path | None = None
    last_metrics: dict[str, Any] = field(default_factory=dict)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each Transformer block's activations during backward instead of storing them.

    Memory for activations drops from one set per layer to one per block boundary, at the cost of a
    second forward (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"). The block's
    ``forward`` is wrapped on the instance, so parameter names and the state dict are unchanged.
    """
    from torch.utils.checkpoint import checkpoint

    for block in find_blocks(model):
        original = type(block).forward.__get__(block)

        @functools.wraps(original)
        def forward(*args: Any, _f: Callable = original, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _f(*args, **kwargs)
            return checkpoint(_f, *args, use_reentrant=False, **kwargs)

        block.forward = forward
    return model


def apply_compile(model: nn.Module) -> nn.Module:
    """``torch.compile`` the model; returns the compiled wrapper (save the original module, not this)."""
    return torch.compile(model)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step boundary and returns."""

    def __init__(self) -> None:
        self.raised = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:  # noqa: PYI034
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.raised and signum == signal.SIGINT:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.raised = True

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# C901: the one training loop, phase by phase as STYLE.md orders them (transforms, resume, accumulate,
# step, log, evaluate, checkpoint); its helpers are the phases that stand alone
def train(  # noqa: C901
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches | Iterator,
    config: TrainConfig,
    *,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    export_fn: ExportFn | None = None,
    extra_state: Stateful | None = None,
    optimizer_fn: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    flops_per_token: float | None = None,
    dist: DistInfo | None = None,
    run_config: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` for ``config.max_steps`` optimizer steps.

    Args:
        model: a single-device model; parameters with ``requires_grad=False`` stay frozen. It is cast to
            the precision policy, moved to the device and transformed (activation checkpointing, DDP/FSDP/TP/PP,
            compile) here, in that order; after the call it holds the trained weights.
        loss_fn: ``loss_fn(model, batch) -> (mean loss, n_tokens | metrics dict)``; runs under autocast.
            Under ``parallel="pp"`` it must call ``model(...)`` once, on rows of the batch, and compute the
            loss from its output: the last stage runs it once per micro-batch (``corelm.train.parallel``).
        batches: endless iterator of batches (CPU tensors are moved to the device); if it has
            ``state_dict``/``load_state_dict`` its position is checkpointed and restored.
        config: the run arguments.
        eval_fn: ``eval_fn(model) -> {"val_loss": ...}`` run every ``eval_every`` steps and at the end
            (eval mode, no grad, autocast). ``val_ppl`` is added when ``val_loss`` is returned.
        export_fn: ``export_fn(full_state_dict, out_dir)`` writes the loadable model files of a
            checkpoint (default: ``model.safetensors`` with the model's names).
        extra_state: anything with ``state_dict()``/``load_state_dict()`` (JSON-able) to save and restore.
        optimizer_fn: builds the optimizer from the (sharded) model; default ``config.optimizer`` (AdamW or
            SGD with momentum) over trainable params.
        flops_per_token: training FLOPs per token, for MFU (``corelm.plan.formulas.train_flops_per_token``).
        dist: the process group position (``init_distributed()``); single process if ``None``.
        run_config: the resolved run configuration (model config, data, ...) saved with each checkpoint.

    Returns:
        A :class:`TrainResult`. Raises :class:`CorelmError` when losses stay non-finite.
    """
    info = dist or DistInfo()
    cfg = config
    if cfg.parallel != "none" and not info.distributed:
        raise CorelmError(f"--parallel {cfg.parallel} needs several processes: launch with "
                          f"torchrun --nproc-per-node N -m corelm ...")
    precision = Precision(cfg.precision, info.device.type)
    if info.device.type == "cpu":
        keep_freed_memory()  # no page faults on the step's large tensors (corelm.cpu.keep_freed_memory)
    # one seed per data-parallel replica: the ranks of a TP group must draw the same dropout masks on the
    # activations they all hold
    dp_rank = info.rank
    if cfg.parallel in ("tp", "pp", "fsdp+tp", "pp+tp"):
        from corelm.train.parallel import data_parallel

        dp_rank = data_parallel(cfg.parallel, info.rank, info.world_size, cfg.tp_size)[0]
    torch.manual_seed(cfg.seed + dp_rank)

    # Transforms, in a fixed order (as torchtitan): dtype, device, activation checkpointing,
    # parallelism, then compile; `model` stays the unwrapped module whose names we save.
    precision.apply(model)
    model.to(info.device)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    wrapped, pipeline, dp_size = model, None, info.world_size
    if cfg.parallel == "ddp":
        wrapped = apply_ddp(model, info)
    elif cfg.parallel == "fsdp":
        wrapped = apply_fsdp(model, info)
    elif cfg.parallel in ("tp", "pp", "fsdp+tp", "pp+tp"):  # corelm.train.parallel: TP, then FSDP on dp or PP
        from corelm.train.parallel import data_parallel, parallelize

        pipeline = parallelize(model, cfg.parallel, info.world_size, info.device, tp_size=cfg.tp_size,
                               sequence_parallel=cfg.sequence_parallel, pp_microbatches=cfg.pp_microbatches,
                               pp_schedule=cfg.pp_schedule)
        # processes that read different batches (the ranks of one TP group or pipeline read the same ones)
        dp_size = data_parallel(cfg.parallel, info.rank, info.world_size, cfg.tp_size)[1]
    if pipeline is not None and (cfg.precision == "fp16-mixed" or cfg.compile):
        raise CorelmError(f"--parallel {cfg.parallel} does not combine with fp16-mixed or --compile")
    optimizer = optimizer_fn(model) if optimizer_fn else build_optimizer(
        model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), kind=cfg.optimizer, momentum=cfg.momentum)
    scaler = precision.grad_scaler()
    forward_model = apply_compile(wrapped) if cfg.compile else wrapped
    params = [p for p in model.parameters() if p.requires_grad]

    step, skipped, bad_streak, tokens_seen = 0, 0, 0, 0
    if cfg.resume:
        ckpt = latest_checkpoint(cfg.resume)
        if ckpt is None:
            raise CorelmError(f"--resume {cfg.resume}: no complete checkpoint found")
        state = load_checkpoint(ckpt, model=model, optimizer=optimizer, scaler=scaler, rank=info.rank,
                                world_size=info.world_size)
        step, skipped = state["step"], state.get("skipped_steps", 0)
        tokens_seen = state.get("tokens_seen", 0)
        try:
            if hasattr(batches, "load_state_dict") and "data" in state:
                batches.load_state_dict(state["data"])
            if extra_state is not None and "extra" in state:
                extra_state.load_state_dict(state["extra"])
        except (AttributeError, KeyError, TypeError, ValueError) as exc:  # state.json is JSON, not trusted
            raise CorelmError(f"checkpoint {ckpt} is corrupt: the data position or extra state in its "
                              f"state.json cannot be restored ({' '.join(str(exc).split())})") from None
        if info.is_main:
            print(f"resumed from {ckpt} at step {step}", flush=True)

    def trainer_state() -> dict[str, Any]:
        return {
            "skipped_steps": skipped, "tokens_seen": tokens_seen,
            "data": batches.state_dict() if hasattr(batches, "state_dict") else None,
            "extra": extra_state.state_dict() if extra_state is not None else None,
            "train_config": dataclasses.asdict(cfg), "run_config": run_config or {},
            "world_size": info.world_size,
        }

    def checkpoint() -> Path | None:
        if not cfg.out:
            return None
        if pipeline is not None:  # rank 0 saves the whole model and optimizer state
            pipeline.sync(optimizer)
        return save_checkpoint(cfg.out, step, model=model, optimizer=optimizer, state=trainer_state(),
                               scaler=scaler, export_fn=export_fn, keep_last=cfg.keep_last, rank=info.rank,
                               world_size=info.world_size)

    tracker = Tracker(cfg.out, cfg.max_steps, start_step=step, enabled=info.is_main, progress=cfg.progress,
                      tensorboard="tensorboard" in cfg.tracker, csv="csv" in cfg.tracker,
                      wandb=(cfg.wandb or "corelm") if "wandb" in cfg.tracker else None,
                      config={**dataclasses.asdict(cfg), "run": run_config or {}})
    if precision.note():
        tracker.write(precision.note())
    restore_matmul = precision.set_matmul_mode()  # tf32 on CUDA: for this run only
    result = TrainResult(step=step, skipped_steps=skipped)
    is_ddp = cfg.parallel == "ddp"
    is_fsdp = cfg.parallel in ("fsdp", "fsdp+tp")
    last_saved = step if cfg.resume else -1

    def run_eval() -> dict[str, float]:
        if eval_fn is None:
            return {}
        if pipeline is not None:  # every rank evaluates the whole model
            pipeline.sync()
        model.eval()
        with torch.no_grad(), precision.autocast():
            metrics = dict(eval_fn(forward_model))
        model.train()
        if "val_loss" in metrics:
            metrics["val_ppl"] = math.exp(min(float(metrics["val_loss"]), 50.0))
        return metrics

    try:
        peak = measure_matmul_peak(precision.compute_dtype, device=info.device.type) if (
            cfg.measure_mfu and flops_per_token) else None
        with _StopFlag() as stop:
            model.train()
            while step < cfg.max_steps:
                lr = set_lr(optimizer, lr_factor(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
                t0 = time.perf_counter()
                loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)
                n_tokens, sums = 0, {}
                for micro in range(cfg.grad_accum):
                    batch = to_device(next(batches), info.device)
                    sync = micro == cfg.grad_accum - 1  # all-reduce gradients only on the last micro-batch
                    no_sync = wrapped.no_sync() if is_ddp and not sync else contextlib.nullcontext()
                    if is_fsdp:
                        model.set_requires_gradient_sync(sync)
                    with no_sync:
                        if pipeline is not None:  # the schedule runs forward and backward of each micro-batch
                            with precision.autocast():
                                loss, extra = pipeline.step(loss_fn, batch, cfg.grad_accum)
                        else:
                            with precision.autocast():
                                loss, extra = loss_fn(forward_model, batch)
                            scaled = loss / cfg.grad_accum
                            (scaler.scale(scaled) if scaler else scaled).backward()
                    n, metrics = split_loss_info(extra, batch)
                    n_tokens += n
                    for k, v in metrics.items():
                        sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
                    loss_sum += loss.detach().double()
                mean_loss = float(all_reduce_mean(loss_sum / cfg.grad_accum, info))

                if scaler is not None:
                    scaler.unscale_(optimizer)
                clip = pipeline.clip_grad_norm_ if pipeline is not None else torch.nn.utils.clip_grad_norm_
                gnorm = clip(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                if hasattr(gnorm, "full_tensor"):  # FSDP2: the norm is a DTensor
                    gnorm = gnorm.full_tensor()
                gnorm = float(gnorm)
                finite = math.isfinite(mean_loss) and math.isfinite(gnorm)
                if scaler is not None:
                    scaler.step(optimizer)  # skips the update itself when gradients overflowed
                    scaler.update()
                elif finite:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens_seen += n_tokens * dp_size
                if not finite:
                    skipped += 1
                    bad_streak = bad_streak + 1 if not math.isfinite(mean_loss) else 0
                    tracker.write(f"step {step}: non-finite {'loss' if not math.isfinite(mean_loss) else 'gradient'}"
                                  f" (loss={mean_loss}, grad_norm={gnorm}); update skipped ({skipped} so far)")
                    if bad_streak >= cfg.max_bad_steps:
                        raise CorelmError(f"stopped at step {step}: the loss was non-finite {bad_streak} steps in "
                                          "a row (lower --lr, use bf16-mixed instead of fp16, or check the data); "
                                          "the last good checkpoint is untouched")
                else:
                    bad_streak = 0

                dt = time.perf_counter() - t0
                tps = n_tokens / dt
                record: dict[str, Any] = {"loss": mean_loss, "lr": lr, "grad_norm": gnorm,
                                          "tokens_per_s": tps * dp_size, "step_time_s": dt,
                                          "tokens": tokens_seen, **sums}
                if peak and flops_per_token:
                    record["mfu"] = mfu(flops_per_token, tps, peak)
                if not finite:
                    record["skipped"] = 1
                if scaler is not None:
                    record["loss_scale"] = float(scaler.get_scale())
                result.losses.append((step, mean_loss))
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                    record.update(run_eval())
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    tracker.log(step, record)
                tracker.progress(step, {"loss": mean_loss, "tok/s": round(tps * dp_size),
                                        **({"val": record["val_loss"]} if "val_loss" in record else {})})
                result.last_metrics = record

                stop_now = stop.raised
                if info.distributed:  # every rank must agree to stop at the same step
                    stop_now = bool(all_reduce_mean(torch.tensor(float(stop_now)), info) > 0)
                if stop_now:
                    result.checkpoint = checkpoint()
                    last_saved = step
                    result.stopped = "interrupted"
                    tracker.write(f"interrupted at step {step}; checkpoint written"
                                  + (f" to {result.checkpoint}" if result.checkpoint else ""))
                    break
                if cfg.save_every and step % cfg.save_every == 0:
                    result.checkpoint = checkpoint()
                    last_saved = step

            if result.stopped == "done":
                final = run_eval()
                if final:
                    tracker.log(step, final)
                    tracker.write("eval: " + ", ".join(f"{k}={v:.4g}" for k, v in final.items()))
                    result.last_metrics.update(final)
                if last_saved != step:
                    result.checkpoint = checkpoint()
    finally:
        tracker.close()
        restore_matmul()
    result.step, result.skipped_steps = step, skipped
    return result


def evaluate_loss(model: nn.Module, loss_fn: LossFn, make_batches: Callable[[], Iterator], n_batches: int,
                  dist: DistInfo | None = None) -> dict[str, float]:
    """Mean loss over the first ``n_batches`` of a fresh iterator (token-weighted, averaged over ranks).

    Use inside an ``eval_fn``: ``eval_fn = lambda m: evaluate_loss(m, loss_fn, make_val_batches, 20)``.
    """
    info = dist or DistInfo()
    total, count = torch.zeros((), dtype=torch.float64), 0
    it = make_batches()
    for _ in range(n_batches):
        try:
            batch = to_device(next(it), info.device)
        except StopIteration:
            break
        loss, extra = loss_fn(model, batch)
        n, _ = split_loss_info(extra, batch)
        total += loss.detach().double().cpu() * n
        count += n
    stats = all_reduce_mean(torch.tensor([float(total), float(count)], dtype=torch.float64), info)
    return {"val_loss": float(stats[0] / max(stats[1], 1e-12))}
