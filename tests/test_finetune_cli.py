"""The finetune / merge / evaluate / predict commands: help, errors, and a tiny run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from corelm.cli import main as cli


@pytest.mark.parametrize("command", ["finetune", "merge", "evaluate", "predict"])
def test_help(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        cli([command, "--help"])
    assert exc.value.code == 0
    assert "--model" in capsys.readouterr().out or command == "merge"


def test_bad_input_is_one_line_and_nothing_is_written(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert cli(["finetune", "--model", "minilm-l6", "--task", "classify", "--data", str(tmp_path / "nope.csv"),
                "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "data file not found" in err
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nok,a\n,b\n")
    assert cli(["finetune", "--model", "minilm-l6", "--task", "classify", "--data", str(bad), "--out", str(out)]) == 2
    assert "bad.csv:3" in capsys.readouterr().err
    assert not out.exists()
    assert cli(["evaluate", "--model", str(tmp_path), "--task", "ner", "--data", "demo:ner:test"]) == 2
    assert "needs a fine-tuning run directory" in capsys.readouterr().err


def test_tiny_sft_lora_run_merge_and_perplexity(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """llama-tiny (random weights, SmolLM2 vocabulary): finetune -> merge -> merged logits == adapter logits."""
    import corelm
    from corelm.data import tasks
    from corelm.data.demo import resolve
    from corelm.loading import load_run

    run_dir, merged_dir = tmp_path / "sft", tmp_path / "merged"
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(m) + "\n" for m in tasks.read_chat(resolve("demo:chat:val")).items[:4]))
    assert cli(["finetune", "--model", "llama-tiny", "--task", "sft", "--data", "demo:chat", "--val", str(val),
                "--method", "lora", "--steps", "2", "--batch-size", "4", "--max-len", "64", "--lr", "1e-2",
                "--out", str(run_dir), "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and "val_loss_before" in summary
    task = json.loads((run_dir / "corelm_task.json").read_text())
    assert task["method"] == "lora" and task["base"] == "llama-tiny" and len(task["method_config"]["modules"]) == 16
    assert (run_dir / "adapter.safetensors").is_file() and not (run_dir / "model.safetensors").exists()

    assert cli(["merge", str(run_dir), "--out", str(merged_dir)]) == 0
    assert "max |output difference|" in capsys.readouterr().out
    adapted = load_run(run_dir).model
    merged = corelm.load(str(merged_dir), dtype="fp32").model
    x = torch.randint(0, 49152, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted(x), rtol=1e-4, atol=1e-4)
        # the run directory itself loads as a language model (base + adapters), as `corelm generate --model` uses it
        torch.testing.assert_close(corelm.load(str(run_dir), dtype="fp32").model(x), adapted(x))

    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    assert cli(["evaluate", "--model", str(run_dir), "--task", "perplexity", "--data", str(text), "--window", "64",
                "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"] > 100 and report["perplexity"] > 1 and "_table" not in report
    assert cli(["evaluate", "--model", str(merged_dir), "--task", "perplexity", "--data", str(text),
                "--window", "64", "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] == pytest.approx(report["perplexity"], rel=1e-3)


def test_adalora_run_resumes_bit_exactly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """8 steps straight == 4 steps, then --resume from that checkpoint to 8 (adapter weights, bit for bit).

    AdaLoRA is the hard case: its importance averages and step count travel in the trainer state, and the
    optimizer-state initialization that checkpoint loading performs must not count as a training step.
    """
    import shutil

    from safetensors.torch import load_file

    from corelm.data import tasks
    from corelm.data.demo import resolve

    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(m) + "\n" for m in tasks.read_chat(resolve("demo:chat:val")).items[:2]))
    common = ["finetune", "--model", "llama-tiny", "--task", "sft", "--data", "demo:chat", "--val", str(val),
              "--method", "adalora", "--init-rank", "4", "--target-rank", "2", "--steps", "8", "--save-every", "4",
              "--batch-size", "4", "--max-len", "48", "--lr", "1e-2", "--no-progress", "--json"]
    straight, resumed = tmp_path / "a", tmp_path / "b"
    assert cli([*common, "--out", str(straight)]) == 0
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-000004", resumed / "checkpoints" / "step-000004")
    assert cli([*common, "--out", str(resumed), "--resume"]) == 0
    a, b = load_file(str(straight / "adapter.safetensors")), load_file(str(resumed / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    capsys.readouterr()
