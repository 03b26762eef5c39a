"""No request gets a 5xx: every malformed body is an OpenAI-shaped 4xx naming what is wrong.

The explicit cases are the 13 kinds that got HTTP 500 when the server was probed; the property tests
put any JSON value into any field of the three request kinds, and any bytes into the body.
"""

from __future__ import annotations

import json
import select
import socket

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import corelm
from corelm.serve.app import ServerConfig, create_app
from corelm.serve.batcher import Batcher
from corelm.serve.server import ServeOptions, ServerThread
from corelm.serve.service import EmbeddingModel, TextModel
from tests.test_serve_api import HANG, tiny_llm

BASES = {
    "/v1/completions": {"model": "tiny", "prompt": "a b", "max_tokens": 2},
    "/v1/chat/completions": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/v1/embeddings": {"model": "minilm-l6", "input": "hello"},
}
GENERATION = ["model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stream_options", "stop", "seed",
              "repetition_penalty", "ignore_eos", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs",
              "logit_bias", "best_of", "user", "unknown_field"]
HOLE = object()  # where a field template takes the drawn value
FIELDS = {  # top-level fields, and nested ones as templates merged into the base body
    "/v1/completions": [{f: HOLE} for f in GENERATION + ["prompt", "echo", "suffix"]] + [{"prompt": [HOLE]}],
    "/v1/chat/completions": [{f: HOLE} for f in GENERATION + ["messages", "max_completion_tokens", "tools",
                                                            "tool_choice", "response_format"]]
                            + [{"messages": [HOLE]}, {"messages": [{"role": HOLE, "content": "hi"}]},
                               {"messages": [{"role": "user", "content": HOLE}]},
                               {"messages": [{"role": "user", "content": [HOLE]}]},
                               {"messages": [{"role": "user", "content": [{"type": "text", "text": HOLE}]}]},
                               {"stream": True, "stream_options": {"include_usage": HOLE}},
                               {"response_format": {"type": "json_schema",
                                                    "json_schema": {"name": "x", "schema": HOLE}}},
                               {"response_format": {"type": HOLE}}, {"regex": HOLE}, {"grammar": HOLE}],
    "/v1/embeddings": [{f: HOLE} for f in ("model", "input", "encoding_format", "dimensions", "user", "unknown_field")]
                      + [{"input": [HOLE]}, {"input": ["ok", HOLE]}],
}


def _fill(template, value):
    if template is HOLE:
        return value
    if isinstance(template, dict):
        return {k: _fill(v, value) for k, v in template.items()}
    if isinstance(template, list):
        return [_fill(v, value) for v in template]
    return template


@pytest.fixture(scope="module")
def llm():
    return tiny_llm()


@pytest.fixture(scope="module")
def models(llm):
    batcher = Batcher(llm.model, max_batch=4, max_seq_len=128, max_queue=64)
    batcher.start()
    yield [TextModel("tiny", llm, batcher, default_max_tokens=4), EmbeddingModel("minilm-l6", corelm.load("minilm-l6"))]
    batcher.stop()


@pytest.fixture(scope="module")
def client(models):
    with TestClient(create_app(models, ServerConfig(max_body_bytes=1 << 20)), raise_server_exceptions=False) as c:
        yield c


SERVED = {"requests": 0, "server_errors": 0}  # what the property tests sent, for the summary line


def _check(response) -> None:
    """2xx, or a 4xx whose body is OpenAI's error object; never a 5xx, nor an error event mid-stream."""
    SERVED["requests"] += 1
    SERVED["server_errors"] += response.status_code >= 500
    assert response.status_code < 500, response.text[:300]
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert isinstance(error["message"], str) and error["message"]
        assert error["type"] in ("invalid_request_error", "not_found_error", "authentication_error")
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
        assert events[-1] == "[DONE]"
        assert not any("error" in json.loads(e) for e in events[:-1]), response.text[-300:]
    else:
        assert response.json()["object"] in ("list", "text_completion", "chat.completion")


def _post(client, path: str, raw: bytes):
    return client.post(path, content=raw, headers={"content-type": "application/json"})


