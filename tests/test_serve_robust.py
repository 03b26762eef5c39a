"""No request gets a 5xx: every malformed body is an OpenAI-shaped 4xx naming what is wrong.

The explicit cases are the 13 kinds that got HTTP 500 when the server was probed; the property tests
put any JSON value into any field of the three request kinds, and any bytes into the body.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import corelm
from corelm.serve.app import ServerConfig, create_app
from corelm.serve.batcher import Batcher
from corelm.serve.service import EmbeddingModel, TextModel
from tests.test_serve_api import tiny_llm

BASES = {
    "/v1/completions": {"model": "tiny", "prompt": "a b", "max_tokens": 2},
    "/v1/chat/completions": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/v1/embeddings": {"model": "minilm-l6", "input": "hello"},
}
FIELDS = {
    "/v1/completions": ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stop",
                        "seed", "repetition_penalty", "stream_options", "logprobs", "presence_penalty", "ignore_eos",
                        "echo", "suffix", "user", "unknown_field"],
    "/v1/chat/completions": ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                             "n", "stream", "stop", "seed", "tools", "tool_choice", "response_format",
                             "frequency_penalty", "unknown_field"],
    "/v1/embeddings": ["model", "input", "encoding_format", "dimensions", "user", "unknown_field"],
}


@pytest.fixture(scope="module")
def client():
    llm = tiny_llm()
    batcher = Batcher(llm.model, max_batch=4, max_seq_len=128, max_queue=64)
    app = create_app([TextModel("tiny", llm, batcher, default_max_tokens=4),
                      EmbeddingModel("minilm-l6", corelm.load("minilm-l6"))], ServerConfig(max_body_bytes=1 << 20))
    batcher.start()
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
    batcher.stop()


def _check(response) -> None:
    """2xx, or a 4xx whose body is OpenAI's error object; never a 5xx."""
    assert response.status_code < 500, response.text[:300]
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert error["type"] in ("invalid_request_error", "not_found_error", "authentication_error")


def _post(client, path: str, raw: bytes):
    return client.post(path, content=raw, headers={"content-type": "application/json"})


PROBED = [
    ("/v1/completions", b'{"model":"tiny","prompt":"\\udcff","max_tokens":2}', "lone surrogate"),
    ("/v1/completions", b'{"model":"tiny","prompt":"a\\ud800b","max_tokens":2}', "lone surrogate"),
    ("/v1/completions", b'{"model":"tiny","prompt":"\xed\xb3\xbf","max_tokens":2}', "not UTF-8"),  # CESU-8
    ("/v1/chat/completions", b'{"model":"tiny","messages":[{"role":"user","content":"\\udcff"}]}', "lone surrogate"),
    ("/v1/chat/completions", b'{"model":"tiny","messages":[{"role":"user","content":"\xed\xa0\x80"}]}', "not UTF-8"),
    ("/v1/embeddings", b'{"model":"minilm-l6","input":"\\ud800"}', "lone surrogate"),
    ("/v1/embeddings", b'{"model":"minilm-l6","input":["ok","\\udcff"]}', "lone surrogate"),
    ("/v1/completions", b'{"model":"tiny","prompt":"a","temperature":' + b"9" * 401 + b"}", "finite number"),
    ("/v1/completions", b'{"model":"tiny","prompt":"a","max_tokens":' + b"9" * 5000 + b"}", "4300 digits"),
    ("/v1/completions", b"[" * 100_000, "nested too deeply"),
    ("/v1/completions", b'{"a":' * 50_000, "nested too deeply"),
    ("/v1/completions", b'{"model":"tiny","prompt":"a","temperature":NaN}', "finite number, got NaN"),
    ("/v1/completions", b'{"model":"tiny","prompt":"a","top_p":1e400}', "finite number, got Infinity"),
]


@pytest.mark.parametrize("path,raw,message", PROBED)
def test_probed_bodies_are_400_with_a_reason(client, path, raw, message) -> None:
    r = _post(client, path, raw)
    assert r.status_code == 400, r.text[:300]
    assert message in r.json()["error"]["message"]
    # the connection stays usable: the next request on it is answered normally
    _check(_post(client, path, json.dumps(BASES[path]).encode()))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
EXAMPLES = {"max_examples": 120, "deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture]}


@settings(**EXAMPLES)
@given(path=st.sampled_from(sorted(BASES)), data=st.data(), value=json_values)
def test_any_json_value_in_any_field_is_2xx_or_an_openai_4xx(client, path, data, value) -> None:
    field = data.draw(st.sampled_from(FIELDS[path]))
    body = {**BASES[path], field: value}
    # json.dumps writes NaN/Infinity as JavaScript literals, which json.loads (and the server) accept
    _check(_post(client, path, json.dumps(body).encode()))


@settings(**EXAMPLES)
@given(path=st.sampled_from(sorted(BASES)), raw=st.binary(max_size=200))
def test_any_bytes_as_a_body_is_a_4xx(client, path, raw) -> None:
    _check(_post(client, path, raw))


def test_slow_clients_are_cut_off_and_do_not_block_others() -> None:
    """A client that trickles header bytes is closed after the header timeout; one that stops sending
    its body gets 408; a normal client is served meanwhile (the guard below is against a hang only)."""
    import socket
    import time

    from corelm.serve.server import ServerThread

    llm = tiny_llm()
    batcher = Batcher(llm.model, max_batch=2, max_seq_len=64)
    app = create_app([TextModel("tiny", llm, batcher, default_max_tokens=2)], ServerConfig(body_timeout=0.5))
    batcher.start()
    with ServerThread(app, header_timeout=0.5) as srv:
        slow = socket.create_connection((srv.host, srv.port))
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never finish
        body_less = socket.create_connection((srv.host, srv.port))
        body_less.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"model\"")  # the body stops after 8 of 100 bytes
        import httpx

        r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "hi"}, timeout=60)
        assert r.status_code == 200
        slow.settimeout(120)
        body_less.settimeout(120)
        deadline = time.monotonic() + 120
        while True:  # the server closes the header-less connection: recv returns b"" (EOF)
            data = slow.recv(1024)
            if data == b"" or time.monotonic() > deadline:
                break
        assert data == b""
        reply = body_less.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b"body_timeout" in reply
        slow.close()
        body_less.close()
    batcher.stop()
