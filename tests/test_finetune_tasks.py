"""Fine-tuning the embedded models end to end: MiniLM classification and NER, SmolLM2 LoRA SFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from corelm.cli import main as cli
from corelm.data import tasks
from corelm.data.demo import resolve
from corelm.finetune.run import FinetuneArgs, encode_examples, finetune, forward_items, predict
from corelm.loading import load_run

pytestmark = pytest.mark.slow


def test_minilm_head_classifies_held_out_stdlib_docstrings(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Docstring -> package on a split the run never saw (the test split of demo:packages)."""
    out = tmp_path / "cls"
    summary = finetune(FinetuneArgs(model="minilm-l6", task="classify", data="demo:packages",
                                    val="demo:packages:val", out=str(out), method="head", max_len=32,
                                    batch_size=32, epochs=8, progress=False))
    assert summary["trainable_parameters"] == 384 * 4 + 4  # only the head
    run = load_run(out)  # everything again from the files: base model + saved head
    rows = tasks.read_classification(resolve("demo:packages:test"))
    encoded = encode_examples("classify", rows.items, run.tokenizer, run.labels, 32)
    pred = torch.stack(forward_items(run.model, encoded, run.pad_id)).argmax(-1).tolist()
    acc = sum(run.labels[p] == label for p, (_, label) in zip(pred, rows.items)) / len(rows.items)
    assert len(rows.items) > 150
    assert acc >= 0.90, acc
    # From Python as from the CLI: the same labels and probabilities, equal to the argmax above.
    texts = [text for text, _ in rows.items[:6]]
    items = predict(run, texts, top=2)
    assert [i["label"] for i in items] == [run.labels[p] for p in pred[:6]]
    assert all(len(i["probabilities"]) == 2 and 0 < sum(i["probabilities"].values()) <= 1 + 1e-6 for i in items)
    capsys.readouterr()
    assert cli(["predict", "--model", str(out), "--json", "--top", "2", *texts]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == items


def _conll(path: Path, sentences: list) -> str:
    path.write_text("\n".join("".join(f"{w} {t}\n" for w, t in zip(ws, ts)) for ws, ts in sentences))
    return str(path)


def test_minilm_ner_lora_improves_entity_f1(tmp_path: Path) -> None:
    dev = _conll(tmp_path / "dev.conll", tasks.read_conll(resolve("demo:ner:dev")).items[:40])
    summary = finetune(FinetuneArgs(model="minilm-l6", task="ner", data="demo:ner", val=dev,
                                    out=str(tmp_path / "ner"), method="lora", rank=8, max_len=32, batch_size=16,
                                    steps=15, lr=3e-3, progress=False))
    assert summary["val_f1"] > summary["val_f1_before"] + 0.3, summary
    assert summary["val_loss"] < summary["val_loss_before"]


def test_smollm2_lora_sft_lowers_assistant_token_loss(tmp_path: Path) -> None:
    chats = tasks.read_chat(resolve("demo:chat:train")).items
    chats = sorted(chats, key=lambda m: len(m[1]["content"]))[:8]  # the shortest answers: cheap steps
    data, val = tmp_path / "chats.jsonl", tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    val.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats[:2]))
    summary = finetune(FinetuneArgs(model="smollm2-135m-instruct", task="sft", data=str(data), val=str(val),
                                    out=str(tmp_path / "sft"), method="lora", rank=8, max_len=80, batch_size=2,
                                    steps=3, lr=3e-3, progress=False))
    assert summary["trainable_parameters"] < 0.02 * summary["total_parameters"]
    assert summary["val_loss"] < summary["val_loss_before"] - 0.1, summary
