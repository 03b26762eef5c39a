"""torchrun on CPU (gloo): tensor, pipeline, FSDP x tensor and pipeline x tensor parallelism of tiny llama, gpt2
and gemma models give the single-process logits, loss curve, checkpoint and resumed losses; a checkpoint saved
under TP x 2 resumes under FSDP x 2 and in one process with the single-process losses; layouts that cannot run
are refused with a CorelmError.

The test launches this file as a torchrun worker (``python -m torch.distributed.run ... test_train_parallel.py
OUT RUNS``); the worker trains each run of RUNS in turn with :func:`corelm.train.train` and writes rank 0's
losses and logits under ``OUT/<run name>``. Two launches (2 and 4 processes) cover every run, so the cost is
two process-group start-ups, not one per layout."""

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

# name: (family, parallel mode, TrainConfig fields); every run also resumes 2 steps in its own layout
RUNS_2 = {
    "llama-tp": ("llama", "tp", {}),
    "llama-pp": ("llama", "pp", {"pp_microbatches": 4}),  # 1F1B over 4 micro-batches
    "gpt2-tp-sp": ("gpt2", "tp", {"sequence_parallel": True}),  # fused c_attn, sequence parallel
    "gpt2-pp": ("gpt2", "pp", {"pp_schedule": "gpipe"}),
    "gemma-tp": ("gemma", "tp", {}),  # sandwich norms, soft-caps, per-head q/k norms
    "gemma-pp": ("gemma", "pp", {}),
}
RUNS_4 = {
    "llama-fsdp+tp": ("llama", "fsdp+tp", {"tp_size": 2, "sequence_parallel": True}),
    "llama-pp+tp": ("llama", "pp+tp", {"tp_size": 2, "pp_microbatches": 2}),
    "gpt2-pp+tp": ("gpt2", "pp+tp", {"tp_size": 2}),  # the strided c_attn shards broadcast between stages
}


def tiny_model(family: str = "llama", tie: bool = False):
    from corelm.config import ModelConfig
    from corelm.models import build_model

    torch.manual_seed(0)
    shape = {"vocab_size": 64, "d_model": 32, "n_layer": 2, "n_head": 4, "d_ff": 64, "max_seq_len": 64,
             "tie_embeddings": tie}
    if family == "llama":
        config = ModelConfig(family="llama", n_kv_head=2, **shape)
    elif family == "gemma":  # Gemma 2/3 switches: sandwich norms, QK norm, soft-caps, alternating windows
        config = ModelConfig(family="gemma", n_kv_head=2, sandwich_norm=True, qk_norm=True, attn_softcap=50.0,
                             final_softcap=30.0, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                             activation="gelu_tanh", **shape)
    else:
        config = ModelConfig(family="gpt2", **shape)
    return build_model(config)


class Batches:
    """Two fixed batches of packed windows (inputs ``[:, :-1]``), again and again (the loss falls); resumable.
    A data-parallel rank ``r`` of ``n`` reads rows ``r::n`` of each: the global batch stays ``BATCH``."""

    def __init__(self, rank: int = 0, world: int = 1) -> None:
        self.data = torch.randint(0, 64, (2, BATCH, T + 1), generator=torch.Generator().manual_seed(1))
        self.i, self.rank, self.world = 0, rank, world

    def __next__(self) -> torch.Tensor:
        self.i += 1
        return self.data[(self.i - 1) % 2][self.rank::self.world]

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]


def loss_fn(model, batch):
    logits = model(batch[:, :-1])  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()), int(batch[:, 1:].numel())


def config(mode: str, out: Path, **extra):
    from corelm.train.loop import TrainConfig

    fields = {"max_steps": STEPS, "lr": 1e-2, "warmup_steps": 1, "parallel": mode, "progress": False,
              "tensorboard": False, "measure_mfu": False, "out": str(out), **extra}
    return TrainConfig(**fields)


def run(family: str, mode: str, out: Path, info=None, **extra) -> tuple[list[float], dict]:
    """Train 4 steps, then resume a fresh model from the checkpoint for 2 more; returns the 6 losses and the
    logits of the probe batch (initial under TP, and of the trained model)."""
    from corelm.train.loop import train

    probe = next(Batches())[:, :-1]
    cfg = config(mode, out, **extra)
    logits = {}
    if mode in ("none", "tp"):  # the forward of a fresh model (a pipeline runs only inside its schedule)
        from corelm.train.parallel import apply_tp, build_mesh

        fresh = tiny_model(family)
        if mode == "tp":
            apply_tp(fresh, build_mesh(2, tp=2)["tp"], cfg.sequence_parallel)
        with torch.no_grad():
            logits["initial"] = fresh(probe)
    model = tiny_model(family)
    result = train(model, loss_fn, Batches(), cfg, dist=info)
    with torch.no_grad():  # every rank holds the whole trained model (TP: gathered by the layers; PP: synced)
        logits["trained"] = model(probe)
    losses = [loss for _, loss in result.losses]
    # resume a fresh model from the checkpoint (full tensors, re-sharded on load) and train 2 more steps
    cfg = dataclasses.replace(cfg, max_steps=STEPS + 2, resume=str(out))
    losses += [loss for _, loss in train(tiny_model(family), loss_fn, Batches(), cfg, dist=info).losses]
    return losses, logits


