"""Plan a training, fine-tuning or serving run: memory per device, time, cost, energy, and a layout.

``plan(cfg, workload, hardware)`` searches the layouts a team would try — precision, tensor-parallel
degree, ZeRO/FSDP stage, activation checkpointing, micro-batch — keeps those that fit the device's
memory, and picks the fastest, with the reason in words. Pure functions of the model config and the
hardware rows (no torch).

Time model (each term is a formula in :mod:`corelm.plan.formulas` or a link bandwidth):
- compute: hardware FLOPs ÷ (devices × peak × ``train_efficiency``); with ``mfu`` given, model FLOPs ÷
  (devices × peak × mfu) — the way published throughput is quoted [PaLM app. B].
- data-parallel gradient traffic: ring all-reduce moves 2(n-1)/n of the gradient bytes; ZeRO-3 adds two
  parameter all-gathers (forward and backward) [ZeRO §7]. Overlapped with the backward pass, so a step
  takes max(compute, traffic).
- tensor parallelism: 4 all-reduces of the (b, s, h) activations per layer per step, not overlapped
  [Korthikanti et al. 2022, §2].
- decode: each step streams the weights and the KV cache: bytes ÷ (bandwidth × efficiency), or the
  FLOPs bound if larger (roofline).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from corelm.config import ModelConfig
from corelm.errors import CorelmError
from corelm.plan import formulas as F
from corelm.plan.hardware import Hardware

TASKS = ("pretrain", "finetune", "infer")
METHODS = ("full", "lora", "qlora", "adapter")
GiB = F.GiB


@dataclass
class Workload:
    """What the user wants to run (each field is a ``corelm plan`` option).

    Attributes:
        task: ``pretrain``, ``finetune`` or ``infer``.
        method: fine-tuning method: ``full``, ``lora``, ``qlora`` (4-bit base) or ``adapter``.
        seq_len: training sequence length in tokens (defaults to the model's context, at most 4096).
        batch: global batch in sequences (training) or concurrent sequences (inference).
        tokens: training tokens for the whole run (default: 20 per parameter, Hoffmann et al. 2022).
        context: tokens held in the KV cache per sequence at inference (prompt + generated).
        new_tokens: tokens generated per sequence at inference (for timing).
        precision: training policy (``fp32``, ``bf16-mixed``, ``fp16-mixed``, ``bf16-true``) or None = choose.
        dtype: inference weight/KV dtype (``bf16``, ``fp16``, ``fp8``, ``int8``, ``int4``, ``fp32``)
            or None = choose.
        optimizer: ``adamw``, ``adamw-8bit``, ``sgd``, ``sgd-nomomentum``.
        zero: ZeRO stage 0-3 or None = choose. tp: tensor-parallel degree or None = choose.
        recompute: activation checkpointing ``none``/``selective``/``full`` or None = choose.
        micro_batch: sequences per device per forward or None = choose.
        lora_rank, lora_targets: LoRA settings; adapter_size: Houlsby bottleneck.
        mfu: measured model-FLOPs utilization to time with instead of the row's efficiency.
        fused_attention: attention kernels that never store the s×s scores (FlashAttention, SDPA).
        fused_norms: norm kernels that save only their input (False: an unfused RMSNorm also saves x̂).
    """

    task: str = "pretrain"
    method: str = "full"
    seq_len: int | None = None
    batch: int | None = None
    tokens: float | None = None
    context: int | None = None
    new_tokens: int = 256
    precision: str | None = None
    dtype: str | None = None
    optimizer: str = "adamw"
    zero: int | None = None
    tp: int | None = None
    recompute: str | None = None
    micro_batch: int | None = None
    lora_rank: int = 16
    lora_targets: str = "all"
    adapter_size: int = 64
    mfu: float | None = None
    fused_attention: bool = True
    fused_norms: bool = True

    def validate(self, cfg: ModelConfig) -> None:
        """Reject impossible settings with one clear sentence each."""
        if self.task not in TASKS:
            raise CorelmError(f"unknown task {self.task!r}; expected one of {', '.join(TASKS)}")
        if self.method not in METHODS:
            raise CorelmError(f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        for name in ("seq_len", "batch", "context", "micro_batch", "new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise CorelmError(f"{name.replace('_', '-')} must be >= 1, got {value}")
        if self.tokens is not None and self.tokens <= 0:
            raise CorelmError(f"tokens must be positive, got {self.tokens:g}")
        if self.mfu is not None and not 0 < self.mfu <= 1:
            raise CorelmError(f"mfu must be in (0, 1], got {self.mfu}")
        if self.tp is not None:
            F.check_tp(cfg, self.tp)
        if self.precision is not None:
            F.check_precision(self.precision)
        if self.dtype is not None and self.dtype not in F.DTYPE_BYTES:
            raise CorelmError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(F.DTYPE_BYTES)}")
        F.check_optimizer(self.optimizer)
        if self.recompute is not None and self.recompute not in F.RECOMPUTE_MODES:
            raise CorelmError(f"unknown recompute {self.recompute!r}; expected {', '.join(F.RECOMPUTE_MODES)}")
        if self.zero is not None and self.zero not in (0, 1, 2, 3):
            raise CorelmError(f"ZeRO stage must be 0, 1, 2 or 3, got {self.zero}")
        if self.seq_len is not None and self.seq_len > cfg.max_seq_len and self.task != "infer":
            raise CorelmError(f"seq-len {self.seq_len} exceeds the model's context of {cfg.max_seq_len} tokens")
        if self.context is not None and self.context > cfg.max_seq_len:
            raise CorelmError(f"context {self.context} exceeds the model's context of {cfg.max_seq_len} tokens")


@dataclass
class Layout:
    """How a run is laid out on ``count`` devices."""

    precision: str
    dp: int
    tp: int
    zero: int
    micro_batch: int
    grad_accum: int
    recompute: str

    @property
    def parallel(self) -> str | None:
        """The ``corelm pretrain --parallel`` value that runs this layout, or None when corelm has none: it runs
        DDP (ZeRO-0) and FSDP (ZeRO-3) but not ZeRO-1/2, and tensor parallelism alone or under FSDP."""
        if self.tp == 1:
            return "none" if self.dp == 1 else {0: "ddp", 3: "fsdp"}.get(self.zero)
        if self.dp == 1:
            return "tp"
        return "fsdp+tp" if self.zero == 3 else None

    def describe(self) -> str:
        par = []
        if self.dp > 1:
            stage = f" ZeRO-{self.zero}" if self.zero in (1, 2) else ""
            par.append(f"{'FSDP' if self.zero == 3 else 'DDP'}×{self.dp}{stage}")
        if self.tp > 1:
            par.append(f"TP×{self.tp}")
        return (f"{self.precision}, {' + '.join(par) or 'single device'}, micro-batch {self.micro_batch}"
                f"{f' × {self.grad_accum} accumulation' if self.grad_accum > 1 else ''}, "
                f"checkpointing {self.recompute}")


@dataclass
class DevicePlan:
    """The plan for one hardware row. Times in seconds, memory in bytes per device."""

    hardware: str
    hardware_name: str
    count: int
    fits: bool
    reason: str
    memory_bytes: dict[str, float]
    capacity_bytes: float
    layout: Layout | None = None
    usable_bytes: float | None = None
    step_time_s: float | None = None
    tokens_per_s: float | None = None
    tokens_per_s_per_device: float | None = None
    mfu: float | None = None
    total_time_s: float | None = None
    cost_usd: float | None = None
    energy_kwh: float | None = None
    prefill_time_s: float | None = None
    decode_tokens_per_s: float | None = None
    decode_bound: str | None = None
    timing: dict[str, float] = field(default_factory=dict)
    recommendation: str = ""
    command: str | None = None  # the corelm command line that runs the recommended layout
    command_note: str = ""      # why there is none, when there is none

    @property
    def memory_total(self) -> float:
        return sum(self.memory_bytes.values())

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["memory_total_bytes"] = self.memory_total
        return out


@dataclass
class Plan:
    """A model × workload across one or more hardware rows."""

    model: str
    params: int
    trainable_params: int
    workload: Workload
    train_flops: float
    flops_per_token: float
    kv_cache_bytes: float
    devices: list[DevicePlan]
    seq_len: int = 0
    batch: int = 0
    tokens: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "params": self.params, "trainable_params": self.trainable_params,
                "workload": asdict(self.workload), "seq_len": self.seq_len, "batch": self.batch,
                "tokens": self.tokens, "train_flops": self.train_flops,
                "flops_per_token": self.flops_per_token, "kv_cache_bytes": self.kv_cache_bytes,
                "devices": [d.to_dict() for d in self.devices]}


# --------------------------------------------------------------------------------------------------
# Training


def trainable_params(cfg: ModelConfig, w: Workload) -> int:
    if w.task == "pretrain" or w.method == "full":
        return F.param_count(cfg)
    if w.method in ("lora", "qlora"):
        return F.lora_params(cfg, w.lora_rank, w.lora_targets)
    return F.adapter_params(cfg, w.adapter_size)


def _defaults(cfg: ModelConfig, w: Workload) -> tuple[int, int, float]:
    seq = w.seq_len or min(cfg.max_seq_len, 4096)
    # Pretraining default: ~1M tokens per optimizer step (GPT-3 used 0.5-3.2M, Llama 3 4M+);
    # fine-tuning: 8 sequences; serving: one stream.
    default = {"pretrain": max(1, 2 ** 20 // seq), "finetune": 8, "infer": 1}[w.task]
    batch = w.batch or default
    # Default run length: Chinchilla's 20 tokens per parameter (Hoffmann et al. 2022) for pretraining,
    # 1,000 optimizer steps for fine-tuning, nothing for serving.
    if w.tokens is not None:
        tokens = w.tokens
    elif w.task == "pretrain":
        tokens = 20.0 * F.param_count(cfg)
    else:
        tokens = 1000.0 * batch * seq
    return seq, batch, tokens


def train_memory(cfg: ModelConfig, w: Workload, layout: Layout, *, seq_len: int) -> dict[str, float]:
    """Bytes per device at the peak of a training step, by component.

    A step has two candidate peaks. (1) The start of the backward pass: every block's saved
    activations and the loss head are alive, but with ``zero_grad(set_to_none=True)`` only the LM head's
    gradient exists yet (all gradients when accumulating micro-batches). (2) The optimizer step: all
    gradients plus the one parameter-sized temporary that multi-tensor (foreach) AdamW allocates for
    sqrt(v). The larger phase is returned; its components sum to the predicted peak.
    """
    n = F.param_count(cfg)
    trainable = trainable_params(cfg, w)
    peft = w.task == "finetune" and w.method != "full"
    frozen_dtype = "nf4" if w.method == "qlora" else ("fp32" if layout.precision == "fp32" else "bf16")
    if peft:
        states = F.sharded_state_bytes(n + trainable, trainable, precision=layout.precision,
                                       optimizer=w.optimizer, zero=layout.zero, dp=layout.dp, tp=layout.tp,
                                       frozen_dtype=frozen_dtype)
    else:
        states = F.sharded_state_bytes(n, n, precision=layout.precision, optimizer=w.optimizer,
                                       zero=layout.zero, dp=layout.dp, tp=layout.tp)
    prec = F.PRECISIONS[layout.precision]
    act_kw = {"act_bytes": prec.activations, "fused_attention": w.fused_attention, "tp": layout.tp,
                  "fused_norms": w.fused_norms, "residual_bytes": prec.residual}
    activations = cfg.n_layer * F.activation_bytes_per_layer(cfg, seq_len, layout.micro_batch,
                                                             recompute=layout.recompute, **act_kw)
    if layout.recompute == "full":  # the block being recomputed holds its full activations once
        activations += F.activation_bytes_per_layer(cfg, seq_len, layout.micro_batch, **act_kw)
    # Under ZeRO-3 the gathered (unsharded) blocks being computed are resident too: ~2 blocks in flight.
    if layout.zero == 3 and layout.dp > 1 and not peft:
        p = F.param_breakdown(cfg)
        states["compute_copy"] += 2 * (p["attention"] + p["mlp"]) / cfg.n_layer * prec.weights / layout.tp
    grad_shard = layout.dp if layout.zero >= 2 else 1
    if layout.grad_accum > 1 or peft:
        grads_at_backward = states["grads"]  # accumulated from earlier micro-batches (LoRA: tiny anyway)
    else:  # the LM head's gradient is the first one the backward pass produces
        grads_at_backward = cfg.vocab_size * cfg.d_model * prec.grads / layout.tp / grad_shard
    backward = {**states, "grads": grads_at_backward, "activations": activations,
                "logits": F.logits_bytes(cfg, seq_len, layout.micro_batch) / layout.tp, "optimizer_temp": 0.0}
    opt_temp = 0.0
    if w.optimizer.startswith("adamw") and w.optimizer != "adamw-8bit":
        opt_temp = trainable * 4 * F.PRECISIONS[layout.precision].optimizer_scale / layout.tp
        opt_temp /= layout.dp if layout.zero >= 1 else 1
    step = {**states, "compute_copy": 0.0, "activations": 0.0, "logits": 0.0, "optimizer_temp": opt_temp}
    return backward if sum(backward.values()) >= sum(step.values()) else step


def _divisors_pow2(n: int) -> list[int]:
    return [d for d in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if d <= n and n % d == 0] or [1]


def _tp_ok(cfg: ModelConfig, tp: int) -> bool:
    try:
        F.check_tp(cfg, tp)
        return True
    except CorelmError:
        return False


def _precisions(hw: Hardware, w: Workload) -> list[str]:
    if w.precision:
        return [w.precision]
    half = hw.fastest_16bit
    if half is None or (hw.supports("fp32") and hw.peak_flops("fp32") >= hw.peak_flops(half)):
        return ["fp32"]  # e.g. a CPU without a fast bf16 unit: half precision only costs conversions
    return [f"{half}-mixed"]


def _compute_dtype(precision: str) -> str:
    return {"fp32": "fp32", "bf16-mixed": "bf16", "fp16-mixed": "fp16", "bf16-true": "bf16",
            "bf16-mixed-master": "bf16"}[precision]


def train_time(cfg: ModelConfig, w: Workload, hw: Hardware, layout: Layout, *, seq_len: int,
               batch: int, count: int) -> dict[str, float]:
    """Seconds per optimizer step, split by term (see the module docstring)."""
    tokens_step = batch * seq_len
    peak = hw.peak_flops(_compute_dtype(layout.precision))
    model_flops = F.train_flops_per_token(cfg, seq_len) * tokens_step
    hw_flops = F.train_flops_per_token(cfg, seq_len, layout.recompute) * tokens_step
    if w.task == "finetune" and w.method != "full":
        # Frozen weights need no weight gradient: the backward costs one forward less for them
        # (only the input gradient), so ~4N instead of 6N per token (LoRA's own matmuls are tiny).
        model_flops *= 2 / 3
        hw_flops *= 2 / 3
    if w.mfu is not None:
        compute = model_flops / (count * peak * w.mfu)
    else:
        compute = hw_flops / (count * peak * hw.train_efficiency)
    # Data-parallel traffic per step; FSDP reduces in bf16, DDP in the gradient dtype.
    grad_elems = trainable_params(cfg, w) / layout.tp
    ring = 2 * (layout.dp - 1) / layout.dp if layout.dp > 1 else 0.0
    grad_dtype_bytes = 2 if layout.zero == 3 else F.PRECISIONS[layout.precision].grads
    dp_bytes = ring * grad_elems * grad_dtype_bytes
    if layout.zero == 3:  # all-gather params for forward and again for backward, per micro-batch
        dp_bytes += 2 * layout.grad_accum * (layout.dp - 1) / layout.dp * grad_elems * 2
    spans_nodes = count > hw.node_size
    link = (hw.scale_out_gbs if spans_nodes else hw.interconnect_gbs) * 1e9
    dp_time = dp_bytes / link if dp_bytes and link else (math.inf if dp_bytes else 0.0)
    tp_time = 0.0
    if layout.tp > 1:
        act = layout.micro_batch * seq_len * cfg.d_model * 2  # 16-bit activations
        per_micro = 4 * cfg.n_layer * 2 * (layout.tp - 1) / layout.tp * act / (hw.interconnect_gbs * 1e9)
        tp_time = per_micro * layout.grad_accum
    step = max(compute, dp_time) + tp_time
    return {"step": step, "compute": compute, "data_parallel_comm": dp_time, "tensor_parallel_comm": tp_time,
            "model_flops": model_flops, "peak": peak}


# the families corelm.train.parallel splits with tensor parallelism (its Layouts; no torch import here)
TP_FAMILIES = ("gpt2", "llama", "gemma")
RUNNABLE_RECOMPUTE = ("none", "full")  # TrainConfig.activation_checkpointing: whole blocks or nothing
TRAIN_POLICIES = ("fp32", "bf16-mixed", "fp16-mixed", "bf16-true")  # of corelm.train.precision.POLICIES


def _tp_runnable(cfg: ModelConfig, tp: int) -> bool:
    """corelm can train ``cfg`` tensor-parallel over ``tp`` devices (heads, KV heads and MLP width divide)."""
    return tp == 1 or (cfg.family in TP_FAMILIES and _tp_ok(cfg, tp) and cfg.d_ff % tp == 0)


def _layouts(cfg: ModelConfig, w: Workload, hw: Hardware, count: int, batch: int) -> list[Layout]:
    """The layouts to compare. Settings the user fixed are kept as given; the ones the planner chooses are only
    those corelm can run (:attr:`Layout.parallel` is not None, checkpointing of whole blocks or none)."""
    tps = [w.tp] if w.tp else [t for t in _divisors_pow2(min(count, hw.node_size, 8)) if _tp_runnable(cfg, t)]
    recomputes = [w.recompute] if w.recompute else list(RUNNABLE_RECOMPUTE)
    out = []
    for precision in _precisions(hw, w):
        for tp in tps:
            if count % tp:
                continue
            dp = count // tp
            if batch % dp:
                continue
            zeros = [w.zero] if w.zero is not None else ([0] if dp == 1 else [3] if tp > 1 else [0, 3])
            per_replica = batch // dp
            micros = [w.micro_batch] if w.micro_batch else _divisors_pow2(per_replica) + (
                [per_replica] if per_replica not in _divisors_pow2(per_replica) else [])
            for micro in micros:
                if per_replica % micro:
                    continue
                for zero in zeros:
                    for rc in recomputes:
                        out.append(Layout(precision, dp, tp, zero, micro, per_replica // micro, rc))
    return out


def plan_training(cfg: ModelConfig, w: Workload, hw: Hardware, count: int) -> DevicePlan:
    """Best layout of a training run on ``count`` devices of one kind (fastest that fits)."""
    seq, batch, tokens = _defaults(cfg, w)
    layouts = _layouts(cfg, w, hw, count, batch)
    if not layouts:
        return DevicePlan(hw.id, hw.name, count, False,
                          f"global batch {batch} cannot be split over {count} devices "
                          f"(the data-parallel degree must divide it)", {}, hw.memory_bytes)
    best: tuple[float, float, Layout, dict, dict] | None = None
    smallest: tuple[float, Layout, dict] | None = None
    for layout in layouts:
        mem = train_memory(cfg, w, layout, seq_len=seq)
        total = sum(mem.values())
        if smallest is None or total < smallest[0]:
            smallest = (total, layout, mem)
        if total > hw.usable_bytes:
            continue
        t = train_time(cfg, w, hw, layout, seq_len=seq, batch=batch, count=count)
        # Fastest first; among equally fast layouts, the one that computes least (no needless
        # recomputation), the least tensor parallelism, the fewest accumulation micro-steps (each
        # pays fixed per-step overheads the FLOP model does not see), then the most memory headroom.
        rc_cost = F.RECOMPUTE_MODES.index(layout.recompute)
        key = (round(t["step"], 12), rc_cost, layout.tp, layout.grad_accum, total)
        if best is None or key < best[0]:
            best = (key, total, layout, mem, t)
    if best is None:
        total, layout, mem = smallest
        return DevicePlan(hw.id, hw.name, count, False,
                          f"needs {total / GiB:.1f} GiB per device even with {layout.describe()}; "
                          f"{hw.id} has {hw.usable_bytes / GiB:.1f} GiB usable",
                          mem, hw.memory_bytes, layout)
    _, total, layout, mem, t = best
    step = t["step"]
    tokens_step = batch * seq
    tps = tokens_step / step
    seconds = tokens / tps
    hours = seconds / 3600
    plan = DevicePlan(
        hw.id, hw.name, count, True, f"{total / GiB:.1f} of {hw.usable_bytes / GiB:.1f} GiB usable",
        mem, hw.memory_bytes, layout, step_time_s=step, tokens_per_s=tps, tokens_per_s_per_device=tps / count,
        mfu=t["model_flops"] / (step * count * t["peak"]), total_time_s=seconds,
        cost_usd=hours * count * hw.usd_per_hour,
        energy_kwh=hours * count * hw.power_w / 1000 if hw.power_w else None,
        timing={k: v for k, v in t.items() if k in ("compute", "data_parallel_comm", "tensor_parallel_comm")},
    )
    plan.recommendation = _why(cfg, w, hw, plan, seq)
    plan.command, plan.command_note = run_command(cfg, w, layout, count, hw.node_size, seq,
                                                  max(1, math.ceil(tokens / (batch * seq))), hardware_id=hw.id)
    return plan


OPTIMIZER_FLAGS = {"adamw": [], "sgd": ["--optimizer", "sgd"], "sgd-nomomentum": ["--optimizer", "sgd",
                                                                                  "--momentum", "0"]}


def _why_not(cfg: ModelConfig, w: Workload, layout: Layout, count: int, hardware_id: str) -> str:
    """Why corelm cannot run ``layout`` ("" when it can)."""
    if hardware_id.startswith("tpu"):
        return "corelm trains on CUDA (or ROCm) GPUs and CPUs; it has no XLA backend for TPUs"
    if layout.parallel is None:
        return (f"corelm has no {layout.describe().split(', ')[1]} layout: it runs DDP, FSDP, TP and FSDP+TP "
                "(no ZeRO-1/2, no DDP+TP)")
    if layout.precision not in TRAIN_POLICIES:
        return f"corelm has no {layout.precision} policy (its bf16-mixed keeps fp32 weights)"
    if layout.recompute not in RUNNABLE_RECOMPUTE:
        return "corelm checkpoints whole blocks or nothing (no selective activation checkpointing)"
    if w.optimizer not in OPTIMIZER_FLAGS:
        return f"corelm has no {w.optimizer} optimizer (adamw or sgd)"
    if layout.tp > 1 and not _tp_runnable(cfg, layout.tp):
        return f"corelm's tensor parallelism covers {', '.join(TP_FAMILIES)} with heads and d_ff dividing by tp"
    if w.task == "finetune":
        if count > 1:
            return "corelm finetune runs in one process: plan it on --count 1"
        if w.method not in ("full", "lora", "adapter"):
            return f"corelm finetune has no {w.method} method"
        if layout.grad_accum > 1 or layout.recompute != "none":
            return ("corelm finetune has no gradient accumulation or activation checkpointing: plan it with "
                    "--micro-batch equal to --batch and --recompute none")
    return ""


def run_command(cfg: ModelConfig, w: Workload, layout: Layout, count: int, node_size: int, seq_len: int,
                steps: int, model: str | None = None, hardware_id: str = "") -> tuple[str | None, str]:
    """The command line that trains ``layout`` with corelm, and ``""``; or ``None`` and the reason there is none.

    Pretraining: ``torchrun --nproc-per-node ... -m corelm pretrain --parallel ...`` (plain ``corelm pretrain``
    on one device; ``--nnodes`` when the devices span nodes). ``--batch-size`` is the micro-batch of one
    data-parallel replica, ``--grad-accum`` its accumulation, ``--max-steps`` the tokens over the global batch;
    ``DATA`` and ``RUN`` stand for the ``corelm prepare`` directory and the run directory. Fine-tuning: one
    process of ``corelm finetune`` (its ``sft`` task; pick the task your data needs).
    """
    model = model or cfg.name or "CONFIG.yaml"
    reason = _why_not(cfg, w, layout, count, hardware_id)
    if reason:
        return None, reason
    if w.task == "finetune":
        args = ["corelm", "finetune", "--model", model, "--task", "sft", "--data", "DATA", "--out", "RUN",
                "--method", w.method, "--max-len", str(seq_len), "--batch-size", str(layout.micro_batch),
                "--steps", str(steps), "--precision", layout.precision]
        return " ".join(args + (["--rank", str(w.lora_rank)] if w.method == "lora" else [])), ""
    args = ["corelm", "pretrain"]
    if count > 1:
        per_node = min(count, node_size)
        args = ["torchrun", "--nproc-per-node", str(per_node)]
        if count > per_node:
            args += ["--nnodes", str(count // per_node), "--rdzv-backend", "c10d", "--rdzv-endpoint", "HOST:29500"]
        args += ["-m", "corelm", "pretrain"]
    args += ["--model", model, "--data", "DATA", "--out", "RUN", "--seq-len", str(seq_len),
             "--batch-size", str(layout.micro_batch), "--grad-accum", str(layout.grad_accum),
             "--max-steps", str(steps), "--precision", layout.precision, *OPTIMIZER_FLAGS[w.optimizer]]
    if layout.recompute == "full":
        args.append("--activation-checkpointing")
    if layout.parallel != "none":
        args += ["--parallel", layout.parallel]
    if layout.parallel == "fsdp+tp":
        args += ["--tp-size", str(layout.tp)]
    return " ".join(args), ""


def _why(cfg: ModelConfig, w: Workload, hw: Hardware, plan: DevicePlan, seq: int) -> str:
    """One sentence saying why the chosen layout beats the simpler ones."""
    lay = plan.layout
    reasons = []
    if lay.precision.endswith("-mixed"):
        reasons.append(f"{lay.precision}: {hw.id} runs 16-bit matmuls "
                       f"{hw.peak_flops(_compute_dtype(lay.precision)) / hw.peak_flops('fp32'):.0f}× faster than fp32"
                       if hw.supports("fp32") else f"{lay.precision}: the fast matrix dtype of {hw.id}")
    n = F.param_count(cfg)
    states = (plan.memory_bytes["weights"] + plan.memory_bytes["grads"] + plan.memory_bytes["optimizer"]
              + plan.memory_bytes.get("frozen", 0.0))
    if lay.zero or lay.tp > 1:
        full = F.bytes_per_param_training(lay.precision, w.optimizer) * trainable_params(cfg, w)
        reasons.append(f"sharding brings weights+grads+optimizer from {full / GiB:.1f} to {states / GiB:.1f} GiB "
                       f"per device")
    elif n:
        reasons.append(f"weights+grads+optimizer take {states / GiB:.1f} GiB per device without sharding")
    if lay.recompute != "none":
        no_rc = F.activation_bytes_per_layer(cfg, seq, lay.micro_batch,
                                             act_bytes=F.PRECISIONS[lay.precision].activations,
                                             fused_attention=w.fused_attention, tp=lay.tp,
                                             fused_norms=w.fused_norms,
                                             residual_bytes=F.PRECISIONS[lay.precision].residual) * cfg.n_layer
        reasons.append(f"{lay.recompute} checkpointing because activations without it would need "
                       f"{no_rc / GiB:.1f} GiB")
    else:
        reasons.append(f"no checkpointing needed (activations {plan.memory_bytes['activations'] / GiB:.1f} GiB)")
    return f"{lay.describe()} — " + "; ".join(reasons)


# --------------------------------------------------------------------------------------------------
# Inference


def _infer_dtype(hw: Hardware, w: Workload) -> str:
    if w.dtype:
        return w.dtype
    return hw.fastest_16bit or "fp32"


def plan_inference(cfg: ModelConfig, w: Workload, hw: Hardware, count: int) -> DevicePlan:
    """Serving memory (weights + KV cache + workspace) and prefill/decode speed on ``count`` devices (TP)."""
    _, batch, _ = _defaults(cfg, w)
    context = w.context or min(cfg.max_seq_len, 4096)
    dtype = _infer_dtype(hw, w)
    tp = w.tp or count
    F.check_tp(cfg, tp)
    compute_dtype = dtype if hw.supports(dtype) and dtype not in ("int4", "int8") else (hw.fastest_16bit or "fp32")
    weights = F.weight_bytes(cfg, dtype) / tp
    kv_dtype = dtype if dtype in ("bf16", "fp16", "fp32", "fp8") else (hw.fastest_16bit or "fp32")
    kv = F.kv_cache_bytes(cfg, context, batch, kv_dtype) / tp
    # Workspace: one prefill chunk's activations (forward only: a few (chunk, h) and (chunk, f) tensors)
    # and the last position's logits in fp32.
    chunk = min(context, 2048)
    workspace = batch * chunk * (4 * cfg.d_model + 2 * cfg.d_ff) * F.DTYPE_BYTES[compute_dtype] / tp
    logits = batch * cfg.vocab_size * 4
    mem = {"weights": weights, "kv_cache": kv, "activations": workspace, "logits": logits}
    total = sum(mem.values())
    fits = total <= hw.usable_bytes
    reason = (f"{total / GiB:.1f} of {hw.usable_bytes / GiB:.1f} GiB usable" if fits else
              f"needs {total / GiB:.1f} GiB per device (weights {weights / GiB:.1f}, KV cache {kv / GiB:.1f}); "
              f"{hw.id} has {hw.usable_bytes / GiB:.1f} GiB usable")
    peak = hw.peak_flops(compute_dtype) * hw.matmul_efficiency
    prefill = F.prefill_flops(cfg, context, batch) / (count * peak)
    # Decode at a full cache: stream the weights read per token (matmul weights) + the whole KV cache.
    read = F.matmul_params(cfg) * F.DTYPE_BYTES[dtype] / tp + kv
    if dtype == "int4":
        read = F.matmul_params(cfg) * (0.5 + 4 / 32) / tp + kv
    bw = hw.bandwidth_gbs * 1e9 * hw.bandwidth_efficiency
    t_mem = read / bw
    t_flops = batch * F.decode_flops_per_token(cfg, context - 1) / (count * peak)
    step = max(t_mem, t_flops)
    plan = DevicePlan(hw.id, hw.name, count, fits, reason, mem, hw.memory_bytes,
                      prefill_time_s=prefill, decode_tokens_per_s=batch / step,
                      decode_bound="memory bandwidth" if t_mem >= t_flops else "compute",
                      timing={"decode_step_memory_s": t_mem, "decode_step_compute_s": t_flops})
    if cfg.is_encoder:  # an encoder only runs the forward ("prefill") over its inputs: no decode
        plan.decode_tokens_per_s, plan.decode_bound, plan.timing = None, "encoder: forward only", {}
        plan.tokens_per_s = batch * context / prefill
        plan.tokens_per_s_per_device = plan.tokens_per_s / count
        plan.total_time_s = prefill
        plan.cost_usd = prefill / 3600 * count * hw.usd_per_hour
        plan.energy_kwh = prefill / 3600 * count * hw.power_w / 1000 if hw.power_w else None
        plan.recommendation = f"{dtype} weights; {plan.tokens_per_s:,.0f} tokens/s encoded at batch {batch}"
        return plan
    plan.tokens_per_s = batch / step
    plan.tokens_per_s_per_device = plan.tokens_per_s / count
    seconds = prefill + w.new_tokens * step
    plan.total_time_s = seconds
    plan.cost_usd = seconds / 3600 * count * hw.usd_per_hour
    plan.energy_kwh = seconds / 3600 * count * hw.power_w / 1000 if hw.power_w else None
    plan.recommendation = (f"{dtype} weights and KV cache" + (f", tensor-parallel over {tp}" if tp > 1 else "")
                           + f"; decode is {plan.decode_bound}-bound at batch {batch}"
                           + ("" if fits else " — does not fit: use int8/int4 weights, a shorter context, "
                              "a smaller batch or more devices"))
    return plan


# --------------------------------------------------------------------------------------------------
# Entry points


def plan_one(cfg: ModelConfig, w: Workload, hw: Hardware, count: int) -> DevicePlan:
    if count < 1:
        raise CorelmError(f"device count must be >= 1, got {count}")
    if count > 1 and not (hw.interconnect_gbs or hw.scale_out_gbs):
        return DevicePlan(hw.id, hw.name, count, False, f"{hw.id} has no interconnect in the catalog; "
                          "plan it as a single device", {}, hw.memory_bytes, usable_bytes=hw.usable_bytes)
    out = plan_inference(cfg, w, hw, count) if w.task == "infer" else plan_training(cfg, w, hw, count)
    out.usable_bytes = hw.usable_bytes
    return out


def min_devices(cfg: ModelConfig, w: Workload, hw: Hardware, limit: int = 4096) -> DevicePlan:
    """The smallest power-of-two device count whose best layout fits (or the last failure)."""
    count, last = 1, None
    _, batch, _ = _defaults(cfg, w)
    while count <= limit:
        if w.task == "infer" and w.tp is None and not _tp_ok(cfg, count):
            break  # serving splits the model with TP, which must divide the heads
        if w.task != "infer" and count > batch * 8:
            break  # even TP×8 leaves a data-parallel degree larger than the batch
        last = plan_one(cfg, w, hw, count)
        if last.fits:
            return last
        if not (hw.interconnect_gbs or hw.scale_out_gbs):
            break
        count *= 2
    return last


def plan(cfg: ModelConfig, w: Workload, hardware: list[Hardware], count: int | None = None) -> Plan:
    """Plan ``w`` for ``cfg`` on every hardware row; ``count=None`` picks the fewest devices that fit."""
    w.validate(cfg)
    seq, batch, tokens = _defaults(cfg, w)
    devices = [plan_one(cfg, w, hw, count) if count else min_devices(cfg, w, hw) for hw in hardware]
    context = w.context or min(cfg.max_seq_len, 4096)
    kv_dtype = w.dtype if w.dtype in ("bf16", "fp16", "fp32", "fp8") else "bf16"
    return Plan(
        model=cfg.name or "custom", params=F.param_count(cfg), trainable_params=trainable_params(cfg, w),
        workload=w,
        train_flops=0.0 if w.task == "infer" else F.train_flops(cfg, tokens, seq),
        flops_per_token=(F.forward_flops_per_token(cfg, context) if w.task == "infer"
                         else F.train_flops_per_token(cfg, seq)),
        kv_cache_bytes=F.kv_cache_bytes(cfg, context if w.task == "infer" else seq, batch, kv_dtype),
        devices=devices, seq_len=seq, batch=batch, tokens=tokens,
    )


def plan_budget(cfg: ModelConfig, w: Workload, hardware: list[Hardware], budget_usd: float,
                min_scaling_efficiency: float = 0.8, max_count: int = 64) -> Plan:
    """What to rent: per hardware row, the device count that finishes soonest within ``budget_usd``.

    Starts at the fewest devices that fit and doubles while the run still costs at most the budget,
    gets faster, and keeps at least ``min_scaling_efficiency`` of ideal scaling (ideal scaling keeps
    the cost flat; communication makes it grow: past that point money buys little time), up to
    ``max_count`` devices (the largest allocation the user can get).
    """
    if budget_usd <= 0:
        raise CorelmError(f"budget must be positive, got {budget_usd:g} USD")
    p = plan(cfg, w, hardware, None)
    chosen = []
    for hw, first in zip(hardware, p.devices):
        best = first
        if first is not None and first.fits and w.task != "infer":
            count = first.count * 2
            while count <= max_count:
                nxt = plan_one(cfg, w, hw, count)
                if (not nxt.fits or nxt.cost_usd > budget_usd or nxt.total_time_s >= best.total_time_s
                        or nxt.cost_usd > first.cost_usd / min_scaling_efficiency):
                    break
                best, count = nxt, count * 2
        chosen.append(best)
    p.devices = sorted([d for d in chosen if d is not None],
                       key=lambda d: (not d.fits, (d.cost_usd or 0) > budget_usd, d.total_time_s or math.inf))
    return p
