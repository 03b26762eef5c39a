"""Fine-tuning's task table, precision policies, dev evaluation every N steps, TensorBoard, the per-tag NER report."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from corelm.cli import main as cli
from corelm.eval.ner import entity_report, token_report
from corelm.finetune import methods
from corelm.finetune.tasks import TASKS, Task, get_task


def test_every_task_is_one_registered_object() -> None:
    assert tuple(TASKS) == methods.TASKS  # the names runs are saved and loaded under
    for name, task in TASKS.items():
        assert isinstance(task, Task) and task.name == name
        for method in ("read", "encode", "loss"):  # what every task must define for itself
            assert getattr(type(task), method) is not getattr(Task, method), (name, method)
    with pytest.raises(Exception, match="unknown task 'qa'"):
        get_task("qa")
    source = (Path(methods.__file__).parent / "run.py").read_text()
    assert "task ==" not in source  # run.py looks tasks up; it does not switch on their names


def test_token_report_is_per_tag_precision_recall_f1() -> None:
    gold = [["B-LOC", "I-LOC", "O", "B-PER"], ["O", "B-LOC"]]
    pred = [["B-LOC", "O", "O", "B-PER"], ["B-PER", "B-LOC"]]
    r = token_report(gold, pred)
    assert list(r["per_class"]) == ["B-LOC", "B-PER", "I-LOC", "O"]  # sorted: B-*, I-*, then O
    assert r["per_class"]["B-PER"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert r["per_class"]["I-LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert r["per_class"]["O"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert r["accuracy"] == pytest.approx(4 / 6) == entity_report(gold, pred)["token_accuracy"]
    assert r["macro"]["recall"] == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    with pytest.raises(ValueError):
        token_report(gold, pred[:1])


def test_token_report_equals_sklearn_classification_report() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    tags = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER", "B-ORG"]
    lengths = torch.randint(1, 12, (40,), generator=g).tolist()
    gold = [[tags[int(i)] for i in torch.randint(0, 6, (n,), generator=g)] for n in lengths]
    pred = [[t if torch.rand((), generator=g) < 0.6 else tags[int(torch.randint(0, 5, (), generator=g))] for t in s]
            for s in gold]  # B-ORG is never predicted: its precision is 0/0
    ours = token_report(gold, pred)
    flat_gold, flat_pred = [t for s in gold for t in s], [t for s in pred for t in s]
    ref = metrics.classification_report(flat_gold, flat_pred, output_dict=True, zero_division=0)
    for tag, row in ours["per_class"].items():
        assert row == pytest.approx({k.replace("f1-score", "f1"): v for k, v in ref[tag].items()}), tag
    assert ours["accuracy"] == pytest.approx(ref["accuracy"])
    for avg in ("macro", "weighted"):
        assert ours[avg]["f1"] == pytest.approx(ref[f"{avg} avg"]["f1-score"])


def test_finetune_and_distill_offer_every_precision_policy(capsys: pytest.CaptureFixture) -> None:
    from corelm.commands.distill import build_parser

    with pytest.raises(SystemExit):
        cli(["finetune", "--help"])
    text = capsys.readouterr().out
    assert "fp16-mixed" in text and "--eval-every" in text
    args = build_parser().parse_args(["--teacher", "t", "--data", "d", "--out", "o", "--precision", "fp16-mixed"])
    assert args.precision == "fp16-mixed"


@pytest.mark.slow
def test_fp16_mixed_ner_run_logs_dev_metrics_and_tensorboard(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16 autocast with a GradScaler works on CPU (torch >= 2.3); --eval-every 1 logs the dev set every step,
    to TensorBoard and (--wandb) to Weights & Biases."""
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from corelm.data import tasks
    from corelm.data.demo import resolve

    dev = tmp_path / "dev.conll"
    dev.write_text("\n".join("".join(f"{w} {t}\n" for w, t in zip(ws, ts))
                             for ws, ts in tasks.read_conll(resolve("demo:ner:dev")).items[:12]))
    out = tmp_path / "ner"
    assert cli(["finetune", "--model", "minilm-l6", "--task", "ner", "--data", "demo:ner", "--val", str(dev),
                "--method", "full", "--steps", "3", "--batch-size", "4", "--max-len", "32", "--precision",
                "fp16-mixed", "--eval-every", "1", "--out", str(out), "--no-progress", "--json",
                "--wandb", "proj"]) == 0
    printed = capsys.readouterr()
    summary = json.loads(printed.out.strip().splitlines()[-1])
    assert summary["steps"] == 3 and "val_f1" in summary
    assert printed.err.count("dev at epoch 0.0") == 3 and "before training: val_loss=" in printed.err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_scale" in r for r in rows if "loss" in r)  # the GradScaler was on
    assert sorted(r["step"] for r in rows if "val_f1" in r) == [1, 2, 3]  # steps 1, 2 and the final evaluation
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"train/loss", "val/loss", "val/f1"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert fake.inits[0]["project"] == "proj" and fake.inits[0]["config"]["precision"] == "fp16-mixed"
    assert [step for data, step in fake.logged if "train/loss" in data] == [1, 2, 3]

    # evaluate: the entity-level report and the per-tag one; --scheme bio as in finetune
    assert cli(["evaluate", "--model", str(out), "--task", "ner", "--data", str(dev), "--scheme", "bio",
                "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    tags = report["token_report"]
    assert "O" in tags["per_class"] and all(t == "O" or t[:2] in ("B-", "I-") for t in tags["per_class"])
    assert sum(c["support"] for c in tags["per_class"].values()) == tags["n"] == sum(
        len(ws) for ws, _ in tasks.read_conll(dev).items)
    assert tags["accuracy"] == pytest.approx(report["token_accuracy"])
    assert cli(["evaluate", "--model", str(out), "--task", "ner", "--data", str(dev), "--no-progress"]) == 0
    assert "per tag (token level)" in capsys.readouterr().out


def test_distillation_trains_under_fp16_mixed() -> None:
    from corelm.compress.distill import distill_loss_fn
    from corelm.config import ModelConfig
    from corelm.models import build_model
    from corelm.train.loop import TrainConfig, train

    def tiny(seed: int, d: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return build_model(ModelConfig(family="llama", vocab_size=48, n_layer=1, n_head=4, n_kv_head=2, d_model=d,
                                       d_ff=2 * d, max_seq_len=32))

    teacher, student = tiny(0, 64), tiny(1, 32)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    data = torch.randint(0, 48, (8, 17), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(max_steps=6, lr=1e-2, warmup_steps=0, precision="fp16-mixed", progress=False,
                      tensorboard=False, measure_mfu=False)
    result = train(student, distill_loss_fn(teacher, 2.0, 0.5), iter([data] * 6), cfg)
    assert "loss_scale" in result.last_metrics and result.skipped_steps < 6
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.losses)
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())  # some updates applied


class _FakeWandb:
    """Stands in for the wandb package: records what a run would send."""

    def __init__(self) -> None:
        self.inits: list[dict] = []
        self.logged: list[tuple[dict, int]] = []
        self.finished = 0

    def init(self, **kwargs: Any) -> Any:
        self.inits.append(kwargs)
        fake = self

        class Run:
            id = kwargs.get("id") or "run123"

            def log(self, data: dict, step: int) -> None:
                fake.logged.append((data, step))

            def finish(self) -> None:
                fake.finished += 1

        return Run()


def test_tracker_logs_the_tensorboard_scalars_to_wandb_and_resumes_its_run(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from corelm.errors import CorelmError
    from corelm.train.tracking import Tracker

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: one clear line
    with pytest.raises(CorelmError, match="pip install wandb"):
        Tracker(tmp_path, 2, progress=False, tensorboard=False, wandb="proj")
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    tracker = Tracker(tmp_path, 2, progress=False, tensorboard=False, wandb="proj", config={"lr": 0.1})
    tracker.log(1, {"loss": 2.5, "lr": 0.1, "grad_norm": float("nan"), "note": "x"})
    tracker.log(2, {"val_loss": 1.5, "val_f1": 0.5})
    tracker.close()
    assert fake.inits == [{"project": "proj", "dir": str(tmp_path), "config": {"lr": 0.1}, "id": None,
                           "resume": "allow"}]
    assert fake.logged == [({"train/loss": 2.5, "train/lr": 0.1}, 1), ({"val/loss": 1.5, "val/f1": 0.5}, 2)]
    assert fake.finished == 1
    Tracker(tmp_path, 4, start_step=2, progress=False, tensorboard=False, wandb="proj").close()
    assert fake.inits[-1]["id"] == "run123"  # the resumed run continues the same W&B run
    disabled = Tracker(tmp_path, 2, enabled=False, wandb="proj")  # other ranks log nothing
    disabled.log(1, {"loss": 1.0})
    assert len(fake.inits) == 2 and len(fake.logged) == 2


@pytest.mark.slow
def test_linear_probe_trains_in_bf16_true(tmp_path: Path) -> None:
    """--method head caches the frozen backbone's fp32 features; a bf16-true head must take them (it crashed)."""
    from corelm.finetune.run import FinetuneArgs, finetune

    summary = finetune(FinetuneArgs(model="minilm-l6", task="classify", data="demo:packages", method="head",
                                    precision="bf16-true", steps=2, batch_size=32, max_len=24,
                                    out=str(tmp_path / "cls"), progress=False))
    assert summary["steps"] == 2 and 0 <= summary["val_acc"] <= 1 and summary["train_loss"] > 0