PROBED = [  # the 13 kinds that were answered with HTTP 500, and the non-finite numbers' message
    ("/v1/completions", b'{"model":"tiny","prompt":"\\udcff","max_tokens":2}', "lone surrogate"),
    ("/v1/completions", b'{"model":"tiny","prompt":"a\\ud800b","max_tokens":2}', "lone surrogate"),
    ("/v1/completions", b'{"model":"tiny","prompt":"\xed\xb3\xbf","max_tokens":2}', "not UTF-8"),  # CESU-8
    ("/v1/chat/completions", b'{"model":"tiny","messages":[{"role":"user","content":"\\udcff"}]}', "lone surrogate"),
    ("/v1/chat/completions", b'{"model":"tiny","messages":[{"role":"user","content":"\xed\xa0\x80"}]}', "not UTF-8"),
    ("/v1/embeddings", b'{"model":"minilm-l6","input":"\\ud800"}', "lone surrogate"),
    ("/v1/embeddings", b'{"model":"minilm-l6","input":["ok","\\udcff"]}', "lone surrogate"),
    ("/v1/embeddings", b'{"model":"minilm-l6","input":"\xed\xb3\xbf"}', "not UTF-8"),
    ("/v1/completions", b'{"model":"tiny","prompt":"a","temperature":' + b"9" * 401 + b"}", "finite number"),
    ("/v1/completions", b'{"model":"tiny","prompt":"a","max_tokens":' + b"9" * 5000 + b"}", "4300 digits"),
    ("/v1/completions", b"[" * 100_000, "nested too deeply"),
    ("/v1/completions", b'{"a":' * 50_000, "nested too deeply"),
    ("/v1/chat/completions", b'{"messages":' + b"[" * 100_000, "nested too deeply"),
    ("/v1/completions", b'{"model":"tiny","prompt":"a","temperature":NaN}', "must be a finite number, got NaN"),
    ("/v1/completions", b'{"model":"tiny","prompt":"a","top_p":1e400}', "must be a finite number, got Infinity"),
    ("/v1/completions", b'{"model":"tiny","prompt":"a","top_p":-Infinity}', "must be a finite number, got -Infinity"),
    # found while writing these tests: a surrogate in a key, an integer too long to format with :g
    ("/v1/completions", b'{"model":"tiny","prompt":"a","\\ud800":1}', "lone surrogate"),
    ("/v1/completions", b'{"model":"tiny","prompt":"a","n":' + b"9" * 401 + b"}", "'n' must be in [1, 8]"),
]


@pytest.mark.parametrize("path,raw,message", PROBED)
def test_probed_bodies_are_400_with_a_reason(client, path, raw, message) -> None:
    r = _post(client, path, raw)
    assert r.status_code == 400, r.text[:300]
    assert message in r.json()["error"]["message"]
    _check(r)


def test_probed_bodies_keep_the_connection_alive(models) -> None:
    """On a real server, every probed body and then a good request travel over one kept-alive socket
    (a 500 made uvicorn close it)."""
    with ServerThread(create_app(models)) as srv, socket.create_connection((srv.host, srv.port)) as sock:
        sock.settimeout(HANG)
        reader = sock.makefile("rb")
        for path, raw, message in PROBED + [("/v1/completions", json.dumps(BASES["/v1/completions"]).encode(), "")]:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
            status, headers, body = _read_response(reader)
            assert headers.get("connection") != "close", (path, raw[:60])
            assert status == (400 if message else 200), (status, body)


def _read_response(reader) -> tuple[int, dict[str, str], dict]:
    """One HTTP/1.1 response from a socket's reader: status, headers, the JSON body."""
    status, headers = int(reader.readline().split()[1]), {}
    while (line := reader.readline()) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, json.loads(reader.read(int(headers["content-length"])))


# values at the edges of what JSON can say and Python or fp32 can hold
NASTY = [10**401, -(10**401), 2**63, 2**64, -1, 0, 1e-300, 5e-324, 1e-45, -0.0, 1.7e308, float("nan"),
         float("inf"), "", "\udcff", "a\ud800", "\x00", True, None, [], {}, [[]], {"": None}]
text = st.text(st.characters() | st.characters(categories=["Cs"]), max_size=20)  # lone surrogates included
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | text | st.sampled_from(NASTY),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12)
EXAMPLES = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture]}


def test_every_field_takes_every_edge_value(client) -> None:
    """Exhaustive where hypothesis is a sample: each edge value in each field of each request kind."""
    for path, templates in FIELDS.items():
        for template in templates:
            for value in NASTY:
                _check(_post(client, path, json.dumps({**BASES[path], **_fill(template, value)}).encode()))


@settings(max_examples=300, **EXAMPLES)
@given(path=st.sampled_from(sorted(BASES)), data=st.data(), value=st.sampled_from(NASTY) | json_values)
def test_any_json_value_in_any_field_is_2xx_or_an_openai_4xx(client, path, data, value) -> None:
    template = data.draw(st.sampled_from(FIELDS[path]))
    # json.dumps writes NaN/Infinity as JavaScript literals and lone surrogates as \ud800 escapes,
    # which json.loads (and the server) accept
    _check(_post(client, path, json.dumps({**BASES[path], **_fill(template, value)}).encode()))


@settings(max_examples=150, **EXAMPLES)
@given(path=st.sampled_from(sorted(BASES)),
       body=st.dictionaries(st.sampled_from(sorted({f for fs in FIELDS.values() for t in fs for f in t})) | text,
                            json_values, max_size=6))
