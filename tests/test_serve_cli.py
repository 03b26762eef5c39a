"""``corelm serve`` as a user runs it: a subprocess with a saved model directory, an API key file and
MiniLM for embeddings; bad command lines fail with one line and exit 2 before loading anything."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest
from openai import OpenAI

from corelm.cli import main as cli_main
from corelm.io.hf import save_hf_dir
from corelm.serve.server import free_port
from tests.test_serve_api import tiny_llm

pytestmark = pytest.mark.slow


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = cli_main(["serve", *argv])
    return code, capsys.readouterr().err


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["serve", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--model", "--host", "--port", "--api-key-file", "--max-batch", "--max-seq-len", "--max-queue",
                   "--request-timeout", "--max-body-kb", "--dtype"):
        assert option in out


def test_bad_command_lines_fail_with_one_line(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code, err = run_cli(["--port", str(busy.getsockname()[1])], capsys)
        assert code == 2 and "cannot listen on 127.0.0.1" in err
    empty = tmp_path / "key.txt"
    empty.write_text("\n")
    for argv, message in (([f"--api-key-file={tmp_path / 'missing.txt'}"], "cannot read the API key file"),
                          ([f"--api-key-file={empty}"], "is empty"),
                          (["--host", "my-laptop"], "--host must be an IP address"),
                          (["--port", "70000"], "--port must be in 1..65535"),
                          (["--model", "smollm3-135m", "--port", str(free_port())], "unknown model")):
        code, err = run_cli(argv, capsys)
        errors = [line for line in err.splitlines() if "error" in line]  # besides a "loading ..." progress line
        assert code == 2 and len(errors) == 1 and message in errors[0], err
        assert "Traceback" not in err


def test_serve_subprocess_with_key_chat_and_embeddings(tmp_path):
    llm = tiny_llm()
    model_dir = save_hf_dir(llm.model, llm.config, tmp_path / "tiny-chat", tokenizer=llm.tokenizer)
    key = tmp_path / "key.txt"
    key.write_text("k-123\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "corelm", "serve", "--model", str(model_dir), "--model", "minilm-l6",
                             "--port", str(port), "--api-key-file", str(key), "--max-batch", "4"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() - t0 < 60, "server did not start"
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        client = OpenAI(base_url=url + "/v1", api_key="k-123", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny-chat", "minilm-l6"]  # names, never paths
        reply = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=5, temperature=0)
        assert reply.usage.completion_tokens == 5
        assert len(client.embeddings.create(model="minilm-l6", input="hi").data[0].embedding) == 384
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert proc.returncode in (0, -15)
    assert "serving 'tiny-chat'" in err and "Traceback" not in err
