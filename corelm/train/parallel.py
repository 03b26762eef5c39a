"""Tensor, sequence and pipeline parallelism as functions applied to a single-device model, on a device mesh.

Launch with ``torchrun``; the model class never learns about any of this (docs/DESIGN.md "Models"). The
order, as in torchtitan's ``parallelize_llama``: build the mesh, then tensor parallelism inside each block
(:func:`apply_tp`), then FSDP2 on the data-parallel dimension (``fully_shard`` over TP's DTensors gives 2-D
parameters), then compile. Pipeline parallelism (:func:`apply_pp`) splits the blocks into stages instead.

* :func:`build_mesh`: ``init_device_mesh`` with dimensions ``("pp", "dp", "tp")``, TP innermost (the
  fastest links: Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters").
* :func:`apply_tp`: Megatron-LM tensor parallelism (Shoeybi et al. 2019, section 3): ``q/k/v`` and
  ``gate/up`` split by output columns, ``o`` and ``down`` by input rows, so each block needs one all-reduce
  after attention and one after the MLP. With ``sequence_parallel`` the norms and residual stream are split
  along the sequence instead (Korthikanti et al. 2022): all-gather before, reduce-scatter after.
* :func:`apply_pp`: GPipe (Huang et al. 2019) or 1F1B (Narayanan et al. 2019, PipeDream) schedules of
  ``torch.distributed.pipelining`` over contiguous stages of blocks, with micro-batches.

Only the llama family (llama, mistral, qwen2/3, smollm2) is supported: its blocks have HF's names
(``self_attn.q_proj`` ... ``mlp.down_proj``) and a uniform ``block(x, ctx)`` signature.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from corelm.errors import CorelmError
from corelm.train.loss_info import split_loss_info

MODES = ("tp", "pp", "fsdp+tp")
SCHEDULES = ("gpipe", "1f1b")


def _llama_body(model: nn.Module, what: str) -> nn.Module:
    body = getattr(model, "model", None)
    if not (hasattr(body, "layers") and hasattr(body, "embed_tokens") and hasattr(model, "rope")):
        raise CorelmError(f"{what} supports the llama family only (llama, mistral, qwen2, qwen3, smollm2); "
                          f"{type(model).__name__} is not one: use --parallel ddp or fsdp")
    return body


def build_mesh(world: int, dp: int = 1, tp: int = 1, pp: int = 1, device_type: str = "cpu") -> Any:
    """The ``(pp, dp, tp)`` device mesh of ``world`` processes (every process must call it).

    Raises:
        CorelmError: the degrees do not multiply to ``world``.
    """
    from torch.distributed.device_mesh import init_device_mesh

    if min(dp, tp, pp) < 1 or dp * tp * pp != world:
        raise CorelmError(f"{world} processes cannot form pp={pp} x dp={dp} x tp={tp}: the degrees must multiply "
                          f"to the number of processes (torchrun --nproc-per-node)")
    return init_device_mesh(device_type, (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))


def check_tp(config: Any, tp: int) -> None:
    """Raise a :class:`CorelmError` unless ``tp`` divides the attention heads, KV heads and MLP width."""
    for what, n in (("attention heads (n_head)", config.n_head), ("key/value heads (n_kv_head)", config.n_kv_head),
                    ("MLP width (d_ff)", config.d_ff)):
        if n % tp:
            raise CorelmError(f"tensor parallelism over {tp} processes needs the {what} to divide by {tp}; "
                              f"{config.name or 'this model'} has {n}")


def _replicate(module: nn.Module, mesh: Any, out: Any = None) -> None:
    """Parameters become replicated DTensors; inputs are lifted to replicated DTensors and outputs returned as
    local tensors (``out`` placement first: ``Shard(1)`` enters the sequence-parallel region)."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    def inputs(mod: nn.Module, args: tuple, mesh: Any) -> tuple:
        return tuple(DTensor.from_local(a, mesh, [Replicate()], run_check=False) if isinstance(a, torch.Tensor)
                     and not isinstance(a, DTensor) else a for a in args)

    def outputs(mod: nn.Module, y: Any, mesh: Any) -> torch.Tensor:
        if not isinstance(y, DTensor):
            return y
        return (y.redistribute(mesh, [out]) if out is not None else y).to_local()

    distribute_module(module, mesh, input_fn=inputs, output_fn=outputs)