def _torchrun(out: Path, runs: dict, nproc: int) -> subprocess.Popen:
    # TMPDIR: torchrun's per-launch torchelastic_* directories stay under the test's own directory
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(out)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), __file__,
           str(out), json.dumps(runs)]
    return subprocess.Popen(cmd, env=env, cwd=Path(__file__).parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=500)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
def test_parallel_layouts_match_single_process(tmp_path):
    # both launches run concurrently while the single-process references run here
    procs = [_torchrun(tmp_path, RUNS_2, 2), _torchrun(tmp_path, RUNS_4, 4)]
    reference = {}
    for family in ("llama", "gpt2", "gemma"):
        reference[family] = run(family, "none", tmp_path / f"{family}-none")
    for proc in procs:
        _finish(proc)
    from safetensors.torch import load_file

    step = f"checkpoints/step-{STEPS:06d}/model.safetensors"
    for name, (family, mode, _) in {**RUNS_2, **RUNS_4}.items():
        want_losses, want_logits = reference[family]
        want_losses = torch.tensor(want_losses)
        assert len(want_losses) == STEPS + 2 and want_losses[-1] < want_losses[0] - 0.2
        # the same losses, also over the 2 steps after resuming from the checkpoint
        losses = torch.tensor(json.loads((tmp_path / name / "losses.json").read_text()))
        torch.testing.assert_close(losses, want_losses, rtol=1e-5, atol=1e-5, msg=name)
        got = load_file(str(tmp_path / name / "logits.safetensors"))
        for k in got:  # TP: the fresh and the trained model's logits; else the trained model's
            torch.testing.assert_close(got[k], want_logits[k], rtol=1e-4, atol=1e-4, msg=f"{name}: {k} logits")
        # the checkpoint holds full tensors with the single-process names and values; Adam's m / sqrt(v) turns
        # last-bit gradient differences of near-zero gradients into updates of up to lr: atol 2e-4 at lr 1e-2
        weights = load_file(str(tmp_path / f"{family}-none" / step))
        got = load_file(str(tmp_path / name / step))
        assert got.keys() == weights.keys()
        for k in weights:
            torch.testing.assert_close(got[k], weights[k], rtol=1e-4, atol=2e-4, msg=f"{name}: {k}")

    # across layouts: the TP x 2 checkpoint of step 4 resumed under FSDP x 2 (in the worker) and in one process
    # (here) continues with the single-process losses of steps 5 and 6
    want = torch.tensor(reference["llama"][0][STEPS:])
    fsdp = torch.tensor(json.loads((tmp_path / "llama-tp-to-fsdp" / "losses.json").read_text()))
    torch.testing.assert_close(fsdp, want, rtol=1e-5, atol=1e-5)
    from corelm.train.loop import train

    cfg = config("none", tmp_path / "llama-tp-to-1", max_steps=STEPS + 2,
                 resume=str(tmp_path / "llama-tp" / "checkpoints" / f"step-{STEPS:06d}"))
    with pytest.warns(UserWarning, match="written by 2 processes"):
        single = train(tiny_model("llama"), loss_fn, Batches(), cfg)
    torch.testing.assert_close(torch.tensor([loss for _, loss in single.losses]), want, rtol=1e-5, atol=1e-5)


def test_tp_degree_must_divide_heads():
    from corelm.errors import CorelmError
    from corelm.train.parallel import check_tp

    config = tiny_model().config  # 4 heads, 2 KV heads, d_ff 64
    check_tp(config, 2)
    with pytest.raises(CorelmError, match=r"key/value heads \(n_kv_head\) to divide by 4"):
        check_tp(config, 4)
    with pytest.raises(CorelmError, match=r"attention heads \(n_head\) to divide by 3"):
        check_tp(config, 3)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma"])