def test_any_body_of_json_values_is_2xx_or_an_openai_4xx(client, path, body) -> None:
    _check(_post(client, path, json.dumps({**BASES[path], **body}).encode()))


@settings(max_examples=150, **EXAMPLES)
@given(path=st.sampled_from(sorted(BASES)), raw=st.binary(max_size=200))
def test_any_bytes_as_a_body_is_a_4xx(client, path, raw) -> None:
    _check(_post(client, path, raw))


def test_zz_summary_of_what_the_property_tests_sent() -> None:
    """Printed with ``-s``: how many requests the tests above sent and how many got a 5xx (none)."""
    print(f"\nserve robustness: {SERVED['requests']} requests, {SERVED['server_errors']} server errors")
    assert SERVED["server_errors"] == 0


def _limited_server(llm, **options):
    """A server with the given :class:`ServeOptions` limits (the app gets the body timeout)."""
    batcher = Batcher(llm.model, max_batch=2, max_seq_len=64)
    opts = ServeOptions(**options)
    app = create_app([TextModel("tiny", llm, batcher, default_max_tokens=2)],
                     ServerConfig(body_timeout=opts.body_timeout))
    batcher.start()
    return batcher, ServerThread(app, options=opts)


def _closed_by_server(sock: socket.socket) -> bool:
    """Wait (HANG at most) until the server closes ``sock`` without answering."""
    sock.settimeout(HANG)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


def test_slow_clients_are_cut_off_and_do_not_block_others(llm) -> None:
    """A client that trickles header bytes is closed after the header timeout; one that stops sending
    its body gets 408; a normal client is served meanwhile (HANG only guards against a hang)."""
    batcher, srv = _limited_server(llm, header_timeout=0.5, body_timeout=0.5)
    with srv, socket.create_connection((srv.host, srv.port)) as slow, \
            socket.create_connection((srv.host, srv.port)) as body_less:
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the headers never finish
        body_less.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"model\"")  # the body stops after 8 of 100 bytes
        r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "hi"}, timeout=HANG)
        assert r.status_code == 200
        assert _closed_by_server(slow)
        body_less.settimeout(HANG)
        status, _, body = _read_response(body_less.makefile("rb"))
        assert status == 408 and body["error"]["code"] == "body_timeout"
    batcher.stop()


def test_a_trickled_body_is_bounded_as_a_whole(llm) -> None:
    """A byte every 50 ms keeps every single read short; the body as a whole still gets 408 (it would
    take 500 s to arrive)."""
    batcher, srv = _limited_server(llm, body_timeout=1.0)
    with srv, socket.create_connection((srv.host, srv.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 10000\r\n\r\n")
        for _ in range(int(HANG / 0.05)):
            if select.select([sock], [], [], 0.05)[0]:  # the server answered
                break
            sock.sendall(b" ")
        sock.settimeout(HANG)
        status, _, body = _read_response(sock.makefile("rb"))
        assert status == 408 and body["error"]["code"] == "body_timeout"
    batcher.stop()


def test_idle_connections_close_and_the_connection_cap_answers_503(llm) -> None:
    batcher, srv = _limited_server(llm, keep_alive_timeout=0.5, max_connections=3)
    with srv:
        with socket.create_connection((srv.host, srv.port)) as idle:  # one request, then silence
            idle.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            idle.settimeout(HANG)
            reader = idle.makefile("rb")
            assert _read_response(reader)[0] == 200
            assert reader.read() == b""  # EOF: closed by the keep-alive timeout
        held = [socket.create_connection((srv.host, srv.port)) for _ in range(3)]
        try:  # 3 connections open: the cap is reached, a request on a 4th gets 503
            r = httpx.get(srv.url + "/health", timeout=HANG)
            assert r.status_code == 503
        finally:
            for sock in held:
                sock.close()
    batcher.stop()


@pytest.mark.parametrize("raw", [b"NOT HTTP AT ALL\r\n\r\n",
                                 b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 40_000])
def test_malformed_http_is_an_openai_400(llm, raw) -> None:
    """Not HTTP, or headers still unfinished after ``max_header_bytes``: 400 with OpenAI's error object."""
    batcher, srv = _limited_server(llm, max_header_bytes=16 * 1024)
    with srv, socket.create_connection((srv.host, srv.port)) as sock:
        sock.sendall(raw)
        sock.settimeout(HANG)
        status, headers, body = _read_response(sock.makefile("rb"))
        assert status == 400 and headers["content-type"] == "application/json"
        assert body["error"]["code"] == "invalid_http" and body["error"]["type"] == "invalid_request_error"
    batcher.stop()
