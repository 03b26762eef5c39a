"""Every documented command runs: the ``corelm ...`` lines of README.md and docs/*.md, in smoke size.

A guide is followed as a new user would: its commands run in order, in one scratch directory that
holds a copy of ``docs/examples/`` (the files the guides refer to), so a later command finds what an
earlier one wrote. Commands are taken from the fenced blocks that show a shell: ``bash``/``sh``
blocks (every ``corelm`` line) and console transcripts (untagged or ``console`` blocks, the lines
after ``$ ``). A transcript whose next line is ``corelm <cmd>: error: ...`` documents a refusal: the
command must then exit non-zero with that message.

Two explicit tables keep this honest, and nothing else is left out:

* ``SMOKE``: option substitutions that shrink a command to smoke size (steps, tokens, limits), each
  with its reason. The command still runs, with every other documented option.
* ``SKIP``: commands that need what a CI machine does not have, each with its reason.

The test fails when a documented command exits non-zero (or succeeds where a refusal is documented),
and when a command names a file under ``docs/examples/`` that does not exist. Commands run in this
process (``corelm.cli.main``), which saves a Python start and a torch import per command;
``corelm serve`` runs once as a real server, answers one request and is stopped.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # loads the embedded models; still part of `make test`

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"
# The guides in the order a reader follows them; later pages use what earlier ones wrote
# (serving.md serves runs/sft-merged from the fine-tuning page, compression.md distills on the data
# that distillation.md prepares).
PAGES = ["README.md", "docs/quickstart.md", "docs/pretraining.md", "docs/finetuning-evaluation.md",
         "docs/translation.md", "docs/distillation.md", "docs/compression.md", "docs/structured-pruning.md",
         "docs/planning.md", "docs/models-generation.md", "docs/coming-from.md", "docs/serving.md",
         "docs/structured-output.md"]
SHELL_LANGS = {"bash", "sh", "shell"}
TRANSCRIPT_LANGS = {"", "console"}

# (command, pattern, replacement, reason). Applied in order to the documented command line.
SMOKE: list[tuple[str, str, str, str]] = [
    ("*", r"--max-new-tokens \d+", "--max-new-tokens 4", "four tokens show that decoding runs"),
    ("pretrain", r"--max-steps \d+", "--max-steps 2", "two optimizer steps, not a training run"),
    ("pretrain", r"--save-every \d+", "--save-every 1", "a checkpoint within the two steps"),
    ("distill", r"--max-steps \d+", "--max-steps 2", "two optimizer steps, not a training run"),
    ("pretrain", r"^((?:(?!--batch-size).)*)$", r"\1 --batch-size 2 --seq-len 64",
     "two short sequences per step where the command leaves the default batch (8 x 256)"),
    ("distill", r"^((?:(?!--batch-size).)*)$", r"\1 --batch-size 2 --seq-len 64",
     "two short sequences per step where the command leaves the default batch (8 x 256)"),
    ("distill", r"^((?:(?!--eval-batches).)*)$", r"\1 --eval-batches 1", "one validation batch"),
    ("*", r"--eval-batches \d+", "--eval-batches 1", "one validation batch"),
    ("finetune", r"--steps \d+", "--steps 2", "two optimizer steps"),
    ("finetune", r"--epochs \d+", "--epochs 1 --steps 2", "two optimizer steps (--steps overrides --epochs)"),
    ("evaluate", r"--limit (2048)", "--limit 128", "128 tokens of perplexity"),
    ("evaluate", r"--limit 8\b", "--limit 1", "one summary"),
    ("evaluate", r"--window 512", "--window 64", "a window within the 128 tokens"),
    ("evaluate", r"--task translate", "--task translate --limit 4", "four test pairs"),
    ("prune", r"--recover-steps \d+", "--recover-steps 1 --recover-batch-size 1", "one recovery step of one window"),
    ("prune", r"$", " --calib-tokens 256", "256 calibration tokens instead of 4096 (default)"),
    ("prune", r"--calib-tokens 1024 (.*) --calib-tokens 256", r"--calib-tokens 256 \1",
     "the documented 1024 calibration tokens become 256 too"),
    ("prune", r"--precision bf16-mixed", "--precision fp32", "bf16 autocast is slow on CPUs without AVX512_BF16"),
    ("compare", r"--tokens \d+", "--tokens 64", "64 held-out tokens"),
    ("compare", r"^((?:(?!--tokens).)*)$", r"\1 --tokens 64", "64 held-out tokens where the default is used"),
    ("compare", r"--window \d+", "--window 32", "a window within the 64 tokens"),
    ("compare", r"^((?:(?!--window).)*)$", r"\1 --window 32", "a window within the 64 tokens"),
    ("compare", r"--decode-tokens \d+", "--decode-tokens 2", "two decode steps"),
    ("compare", r"^((?:(?!--decode-tokens).)*)$", r"\1 --decode-tokens 2", "two decode steps"),
    ("compare", r"^((?:(?!--threads).)*)$", r"\1 --threads 1", "one thread on the shared CI machine"),
    ("bench", r"--threads \d+", "", "--threads given once below"),
    ("bench", r"$", " --quick --threads 1 --steps 2 --new-tokens 4 --seq-len 32 --batch 2",
     "the shortest measurement (numbers are not checked here; benchmarks/ measures)"),
    ("plan", r"--plot docs/img/", "--plot ", "the plot goes to the scratch directory, not into docs/img"),
    ("convert", r"/tmp/", "", "the output goes to the scratch directory"),
]

# Shell steps that make a file a later corelm command reads: run with bash in the scratch directory.
SHELL_STEPS = ("cat ",)
# command prefix -> reason. A documented command starting with one of these is not run.
SKIP: dict[str, str] = {
    "torchrun": "several processes (torch.distributed); tests/test_train_distributed.py covers them",
    "corelm serve": "a long-running server: test_serve_runs starts and stops one documented serve command",
    "corelm pull": "downloads a Hugging Face repo (network); tests/test_hub.py covers it offline on a fake HF cache",
    "corelm quantize smollm2-135m-instruct smollm2-Q4_K_M.gguf": "the K-quant scale search over all of SmolLM2 "
    "(~10 s on one core); tests/test_gguf_quantize.py runs --method Q4_K_M on a tiny model, and the Q8_0 lines run",
    "corelm generate --model smollm2-Q4_K_M.gguf": "reads the Q4_K_M file of the skipped line above",
    "corelm evaluate --model smollm2-Q4_K_M.gguf": "reads the skipped Q4_K_M file; a 9,226-token perplexity run",
    "corelm generate --model Qwen/": "a Hugging Face repo id, downloaded on first use (network)",
}
SERVED = "corelm serve --model runs/sft-merged --port 9000 --api-key-file docs/examples/key.txt --max-batch 16"


@dataclass
class Command:
    page: str
    line: int
    text: str
    error: str | None = None  # the documented refusal message, if the transcript shows one


def documented_commands(page: str) -> list[Command]:
    """The shell commands of one page's fenced blocks, in order, with continuation lines joined."""
    lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
    out: list[Command] = []
    lang: str | None = None
    i = 0
    while i < len(lines):
        fence = re.match(r"\s*```(\w*)\s*$", lines[i])
        if fence:
            lang = None if lang is not None else fence.group(1)
            i += 1
            continue
        s = lines[i].strip()
        if lang in TRANSCRIPT_LANGS and s.startswith("$ "):
            text = s[2:]
        elif lang in SHELL_LANGS and not s.startswith("#") and s:
            text = s.removeprefix("$ ")
        else:
            i += 1
            continue
        start = i
        while text.endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text[:-1].rstrip() + " " + lines[i].strip()
        cmd = Command(page, start + 1, text)
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if lang in TRANSCRIPT_LANGS and re.match(r"corelm [\w-]+: error: ", nxt):
            cmd.error = nxt.split(": error: ", 1)[1]
        out.append(cmd)
        i += 1
    return out


