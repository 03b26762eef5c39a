"""``corelm pretrain``: train a model from scratch on prepared token shards (causal LM or masked LM).

Examples::

    corelm pretrain --model gpt2-tiny --data data/pydocs --max-steps 500 --seed 7 --save-every 100 --out runs/a
    corelm pretrain --model bert-tiny --objective mlm --nsp --data data/pydocs --out runs/b
    corelm pretrain --model gpt2-tiny --data data/pydocs --max-steps 500 --out runs/a --resume runs/a
    torchrun --nproc-per-node 2 -m corelm pretrain --model gpt2-tiny --data data/pydocs --out runs/d --parallel ddp
    torchrun --nproc-per-node 2 -m corelm pretrain --model llama-tiny --data data/pydocs --out runs/t --parallel tp

The run directory is a normal corelm model directory (``corelm generate --model runs/a``) holding
the newest checkpoint, plus ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/`` and ``loss.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import MISSING, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch

from corelm.commands.args import Options, option, options_from, parser_from, set_threads, threads_option
from corelm.errors import CorelmError
from corelm.train.loop import PARALLEL, TrainConfig, TrainResult
from corelm.train.precision import POLICIES

OBJECTIVES = ("clm", "mlm")


def _loop(name: str, default: Any = MISSING, note: str = "") -> Any:
    """An option of the training loop: :class:`TrainConfig`'s field ``name``, its documentation, and its default
    unless pretraining has its own."""
    spec = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    meta: dict[str, Any] = {"precision": {"policies": POLICIES}} if name == "precision" else {}
    if name == "parallel":
        meta["choices"] = PARALLEL
    if name == "pp_schedule":
        meta["choices"] = ("gpipe", "1f1b")
    # TrainConfig documents each field once, in its metadata: that is the help text here too
    return option(spec.default if default is MISSING else default, spec.metadata["help"] + note, **meta)


@dataclass
class PretrainOptions(Options):
    """A pretraining run: the model, the data, and the training loop's options (:class:`TrainConfig`'s fields,
    with pretraining's defaults: small models from scratch like a higher learning rate)."""

    model: str = option(help="preset (gpt2-tiny, bert-tiny, llama-tiny, ... see `corelm models`), a config file "
                             "(YAML/JSON of ModelConfig fields) or a model directory to continue pretraining")
    data: str = option(help="directory written by `corelm prepare` (tokenizer and vocabulary come from its manifest)")
    out: str | None = option(None, "run directory (required unless --resume names it)")
    resume: str | None = option(None, "continue the run in this directory from its newest complete checkpoint "
                                      "(use the same --out and options)")
    objective: Literal["clm", "mlm"] | None = option(
        None, "clm = next-token prediction (decoders), mlm = BERT masked LM; default from the family")
    nsp: bool = option(False, "mlm: add next-sentence prediction (BERT's second task)")
    seq_len: int | None = option(None, "tokens per training sequence (default min(256, context) for clm, 128 for mlm)")
    batch_size: int = option(8, "sequences per micro-batch per process")
    eval_batches: int = option(8, "validation batches per evaluation")
    attention: Literal["sdpa", "reference"] = option(
        "sdpa", "attention kernel: fused scaled_dot_product_attention or the readable reference")
    device: str = option("auto", "where to train: auto = cuda when a GPU is visible (NCCL under torchrun), "
                                 "else cpu (gloo)", device=True)
    threads: int | None = threads_option()
    # the training loop (corelm.train.loop.TrainConfig; out and resume are above)
    max_steps: int = _loop("max_steps", 500)
    lr: float = _loop("lr", 1e-3)
    min_lr_ratio: float = _loop("min_lr_ratio")
    warmup_steps: int | None = _loop("warmup_steps", None, " (default: 5% of --max-steps)")
    optimizer: Literal["adamw", "sgd"] = _loop("optimizer")
    momentum: float = _loop("momentum")
    weight_decay: float = _loop("weight_decay")
    beta1: float = _loop("beta1")
    beta2: float = _loop("beta2")
    grad_clip: float = _loop("grad_clip")
    grad_accum: int = _loop("grad_accum")
    precision: str = _loop("precision")
    compile: bool = _loop("compile")
    activation_checkpointing: bool = _loop("activation_checkpointing")
    parallel: str = _loop("parallel")
    tp_size: int = _loop("tp_size")
    sequence_parallel: bool = _loop("sequence_parallel")
    pp_microbatches: int = _loop("pp_microbatches")
    pp_schedule: str = _loop("pp_schedule")
    eval_every: int | None = _loop("eval_every", None, " (default: 10 times per run)")
    log_every: int = _loop("log_every")
    save_every: int = _loop("save_every")
    keep_last: int = _loop("keep_last")
    seed: int = _loop("seed")
    max_bad_steps: int = _loop("max_bad_steps")
    progress: bool = _loop("progress")
    tracker: list[str] | None = dataclasses.field(  # a list: --tracker a --tracker b (or a,b)
        default=None, metadata=next(f for f in dataclasses.fields(TrainConfig) if f.name == "tracker").metadata)
    tensorboard: bool = _loop("tensorboard")
    measure_mfu: bool = _loop("measure_mfu")
    wandb: str | None = _loop("wandb")

    def check(self) -> None:
        self.train_config()  # the loop's own validation, before any data is read

    def train_config(self) -> TrainConfig:
        """The loop's :class:`TrainConfig`: these options, the run directory, and the warmup and evaluation
        intervals pretraining derives from ``max_steps`` when they are not given."""
        loop = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)
                if f.name not in ("out", "resume") and hasattr(self, f.name)}  # tests/test_command_options: all
        if self.warmup_steps is None:
            loop["warmup_steps"] = max(1, self.max_steps // 20)
        if self.eval_every is None:
            loop["eval_every"] = max(1, self.max_steps // 10)
        return TrainConfig(**loop, out=self.out or self.resume, resume=self.resume)


def build_parser() -> argparse.ArgumentParser:
    return parser_from(
        PretrainOptions, prog="corelm pretrain",
        description="Pretrain a Transformer on data written by `corelm prepare` with the shared training loop: "
                    "AdamW (no decay on norms/biases/embeddings), warmup + cosine, clipping, accumulation, "
                    "precision policies, exact resume, DDP/FSDP under torchrun.")


def pretrain(options: PretrainOptions) -> TrainResult:
    """Pretrain ``options.model`` on ``options.data`` into ``options.out`` (under torchrun: one process of the
    group) and return what the run did; ``.stopped`` is ``"interrupted"`` after Ctrl-C or SIGTERM, with the
    newest checkpoint saved."""
    from corelm.train.distributed import init_distributed, shutdown_distributed

    set_threads(options.threads)
    info = init_distributed(None if options.device == "auto" else options.device)
    try:
        return run(options, info)
    finally:
        shutdown_distributed()


def main(argv: list[str]) -> int:
    result = pretrain(options_from(PretrainOptions, build_parser().parse_args(argv)))
    return 130 if result.stopped == "interrupted" else 0  # 130: like every command stopped by SIGINT/SIGTERM


# the setup in the order a run needs it: run directory, objective, data, model, transforms, loop
def run(args: PretrainOptions, info: Any) -> TrainResult:  # noqa: C901
    from corelm.data.prepare import read_manifest
    from corelm.data.shards import TokenWindows
    from corelm.loading import training_model
    from corelm.models import build_model
    from corelm.objectives import MaskingSpec, MLMCollate, causal_lm_loss, mlm_loss
    from corelm.ops.attention import set_attention_impl
    from corelm.plan.formulas import train_flops_per_token
    from corelm.tokenizer import Tokenizer
    from corelm.train.checkpoint import checkpoint_dirs
    from corelm.train.loader import ResumableLoader
    from corelm.train.loop import evaluate_loss, train
    from corelm.train.parallel import data_parallel

    out = args.out or args.resume
    if not out:
        raise CorelmError("give --out RUN_DIR (or --resume RUN_DIR to continue a run)")
    if args.resume and not Path(args.resume).exists():
        raise CorelmError(f"--resume {args.resume}: no such run directory")
    if not args.resume and checkpoint_dirs(Path(out)):
        raise CorelmError(f"{out} already holds a run; pass --resume {out} to continue it or choose another --out")
    manifest = read_manifest(args.data)
    tokenizer = Tokenizer.from_dir(args.data)
    config, loaded = training_model(args.model, manifest["vocab_size"])
    objective = args.objective or ("mlm" if config.is_encoder else "clm")
    if objective == "clm" and config.is_encoder:
        raise CorelmError(f"{args.model} is an encoder: use --objective mlm")
    if objective == "mlm" and not config.is_encoder:
        raise CorelmError(f"{args.model} is a decoder: masked LM needs an encoder (e.g. bert-tiny)")
    seq_len = args.seq_len or min(config.max_seq_len, 128 if objective == "mlm" else 256)
    if seq_len > config.max_seq_len:
        raise CorelmError(f"--seq-len {seq_len} exceeds the model's context of {config.max_seq_len}")
    set_attention_impl(args.attention)

    specials = manifest.get("special_token_ids", {})
    if config.is_encoder and specials.get("pad_token") is not None:
        config = dataclasses.replace(config, pad_token_id=specials["pad_token"])
    torch.manual_seed(args.seed)  # the same initial weights on every rank (FSDP does not broadcast)
    model = loaded if loaded is not None else build_model(config)

    if objective == "clm":
        train_set = TokenWindows(args.data, "train", seq_len + 1, seq_len)
        val_set = TokenWindows(args.data, "val", seq_len + 1, seq_len)
        loss_fn, with_idx = causal_lm_loss, False

        def make_collate(ds: Any, seed: int = 0) -> None:
            return None  # packed windows stack as they are
    else:
        missing = [k for k in ("mask_token", "cls_token", "sep_token") if specials.get(k) is None]
        if missing:
            raise CorelmError(f"the tokenizer of {args.data} has no {', '.join(missing)}: masked LM needs them "
                              "(prepare without --tokenizer to train one that has)")
        body = seq_len - (3 if args.nsp else 2)
        train_set = TokenWindows(args.data, "train", body, body)
        val_set = TokenWindows(args.data, "val", body, body)
        spec = MaskingSpec(mask_id=specials["mask_token"], vocab_size=config.vocab_size,
                           special_ids=tuple(sorted({v for v in specials.values() if v is not None})))
        loss_fn, with_idx = mlm_loss, True

        def make_collate(ds: Any, seed: int = args.seed) -> MLMCollate:
            return MLMCollate(ds, spec, specials["cls_token"], specials["sep_token"], seed=seed, nsp=args.nsp)

    # the ranks of one tensor-parallel group or pipeline read the same batches (corelm.train.parallel)
    data_rank, data_world = data_parallel(args.parallel, info.rank, info.world_size, args.tp_size)
    batches = ResumableLoader(train_set, args.batch_size, make_collate(train_set), seed=args.seed,
                              rank=data_rank, world_size=data_world, collate_with_indices=with_idx)
    global_batch = args.batch_size * data_world
    n_eval = min(args.eval_batches, len(val_set) // global_batch)
    eval_fn = None
    if n_eval > 0:
        def make_val() -> ResumableLoader:
            return ResumableLoader(val_set, args.batch_size, make_collate(val_set, seed=args.seed + 1), shuffle=False,
                                   rank=data_rank, world_size=data_world, collate_with_indices=with_idx)

        def eval_fn(m: torch.nn.Module) -> dict[str, float]:
            return evaluate_loss(m, loss_fn, make_val, n_eval, info)
    elif info.is_main:
        print(f"note: the val split ({len(val_set)} sequences) is smaller than one batch; no evaluation",
              file=sys.stderr)

    cfg = args.train_config()
    run_config = {"model": args.model, "model_config": config.to_dict(), "objective": objective, "nsp": args.nsp,
                  "data": str(args.data), "seq_len": seq_len, "batch_size": args.batch_size,
                  "global_batch": global_batch * cfg.grad_accum, "world_size": info.world_size,
                  "attention": args.attention, "tokenizer": manifest["tokenizer_source"],
                  "train": dataclasses.asdict(cfg)}
    if info.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"pretrain {args.model} ({n_params / 1e6:.2f}M params, vocab {config.vocab_size}) on {args.data}: "
              f"{objective}, {len(train_set):,} sequences of {seq_len}, global batch {global_batch * cfg.grad_accum} "
              f"({args.batch_size} per process x {data_world} "
              f"{'process(es)' if data_world == info.world_size else 'data-parallel group(s)'} x "
              f"{cfg.grad_accum} accumulation)")
        print("config: " + json.dumps({k: v for k, v in run_config.items() if k != "model_config"}), flush=True)

    def export(state: dict[str, torch.Tensor], out_dir: Path) -> None:
        from corelm.io.hf import save_hf_dir

        save_hf_dir(SimpleNamespace(state_dict=lambda: state), config, out_dir, tokenizer=tokenizer)
        (out_dir / "run_config.json").write_text(json.dumps(run_config, indent=2, default=str) + "\n")

    flops = train_flops_per_token(config, seq_len)
    result = train(model, loss_fn, batches, cfg, eval_fn=eval_fn, export_fn=export, flops_per_token=flops,
                   dist=info, run_config=run_config)
    if info.is_main:
        m = result.last_metrics
        parts = [f"step {result.step}", f"loss {m.get('loss', float('nan')):.4f}"]
        if "val_loss" in m:
            parts.append(f"val loss {m['val_loss']:.4f} (ppl {m['val_ppl']:.2f})")
        if result.skipped_steps:
            parts.append(f"{result.skipped_steps} skipped steps")
        print(("interrupted: " if result.stopped == "interrupted" else "done: ") + ", ".join(parts))
        if result.checkpoint:
            # an encoder does not generate: point at what it can do (fine-tune a task head, then evaluate)
            use = (f"corelm finetune --model {out} --task classify --data ... --out runs/cls" if config.is_encoder
                   else f"corelm generate --model {out} \"...\"")
            print(f"checkpoint {result.checkpoint}; the run directory {out} is a model: {use}")
    return result
