"""Bad input is one line and exit 2, signals exit 130, and nothing half-written is ever left behind.

Every case here was found by probing the CLI: non-UTF-8 data files, argv and stdin, non-finite numbers,
labels that are not labels, a full or read-only disk, SIGTERM during a write. Property tests feed
arbitrary bytes to the file readers: the answer is a result or one line, never a traceback.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from corelm.cli import main
from corelm.data import tasks
from corelm.data.prepare import read_documents
from corelm.errors import CorelmError
from tests.test_gguf import write_tiny_gguf

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("robust") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


def one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """Run ``corelm argv`` in-process; assert exit 2 and exactly one stderr line; return that line."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[loaded")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


# ------------------------------------------------------------------------------------------- data files

def test_data_files_that_are_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "latin1.csv").write_bytes("text,label\ncafé,pos\nok,neg\n".encode("latin-1"))
    (tmp_path / "bad.conll").write_bytes(b"a O\nb\xff B-PER\n")
    (tmp_path / "chat.jsonl").write_bytes(b'{"messages": [{"role": "assistant", "content": "\xfe"}]}\n')
    (tmp_path / "pairs.jsonl").write_bytes(b'{"text": "ok", "summary": "s"}\n{"text": "caf\xe9", "summary": "s"}\n')
    out = str(tmp_path / "run")
    ft = ["finetune", "--model", "minilm-l6", "--out", out, "--data"]
    one_line_error(ft + [str(tmp_path / "latin1.csv"), "--task", "classify"], capsys,
                   "latin1.csv: not UTF-8 text (invalid continuation byte at byte 14, line 2)")
    one_line_error(ft + [str(tmp_path / "bad.conll"), "--task", "ner"], capsys, "bad.conll", "byte 5, line 2")
    one_line_error(ft + [str(tmp_path / "chat.jsonl"), "--task", "sft"], capsys, "chat.jsonl", "byte 48, line 1")
    one_line_error(["evaluate", "--model", "smollm2-135m-instruct", "--task", "summarize", "--data",
                    str(tmp_path / "pairs.jsonl")], capsys, "pairs.jsonl", "byte 44, line 2")
    # evaluate classify reads the data before loading the run's weights (so this run needs none)
    run = tmp_path / "cls-run"
    run.mkdir()
    (run / "corelm_task.json").write_text(
        json.dumps({"task": "classify", "fields": {"text": "text", "label": "label"}}))
    one_line_error(["evaluate", "--model", str(run), "--task", "classify", "--data", str(tmp_path / "latin1.csv")],
                   capsys, "latin1.csv: not UTF-8")
    assert not Path(out).exists()


def test_labels_must_be_labels_and_more_than_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i, label in enumerate((["pos"], {"name": "pos"}, float("nan"))):
        path = tmp_path / f"l{i}.jsonl"
        path.write_text(json.dumps({"text": "fine", "label": "neg"}) + "\n"
                        + json.dumps({"text": "good", "label": label}) + "\n")
        with pytest.raises(CorelmError, match=rf"l{i}\.jsonl:2: field 'label' is"):
            tasks.read_classification(path)
        assert tasks.read_classification(path, skip_bad=True).skipped == 1
    line = one_line_error(["finetune", "--model", "minilm-l6", "--task", "classify",
                           "--data", str(tmp_path / "l0.jsonl"), "--out", str(tmp_path / "o")],
                          capsys, "l0.jsonl:2", "JSON array")
    assert "skip-bad" in line
    one = tmp_path / "one.csv"
    one.write_text("text,label\n" + "".join(f"text {i},same\n" for i in range(12)))
    one_line_error(["finetune", "--model", "minilm-l6", "--task", "classify", "--data", str(one), "--out",
                    str(tmp_path / "o")], capsys, "one.csv", "label 'same'", "at least two classes")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------- argv and stdin

