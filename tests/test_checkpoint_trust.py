"""A training checkpoint may come from a stranger: resuming from one must never run its code
(SECURITY.md, "Training checkpoints").

The attacker model: anyone who can write the run directory can replace any file of a checkpoint and
recompute ``files.json`` (it is an integrity manifest against crashes, not a signature). So every file
that ``--resume`` reads gets a pickle whose ``__reduce__`` would create a marker file; the resume must
refuse it with one line and the marker must never appear.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import corelm
from corelm.cli import main as cli
from corelm.errors import CorelmError
from corelm.objectives import causal_lm_loss
from corelm.train import ResumableLoader, TrainConfig, train
from corelm.train.checkpoint import STATE_DIR, checkpoint_dirs, load_checkpoint, save_checkpoint
from corelm.train.optim import build_optimizer
from tests.test_pretrain_cli import make_tiny_data
from tests.test_train_loop import TinyLM, _data

# Every file of trainer_state/ that a resume reads (fp16-mixed, so the loss scaler's state is there too).
STATE_FILES = ["files.json", "optimizer.json", "optimizer.safetensors", "rng.json", "rng.safetensors",
               "scaler.json", "state.json", "weights.safetensors"]


class _Payload:
    """Unpickling this object calls ``os.system`` -- what a crafted ``rng.pt`` carried."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _config(out: Path, max_steps: int = 2, **kw) -> TrainConfig:
    return TrainConfig(max_steps=max_steps, lr=3e-3, warmup_steps=1, out=str(out), precision="fp16-mixed",
                       progress=False, tensorboard=False, measure_mfu=False, **kw)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with one real checkpoint (step 2), written by the training loop."""
    out = tmp_path_factory.mktemp("trust") / "run"
    torch.manual_seed(0)
    train(TinyLM(), causal_lm_loss, ResumableLoader(_data(), batch_size=4, seed=3), _config(out))
    return out


@pytest.fixture
def run(pristine: Path, tmp_path: Path) -> Path:
    """A copy of the pristine run for one test to tamper with."""
    shutil.copytree(pristine, tmp_path / "run")
    return tmp_path / "run"


def _ckpt(run: Path) -> Path:
    return checkpoint_dirs(run)[-1][1]


def _forge_manifest(ckpt: Path) -> None:
    """Recompute files.json as an attacker would: size and sha256 of whatever is there now."""
    files = {str(f.relative_to(ckpt)): {"size": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
             for f in sorted(ckpt.rglob("*")) if f.is_file() and f.name != "files.json"}
    (ckpt / STATE_DIR / "files.json").write_text(json.dumps(files))


def _plant(ckpt: Path, rel: str, marker: Path) -> None:
    (ckpt / rel).write_bytes(pickle.dumps(_Payload(marker)))
    if not rel.endswith("files.json"):
        _forge_manifest(ckpt)


def _resume(run: Path, ckpt: Path) -> None:
    torch.manual_seed(0)
    train(TinyLM(), causal_lm_loss, ResumableLoader(_data(), batch_size=4, seed=3),
          _config(run, resume=str(ckpt), max_steps=4))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg, msg
    return msg


def test_trainer_state_is_safetensors_and_json(pristine: Path) -> None:
    """The files listed above are all of trainer_state/ (a new file must join the list and the tests below)."""
    state_dir = _ckpt(pristine) / STATE_DIR
    assert sorted(f.name for f in state_dir.iterdir()) == STATE_FILES
    for f in state_dir.iterdir():
        assert not f.read_bytes().startswith(b"\x80"), f"{f.name} is a pickle"  # protocol 2+ opcode PROTO
        if f.suffix == ".json":
            json.loads(f.read_text())
    from safetensors.torch import load_file

    opt = load_file(str(state_dir / "optimizer.safetensors"))
    assert "state.transformer.wte.weight.exp_avg" in opt and opt["state.transformer.wte.weight.step"].ndim == 0
    assert set(load_file(str(state_dir / "rng.safetensors"))) == {"rank0.torch"}


def test_save_and_load_restore_every_state_exactly(tmp_path: Path) -> None:
    """Optimizer (moments, step, param groups incl. the betas tuple), loss scaler and every RNG, value for value."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = build_optimizer(model, 1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(2):
        loss, _ = causal_lm_loss(model, _data()[:4])
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    random.random(), np.random.rand(), torch.rand(1)  # move every stream off its seed
    ckpt = save_checkpoint(tmp_path, 2, model=model, optimizer=opt, state={"k": 1}, scaler=scaler)
    saved_opt, saved_scaler = opt.state_dict(), scaler.state_dict()
    saved_rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.random(), np.random.randn(), torch.rand(3)  # ... and on again, so the load has something to undo

    torch.manual_seed(1)
    model2 = TinyLM()
    opt2, scaler2 = build_optimizer(model2, 5e-4), torch.amp.GradScaler("cpu")
    state = load_checkpoint(ckpt, model=model2, optimizer=opt2, scaler=scaler2)
    assert state["step"] == 2 and state["k"] == 1
    for name, p in model.named_parameters():
        assert torch.equal(p, model2.get_parameter(name)), name
    loaded = opt2.state_dict()
    assert loaded["param_groups"] == saved_opt["param_groups"]  # a list where a tuple was would differ
    assert loaded["state"].keys() == saved_opt["state"].keys()
    for i, entry in saved_opt["state"].items():
        assert loaded["state"][i].keys() == entry.keys()
        for key, value in entry.items():
            assert torch.equal(loaded["state"][i][key], value), (i, key)
    assert scaler2.state_dict() == saved_scaler
    assert random.getstate() == saved_rng[0]
    np_state = np.random.get_state()
    assert np_state[0] == saved_rng[1][0] and np.array_equal(np_state[1], saved_rng[1][1])
    assert np_state[2:] == saved_rng[1][2:]
    assert torch.equal(torch.get_rng_state(), saved_rng[2])