def apply_tp(model: nn.Module, tp_mesh: Any, sequence_parallel: bool = False) -> nn.Module:
    """Megatron-style tensor parallelism of a llama-family model over ``tp_mesh`` (in place).

    Each block's ``q/k/v_proj`` and ``gate/up_proj`` are sharded by output features (``ColwiseParallel``) and
    ``o_proj``/``down_proj`` by input features (``RowwiseParallel``); the attention modules then hold
    ``n_head / tp`` query and ``n_kv_head / tp`` key/value heads per rank. Embeddings, norms and the head are
    replicated DTensors (every parameter is a DTensor, so clipping and FSDP2 see one kind of tensor).

    Args:
        model: a llama-family model on this rank's device, identical on every rank (same seed).
        tp_mesh: a 1-D device mesh (``build_mesh(...)["tp"]``).
        sequence_parallel: also split the norms' activations along the sequence (``T`` must divide by ``tp``).

    Returns:
        ``model``, its parameter names unchanged (a full state dict gathers the shards).

    Raises:
        CorelmError: not a llama-family model, or ``tp`` does not divide the heads, KV heads or ``d_ff``.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    body = _llama_body(model, "tensor parallelism")
    tp = tp_mesh.size()
    check_tp(model.config, tp)
    # Outside the blocks: replicated; with SP the residual stream leaves the embedding split along T.
    _replicate(body.embed_tokens, tp_mesh, Shard(1) if sequence_parallel else None)
    if sequence_parallel:
        parallelize_module(body.norm, tp_mesh, SequenceParallel())
        parallelize_module(model.lm_head, tp_mesh, PrepareModuleInput(input_layouts=(Shard(1),),
                                                                      desired_input_layouts=(Replicate(),)))
    else:
        _replicate(body.norm, tp_mesh)
    _replicate(model.lm_head, tp_mesh)  # tied: reuses the embedding's (already replicated) weight
    for block in body.layers:
        plan: dict[str, Any] = {
            "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel(),
        }
        if sequence_parallel:
            plan.update({
                "input_layernorm": SequenceParallel(), "post_attention_layernorm": SequenceParallel(),
                # all-gather the sequence before the column-parallel projections ...
                "self_attn": PrepareModuleInput(input_layouts=(Shard(1), None),
                                                desired_input_layouts=(Replicate(), None)),
                "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
                # ... and reduce-scatter it after the row-parallel ones
                "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
                "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
            })
        else:
            _replicate(block.input_layernorm, tp_mesh)
            _replicate(block.post_attention_layernorm, tp_mesh)
        for name in ("q_norm", "k_norm"):  # qwen3's per-head norms act on local heads: replicated weights
            norm = getattr(block.self_attn, name)
            if any(True for _ in norm.parameters()):
                _replicate(norm, tp_mesh)
        parallelize_module(block, tp_mesh, plan)
        # the local projections now produce n_head / tp heads: the attention's reshapes must say so
        block.self_attn.n_head //= tp
        block.self_attn.n_kv_head //= tp
    return model


def apply_fsdp_tp(model: nn.Module, mesh: Any, sequence_parallel: bool = False) -> nn.Module:
    """2-D parallelism: :func:`apply_tp` on ``mesh["tp"]``, then FSDP2 ``fully_shard`` of every block and the
    root on ``mesh["dp"]`` (torchtitan's order: FSDP shards the TP DTensors a second time)."""
    from torch.distributed.fsdp import fully_shard

    from corelm.train.distributed import find_blocks

    apply_tp(model, mesh["tp"], sequence_parallel)
    for block in find_blocks(model):
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model


class _LlamaStage(nn.Module):
    """Blocks ``lo..hi-1`` of a llama model, plus the embedding on the first stage and the final norm and head on
    the last: ``forward(input_ids or hidden states) -> hidden states or logits``. It holds the model's own
    modules (shared, not copied), so training a stage trains the model."""

    def __init__(self, model: nn.Module, lo: int, hi: int, first: bool, last: bool) -> None:
        super().__init__()
        body = model.model
        self.embed_tokens = body.embed_tokens if first else None
        self.layers = nn.ModuleList(body.layers[lo:hi])
        self.norm = body.norm if last else None
        self.lm_head = model.lm_head if last else None
        self._rope = (model.rope,)  # a shared table, not a parameter of this stage
        self.sliding_window = model.sliding_window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from corelm.ops.attention import decoder_context

        if self.embed_tokens is not None:
            x = self.embed_tokens(x)  # (B, T) ids -> (B, T, d)
        ids = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)  # shape and device only: (B, T)
        ctx = decoder_context(ids, None, None, None, self.sliding_window)
        ctx.rope = self._rope[0](ctx.input_pos, None)
        for block in self.layers:
            x = block(x, ctx)
        if self.norm is not None:
            x = self.lm_head(self.norm(x))  # (B, T, vocab)
        return x


class _Inputs(Exception):
    """Raised by a stand-in model to capture the arguments a ``loss_fn`` passes to ``model(...)``."""


