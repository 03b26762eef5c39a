"""Tensor, sequence and pipeline parallelism as functions applied to a single-device model, on a device mesh.

Launch with ``torchrun``; the model class never learns about any of this (docs/DESIGN.md "Models"). The
order, as in torchtitan's ``parallelize_llama``: build the mesh, then tensor parallelism inside each block
(:func:`apply_tp`), then FSDP2 on the data-parallel dimension (``fully_shard`` over TP's DTensors gives 2-D
parameters) or pipeline stages over the ``pp`` dimension (:func:`apply_pp`), then compile.

* :func:`build_mesh`: ``init_device_mesh`` with dimensions ``("pp", "dp", "tp")``, TP innermost (the
  fastest links: Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters").
* :func:`apply_tp`: Megatron-LM tensor parallelism (Shoeybi et al. 2019, section 3): the query/key/value and
  the MLP's input projections split by output columns, the attention output and the MLP's output projection
  by input rows, so each block needs one all-reduce after attention and one after the MLP. GPT-2's fused
  ``c_attn`` (``[q; k; v]`` stacked by rows) is split with a strided placement: rank ``r`` holds
  ``[q_r; k_r; v_r]``, its own heads of each. With ``sequence_parallel`` the norms and residual stream are
  split along the sequence instead (Korthikanti et al. 2022): all-gather before, reduce-scatter after.
* :func:`apply_pp`: GPipe (Huang et al. 2019) or 1F1B (Narayanan et al. 2019, PipeDream) schedules of
  ``torch.distributed.pipelining`` over contiguous stages of blocks, with micro-batches; over a 2-D
  ``(pp, tp)`` mesh each stage is itself tensor-parallel.

Families: gpt2, the llama family (llama, mistral, qwen2, qwen3, smollm2) and gemma (1, 2, 3). Each is a
:class:`Layout` below: where its embeddings, blocks, norms and head are, and which linear layers of a block
split by columns or rows. OLMo 2 (a query/key norm over all heads at once), MoE (experts) and encoders are
refused with a CorelmError: use ddp or fsdp for them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from corelm.errors import CorelmError
from corelm.train.loss_info import split_loss_info

MODES = ("tp", "pp", "fsdp+tp", "pp+tp")
SCHEDULES = ("gpipe", "1f1b")


@dataclass(frozen=True)
class Layout:
    """Where one family keeps its pieces (dotted paths from the model; block paths from a block).

    Attributes:
        blocks: the ``nn.ModuleList`` of blocks.
        embeddings: modules before the blocks whose outputs are summed into the residual stream.
        norm: the final norm; ``head``: the LM head.
        colwise: block linears split by output features; ``fused``: the same for a linear whose output is
            ``n`` projections stacked (``{"attn.c_attn": 3}``); ``rowwise``: split by input features.
        attention: the block's attention module (its ``n_head`` / ``n_kv_head`` become per-rank counts).
        norms: the block's norms on the residual stream (sequence-parallel under SP).
        gathers: block sub-layers that take the whole sequence (all-gathered under SP), with their arity.
        head_norms: norms over each head of the queries/keys (Qwen3, Gemma 3): they see this rank's heads.
    """

    blocks: str
    embeddings: tuple[str, ...]
    norm: str
    colwise: tuple[str, ...]
    rowwise: tuple[str, ...]
    attention: str
    norms: tuple[str, ...]
    gathers: dict[str, int]
    fused: dict[str, int] = field(default_factory=dict)
    head_norms: tuple[str, ...] = ()
    head: str = "lm_head"


_LLAMA = Layout(blocks="model.layers", embeddings=("model.embed_tokens",), norm="model.norm",
                colwise=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"),
                rowwise=("self_attn.o_proj", "mlp.down_proj"), attention="self_attn",
                norms=("input_layernorm", "post_attention_layernorm"), gathers={"self_attn": 2, "mlp": 1},
                head_norms=("self_attn.q_norm", "self_attn.k_norm"))
# Gemma 2/3's sandwich: the post-norms act on the row-parallel outputs, which SP leaves split along T
_GEMMA = dataclasses.replace(_LLAMA, norms=("input_layernorm", "post_attention_layernorm",
                                            "pre_feedforward_layernorm", "post_feedforward_layernorm"))
_GPT2 = Layout(blocks="transformer.h", embeddings=("transformer.wte", "transformer.wpe"), norm="transformer.ln_f",
               colwise=("mlp.c_fc",), fused={"attn.c_attn": 3}, rowwise=("attn.c_proj", "mlp.c_proj"),
               attention="attn", norms=("ln_1", "ln_2"), gathers={"attn": 2, "mlp": 1})


def layout_of(model: nn.Module, what: str) -> Layout:
    """The :class:`Layout` of ``model``'s family.

    Raises:
        CorelmError: a family that tensor/pipeline parallelism does not cover (one line naming the way out).
    """
    from corelm.models.gemma import Gemma
    from corelm.models.gpt2 import GPT2
    from corelm.models.llama import Llama

    if type(model) is Llama:  # OLMo 2 and MoE subclass Llama with blocks of their own
        return _LLAMA
    if isinstance(model, Gemma):
        return _GEMMA
    if isinstance(model, GPT2):
        return _GPT2
    family = getattr(getattr(model, "config", None), "family", type(model).__name__)
    raise CorelmError(f"{what} supports gpt2, the llama family (llama, mistral, qwen2, qwen3, smollm2) and gemma; "
                      f"{family} is not one: use --parallel ddp or fsdp")


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


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


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a view: in-place writes reach the DTensor); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _replicate(module: nn.Module, mesh: Any, out: Any = None, heads: bool = False) -> None:
    """Parameters become replicated DTensors; inputs are lifted to replicated DTensors and outputs returned as
    local tensors (``out`` placement first: ``Shard(1)`` enters the sequence-parallel region).

    ``heads``: the input is this rank's heads, ``(B, T, n_head / tp, head_dim)`` (a per-head norm): it is
    lifted as ``Shard(2)``, so the weight's gradient is summed over every rank's heads, not only its own.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module

    lift = [Shard(2)] if heads else [Replicate()]

    def inputs(mod: nn.Module, args: tuple, mesh: Any) -> tuple:
        return tuple(DTensor.from_local(a, mesh, lift, run_check=False) if isinstance(a, torch.Tensor)
                     and not isinstance(a, DTensor) else a for a in args)

    def outputs(mod: nn.Module, y: Any, mesh: Any) -> torch.Tensor:
        if not isinstance(y, DTensor):
            return y
        return (y.redistribute(mesh, [out]) if out is not None else y).to_local()

    distribute_module(module, mesh, input_fn=inputs, output_fn=outputs)


