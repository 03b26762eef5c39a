"""``--threads N`` on every command that computes: one declaration (corelm.commands.args.threads_option), one
default (OMP_NUM_THREADS if set, else the physical cores), checked like every other option."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

from corelm.cli import main
from corelm.commands.args import parser_from, set_threads
from corelm.cpu import physical_cores

# command -> its options class (module, name)
COMPUTING = {
    "generate": ("corelm.commands.generate", "GenerateOptions"), "chat": ("corelm.commands.chat", "ChatOptions"),
    "evaluate": ("corelm.commands.evaluate", "EvaluateOptions"),
    "predict": ("corelm.commands.predict", "PredictOptions"), "compare": ("corelm.commands.compare", "CompareOptions"),
    "serve": ("corelm.commands.serve", "ServeCommandOptions"),
    "quantize": ("corelm.commands.quantize", "QuantizeOptions"), "prune": ("corelm.commands.prune", "PruneOptions"),
    "finetune": ("corelm.finetune.run", "FinetuneOptions"), "pretrain": ("corelm.commands.pretrain", "PretrainOptions"),
    "distill": ("corelm.commands.distill", "DistillOptions"), "bench": ("corelm.commands.bench", "BenchOptions"),
    "export": ("corelm.commands.export", "ExportOptions"), "merge": ("corelm.commands.merge", "MergeOptions"),
    "convert": ("corelm.commands.convert", "ConvertOptions"),
}


@pytest.mark.parametrize("command", sorted(COMPUTING))
def test_every_computing_command_declares_the_shared_threads_option(command):
    module, name = COMPUTING[command]
    options = getattr(importlib.import_module(module), name)
    (threads,) = [f for f in dataclasses.fields(options) if f.name == "threads"]
    assert threads.metadata.get("threads") is True and threads.default is None  # threads_option(), not a copy
    help_text = parser_from(options, prog=f"corelm {command}").format_help()
    assert "--threads N" in help_text and "OMP_NUM_THREADS" in help_text


@pytest.mark.parametrize("value", ["0", "-2"])
def test_threads_below_one_is_one_line_and_exit_2(value, capsys):
    assert main(["generate", "hi", "--threads", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"corelm generate: error: --threads must be a whole number of at least 1, got {int(value)}"]


def test_default_is_omp_num_threads_else_the_physical_cores(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_threads(None) == 1 == torch.get_num_threads()
        assert set_threads(2) == 2 == torch.get_num_threads()  # --threads wins
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert set_threads(None) == physical_cores() == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
