"""torchrun on CPU (gloo): tensor, pipeline and FSDP x tensor parallelism of a tiny llama give the single-process
logits, loss curve, checkpoint and resumed losses; layouts that cannot run are refused with a CorelmError.

The test launches this file as a torchrun worker (``python -m torch.distributed.run ... test_train_parallel.py
MODE OUT``); the worker trains with :func:`corelm.train.train` and writes rank 0's losses and logits."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

STEPS, BATCH, T = 4, 4, 16


def tiny_llama(tie: bool = False):
    from corelm.config import ModelConfig
    from corelm.models import build_model

    torch.manual_seed(0)
    config = ModelConfig(family="llama", vocab_size=64, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=64,
                         max_seq_len=64, tie_embeddings=tie)
    return build_model(config)


class Batches:
    """Two fixed batches of packed windows (inputs ``[:, :-1]``), again and again (the loss falls); resumable."""

    def __init__(self) -> None:
        self.data = torch.randint(0, 64, (2, BATCH, T + 1), generator=torch.Generator().manual_seed(1))
        self.i = 0

    def __next__(self) -> torch.Tensor:
        self.i += 1
        return self.data[(self.i - 1) % 2]

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]


def loss_fn(model, batch):
    logits = model(batch[:, :-1])  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()), int(batch[:, 1:].numel())


def run(mode: str, out: Path, tie: bool = False, **extra) -> list[float]:
    from corelm.train.loop import TrainConfig, train

    info = None
    if mode != "none":
        from corelm.train.distributed import init_distributed

        info = init_distributed("cpu")
    model = tiny_llama(tie)
    probe = next(Batches())[:, :-1]
    cfg = TrainConfig(max_steps=STEPS, lr=1e-2, warmup_steps=1, parallel=mode, progress=False, tensorboard=False,
                      measure_mfu=False, out=str(out), **extra)
    logits = {}
    if mode in ("none", "tp"):  # the forward of a fresh model (a pipeline runs only inside its schedule)
        from corelm.train.parallel import apply_tp, build_mesh

        fresh, tied = tiny_llama(tie), tiny_llama(tie=True)
        if mode == "tp":
            mesh = build_mesh(2, tp=2)["tp"]
            apply_tp(fresh, mesh)
            apply_tp(tied, mesh, sequence_parallel=True)  # tied head: the replicated embedding matrix
        with torch.no_grad():
            logits["initial"], logits["tied_sp"] = fresh(probe), tied(probe)
    result = train(model, loss_fn, Batches(), cfg, dist=info)
    with torch.no_grad():  # every rank holds the whole trained model (TP: gathered by the layers; PP: synced)
        logits["trained"] = model(probe)
    losses = [loss for _, loss in result.losses]
    # resume a fresh model from the checkpoint (full tensors, re-sharded on load) and train 2 more steps
    cfg = dataclasses.replace(cfg, max_steps=STEPS + 2, resume=str(out))
    losses += [loss for _, loss in train(tiny_llama(tie), loss_fn, Batches(), cfg, dist=info).losses]
    if mode == "none" or info.rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in logits.items()}, str(out / "logits.safetensors"))
    return losses


def _torchrun(tmp_path: Path, mode: str, nproc: int = 2, **config) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), __file__,
           mode, str(tmp_path / mode), json.dumps(config)]
    return subprocess.Popen(cmd, env=env, cwd=Path(__file__).parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.mark.slow
def test_tp_pp_and_fsdp_tp_match_single_process(tmp_path):
    # concurrent launches: TP=2; PP=2 stages, 1F1B over 4 micro-batches; FSDP=2 x TP=2 with sequence parallel
    procs = {"tp": _torchrun(tmp_path, "tp"), "pp": _torchrun(tmp_path, "pp", pp_microbatches=4),
             "fsdp+tp": _torchrun(tmp_path, "fsdp+tp", 4, tp_size=2, sequence_parallel=True)}
    reference = torch.tensor(run("none", tmp_path / "none"))
    for proc in procs.values():
        _finish(proc)
    assert len(reference) == STEPS + 2 and reference[-1] < reference[0] - 0.2
    from safetensors.torch import load_file

    want = load_file(str(tmp_path / "none" / "logits.safetensors"))
    step = f"checkpoints/step-{STEPS:06d}/model.safetensors"
    weights = load_file(str(tmp_path / "none" / step))
    for mode in procs:
        # the same losses, also over the 2 steps after resuming from the checkpoint
        losses = torch.tensor(json.loads((tmp_path / mode / "losses.json").read_text()))
        torch.testing.assert_close(losses, reference, rtol=1e-5, atol=1e-5, msg=mode)
        got = load_file(str(tmp_path / mode / "logits.safetensors"))
        for k in got:  # TP: fresh models' (untied; tied + SP) and the trained model's logits; else trained
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4, msg=f"{mode}: {k} logits")
        # the checkpoint holds full tensors with the single-process names and values; Adam's m / sqrt(v) turns
        # last-bit gradient differences of near-zero gradients into updates of up to lr: atol 2e-4 at lr 1e-2
        got = load_file(str(tmp_path / mode / step))
        assert got.keys() == weights.keys()
        for k in weights:
            torch.testing.assert_close(got[k], weights[k], rtol=1e-4, atol=2e-4, msg=f"{mode}: {k}")


def test_tp_degree_must_divide_heads():
    from corelm.errors import CorelmError
    from corelm.train.parallel import check_tp

    config = tiny_llama().config  # 4 heads, 2 KV heads, d_ff 64
    check_tp(config, 2)
    with pytest.raises(CorelmError, match=r"key/value heads \(n_kv_head\) to divide by 4"):
        check_tp(config, 4)
    with pytest.raises(CorelmError, match=r"attention heads \(n_head\) to divide by 3"):
        check_tp(config, 3)


class _Mesh:
    """A stand-in 1-D mesh: the checks run before any communication."""

    def __init__(self, n: int) -> None:
        self.n = n

    def size(self) -> int:
        return self.n

    def get_local_rank(self) -> int:
        return 0


def test_parallel_layouts_that_cannot_run_are_refused():
    from corelm.errors import CorelmError
    from corelm.models import build_model
    from corelm.train.loop import TrainConfig
    from corelm.train.parallel import apply_pp, apply_tp, build_mesh

    with pytest.raises(CorelmError, match=r"key/value heads \(n_kv_head\) to divide by 4; .* has 2"):
        apply_tp(tiny_llama(), _Mesh(4))
    with pytest.raises(CorelmError, match="llama family only"):
        apply_tp(build_model(tiny_llama().config.__class__(family="gpt2", n_layer=1, n_head=2, d_model=8,
                                                           vocab_size=8, max_seq_len=8)), _Mesh(2))
    with pytest.raises(CorelmError, match="untied embeddings"):
        apply_pp(tiny_llama(tie=True), _Mesh(2))
    with pytest.raises(CorelmError, match="at least 3 blocks; the model has 2"):
        apply_pp(tiny_llama(), _Mesh(3))
    with pytest.raises(CorelmError, match="cannot form pp=1 x dp=1 x tp=3"):
        build_mesh(2, tp=3)
    with pytest.raises(CorelmError, match="expected gpipe or 1f1b"):
        TrainConfig(parallel="pp", pp_schedule="zb")
    with pytest.raises(CorelmError, match="expected none, ddp, fsdp, tp, pp or fsdp\\+tp"):
        TrainConfig(parallel="tp+pp")


if __name__ == "__main__":  # a torchrun worker: MODE OUT [TrainConfig fields as JSON]
    mode, out = sys.argv[1], Path(sys.argv[2])
    sys.path.insert(0, str(Path(__file__).parents[1]))
    losses = run(mode, out, **json.loads(sys.argv[3] if len(sys.argv) > 3 else "{}"))
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "losses.json").write_text(json.dumps(losses))
    from corelm.train.distributed import shutdown_distributed

    shutdown_distributed()
