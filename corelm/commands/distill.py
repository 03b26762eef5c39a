"""``corelm distill``: train a small student on a teacher's next-token distributions.

Knowledge distillation (Hinton et al. 2015) through corelm's one training loop: the data comes from
``corelm prepare`` (tokenized with the teacher's tokenizer), the loss is
:func:`corelm.compress.distill.distill_loss_fn`, and everything else -- schedule, precision,
checkpoints, ``--resume`` -- is :func:`corelm.train.loop.train`. The run directory is a model
(``corelm generate --model RUN``, ``corelm generate --draft RUN`` as a speculative draft).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Literal

import torch

from corelm.commands.args import (
    PRECISION_HELP,
    TRACKER_HELP,
    Options,
    as_options,
    option,
    options_from,
    parser_from,
    resolve_trackers,
    set_threads,
    threads_option,
)
from corelm.errors import CorelmError

if TYPE_CHECKING:
    from corelm.train.loop import TrainResult


@dataclass
class DistillOptions(Options):
    """A distillation run: the teacher, the student, the data, and the loss's temperature and mix."""

    teacher: str = option(help="teacher: embedded model name, .gguf or checkpoint directory")
    data: str = option(help="directory written by `corelm prepare` with the teacher's tokenizer")
    out: str = option(help="run directory (checkpoints, metrics); resumed if it holds a run")
    student: str = option("llama-tiny", "student: a preset (random init, e.g. llama-tiny with SmolLM2's vocabulary) "
                                        "or a directory")
    teacher_dtype: Literal["auto", "fp32", "bf16"] = option(
        "auto", "dtype the frozen teacher runs in (auto: what this machine runs fastest, e.g. bf16 on CPUs with "
                "AVX512_BF16); its logits are upcast to fp32 for the loss")
    temperature: float = option(2.0, "softmax temperature T of both distributions")
    alpha: float = option(0.5, "weight of the distillation term (1 - alpha: hard labels)")
    max_steps: int = option(200, "optimizer steps")
    lr: float = option(1e-3, "peak learning rate")
    batch_size: int = option(8, "sequences per step")
    seq_len: int = option(128, "tokens per sequence")
    precision: str = option("fp32", PRECISION_HELP, precision=True)
    eval_batches: int = option(8, "validation batches per evaluation")
    seed: int = option(0, "seed of initialisation and data order")
    progress: bool = option(True, "the live progress bar")
    tracker: list[str] | None = field(default=None, metadata={"help": TRACKER_HELP})
    wandb: str | None = option(None, "also log to this Weights & Biases project (optional wandb package)")
    threads: int | None = threads_option()

    def check(self) -> None:
        from corelm.compress.distill import check_loss_params

        check_loss_params(self.temperature, self.alpha)  # before the teacher is loaded
        resolve_trackers(self.tracker, wandb=self.wandb)


def build_parser() -> argparse.ArgumentParser:
    return parser_from(
        DistillOptions, prog="corelm distill",
        description="Distill a teacher model into a smaller student with the same tokenizer: loss = "
                    "alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy.")


def main(argv: list[str]) -> int:
    result = distill(options_from(DistillOptions, build_parser().parse_args(argv)))
    m = result.last_metrics
    parts = [f"step {result.step}", f"loss {m.get('loss', float('nan')):.4f}"]
    if "val_loss" in m:
        parts.append(f"val loss {m['val_loss']:.4f} (ppl {m['val_ppl']:.2f})")
    print(("interrupted: " if result.stopped == "interrupted" else "done: ") + ", ".join(parts), file=sys.stderr)
    return 130 if result.stopped == "interrupted" else 0  # 130: like every command stopped by SIGINT/SIGTERM