def _split_sequence(module: nn.Module, mesh: Any) -> None:
    """A parameter-free module (sinusoidal positions) whose full output enters the sequence-parallel region:
    keep this rank's slice of ``T`` (dimension 1); backward all-gathers the gradient."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def hook(mod: nn.Module, args: tuple, y: torch.Tensor) -> torch.Tensor:
        return DTensor.from_local(y, mesh, [Replicate()], run_check=False).redistribute(mesh, [Shard(1)]).to_local()

    module.register_forward_hook(hook)


def _fused_colwise(n: int) -> Any:
    """``ColwiseParallel`` for a linear whose output is ``n`` projections stacked (GPT-2's ``c_attn``: q, k, v).

    A plain column split would give rank 0 all of q and half of k. ``_StridedShard(0, split_factor=n)`` splits
    each of the ``n`` row blocks over the ranks and concatenates: rank ``r`` holds ``[q_r; k_r; v_r]`` (torch's
    placement for FSDP over TP, used here on one mesh dimension), so its local output is its own heads of q, k
    and v in the order the attention's ``split`` expects. The parameter keeps its full shape and name, so a full
    state dict gathers ``[q; k; v]`` unchanged.
    """
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel
    from torch.distributed.tensor.placement_types import _StridedShard

    class FusedColwise(ColwiseParallel):
        def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: Any) -> None:
            for pname, p in list(module.named_parameters(recurse=False)):
                dt = distribute_tensor(p.detach(), device_mesh, [_StridedShard(0, split_factor=n)])
                module.register_parameter(pname, nn.Parameter(dt, requires_grad=p.requires_grad))

        @staticmethod
        def _prepare_output_fn(output_layouts: Any, use_local_output: bool, mod: nn.Module, outputs: Any,
                               device_mesh: Any) -> torch.Tensor:
            return outputs.to_local()  # already [q_r, k_r, v_r] along the features: nothing to redistribute

    return FusedColwise()


def _block_plan(layout: Layout, block: nn.Module, sequence_parallel: bool) -> dict[str, Any]:
    """The ``parallelize_module`` plan of one block."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    plan: dict[str, Any] = {name: ColwiseParallel() for name in layout.colwise}
    plan.update({name: _fused_colwise(n) for name, n in layout.fused.items()})
    # under SP the row-parallel outputs are reduce-scattered along T instead of all-reduced
    plan.update({name: RowwiseParallel(output_layouts=Shard(1)) if sequence_parallel else RowwiseParallel()
                 for name in layout.rowwise})
    if sequence_parallel:
        for name in layout.norms:
            if _has_params(block.get_submodule(name)):  # Gemma 1 has no post-norms (nn.Identity)
                plan[name] = SequenceParallel(use_local_output=True)
        for name, arity in layout.gathers.items():  # all-gather the sequence before the column-parallel layers
            rest = (None,) * (arity - 1)  # the attention's second argument is its context, not a tensor
            plan[name] = PrepareModuleInput(input_layouts=(Shard(1), *rest), desired_input_layouts=(Replicate(), *rest))
    return plan


def apply_tp(model: nn.Module, tp_mesh: Any, sequence_parallel: bool = False) -> nn.Module:
    """Megatron-style tensor parallelism of a gpt2, llama-family or gemma model over ``tp_mesh`` (in place).

    Each block's query/key/value and MLP input projections are sharded by output features (``ColwiseParallel``;
    GPT-2's fused ``c_attn`` by :func:`_fused_colwise`) and the attention output and MLP output projections by
    input features (``RowwiseParallel``); the attention modules then hold ``n_head / tp`` query and
    ``n_kv_head / tp`` key/value heads per rank. Embeddings, norms and the head are replicated DTensors (every
    parameter is a DTensor, so clipping and FSDP2 see one kind of tensor).

    Args:
        model: a model on this rank's device, identical on every rank (same seed).
        tp_mesh: a 1-D device mesh (``build_mesh(...)["tp"]``).
        sequence_parallel: also split the norms' activations along the sequence (``T`` must divide by ``tp``).

    Returns:
        ``model``, its parameter names unchanged (a full state dict gathers the shards).

    Raises:
        CorelmError: a family not covered, or ``tp`` does not divide the heads, KV heads or ``d_ff``.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInput, SequenceParallel, parallelize_module

    layout = layout_of(model, "tensor parallelism")
    tp = tp_mesh.size()
    check_tp(model.config, tp)
    # Outside the blocks: replicated; with SP the residual stream leaves the embeddings split along T.
    for path in layout.embeddings:
        emb = _get(model, path)
        if _has_params(emb):
            _replicate(emb, tp_mesh, Shard(1) if sequence_parallel else None)
        elif sequence_parallel:  # sinusoidal positions: computed whole, then sliced
            _split_sequence(emb, tp_mesh)
    norm, head = _get(model, layout.norm), _get(model, layout.head)
    if sequence_parallel:
        parallelize_module(norm, tp_mesh, SequenceParallel(use_local_output=True))
        parallelize_module(head, tp_mesh, PrepareModuleInput(input_layouts=(Shard(1),),
                                                             desired_input_layouts=(Replicate(),)))
    else:
        _replicate(norm, tp_mesh)
    _replicate(head, tp_mesh)  # tied: reuses the embedding's (already replicated) weight
    for block in _get(model, layout.blocks):
        parallelize_module(block, tp_mesh, _block_plan(layout, block, sequence_parallel))
        # the local projections now produce n_head / tp heads: the attention's reshapes must say so
        attn = block.get_submodule(layout.attention)
        attn.n_head //= tp
        if hasattr(attn, "n_kv_head"):
            attn.n_kv_head //= tp
        for name in layout.head_norms:
            if _has_params(block.get_submodule(name)):
                _replicate(block.get_submodule(name), tp_mesh, heads=True)
    # what is left: the norms outside SP
    for module in model.modules():
        if any(not isinstance(p, DTensor) for p in module.parameters(recurse=False)):
            _replicate(module, tp_mesh)
    return model


def apply_fsdp_tp(model: nn.Module, mesh: Any, sequence_parallel: bool = False) -> nn.Module:
    """2-D parallelism: :func:`apply_tp` on ``mesh["tp"]``, then FSDP2 ``fully_shard`` of every block and the
    root on ``mesh["dp"]`` (torchtitan's order: FSDP shards the TP DTensors a second time)."""
    from torch.distributed.fsdp import fully_shard

    layout = layout_of(model, "FSDP x tensor parallelism")
    if layout.fused:
        # FSDP over the strided split trains with the right losses, but torch 2.13 gathers and re-shards it
        # wrongly for checkpoints (a resumed gpt2 run diverged from the single-process one at 1e-2)
        raise CorelmError("--parallel fsdp+tp does not cover fused query/key/value projections (gpt2's c_attn): "
                          "its checkpoints would not resume correctly; use tp, pp+tp or fsdp")
    apply_tp(model, mesh["tp"], sequence_parallel)
    for block in _get(model, layout.blocks):
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model


def _context(model: nn.Module, ids: torch.Tensor) -> Any:
    """The attention context of one forward (mask, rotary tables): what the family's ``hidden_states`` builds."""
    from corelm.ops.attention import decoder_context

    ctx = decoder_context(ids, None, None, None, getattr(model, "sliding_window", None))
    if getattr(model, "rope", None) is not None:
        ctx.rope = model.rope(ctx.input_pos, None)  # (B, 1, T, head_dim) each
    if getattr(model, "rope_local", None) is not None:  # gemma 3's local layers
        ctx.rope_local = model.rope_local(ctx.input_pos, None)
    return ctx


def _embed(model: nn.Module, ids: torch.Tensor, ctx: Any) -> torch.Tensor:
    """The family's embedding step, as its ``hidden_states`` does it: ``(B, T)`` ids -> ``(B, T, d)``."""
    from corelm.models.gpt2 import GPT2

    if isinstance(model, GPT2):  # token + position embeddings
        t = model.transformer
        tok = t.wte(ids)
        return t.drop(tok + t.wpe(ctx.input_pos).to(tok.dtype))
    x = model.model.embed_tokens(ids)
    if hasattr(model, "embed_scale"):  # gemma: times sqrt(d_model), rounded to the activation dtype
        x = x * torch.tensor(model.embed_scale, dtype=x.dtype, device=x.device)
    return model.model.dropout(x)


class _Stage(nn.Module):
    """Blocks ``lo..hi-1`` of a model, plus the embeddings on the first stage and the final norm and head on
    the last: ``forward(input_ids or hidden states) -> hidden states or logits``. It holds the model's own
    modules (shared, not copied), so training a stage trains the model."""

    def __init__(self, model: nn.Module, layout: Layout, lo: int, hi: int, first: bool, last: bool) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(_get(model, p) for p in layout.embeddings) if first else None
        self.layers = nn.ModuleList(_get(model, layout.blocks)[lo:hi])
        self.norm = _get(model, layout.norm) if last else None
        self.lm_head = _get(model, layout.head) if last else None
        self._model = (model,)  # for its embedding step, rotary tables and soft-cap: not parameters of this stage
        self.first, self.last = first, last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self._model[0]
        ctx = _context(model, torch.zeros(x.shape[:2], dtype=torch.long, device=x.device))  # shape, device only
        if self.first:
            x = _embed(model, x, ctx)  # (B, T) ids -> (B, T, d)
        for block in self.layers:
            x = block(x, ctx)
        if self.last:
            x = self.lm_head(self.norm(x))  # (B, T, vocab)
            if getattr(model, "final_softcap", None) is not None:  # gemma 2
                from corelm.models.gemma import softcap

                x = softcap(x, model.final_softcap)
        return x


def split_stages(model: nn.Module, n_stages: int) -> list[_Stage]:
    """The ``n_stages`` contiguous stages of ``model`` (stage ``s``: blocks ``[s L / S, (s + 1) L / S)``).

    Raises:
        CorelmError: a family not covered, tied embeddings, or fewer blocks than stages.
    """
    layout = layout_of(model, "pipeline parallelism")
    if not isinstance(_get(model, layout.head), nn.Linear):
        raise CorelmError("pipeline parallelism needs untied embeddings: the first and last stages would both "
                          "own the embedding matrix (set tie_embeddings: false)")
    n_layers = len(_get(model, layout.blocks))
    if n_layers < n_stages:
        raise CorelmError(f"pipeline parallelism over {n_stages} stages needs at least {n_stages} blocks; "
                          f"the model has {n_layers}")
    return [_Stage(model, layout, s * n_layers // n_stages, (s + 1) * n_layers // n_stages, first=s == 0,
                   last=s == n_stages - 1) for s in range(n_stages)]


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

    def __init__(self, model: nn.Module, stages: list[_Stage], pp_mesh: Any, n_microbatches: int,
                 schedule: str, device: torch.device, tp_mesh: Any = None) -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        stage = stages[pp_mesh.get_local_rank()]
        self.model, self.module, self.n_micro, self.device = model, stage, n_microbatches, device
        self.group = pp_mesh.get_group()
        self.tp_group = tp_mesh.get_group() if tp_mesh is not None else None  # pp+tp: each stage is TP-sharded
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
        """Clip by the global gradient norm over all stages (each rank holds its stage's gradients; under pp+tp,
        its shard of them: sharded gradients' squares are summed over the TP group, replicated ones counted once)."""
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in params if p.grad is not None]
        sq = torch.zeros(2, dtype=torch.float64, device=self.device)  # [sharded over TP, whole on this rank]
        for g in grads:
            sharded = isinstance(g, DTensor) and not all(pl.is_replicate() for pl in g.placements)
            sq[0 if sharded else 1] += _local(g).detach().double().pow(2).sum()
        if self.tp_group is not None:
            shards = sq[:1].clone()
            dist.all_reduce(shards, group=self.tp_group)
            sq[0] = shards[0]
        sq = sq.sum()
        dist.all_reduce(sq, group=self.group)
        norm = sq.sqrt().float()
        coef = min(1.0, max_norm / (float(norm) + 1e-6)) if math.isfinite(max_norm) else 1.0
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
        return norm

    def sync(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Give every rank the whole model (and optimizer state): each stage broadcasts its parameters (under
        pp+tp: its shards, to the ranks of the same TP position). Called before evaluation and checkpoints, which
        then see the full model on every rank."""
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
                dist.broadcast(_local(p.data), src=src, group=self.group)
                if template is None or not p.requires_grad:
                    continue
                state = optimizer.state[p]
                for key, shaped in sorted(template.items()):
                    if key not in state:
                        state[key] = torch.zeros_like(p) if shaped else torch.zeros((), dtype=torch.float32)
                    local = _local(state[key])
                    buf = local.to(self.device)  # AdamW's step count lives on the CPU; NCCL needs the GPU
                    dist.broadcast(buf, src=src, group=self.group)
                    local.copy_(buf)


def apply_pp(model: nn.Module, pp_mesh: Any, n_microbatches: int = 0, schedule: str = "1f1b",
             device: torch.device | None = None, tp_mesh: Any = None) -> Pipeline:
    """Split a model's blocks into ``pp_mesh.size()`` contiguous stages (:func:`split_stages`); this rank runs one.

    The first stage also holds the embeddings, the last the final norm and the head. The model itself is
    untouched (every rank keeps all of it; only its stage's parameters receive gradients), so its names, state
    dict and checkpoints are the single-process ones after :meth:`Pipeline.sync`.

    Args:
        model: a gpt2, llama-family or gemma model with untied embeddings, identical on every rank (under pp+tp:
            already tensor-parallel over ``tp_mesh``).
        pp_mesh: a 1-D device mesh (``build_mesh(...)["pp"]``).
        n_microbatches: micro-batches per batch (0: one per stage); the batch must divide by it.
        schedule: ``gpipe`` (all forwards, then all backwards) or ``1f1b`` (interleaved: fewer live activations).
        device: this rank's device.
        tp_mesh: the tensor-parallel mesh of each stage (pp+tp), for clipping.

    Raises:
        CorelmError: a family not covered, tied embeddings, fewer blocks than stages, or an unknown schedule.
    """
    if schedule not in SCHEDULES:
        raise CorelmError(f"unknown pipeline schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    stages = split_stages(model, pp_mesh.size())  # views: every rank knows the split
    dev = device or next(model.parameters()).device
    return Pipeline(model, stages, pp_mesh, n_microbatches or pp_mesh.size(), schedule, dev, tp_mesh)


def parallelize(model: nn.Module, mode: str, world: int, device: torch.device, *, tp_size: int = 2,
                sequence_parallel: bool = False, pp_microbatches: int = 0,
                pp_schedule: str = "1f1b") -> Pipeline | None:
    """Apply ``--parallel tp | pp | fsdp+tp | pp+tp`` to ``model`` in place (every rank calls it).

    ``tp`` and ``pp`` use every process; ``fsdp+tp`` groups ``tp_size`` processes for TP and shards over the
    ``world / tp_size`` groups; ``pp+tp`` makes ``world / tp_size`` pipeline stages, each tensor-parallel over
    ``tp_size`` processes. Returns the :class:`Pipeline` under ``pp`` and ``pp+tp``, else ``None``.
    """
    if mode in ("fsdp+tp", "pp+tp") and (tp_size < 2 or world % tp_size):
        raise CorelmError(f"--tp-size {tp_size} must be at least 2 and divide the {world} processes")
    if mode == "tp":
        apply_tp(model, build_mesh(world, tp=world, device_type=device.type)["tp"], sequence_parallel)
    elif mode == "fsdp+tp":
        apply_fsdp_tp(model, build_mesh(world, dp=world // tp_size, tp=tp_size, device_type=device.type),
                      sequence_parallel)
    elif mode == "pp":
        return apply_pp(model, build_mesh(world, pp=world, device_type=device.type)["pp"], pp_microbatches,
                        pp_schedule, device)
    elif mode == "pp+tp":
        if sequence_parallel:
            raise CorelmError("--sequence-parallel does not combine with pp+tp: a stage boundary carries the "
                              "whole sequence")
        split_stages(model, world // tp_size)  # refuse what cannot be split before any communication
        mesh = build_mesh(world, pp=world // tp_size, tp=tp_size, device_type=device.type)
        apply_tp(model, mesh["tp"])
        return apply_pp(model, mesh["pp"], pp_microbatches, pp_schedule, device, tp_mesh=mesh["tp"])
    else:
        raise CorelmError(f"unknown parallelism {mode!r}; expected one of {', '.join(MODES)}")
    return None


def data_parallel(mode: str, rank: int, world: int, tp_size: int = 2) -> tuple[int, int]:
    """``(rank, size)`` of this process among the data-parallel replicas: the ranks of one TP group or one
    pipeline read the same batches; ranks of different groups read different ones."""
    if mode in ("tp", "pp", "pp+tp"):
        return 0, 1
    if mode == "fsdp+tp":
        return rank // tp_size, max(1, world // tp_size)
    return rank, world