def argv_of(text: str, env: dict[str, str]) -> list[str]:
    argv = shlex.split(text, comments=True)
    unset = [a for a in argv if a.startswith("$") and a[1:] not in env]
    assert not unset, f"{text}: {unset} is not set by an earlier documented step"
    return [env.get(a[1:], a) if a.startswith("$") else a for a in argv]


def smoke(text: str) -> str:
    name = text.split()[1] if text.startswith("corelm ") else ""
    for command, pattern, replacement, _reason in SMOKE:
        if command in ("*", name):
            text = re.sub(pattern, replacement, shlex.join(shlex.split(text, comments=True)), count=1)
    return text


def run_corelm(argv: list[str]) -> tuple[int, str, str]:
    from corelm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse usage errors
            rc = exc.code if isinstance(exc.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("docs-commands")
    shutil.copytree(EXAMPLES, work / "docs" / "examples")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        yield work, {}
    finally:
        os.chdir(cwd)


def test_commands_are_found() -> None:
    found = {p: documented_commands(p) for p in PAGES}
    corelm = [c for cs in found.values() for c in cs if c.text.startswith("corelm ")]
    assert len(corelm) >= 60, f"only {len(corelm)} corelm commands found; did the extraction break?"
    assert all(found[p] for p in ("README.md", "docs/quickstart.md", "docs/pretraining.md"))
    assert SERVED in [c.text for c in found["docs/serving.md"]], "the served command is no longer documented"


@pytest.mark.parametrize("page", [p for p in PAGES if p != "docs/serving.md"])
def test_page_commands_run(page: str, workspace) -> None:
    work, env = workspace
    ran = 0
    for cmd in documented_commands(page):
        where = f"{cmd.page}:{cmd.line}: {cmd.text}"
        assign = re.match(r"(\w+)=(.*)$", cmd.text)
        if assign:  # a shell variable a later command uses ("$P"): bash expands it
            env[assign.group(1)] = subprocess.run(["bash", "-c", f"{cmd.text}; printf %s \"${assign.group(1)}\""],
                                                  capture_output=True, text=True, check=True).stdout
            continue
        if cmd.text.startswith(SHELL_STEPS):
            subprocess.run(["bash", "-c", cmd.text], check=True, timeout=60)
            continue
        if not (cmd.text.startswith("corelm ") or cmd.text.startswith("torchrun")):
            continue  # curl, python benchmarks/..., echo: not corelm commands
        if any(cmd.text.startswith(prefix) for prefix in SKIP):
            continue
        text = smoke(cmd.text)
        argv = argv_of(text, env)
        missing = [a for a in argv if a.startswith("docs/examples/") and not (work / a).exists()]
        assert not missing, f"{where}\nnames files that docs/examples/ does not ship: {missing}"
        t0 = time.perf_counter()
        rc, out, err = run_corelm(argv[1:])
        took = time.perf_counter() - t0
        print(f"{took:6.1f} s  rc {rc}  {text}")
        if cmd.error is not None:
            assert rc != 0, f"{where}\ndocuments a refusal, but it exited 0:\n{out}{err}"
            assert cmd.error.split(" (")[0] in err, f"{where}\ndocumented error {cmd.error!r}, got:\n{err}"
        else:
            assert rc == 0, f"{where}\nran as: {text}\nexit {rc}\n{out[-2000:]}{err[-4000:]}"
        ran += 1
    assert ran or page in ("docs/models-generation.md", "docs/coming-from.md")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_runs(workspace) -> None:
    """The documented ``corelm serve`` of the fine-tuned, merged model answers, then stops."""
    work, _ = workspace
    if not (work / "runs" / "sft-merged").is_dir():
        pytest.fail("runs/sft-merged was not written by the fine-tuning page's commands")
    port = _free_port()
    argv = shlex.split(SERVED.replace("--port 9000", f"--port {port}"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "corelm", *argv[1:]], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    key = (work / "docs" / "examples" / "key.txt").read_text(encoding="utf-8").strip()
    try:
        body = json.dumps({"prompt": "The three laws", "max_tokens": 2, "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"corelm serve exited {proc.returncode}:\n{proc.stdout.read()}"
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    reply = json.load(resp)
                break
            except OSError:
                assert time.monotonic() < deadline, "corelm serve did not answer within 90 s"
                time.sleep(0.5)
        assert reply["choices"][0]["text"] is not None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
