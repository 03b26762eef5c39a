"""--tracker tensorboard|wandb|csv on every training command: the metrics and the resolved configuration reach
each tracker (W&B through the real wandb package, offline, in a temporary directory)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from corelm.commands.args import TRACKERS, resolve_trackers
from corelm.errors import CorelmError


def test_trackers_are_a_repeatable_comma_list():
    assert resolve_trackers(None) == ["tensorboard"]
    assert resolve_trackers(["csv,wandb", "csv", " tensorboard"]) == ["csv", "wandb", "tensorboard"]
    assert resolve_trackers(None, tensorboard=False) == []  # --no-tensorboard
    assert resolve_trackers(["csv"], wandb="proj") == ["csv", "wandb"]  # --wandb PROJECT
    with pytest.raises(CorelmError, match="unknown tracker 'mlflow' \\(choose from tensorboard, wandb, csv\\)"):
        resolve_trackers(["csv,mlflow"])


def test_every_training_command_takes_tracker():
    from corelm.commands import distill, finetune, pretrain

    required = {pretrain: ["--model", "m", "--data", "d"],
                finetune: ["--model", "m", "--task", "classify", "--data", "d", "--out", "o"],
                distill: ["--teacher", "t", "--data", "d", "--out", "o"]}
    for command, argv in required.items():
        args = command.build_parser().parse_args([*argv, "--tracker", "csv,wandb", "--tracker", "tensorboard"])
        assert sorted(resolve_trackers(args.tracker)) == sorted(TRACKERS), command.__name__
    with pytest.raises(CorelmError, match="unknown tracker 'tb'"):
        pretrain.PretrainOptions(model="m", data="d", tracker=["tb"])
    with pytest.raises(CorelmError, match="unknown tracker 'tb'"):
        distill.DistillOptions(teacher="t", data="d", out="o", tracker=["tb"])
    with pytest.raises(CorelmError, match="unknown tracker 'tb'"):
        finetune.FinetuneOptions(model="m", task="classify", data="d", out="o", tracker=["tb"])


class _Batches:
    def __init__(self) -> None:
        self.data = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))

    def __next__(self) -> torch.Tensor:
        return self.data


def _loss(model, batch):
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()), int(batch[:, 1:].numel())


@pytest.mark.slow
def test_all_trackers_get_metrics_and_the_resolved_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from corelm.config import ModelConfig
    from corelm.models import build_model
    from corelm.train.loop import TrainConfig, train
    from corelm.train.tracking import Tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    torch.manual_seed(0)
    model = build_model(ModelConfig(family="llama", vocab_size=64, d_model=32, n_layer=1, n_head=4, n_kv_head=2,
                                    d_ff=64, max_seq_len=32))
    out = tmp_path / "run"
    cfg = TrainConfig(max_steps=3, lr=1e-2, warmup_steps=0, progress=False, measure_mfu=False, out=str(out),
                      tracker=["tensorboard,csv", "wandb"], eval_every=2)
    seen = {}
    close = Tracker.close

    def spy(self):  # the wandb run's config, before it finishes
        seen.update(config=dict(self._wandb.config))
        close(self)

    monkeypatch.setattr(Tracker, "close", spy)
    train(model, _loss, _Batches(), cfg, eval_fn=lambda m: {"val_loss": 3.0}, run_config={"data": "tiny"})

    resolved = json.loads((out / "resolved_config.json").read_text())
    assert resolved["tracker"] == ["tensorboard", "csv", "wandb"] and resolved["lr"] == 1e-2
    assert resolved["run"] == {"data": "tiny"}
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,metric,value"
    losses = [(int(s), float(v)) for s, k, v in (r.split(",") for r in rows[1:]) if k == "loss"]
    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses == [(r["step"], r["loss"]) for r in jsonl if "loss" in r] and len(losses) == 3
    assert [int(s) for s, k, _ in (r.split(",") for r in rows[1:]) if k == "val_loss"] == [2, 3]

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    (text,) = [t for t in events.Tags()["tensors"] if t.startswith("config")]
    assert b'"precision": "fp32"' in events.Tensors(text)[0].tensor_proto.string_val[0]

    (run,) = (out / "wandb").glob("offline-run-*")  # wandb.init(dir=RUN): the offline run, for `wandb sync`
    assert (out / "wandb_run_id.txt").read_text().strip() in run.name
    assert seen["config"]["precision"] == "fp32" and seen["config"]["run"] == {"data": "tiny"}
    (records,) = run.glob("run-*.wandb")  # what `wandb sync` uploads: the config and every logged row, the last
    data = records.read_bytes()            # committed by finish (values are JSON text in the protobuf records)
    assert data.startswith(b":W&B") and b"precision" in data and data.count(b"val/loss") >= 2
    assert all(json.dumps(loss).encode() in data for _, loss in losses)
