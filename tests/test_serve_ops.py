"""Operating the server: SIGTERM drains, the connection cap answers OpenAI's JSON, a model fault stays in its
row, and the access log is one JSON line per request.

- ``corelm serve`` as a real subprocess: SIGTERM while a stream runs lets it finish (every token, then
  ``[DONE]``), refuses new connections meanwhile, and exits 0; with ``--drain-timeout 0`` the stream
  ends at once with an in-band 503 ``shutdown`` error and ``[DONE]``, and the process still exits 0;
- beyond ``--max-connections`` a request gets a 503 ``connection_limit`` the ``openai`` client parses;
- a model whose logits turn NaN for one request (a NaN embedding row, fed only by that prompt): that
  request gets a 500 ``model_output_invalid`` (a server fault, named), the requests decoding beside it
  get exactly their lone-request text, and the row it held serves the next requests exactly;
- ``--access-log``: each request is one JSON object with the id sent back as ``X-Request-Id``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from openai import APIStatusError, OpenAI

from corelm.io.hf import save_hf_dir
from corelm.serve.accesslog import AccessLog
from corelm.serve.app import ServerConfig, create_app
from corelm.serve.batcher import Batcher
from corelm.serve.server import ServeOptions, ServerThread, free_port
from corelm.serve.service import TextModel
from tests.test_serve_api import tiny_llm

pytestmark = pytest.mark.slow  # spawns servers

HANG = 120  # seconds: a guard against a hang, not a speed assertion


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    llm = tiny_llm()
    return save_hf_dir(llm.model, llm.config, tmp_path_factory.mktemp("ops") / "tiny", tokenizer=llm.tokenizer)


def start(model_dir, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "corelm", "serve", "--model", str(model_dir), "--port", str(port),
                             "--max-batch", "2", "--threads", "1", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while True:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        assert time.monotonic() - t0 < HANG, "server did not start"
        time.sleep(0.2)


def stream_until_sigterm(proc: subprocess.Popen, url: str, max_tokens: int) -> list[dict | str]:
    """Start a stream, send SIGTERM after its first chunk, and read it to the end."""
    body = {"prompt": "The river", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    events: list[dict | str] = []
    with httpx.Client(timeout=HANG) as http, http.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
            if len(events) == 1:
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.3)  # the listener closes at once: no new connection is accepted while draining
                with pytest.raises(httpx.ConnectError):
                    httpx.get(url + "/health", timeout=5)
    return events


def test_sigterm_drains_a_running_stream_then_exits_0(model_dir):
    proc, url = start(model_dir, "--drain-timeout", "60")
    try:
        events = stream_until_sigterm(proc, url, max_tokens=200)
        assert proc.wait(timeout=HANG) == 0, proc.stderr.read()
    finally:
        proc.kill()
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length" and events[-2]["usage"]["completion_tokens"] == 200
    assert "draining: 1 request(s) running; deadline 60 s" in proc.stderr.read()


def test_sigterm_past_the_drain_deadline_ends_the_stream_in_band_then_exits_0(model_dir):
    proc, url = start(model_dir, "--drain-timeout", "0")
    try:
        events = stream_until_sigterm(proc, url, max_tokens=240)
        assert proc.wait(timeout=HANG) == 0, proc.stderr.read()
    finally:
        proc.kill()
    assert events[-1] == "[DONE]"
    assert events[-2] == {"error": {"message": "server is shutting down", "type": "server_error", "param": None,
                                    "code": "shutdown"}}
    assert sum(len(e["choices"]) for e in events[:-2]) < 240  # cut short: the stream did not run to its end


@pytest.fixture(scope="module")
def nan_server():
    """The tiny model whose embedding of one token is NaN (a forward hook: the tied output head keeps the real
    weights), so only the rows fed that token get NaN logits."""
    llm = tiny_llm()
    trigger = llm.tokenizer.encode(" zebra")[-1]

    def poison(module, inputs, out):
        return out.masked_fill((inputs[0] == trigger).unsqueeze(-1), float("nan"))

    llm.model.model.embed_tokens.register_forward_hook(poison)
    batcher = Batcher(llm.model, max_batch=4, max_seq_len=128, max_queue=16)
    app = create_app([TextModel("tiny", llm, batcher, default_max_tokens=16)], ServerConfig())
    batcher.start()
    with ServerThread(app) as srv:
        srv.batcher = batcher
        yield srv
    batcher.stop()


def test_nan_logits_fail_their_request_alone(nan_server):
    url = nan_server.url
    prompts = ["a b c", "the cat", "one two three four", "x y"]

    def body(prompt: str, stream: bool = False, temperature: float = 0.0) -> dict:
        return {"prompt": prompt, "max_tokens": 24, "temperature": temperature, "ignore_eos": True, "stream": stream}

    alone = [httpx.post(url + "/v1/completions", json=body(p), timeout=HANG).json()["choices"][0]["text"]
             for p in prompts]

    async def together(bodies: list[dict]) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=HANG) as c:
            return await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))

    # NaN from the second prompt token on, over 40 positions: longer than any later request in those rows
    long_tail = " " + " ".join(["word"] * 40)
    replies = asyncio.run(together([body(p) for p in prompts[:2]] + [
        body("a zebra" + long_tail),  # greedy: the batched argmax path
        body("a zebra zebra" + long_tail, temperature=0.7)]))  # the sampler's path
    assert [r.json()["choices"][0]["text"] for r in replies[:2]] == alone[:2]  # the rows beside it: unaffected
    for r in replies[2:]:
        assert r.status_code == 500 and r.json()["error"]["code"] == "model_output_invalid", r.text
    # a streamed request gets the same error in-band
    text = httpx.post(url + "/v1/completions", json=body("the zebra", stream=True), timeout=HANG).text
    assert '"code": "model_output_invalid"' in text and text.rstrip().endswith("data: [DONE]")
    # all four rows, the NaN-filled ones included, serve the next requests exactly: the NaN keys and values
    # left past a request's positions are never read (a masked NaN would still poison attention: 0 * NaN)
    replies = asyncio.run(together([body(p) for p in prompts]))
    assert [r.json()["choices"][0]["text"] for r in replies] == alone
    assert nan_server.batcher.running == 0 and nan_server.batcher.waiting == 0
    assert 'corelm_errors_total{code="model_output_invalid"} 3.0' in httpx.get(url + "/metrics").text


def test_connection_cap_is_an_openai_503(nan_server):
    app = create_app([], ServerConfig())
    with ServerThread(app, options=ServeOptions(max_connections=2)) as srv:
        held = [socket.create_connection((srv.host, srv.port)) for _ in range(2)]  # two open connections
        try:
            time.sleep(0.2)
            client = OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
            with pytest.raises(APIStatusError) as exc:
                client.models.list()
            assert exc.value.status_code == 503 and exc.value.response.headers["retry-after"] == "1"
            assert exc.value.body["code"] == "connection_limit"  # parsed by the client: OpenAI's error object
        finally:
            for s in held:
                s.close()
        time.sleep(0.2)
        assert httpx.get(srv.url + "/v1/models").status_code == 200  # connections closed: served again


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_access_log_is_one_json_line_per_request():
    llm = tiny_llm()
    batcher = Batcher(llm.model, max_batch=2, max_seq_len=128)
    logger, lines = logging.getLogger("test.access"), Lines()
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    app = AccessLog(create_app([TextModel("tiny", llm, batcher)], ServerConfig()), logger)
    batcher.start()
    with ServerThread(app) as srv:
        done = httpx.post(srv.url + "/v1/completions", json={"prompt": "a b", "max_tokens": 5, "ignore_eos": True,
                                                              "temperature": 0}, timeout=HANG)
        streamed = httpx.post(srv.url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "ignore_eos": True, "stream": True},
            timeout=HANG)
        missing = httpx.get(srv.url + "/nope")
    batcher.stop()  # the server has shut down: every request's line is written
    lines = [json.loads(line) for line in lines.lines]
    assert [(e["method"], e["path"], e["status"]) for e in lines] == [
        ("POST", "/v1/completions", 200), ("POST", "/v1/chat/completions", 200), ("GET", "/nope", 404)]
    assert [e["request_id"] for e in lines] == [r.headers["x-request-id"] for r in (done, streamed, missing)]
    prompt = done.json()["usage"]["prompt_tokens"]
    assert (lines[0]["prompt_tokens"], lines[0]["completion_tokens"]) == (prompt, 5)
    assert lines[1]["completion_tokens"] == 3 and lines[1]["prompt_tokens"] > 0  # a stream: counted at its end
    assert lines[2]["prompt_tokens"] == lines[2]["completion_tokens"] == 0
    assert all(e["latency_ms"] >= 0 and e["client"].startswith("127.0.0.1:") for e in lines)