def distill(options: DistillOptions | str, *values: Any, **named: Any) -> TrainResult:
    """Distill ``options.teacher`` into ``options.student`` on ``options.data``, writing the run to ``options.out``
    (resumed when it holds checkpoints); returns what the run did (``.stopped`` is ``"interrupted"`` after Ctrl-C or
    SIGTERM, with the newest checkpoint saved). ``distill(teacher, data, out, student=..., ...)`` is
    ``distill(DistillOptions(...))``."""
    import corelm
    from corelm.compress.distill import check_pair, distill_loss_fn
    from corelm.data.prepare import read_manifest
    from corelm.data.shards import TokenWindows
    from corelm.loading import training_model
    from corelm.models import build_model
    from corelm.objectives import causal_lm_loss
    from corelm.tokenizer import Tokenizer
    from corelm.train.checkpoint import checkpoint_dirs
    from corelm.train.loader import ResumableLoader
    from corelm.train.loop import TrainConfig, evaluate_loss, train

    args = as_options(DistillOptions, options, values, named)
    set_threads(args.threads)
    manifest = read_manifest(args.data)
    teacher = corelm.load(args.teacher, dtype=args.teacher_dtype)
    if teacher.config.is_encoder:
        raise CorelmError(f"{args.teacher} is an encoder; distillation here is for decoders")
    if manifest["vocab_size"] != teacher.config.vocab_size:
        raise CorelmError(f"{args.data} was tokenized with a vocabulary of {manifest['vocab_size']}, the teacher has "
                          f"{teacher.config.vocab_size}: run `corelm prepare --tokenizer {args.teacher}`")
    config, loaded = training_model(args.student, manifest["vocab_size"])
    torch.manual_seed(args.seed)
    student = loaded if loaded is not None else build_model(config)
    check_pair(teacher.model, student)
    if args.seq_len > config.max_seq_len:
        raise CorelmError(f"--seq-len {args.seq_len} exceeds the student's context of {config.max_seq_len}")
    tokenizer = Tokenizer.from_dir(args.data)
    train_set = TokenWindows(args.data, "train", args.seq_len + 1, args.seq_len)
    val_set = TokenWindows(args.data, "val", args.seq_len + 1, args.seq_len)
    batches = ResumableLoader(train_set, args.batch_size, seed=args.seed)
    n_eval = min(args.eval_batches, len(val_set) // args.batch_size)

    def make_val() -> ResumableLoader:
        return ResumableLoader(val_set, args.batch_size, shuffle=False)

    eval_fn = (lambda m: evaluate_loss(m, causal_lm_loss, make_val, n_eval)) if n_eval > 0 else None
    resume = args.out if checkpoint_dirs(Path(args.out)) else None
    cfg = TrainConfig(max_steps=args.max_steps, lr=args.lr, warmup_steps=max(1, args.max_steps // 20),
                      precision=args.precision, eval_every=max(1, args.max_steps // 10), seed=args.seed,
                      out=args.out, resume=resume, progress=args.progress, tracker=args.tracker, wandb=args.wandb)
    run_config = {"teacher": args.teacher, "student": args.student, "model_config": config.to_dict(),
                  "data": str(args.data), "temperature": args.temperature, "alpha": args.alpha,
                  "teacher_dtype": str(teacher.dtype).removeprefix("torch."),
                  "seq_len": args.seq_len, "batch_size": args.batch_size, "train": dataclasses.asdict(cfg)}
    n_student = sum(p.numel() for p in student.parameters()) / 1e6
    n_teacher = sum(p.numel() for p in teacher.model.parameters()) / 1e6
    print(f"distill {args.teacher} ({n_teacher:.1f}M) -> {args.student} ({n_student:.2f}M) on {args.data}: "
          f"{len(train_set):,} sequences of {args.seq_len}, T={args.temperature}, alpha={args.alpha}, "
          f"teacher in {str(teacher.dtype).removeprefix('torch.')}", flush=True)

    def export(state: dict[str, torch.Tensor], out_dir: Path) -> None:
        from corelm.io.hf import save_hf_dir

        save_hf_dir(SimpleNamespace(state_dict=lambda: state), config, out_dir, tokenizer=tokenizer)
        (out_dir / "run_config.json").write_text(json.dumps(run_config, indent=2, default=str) + "\n")

    return train(student, distill_loss_fn(teacher.model, args.temperature, args.alpha), batches, cfg,
                 eval_fn=eval_fn, export_fn=export, run_config=run_config)