def test_the_pristine_checkpoint_resumes(run: Path) -> None:
    """The control for the refusals below: untampered, the same resume succeeds."""
    _resume(run, _ckpt(run))
    assert [s for s, _ in checkpoint_dirs(run)] == [2, 4]


@pytest.mark.parametrize("name", STATE_FILES)
def test_a_pickle_in_any_state_file_is_refused_unread(run: Path, tmp_path: Path, name: str) -> None:
    marker = tmp_path / "payload-ran"
    ckpt = _ckpt(run)
    _plant(ckpt, f"{STATE_DIR}/{name}", marker)
    with pytest.raises(CorelmError) as exc:
        _resume(run, ckpt)
    assert f"{STATE_DIR}/{name}" in _one_line(exc)
    assert not marker.exists()


def test_model_files_are_hashed_not_parsed_by_resume(run: Path, tmp_path: Path) -> None:
    """The checkpoint's model files (the export) are not trainer state: resume checks their hash and never
    opens them, so a payload there is inert and the run continues from trainer_state/."""
    marker = tmp_path / "payload-ran"
    ckpt = _ckpt(run)
    exported = [f for f in ckpt.iterdir() if f.is_file()]
    assert {f.name for f in exported} >= {"model.safetensors"}
    for f in exported:
        f.write_bytes(pickle.dumps(_Payload(marker)))
    _forge_manifest(ckpt)
    _resume(run, ckpt)
    assert not marker.exists()
    assert [s for s, _ in checkpoint_dirs(run)] == [2, 4]


def test_a_pickle_in_metrics_jsonl_is_dropped_not_parsed(run: Path, tmp_path: Path) -> None:
    """metrics.jsonl (outside the checkpoint) is read on resume to drop lines past the resumed step: a line
    that is not JSON is dropped like a torn one, and the run goes on."""
    marker = tmp_path / "payload-ran"
    metrics = run / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes() + pickle.dumps(_Payload(marker)) + b"\n[1]\n")
    _resume(run, _ckpt(run))
    assert not marker.exists()
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("field, value", [("step", "2"), ("tokens_seen", -1), ("data", {"epoch": "x"}),
                                          ("data", [])])
def test_state_json_fields_of_the_wrong_type_are_one_line(run: Path, field: str, value: object) -> None:
    ckpt = _ckpt(run)
    state = json.loads((ckpt / STATE_DIR / "state.json").read_text())
    state[field] = value
    (ckpt / STATE_DIR / "state.json").write_text(json.dumps(state))
    _forge_manifest(ckpt)
    with pytest.raises(CorelmError, match="state.json") as exc:
        _resume(run, ckpt)
    _one_line(exc)