@pytest.mark.parametrize("argv", [
    ["generate", "\udcff\udcfe"],                       # what Python makes of the bytes ff fe in argv (PEP 383)
    ["chat", "--once", "hi \ud800"],                    # a lone surrogate
    ["tokenizer", "encode", "ok\udce9"],
    ["predict", "--model", "runs/x", "caf\udce9"],
])
def test_argv_that_is_not_utf8(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    line = one_line_error(argv, capsys, "is not UTF-8 text")
    assert ("invalid byte 0x" in line) or ("lone surrogate U+D800" in line)


@pytest.mark.parametrize("argv", [["generate", "--model", "TINY", "-"], ["tokenizer", "encode", "--model", "TINY", "-"],
                                  ["predict", "--model", "runs/x", "-"], ["chat", "--model", "TINY"]])
def test_stdin_that_is_not_utf8(argv: list[str], tiny: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    # a real byte stream, decoded the way the interpreter decodes stdin (surrogateescape) until corelm steps in
    stdin = io.TextIOWrapper(io.BytesIO(b"hello\nw\xffrld\n"), encoding="utf-8", errors="surrogateescape")
    monkeypatch.setattr(sys, "stdin", stdin)
    argv = [str(tiny) if a == "TINY" else a for a in argv]
    one_line_error(argv, capsys, "stdin is not UTF-8 text (invalid start byte: 0xff)")


def test_stdin_of_the_console_script_is_checked(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "corelm.cli", "predict", "--model", str(tmp_path), "-"],
                          input=b"fine\n\xc3\x28\n", capture_output=True, timeout=120, check=False, cwd=ROOT)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert "stdin is not UTF-8 text (invalid continuation byte: 0xc3)" in err


# ------------------------------------------------------------------------------------------------ numbers

@pytest.mark.parametrize("argv,option,value", [
    (["prepare", "x.txt", "--out", "o"], "--val-fraction", "nan"),
    (["finetune", "--model", "m", "--task", "classify", "--data", "d", "--out", "o"], "--lr", "inf"),
    (["pretrain", "--model", "gpt2-tiny", "--data", "d"], "--lr", "-Infinity"),
    (["prune", "--model", "m", "--out", "o"], "--sparsity", "1e400"),
    (["distill", "--teacher", "t", "--student", "s", "--data", "d", "--out", "o"], "--alpha", "NaN"),
    (["plan", "--model", "gpt2"], "--mfu", "nan"),
])
def test_non_finite_numbers(argv: list[str], option: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    one_line_error(argv + [f"{option}={value}"], capsys, f"argument {option}: must be a finite number, got {value!r}")


@pytest.mark.parametrize("top", ["0", "-5"])
def test_predict_top_must_be_positive(top: str, capsys: pytest.CaptureFixture[str]) -> None:
    one_line_error(["predict", "--model", "runs/x", "--top", top, "some text"], capsys,
                   f"--top must be at least 1, got {top}")


def test_usage_errors_are_one_line_and_exit_codes_are_documented(capsys: pytest.CaptureFixture[str]) -> None:
    one_line_error(["prepare", "x.txt"], capsys, "the following arguments are required: --out", "corelm prepare --help")
    one_line_error(["tokenizer", "encode", "--bogus", "x"], capsys, "unrecognized arguments: --bogus")
    one_line_error(["predict", "--model", "m", "--top", "many", "x"], capsys, "invalid int value: 'many'")
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    assert "exit status:" in usage and all(f"  {code} " in usage for code in (0, 2, 130))


# ---------------------------------------------------------------------------------- a full or read-only disk

# A write past RLIMIT_FSIZE fails with EFBIG (once SIGXFSZ, which would kill the process, is ignored):
# a full disk in miniature, without tmpfs or root.
FSIZE_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
from corelm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run_limited(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", FSIZE_LIMITED, *argv], capture_output=True, text=True, timeout=300,
                          check=False, cwd=ROOT, env=env)


def test_full_disk_convert_prepare_export(tiny: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a few words of text to tokenize\n" * 10_000)  # a shard of more than 64 KiB
    for argv, out in ((["convert", str(tiny), str(tmp_path / "hf")], tmp_path / "hf"),
                      (["prepare", str(corpus), "--tokenizer", str(tiny), "--no-progress", "--out",
                        str(tmp_path / "tok")], tmp_path / "tok"),
                      (["export", str(tiny), str(tmp_path / "m.gguf")], tmp_path / "m.gguf")):
        proc = _run_limited(*argv)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert f"cannot write {out}: " in lines[0]
        assert ("File too large" in lines[0]) or (out.suffix == ".gguf" and "cut short" in lines[0])  # numpy: no errno
        assert not out.exists() and not leftovers(tmp_path, out.name)


def test_no_space_and_read_only(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    from corelm.data import prepare

    def no_space(self: object, ids: list[int]) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n" * 20)
    with monkeypatch.context() as m:
        m.setattr(prepare._ShardWriter, "add", no_space)
        one_line_error(["prepare", str(corpus), "--tokenizer", str(tiny), "--no-progress",
                        "--out", str(tmp_path / "t")],
                       capsys, f"cannot write {tmp_path / 't'}: No space left on device")
    assert not (tmp_path / "t").exists() and not leftovers(tmp_path, "t")

    def read_only(*args: object, **kwargs: object) -> str:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / ".hf.tmp-x"))

    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkdtemp", read_only)
        one_line_error(["convert", str(tiny), str(tmp_path / "hf")], capsys,
                       f"cannot write {tmp_path / 'hf'}: Read-only file system")
    assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------------------------------------- SIGTERM

# The command runs until its output sits complete in the temporary directory, says so, and waits there.
HOLD = """
import sys, time
import {module} as target
real = target.{name}
def hold(*args, **kwargs):
    result = real(*args, **kwargs)
    print("holding", flush=True)
    time.sleep(120)
    return result
target.{name} = hold
from corelm.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", ["convert", "prepare"])
def test_sigterm_removes_the_temporary_and_exits_130(command: str, tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    if command == "convert":
        script, argv = HOLD.format(module="corelm.io.hf", name="save_hf_dir"), [str(tiny), str(out)]
    else:
        (tmp_path / "c.txt").write_text("text to tokenize\n" * 20)
        script = HOLD.format(module="corelm.data.prepare", name="train_default_tokenizer")
        argv = [str(tmp_path / "c.txt"), "--train-tokenizer", "300", "--no-progress", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script, command, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        assert proc.stdout.readline().strip() == "holding", proc.stderr.read()
        assert leftovers(tmp_path, "out")  # the temporary directory exists and is being filled
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert not out.exists() and not leftovers(tmp_path, "out")


def test_pretrain_exits_130_after_its_interrupt_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from corelm import objectives
    from corelm.train.checkpoint import checkpoint_dirs
    from tests.test_pretrain_cli import make_tiny_data

    data = make_tiny_data(tmp_path)
    real, calls = objectives.causal_lm_loss, []

    def terminated_at_step_2(model: Any, batch: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or a scheduler would, mid-step
        return real(model, batch)

    monkeypatch.setattr(objectives, "causal_lm_loss", terminated_at_step_2)
    code = main(["pretrain", "--model", str(data / "gpt2.json"), "--data", str(data / "data"), "--seq-len", "32",
                 "--batch-size", "4", "--max-steps", "50", "--out", str(tmp_path / "run"), "--no-progress",
                 "--no-tensorboard", "--no-measure-mfu", "--eval-every", "0"])
    assert code == 130
    assert "interrupted: step 2" in capsys.readouterr().out
    assert [step for step, _ in checkpoint_dirs(tmp_path / "run")] == [2]


# ------------------------------------------------------------------------------- any bytes, any reader

FRAGMENTS = [b"text,label\n", b"text,label,x\n", b"a,b\n", b'"a, b",c\n', b'"open\n', b"\r\n", b"\n", b"\r", b",",
             b"\x00", b"\xff", b"\xe9", b"\xc3", b"\xed\xa0\x80", b"\xef\xbb\xbf", "é🤗".encode(), b" ", b"\t",
             b'{"text": "x", "label": 1}\n', b'{"text": "y", "label": ["x"]}\n', b'{"text": "\\ud800", "label": "a"}\n',
             b'{"text": "t", "label": NaN}\n', b'{"text": 1e400, "label": "z"}\n', b"[" * 3000, b"9" * 4400,
             b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n',
             b'[{"role": "assistant", "content": 5}]\n', b'{"text": "doc", "summary": "s"}\n', b"null\n",
             b"EU B-ORG\n", b"rejects O\n", b"-DOCSTART- O\n", b"x I-\n", b"word\n", b"w\xa0B-PER\n"]
HEADERS = [b"text,label\n", b'{"text": "a", "label": "b"}\n', b"EU B-ORG\n", b"", b"\xef\xbb\xbftext,label\r\n"]
_fragments = st.lists(st.sampled_from(FRAGMENTS), max_size=30).map(b"".join)
_headed = st.tuples(st.sampled_from(HEADERS), _fragments, st.binary(max_size=20)).map(b"".join)
DATA = st.one_of(st.binary(max_size=300), _fragments, _headed, _headed)  # twice: half the files start right
# Cases found earlier, kept so that every run tries them: a CR inside a CSV row (csv.Error), nesting deeper
# than the JSON decoder's recursion limit, an integer of more than 4300 digits, a lone surrogate escape.
KNOWN = [b"text,label\na\rb,c\nx,y\n", b"[" * 3000 + b"\n", b'{"text": ' + b"9" * 4400 + b', "label": 1}\n',
         b'{"text": "\\ud800", "label": "a", "summary": "\\udfff"}\n']
PROPERTY = settings(max_examples=100, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

READERS = {
    "cls.csv": lambda p, skip: tasks.read_classification(p, skip_bad=skip).items,
    "cls.jsonl": lambda p, skip: tasks.read_classification(p, skip_bad=skip).items,
    "ner.conll": lambda p, skip: [w + t for w, t in tasks.read_conll(p, skip_bad=skip).items],
    "chat.jsonl": lambda p, skip: [m["content"] for c in tasks.read_chat(p, skip_bad=skip).items for m in c],
    "pairs.jsonl": lambda p, skip: tasks.read_pairs(p, skip_bad=skip).items,
    "ppl.txt": lambda p, skip: [tasks.read_text(p)],
    "corpus.jsonl": lambda p, skip: [d.text for d in read_documents([p])],
    "corpus.txt": lambda p, skip: [d.text for d in read_documents([p])],
}


def _strings(value: object) -> list[str]:
    return [value] if isinstance(value, str) else [s for v in value for s in _strings(v)]  # type: ignore[union-attr]


def _with_known(test: Callable[..., None]) -> Callable[..., None]:
    for data in KNOWN:
        test = example(data=data, skip_bad=False)(example(data=data, skip_bad=True)(test))
    return test


@PROPERTY
@_with_known
@given(data=DATA, skip_bad=st.booleans())
def test_any_bytes_give_text_or_one_line(data: bytes, skip_bad: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, read in READERS.items():
            path = Path(tmp) / name
            path.write_bytes(data)
            try:
                result = read(path, skip_bad)
            except CorelmError as exc:
                assert str(exc) and "\n" not in str(exc) and "\r" not in str(exc), (name, str(exc))
            else:  # what a reader returns is text a tokenizer can take
                for text in _strings(result):
                    text.encode("utf-8")


@PROPERTY
@given(data=DATA, command=st.sampled_from([("finetune", "classify", "d.csv"), ("finetune", "classify", "d.jsonl"),
                                           ("finetune", "ner", "d.conll"), ("finetune", "sft", "d.jsonl"),
                                           ("evaluate", "summarize", "d.jsonl"), ("evaluate", "perplexity", "d.txt")]))
def test_any_bytes_through_the_cli_give_one_line(data: bytes, command: tuple[str, str, str],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # the model does not exist, so a file that reads fine stops at the model: exit 2 either way, one line
    name, task, file = command
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / file
        path.write_bytes(data)
        argv = [name, "--model", "no-such-model", "--task", task, "--data", str(path)]
        one_line_error(argv + (["--out", str(Path(tmp) / "run")] if name == "finetune" else []), capsys)
        assert sorted(p.name for p in Path(tmp).iterdir()) == [file]


# ----------------------------------------------------------------------- calibration text and recovery


@pytest.mark.parametrize("command", ["prune", "compare"])
def test_calibration_and_comparison_text_must_be_utf8(command: str, tiny: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "calib.txt"
    bad.write_bytes(b"plain text, then \xff\xfe bytes that are not UTF-8\n" * 4)
    argv = (["prune", "--model", str(tiny), "--method", "wanda", "--calib", str(bad), "--out",
             str(tmp_path / "out")] if command == "prune" else
            ["compare", str(tiny), "--data", str(bad)])
    one_line_error(argv, capsys, "not UTF-8", "calib.txt")


def test_an_interrupted_recovery_is_an_interrupt_not_a_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C/SIGTERM during `prune --recover-steps` must reach the CLI (exit 130), not write a half-healed model."""
    import torch

    from corelm.compress import prune as P
    from corelm.train import loop

    def interrupted(model, loss_fn, batches, cfg, **kwargs):  # what the loop returns after Ctrl-C
        return loop.TrainResult(step=1, stopped="interrupted")

    monkeypatch.setattr(loop, "train", interrupted)
    model = torch.nn.Linear(4, 4)
    with pytest.raises(KeyboardInterrupt):
        P.recover(model, model, list(range(2000)), 2, seq_len=16, batch_size=2)


def test_a_checkpoint_that_does_not_fit_on_the_disk_is_one_line(tmp_path: Path) -> None:
    """Training whose checkpoint hits a full disk stops with one line (the safetensors writer's error is no
    OSError) and leaves no half-written checkpoint directory."""
    from tests.test_pretrain_cli import make_tiny_data

    data = make_tiny_data(tmp_path)
    run = tmp_path / "run"
    proc = _run_limited("pretrain", "--model", str(data / "gpt2.json"), "--data", str(data / "data"), "--seq-len",
                        "32", "--batch-size", "4", "--max-steps", "2", "--out", str(run), "--no-progress",
                        "--no-tensorboard", "--no-measure-mfu", "--eval-every", "0")
    errors = [ln for ln in proc.stderr.strip().splitlines() if "error" in ln]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1 and "cannot write the checkpoint of step 2" in errors[0], proc.stderr
    assert not list((run / "checkpoints").glob(".step-*")) and not list((run / "checkpoints").glob("step-*"))