def _rows(batch: Any, idx: torch.Tensor, n: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[idx] if batch.ndim and batch.shape[0] == n else batch
    if isinstance(batch, dict):
        return {k: _rows(v, idx, n) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_rows(v, idx, n) for v in batch)
    return batch


class Pipeline:
    """This rank's pipeline stage of a model and the schedule that trains it (built by :func:`apply_pp`)."""

    def __init__(self, model: nn.Module, stages: list[_LlamaStage], pp_mesh: Any, n_microbatches: int,
                 schedule: str, device: torch.device) -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        stage = stages[pp_mesh.get_local_rank()]
        self.model, self.module, self.n_micro, self.device = model, stage, n_microbatches, device
        self.group = pp_mesh.get_group()
        self.index, self.n_stages = pp_mesh.get_local_rank(), pp_mesh.size()
        self.first, self.last = self.index == 0, self.index == self.n_stages - 1
        self._stage = PipelineStage(stage, self.index, self.n_stages, device, group=self.group)
        cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
        # scale_grads=False: the loss passed to backward is already divided by micro-batches x accumulation
        self._schedule = cls(self._stage, n_microbatches, loss_fn=self._loss, scale_grads=False)
        # which stage trains each parameter: the global rank that broadcasts it in sync()
        ranks = pp_mesh.mesh.flatten().tolist()  # global rank of each stage
        self._owner = {id(p): ranks[s] for s, st in enumerate(stages) for p in st.parameters()}
        self._call: tuple[Callable, Any, float] | None = None
        self._n_rows = 0
        self._record: list[tuple[float, float]] = []

    def _loss(self, output: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        loss_fn, batch, scale = self._call  # type: ignore[misc]

        rows = _rows(batch, idx, self._n_rows)
        loss, info = loss_fn(lambda *a, **k: output, rows)  # the stand-in model returns this micro-batch's logits
        n, _ = split_loss_info(info, rows)
        self._record.append((float(loss.detach()), n))
        return loss * scale

    def step(self, loss_fn: Callable, batch: Any, accum: int) -> tuple[torch.Tensor, dict[str, int]]:
        """Forward and backward of one batch through every stage, in ``n_microbatches`` micro-batches.

        Returns:
            the batch's mean loss and ``{"n_tokens": ...}``, the same on every stage (sent from the last).
        """
        import torch.distributed as dist

        def grab(*args: Any, **kwargs: Any) -> None:
            raise _Inputs(args, kwargs)

        try:
            loss_fn(grab, batch)
            raise CorelmError("pipeline parallelism: the loss function never called the model")
        except _Inputs as got:
            args, kwargs = got.args
        n = args[0].shape[0]
        if n % self.n_micro:
            raise CorelmError(f"pipeline parallelism: a batch of {n} sequences does not split into "
                              f"{self.n_micro} micro-batches (--batch-size must divide by --pp-microbatches)")
        self._call, self._n_rows, self._record = (loss_fn, batch, 1.0 / (self.n_micro * accum)), n, []
        idx = torch.arange(n, device=args[0].device)
        if self.first:
            self._schedule.step(*args, **kwargs, target=idx if self.last else None)
        else:
            self._schedule.step(target=idx if self.last else None)
        stats = torch.zeros(2, dtype=torch.float64, device=idx.device)
        if self.last:
            record = self._record[-self.n_micro:]  # the first step also runs the loss once to infer shapes
            stats[0] = sum(v for v, _ in record) / len(record)
            stats[1] = sum(c for _, c in record)
        dist.broadcast(stats, src=dist.get_global_rank(self.group, self.n_stages - 1), group=self.group)
        return stats[0].float(), {"n_tokens": int(stats[1])}

    def clip_grad_norm_(self, params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip by the global gradient norm over all stages (each rank holds its stage's gradients)."""
        import torch.distributed as dist

        grads = [p.grad for p in params if p.grad is not None]
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for g in grads:
            sq += g.detach().double().pow(2).sum()
        dist.all_reduce(sq, group=self.group)
        norm = sq.sqrt().float()
        coef = min(1.0, max_norm / (float(norm) + 1e-6)) if math.isfinite(max_norm) else 1.0
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
        return norm

    def sync(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Give every rank the whole model (and optimizer state): each stage broadcasts its parameters. Called
        before evaluation and checkpoints, which then see the full model on every rank."""
        import torch.distributed as dist

        template: dict[str, bool] | None = None  # optimizer state tensors -> shaped like the parameter?
        if optimizer is not None:
            for p in self.module.parameters():
                if optimizer.state.get(p):
                    template = {k: v.shape == p.shape for k, v in optimizer.state[p].items()
                                if isinstance(v, torch.Tensor)}
                    break
            ready = torch.tensor([0 if template is None else 1], device=self.device)
            dist.all_reduce(ready, op=dist.ReduceOp.MIN, group=self.group)
            if not int(ready):
                template = None
        with torch.no_grad():
            for p in self.model.parameters():
                src = self._owner[id(p)]
                dist.broadcast(p.data, src=src, group=self.group)
                if template is None or not p.requires_grad:
                    continue
                state = optimizer.state[p]
                for key, shaped in sorted(template.items()):
                    if key not in state:
                        state[key] = torch.zeros_like(p) if shaped else torch.zeros((), dtype=torch.float32)
                    buf = state[key].to(self.device)  # AdamW's step count lives on the CPU; NCCL needs the GPU
                    dist.broadcast(buf, src=src, group=self.group)
                    state[key].copy_(buf)


def apply_pp(model: nn.Module, pp_mesh: Any, n_microbatches: int = 0, schedule: str = "1f1b",
             device: torch.device | None = None) -> Pipeline:
    """Split a llama-family model's blocks into ``pp_mesh.size()`` contiguous stages; this rank runs one.

    Stage ``s`` holds blocks ``[s * L / S, (s + 1) * L / S)``; the first stage also the embedding, the last the
    final norm and the head. The model itself is untouched (every rank keeps all of it; only its stage's
    parameters receive gradients), so its names, state dict and checkpoints are the single-process ones after
    :meth:`Pipeline.sync`.

    Args:
        model: a llama-family model with untied embeddings, identical on every rank.
        pp_mesh: a 1-D device mesh (``build_mesh(...)["pp"]``).
        n_microbatches: micro-batches per batch (0: one per stage); the batch must divide by it.
        schedule: ``gpipe`` (all forwards, then all backwards) or ``1f1b`` (interleaved: fewer live activations).
        device: this rank's device.

    Raises:
        CorelmError: not a llama model, tied embeddings, fewer blocks than stages, or an unknown schedule.
    """
    body = _llama_body(model, "pipeline parallelism")
    if schedule not in SCHEDULES:
        raise CorelmError(f"unknown pipeline schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if not isinstance(model.lm_head, nn.Linear):
        raise CorelmError("pipeline parallelism needs untied embeddings: the first and last stages would both "
                          "own the embedding matrix (set tie_embeddings: false)")
    n_stages, n_layers = pp_mesh.size(), len(body.layers)
    if n_layers < n_stages:
        raise CorelmError(f"pipeline parallelism over {n_stages} stages needs at least {n_stages} blocks; "
                          f"the model has {n_layers}")
    stages = [_LlamaStage(model, s * n_layers // n_stages, (s + 1) * n_layers // n_stages, first=s == 0,
                          last=s == n_stages - 1) for s in range(n_stages)]  # views: every rank knows the split
    dev = device or next(model.parameters()).device
    return Pipeline(model, stages, pp_mesh, n_microbatches or n_stages, schedule, dev)


def parallelize(model: nn.Module, mode: str, world: int, device: torch.device, *, tp_size: int = 2,
                sequence_parallel: bool = False, pp_microbatches: int = 0,
                pp_schedule: str = "1f1b") -> Pipeline | None:
    """Apply ``--parallel tp | pp | fsdp+tp`` to ``model`` in place (every rank calls it).

    ``tp`` and ``pp`` use every process; ``fsdp+tp`` groups ``tp_size`` processes for TP and shards over the
    ``world / tp_size`` groups. Returns the :class:`Pipeline` under ``pp``, else ``None``.
    """
    if mode == "tp":
        apply_tp(model, build_mesh(world, tp=world, device_type=device.type)["tp"], sequence_parallel)
    elif mode == "fsdp+tp":
        if tp_size < 1 or world % tp_size:
            raise CorelmError(f"--tp-size {tp_size} does not divide the {world} processes")
        apply_fsdp_tp(model, build_mesh(world, dp=world // tp_size, tp=tp_size, device_type=device.type),
                      sequence_parallel)
    elif mode == "pp":
        return apply_pp(model, build_mesh(world, pp=world, device_type=device.type)["pp"], pp_microbatches,
                        pp_schedule, device)
    else:
        raise CorelmError(f"unknown parallelism {mode!r}; expected one of {', '.join(MODES)}")
    return None


def data_parallel(mode: str, rank: int, world: int, tp_size: int = 2) -> tuple[int, int]:
    """``(rank, size)`` of this process among the data-parallel replicas: the ranks of one TP group or one
    pipeline read the same batches; ranks of different groups read different ones."""
    if mode in ("tp", "pp"):
        return 0, 1
    if mode == "fsdp+tp":
        return rank // tp_size, max(1, world // tp_size)
    return rank, world
