"""The published OpenAPI document, fuzzed with schemathesis against a real server: no 5xx, no response
that breaks the document.

A bounded, derandomized run (fixed Hypothesis seed per operation): every operation of
``/openapi.json`` gets ``EXAMPLES`` requests generated from its typed request body (positive data: bodies
the document allows, which still include everything the parser must refuse across fields, such as two
structure fields at once or a prompt beyond the window) and ``NEGATIVE`` requests that break it (wrong
types, out-of-range numbers, missing fields). Each response is checked by schemathesis' own checks:
``not_a_server_error``, ``status_code_conformance`` (only documented statuses),
``content_type_conformance`` and ``response_schema_conformance`` (the body validates against the
documented response), plus ``negative_data_rejection`` (a request that breaks the document is refused).
The decoder is a tiny random Llama with the SmolLM2 tokenizer, so generation costs microseconds; it has
LoRA adapter slots (one adapter loaded), so ``/v1/adapters`` is fuzzed as well.
"""

from __future__ import annotations

import collections
import json

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

import corelm
from corelm.serve.app import ServerConfig, create_app
from corelm.serve.server import ServeOptions, ServerThread, wrap
from corelm.serve.service import EmbeddingModel
from tests.test_serve_api import tiny_llm
from tests.test_serve_lora import write_run

pytestmark = pytest.mark.slow  # a real server and ~600 requests (~40 s on 2 busy cores)

EXAMPLES = 40  # positive requests per operation
NEGATIVE = 25  # requests that break the document, per operation with a body


def stream_chunks(ctx, response, case) -> bool | None:
    """Every SSE event is a chunk of the request's kind (or an in-band error), and the stream ends with [DONE]."""
    if not response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        return None
    events = [line[6:] for line in response.content.decode().split("\n\n") if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", "the stream does not end with data: [DONE]"
    kind = "chat.completion.chunk" if case.path.endswith("/chat/completions") else "text_completion"
    for event in map(json.loads, events[:-1]):
        assert "error" in event or (event["object"] == kind and isinstance(event["choices"], list)), event
    return True


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          stream_chunks]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    llm = tiny_llm()
    run = write_run(tmp_path_factory.mktemp("lora") / "sql", llm.model, ("q_proj", "v_proj"), rank=4, alpha=8.0,
                    seed=1)
    options = ServeOptions(max_batch=4, max_seq_len=96, max_queue=64, default_max_tokens=4, lora=[f"sql={run}"],
                           max_loras=2)
    text = wrap("tiny", llm, options, with_adapters=True)  # adapter slots: /v1/adapters is fuzzed too
    models = [text, EmbeddingModel("minilm-l6", corelm.load("minilm-l6"))]
    text.batcher.start()
    config = ServerConfig(max_body_bytes=256 * 1024, request_timeout=60, loopback_only=True)
    with ServerThread(create_app(models, config)) as srv:
        srv.batcher = text.batcher
        yield srv
    text.batcher.stop()


def test_published_document_is_typed(server):
    """The document is what the fuzzer reads: typed bodies, not untyped objects."""
    doc = requests.get(server.url + "/openapi.json", timeout=30).json()
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    request = doc["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert {"messages", "response_format", "tools", "tool_choice", "logprobs", "n", "seed"} <= set(
        request["properties"])
    assert request["required"] == ["messages"]
    assert set(doc["paths"]) == {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/health",
                                 "/metrics", "/", "/v1/adapters", "/v1/adapters/{name}"}


def fuzz(operation, mode, examples: int, checks: list, send) -> None:
    """``examples`` cases of ``operation`` in ``mode``, each sent with ``send`` and checked with ``checks``."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        case.validate_response(send(case), checks=checks)

    run()


def test_schemathesis_finds_no_server_error(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    session = requests.Session()
    statuses: collections.Counter = collections.Counter()

    def send(case):
        response = case.call(base_url=server.url, session=session, timeout=60)
        statuses[response.status_code // 100 * 100] += 1
        return response

    for result in schema.get_all_operations():
        operation = result.ok()
        fuzz(operation, schemathesis.GenerationMode.POSITIVE, EXAMPLES, CHECKS, send)
        if operation.body:
            fuzz(operation, schemathesis.GenerationMode.NEGATIVE, NEGATIVE, [*CHECKS, negative_data_rejection], send)
    sent = sum(statuses.values())
    print(f"schemathesis: {sent} requests, statuses by class {dict(sorted(statuses.items()))}")
    assert statuses[500] == 0
    assert sent >= 4 * (EXAMPLES + NEGATIVE)  # the four POST operations at least ran in full
    assert statuses[200] > 50 and statuses[400] > 50  # both valid and refused requests were exercised
    # the fuzzed requests left no row or queue place behind
    assert server.batcher.running == 0 and server.batcher.waiting == 0