def test_pipeline_stages_compose_to_the_model(family):
    # the stages re-implement each family's embedding step and head: chained, they are the model's forward
    from corelm.train.parallel import split_stages

    model = tiny_model(family).eval()
    ids = next(Batches())[:, :-1]
    for n in (1, 2):
        x = ids
        with torch.no_grad():
            for stage in split_stages(model, n):
                x = stage(x)
            torch.testing.assert_close(x, model(ids), rtol=0, atol=0)


class _Mesh:
    """A stand-in 1-D mesh: the checks run before any communication."""

    def __init__(self, n: int) -> None:
        self.n = n

    def size(self) -> int:
        return self.n

    def get_local_rank(self) -> int:
        return 0


def test_parallel_layouts_that_cannot_run_are_refused():
    from corelm.config import ModelConfig
    from corelm.errors import CorelmError
    from corelm.models import build_model
    from corelm.train.loop import TrainConfig
    from corelm.train.parallel import apply_fsdp_tp, apply_pp, apply_tp, build_mesh, parallelize

    with pytest.raises(CorelmError, match=r"key/value heads \(n_kv_head\) to divide by 4; .* has 2"):
        apply_tp(tiny_model(), _Mesh(4))
    bert = build_model(ModelConfig(family="bert", n_layer=1, n_head=2, d_model=8, vocab_size=8, max_seq_len=8))
    with pytest.raises(CorelmError, match="supports gpt2, the llama family .* and gemma; bert is not one"):
        apply_tp(bert, _Mesh(2))
    olmo = build_model(ModelConfig(family="olmo2", n_layer=1, n_head=2, d_model=8, vocab_size=8, max_seq_len=8))
    with pytest.raises(CorelmError, match="olmo2 is not one: use --parallel ddp or fsdp"):
        apply_pp(olmo, _Mesh(2))
    with pytest.raises(CorelmError, match="fsdp\\+tp does not cover fused query/key/value"):
        apply_fsdp_tp(tiny_model("gpt2"), None)
    with pytest.raises(CorelmError, match="untied embeddings"):
        apply_pp(tiny_model(tie=True), _Mesh(2))
    with pytest.raises(CorelmError, match="untied embeddings"):
        apply_pp(tiny_model("gpt2", tie=True), _Mesh(2))
    with pytest.raises(CorelmError, match="at least 3 blocks; the model has 2"):
        apply_pp(tiny_model(), _Mesh(3))
    with pytest.raises(CorelmError, match="cannot form pp=1 x dp=1 x tp=3"):
        build_mesh(2, tp=3)
    with pytest.raises(CorelmError, match="--tp-size 3 must be at least 2 and divide the 4 processes"):
        parallelize(tiny_model(), "pp+tp", 4, torch.device("cpu"), tp_size=3)
    with pytest.raises(CorelmError, match="sequence-parallel does not combine with pp\\+tp"):
        parallelize(tiny_model(), "pp+tp", 4, torch.device("cpu"), sequence_parallel=True)
    with pytest.raises(CorelmError, match="expected gpipe or 1f1b"):
        TrainConfig(parallel="pp", pp_schedule="zb")
    with pytest.raises(CorelmError, match="expected none, ddp, fsdp, tp, pp, fsdp\\+tp or pp\\+tp"):
        TrainConfig(parallel="tp+pp")


def _worker(out: Path, runs: dict) -> None:
    """Each run in turn in this process group, then (2 processes) the TP checkpoint resumed under FSDP."""
    from safetensors.torch import save_file

    from corelm.train.distributed import init_distributed, shutdown_distributed
    from corelm.train.loop import train

    info = init_distributed("cpu")
    for name, (family, mode, extra) in runs.items():
        losses, logits = run(family, mode, out / name, info, **extra)
        if info.rank == 0:
            (out / name / "losses.json").write_text(json.dumps(losses))
            save_file({k: v.contiguous() for k, v in logits.items()}, str(out / name / "logits.safetensors"))
    if "llama-tp" in runs:
        cfg = config("fsdp", out / "llama-tp-to-fsdp", max_steps=STEPS + 2,
                     resume=str(out / "llama-tp" / "checkpoints" / f"step-{STEPS:06d}"))
        result = train(tiny_model("llama"), loss_fn, Batches(info.rank, info.world_size), cfg, dist=info)
        if info.rank == 0:
            (out / "llama-tp-to-fsdp" / "losses.json").write_text(json.dumps([v for _, v in result.losses]))
    shutdown_distributed()


if __name__ == "__main__":  # a torchrun worker: OUT RUNS (name -> [family, mode, TrainConfig fields] as JSON)
    sys.path.insert(0, str(Path(__file__).parents[1]))
    _worker(Path(sys.argv[1]), json.loads(sys.argv[2]))