def test_an_old_pickled_checkpoint_is_refused_with_one_line(run: Path, tmp_path: Path) -> None:
    """The earlier format (optimizer.pt, rng.pt, scaler.pt) is refused by name, never unpickled."""
    marker = tmp_path / "payload-ran"
    ckpt = _ckpt(run)
    for stem in ("optimizer", "rng", "scaler"):
        for f in (ckpt / STATE_DIR).glob(f"{stem}.*"):
            f.unlink()
        torch.save({"state": _Payload(marker)}, ckpt / STATE_DIR / f"{stem}.pt")
    _forge_manifest(ckpt)
    with pytest.raises(CorelmError, match="old trainer-state format") as exc:
        _resume(run, ckpt)
    assert "rng.pt" in _one_line(exc) and "start a new run" in str(exc.value)
    assert not marker.exists()


def test_files_json_cannot_name_files_outside_the_checkpoint(run: Path) -> None:
    ckpt = _ckpt(run)
    index = ckpt / STATE_DIR / "files.json"
    files = json.loads(index.read_text())
    files["../../../etc/hostname"] = {"size": 1, "sha256": "0" * 64}
    index.write_text(json.dumps(files))
    with pytest.raises(CorelmError, match="files inside the checkpoint") as exc:
        load_checkpoint(ckpt, model=TinyLM())
    _one_line(exc)


def test_a_numpy_rng_position_out_of_range_is_refused(run: Path) -> None:
    """numpy indexes its key with the saved position unchecked: 100000 would read past it and crash."""
    ckpt = _ckpt(run)
    rng = json.loads((ckpt / STATE_DIR / "rng.json").read_text())
    rng["ranks"][0]["numpy"]["pos"] = 100000
    (ckpt / STATE_DIR / "rng.json").write_text(json.dumps(rng))
    _forge_manifest(ckpt)
    before = np.random.get_state()
    with pytest.raises(CorelmError, match=r"rng\.\*.*outside 0\.\.624") as exc:
        load_checkpoint(ckpt, model=TinyLM())
    _one_line(exc)
    assert np.array_equal(np.random.get_state()[1], before[1])  # nothing was restored


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Tiny prepared data and a 2-step `corelm pretrain` run on it."""
    root = make_tiny_data(tmp_path_factory.mktemp("trust-cli"))
    assert cli(_pretrain_args(root, root / "run")) == 0
    return root, root / "run"


def _pretrain_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--model", str(root / "gpt2.json"), "--data", str(root / "data"), "--seq-len", "32",
            "--batch-size", "4", "--max-steps", "2", "--out", str(out), "--no-progress", "--no-tensorboard",
            "--no-measure-mfu", "--eval-every", "0", "--eval-batches", "1", *extra]


@pytest.mark.parametrize("name", ["rng.pt", "rng.safetensors"])
def test_cli_resume_of_a_planted_checkpoint_exits_2_with_one_line(pretrained: tuple[Path, Path], tmp_path: Path,
                                                                  name: str) -> None:
    """The reported attack (a crafted rng.pt, files.json recomputed) and its new-format twin, through the
    real process: exit status 2, one stderr line, no traceback, no payload."""
    root, pristine = pretrained
    run, marker = tmp_path / "run", tmp_path / "payload-ran"
    shutil.copytree(pristine, run)
    _plant(_ckpt(run), f"{STATE_DIR}/{name}", marker)
    args = _pretrain_args(root, run, "--max-steps", "4", "--resume", str(run))
    proc = subprocess.run([sys.executable, "-m", "corelm", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "\n" not in err and name in err and "Traceback" not in err, err
    assert not marker.exists()


def test_no_pickle_anywhere_in_the_package() -> None:
    """Nothing in corelm unpickles: no weights_only=False, no pickle module, no numpy allow_pickle, and every
    torch.load (legacy HF .bin weights) says weights_only=True."""
    root = Path(corelm.__file__).parent
    found = []
    for f in sorted(root.rglob("*.py")):
        text = f.read_text()
        for needle in ("weights_only=False", "import pickle", "from pickle", "allow_pickle"):
            if needle in text:
                found.append(f"{f.relative_to(root)}: {needle}")
        for m in re.finditer(r"torch\.load\(", text):
            depth, i = 1, m.end()
            while depth and i < len(text):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            if "weights_only=True" not in text[m.end():i]:
                found.append(f"{f.relative_to(root)}: torch.load without weights_only=True")
    assert not found, found
