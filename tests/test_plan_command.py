"""The planner recommends layouts corelm can run, and the command line it prints for one is accepted by
``corelm pretrain`` with a ``--parallel`` value among its choices and as many processes as the layout has devices."""

from __future__ import annotations

import shlex

import pytest

from corelm.commands import pretrain
from corelm.commands.args import options_from
from corelm.loading import config_for
from corelm.plan import planner as P
from corelm.plan.hardware import get_hardware
from corelm.train.loop import PARALLEL

CASES = [  # model, hardware, devices, workload settings: DDP/FSDP, FSDP x TP, TP, two nodes, one CPU
    ("gpt2", "h100-sxm", 2, {}),
    ("llama-3.1-8b", "h100-sxm", 8, {"tp": 2}),
    ("llama-3.1-8b", "h100-sxm", 8, {"tp": 8, "batch": 8}),
    ("llama-3.1-8b", "a100-80gb", 16, {}),
    ("gpt2", "cpu", 1, {"seq_len": 128, "batch": 8}),
]


def test_a_planned_fine_tuning_run_prints_its_finetune_command():
    from corelm.commands import finetune

    d = P.plan(config_for("smollm2-135m", None), P.Workload(task="finetune", method="lora", seq_len=512, batch=4,
                                                            micro_batch=4), [get_hardware("a100-80gb")], 1).devices[0]
    argv = shlex.split(d.command)
    assert argv[:2] == ["corelm", "finetune"]
    opts = options_from(finetune.FinetuneOptions, finetune.build_parser().parse_args(argv[2:]))
    assert opts.method == "lora" and opts.batch_size == 4 and opts.max_len == 512


def _plan(model: str, hw: str, count: int, **workload) -> P.DevicePlan:
    p = P.plan(config_for(model, None), P.Workload(task="pretrain", tokens=1e8, **workload), [get_hardware(hw)], count)
    (d,) = p.devices
    assert d.fits, d.reason
    return d


@pytest.mark.parametrize(("model", "hw", "count", "workload"), CASES)
def test_recommended_layout_runs_with_the_printed_command(model, hw, count, workload):
    d = _plan(model, hw, count, **workload)
    lay = d.layout
    assert lay.zero in (0, 3) and lay.recompute in P.RUNNABLE_RECOMPUTE and lay.parallel is not None
    argv = shlex.split(d.command)
    if count > 1:  # torchrun --nproc-per-node N [--nnodes M ...] -m corelm pretrain ...
        assert argv[0] == "torchrun" and argv[argv.index("-m") + 1:][:2] == ["corelm", "pretrain"]
        nodes = int(argv[argv.index("--nnodes") + 1]) if "--nnodes" in argv else 1
        assert int(argv[argv.index("--nproc-per-node") + 1]) * nodes == count == lay.dp * lay.tp
    else:
        assert argv[:2] == ["corelm", "pretrain"]
    args = argv[argv.index("pretrain") + 1:]
    opts = options_from(pretrain.PretrainOptions, pretrain.build_parser().parse_args(args))  # accepted as is
    assert opts.parallel in PARALLEL and opts.parallel == (lay.parallel if count > 1 else "none")
    assert opts.batch_size == lay.micro_batch and opts.grad_accum == lay.grad_accum
    assert opts.precision == lay.precision and opts.activation_checkpointing == (lay.recompute == "full")
    if lay.tp > 1:
        assert opts.parallel in ("tp", "fsdp+tp")
        assert (opts.tp_size if opts.parallel == "fsdp+tp" else count) == lay.tp
    else:
        assert opts.parallel in ("none", "ddp", "fsdp")


def test_unrunnable_settings_given_by_the_user_are_planned_without_a_command():
    d = _plan("gpt2", "h100-sxm", 4, zero=1)  # ZeRO-1: corelm has DDP (0) and FSDP (3) only
    assert d.command is None and "no ZeRO-1/2" in d.command_note
    d = _plan("gpt2", "h100-sxm", 1, recompute="selective")
    assert d.command is None and "selective" in d.command_note
    d = _plan("llama-3.1-8b", "tpu-v5p", 8)
    assert d.command is None and "no XLA backend" in d.command_note
    d = P.plan(config_for("llama-2-7b", None), P.Workload(task="finetune", method="lora", seq_len=4096, batch=8),
               [get_hardware("l4")], 1).devices[0]
    assert d.fits and d.layout.recompute == "full" and "no gradient accumulation" in d.command_note
    layout = P.Layout("bf16-mixed", 1, 2, 0, 1, 1, "none")
    cmd, note = P.run_command(config_for("bert-base", None), P.Workload(), layout, 2, 8, 128, 10)
    assert cmd is None and "tensor parallelism covers gpt2, llama, gemma" in note
