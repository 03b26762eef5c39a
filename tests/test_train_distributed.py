"""torchrun on CPU (gloo): 2-process DDP and FSDP2 give the single-process loss curve at the same global batch,
and a sharded run's checkpoint loads and resumes in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from corelm.cli import main as cli

from .test_pretrain_cli import make_tiny_data

pytestmark = pytest.mark.slow
STEPS = 5


def _args(tiny, out, batch, *extra):
    return ["pretrain", "--model", str(tiny / "gpt2.json"), "--data", str(tiny / "data"), "--seq-len", "32",
            "--batch-size", str(batch), "--max-steps", str(STEPS), "--out", str(out), "--no-progress",
            "--no-tensorboard", "--no-measure-mfu", "--eval-every", "0", "--eval-batches", "1", "--device", "cpu",
            *extra]


def _losses(run):
    return torch.tensor([r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                         if "loss" in r])


def test_ddp_and_fsdp_match_single_process(tmp_path):
    tiny = make_tiny_data(tmp_path)
    # TMPDIR: torchrun's per-launch torchelastic_* directories stay under the test's own directory
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "corelm"]
    # Both launches run concurrently (each picks a free port) while the reference runs here.
    procs = {mode: subprocess.Popen(torchrun + _args(tiny, tmp_path / mode, 2, "--parallel", mode), env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for mode in ("ddp", "fsdp")}
    assert cli(_args(tiny, tmp_path / "single", 4)) == 0  # 1 process x 4 = 2 processes x 2
    for mode, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    single = _losses(tmp_path / "single")
    assert len(single) == STEPS and single[-1] < single[0]
    for mode in ("ddp", "fsdp"):
        torch.testing.assert_close(_losses(tmp_path / mode), single, rtol=1e-5, atol=1e-5)

    # The FSDP checkpoint holds full tensors: it loads in a single process and equals the reference weights.
    from safetensors.torch import load_file

    sharded = load_file(str(tmp_path / "fsdp" / "model.safetensors"))
    reference = load_file(str(tmp_path / "single" / "model.safetensors"))
    assert sharded.keys() == reference.keys()
    for k in reference:
        torch.testing.assert_close(sharded[k], reference[k], rtol=1e-4, atol=1e-5)
    # ... and its optimizer state resumes in one process (global batch unchanged: 4).
    resume = _args(tiny, tmp_path / "fsdp", 4, "--resume", str(tmp_path / "fsdp"), "--max-steps", str(STEPS + 2))
    with pytest.warns(UserWarning, match="written by 2 processes"):
        code = cli(resume)  # argparse keeps the last --max-steps
    assert code == 0
    assert len(_losses(tmp_path / "fsdp")) == STEPS + 2
