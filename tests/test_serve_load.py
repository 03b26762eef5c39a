"""64 concurrent clients against one server: zero errors, every row freed, each greedy output equal to the
same request sent alone.

The clients (asyncio + httpx, one connection each) mix five kinds of request: plain completions
(streamed and not), chat under a JSON schema, chat with a forced tool call (its arguments under the
tool's schema), plain chat, and completions through one of two LoRA adapters (``tiny:sql``,
``tiny:chat``, the runs of ``test_serve_lora``: rows of both adapters and of the base in one batch).
Every request is first sent alone, one after another, to get its reference; then all 64 are sent at
once, so 16 rows decode together while the rest wait in the queue and join as rows free up,
constrained and free rows side by side. The decoder is a tiny random Llama with the SmolLM2 tokenizer
and chat template (the real SmolLM2 under load is ``benchmarks/serve_exactness.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time

import httpx
import jsonschema
import pytest

from corelm.api import LLM
from corelm.models import build_model
from corelm.serve.app import ServerConfig, create_app
from corelm.serve.server import ServeOptions, ServerThread, wrap
from tests.test_serve_api import tiny_llm
from tests.test_serve_lora import write_run

pytestmark = pytest.mark.slow  # a real server and 128 requests

CLIENTS = 64
WORDS = ["river", "stone", "lamp", "orbit", "cedar", "violet", "anchor", "ember", "harbor", "quartz", "meadow",
         "signal", "falcon", "copper", "lantern", "tundra", "glacier", "piano", "saddle", "thistle"]
# llguidance's x-guidance option: no whitespace between JSON tokens (a random model would fill its budget with it)
PERSON = {"x-guidance": {"whitespace_flexible": False}, "type": "object",
          "properties": {"name": {"type": "string", "maxLength": 10},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "additionalProperties": False,
                                                           "required": ["city"],
                                                           "properties": {"city": {"type": "string",
                                                                                   "maxLength": 12}}}}}


def request(i: int) -> tuple[str, dict]:
    """The i-th client's request: (path, body); all greedy, all different."""
    words = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(2 + i % 5))
    kind = i % 5
    if kind == 4:
        return "/v1/completions", {"model": "tiny:" + ("sql", "chat")[i % 2], "prompt": words, "max_tokens": 6 + i % 7,
                                   "temperature": 0, "ignore_eos": True, "stream": i % 3 == 0}
    if kind == 0:
        return "/v1/completions", {"prompt": words, "max_tokens": 6 + i % 11, "temperature": 0, "ignore_eos": True,
                                   "stream": i % 8 == 0}
    chat = {"messages": [{"role": "user", "content": f"Tell me about {words}."}], "temperature": 0}
    if kind == 1:
        return "/v1/chat/completions", {**chat, "max_tokens": 40, "response_format": {
            "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}}
    if kind == 2:
        return "/v1/chat/completions", {**chat, "max_tokens": 40, "tools": [WEATHER], "tool_choice": "required"}
    return "/v1/chat/completions", {**chat, "max_tokens": 4 + i % 9, "stream": i % 8 == 3}


def outcome(body: dict, reply: httpx.Response) -> tuple:
    """What must not change under load: the text (or the tool call) and the finish reason, per choice."""
    assert reply.status_code == 200, reply.text
    if body.get("stream"):
        events = re.findall(r"^data: (.*)$", reply.text, flags=re.MULTILINE)
        assert events[-1] == "[DONE]", reply.text
        chunks = [json.loads(e) for e in events[:-1]]
        assert not any("error" in c for c in chunks), reply.text
        choices = [c["choices"][0] for c in chunks if c["choices"]]
        text = "".join(c.get("text") or (c.get("delta") or {}).get("content") or "" for c in choices)
        return text, choices[-1]["finish_reason"]
    choice = reply.json()["choices"][0]
    if "text" in choice:
        return choice["text"], choice["finish_reason"]
    message = choice["message"]
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or []]
    return message["content"], tuple(calls), choice["finish_reason"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tiny = tiny_llm()
    # the same weights with a 512-token window: the tool prompt (the Hermes fallback) alone is ~230 tokens
    config = dataclasses.replace(tiny.config, max_seq_len=512)
    model = build_model(config).eval()
    model.load_state_dict(tiny.model.state_dict())  # the RoPE tables are buffers outside the state dict
    llm = LLM(model, tiny.tokenizer, config, source="random init")
    root = tmp_path_factory.mktemp("lora")
    runs = [f"sql={write_run(root / 'sql', model, ('q_proj', 'v_proj'), rank=4, alpha=8.0, seed=1)}",
            f"chat={write_run(root / 'chat', model, ('o_proj', 'gate_proj', 'down_proj'), rank=8, alpha=8.0, seed=2)}"]
    options = ServeOptions(max_batch=16, max_seq_len=512, max_queue=CLIENTS, default_max_tokens=16,
                           max_connections=4 * CLIENTS, lora=runs)
    served = wrap("tiny", llm, options, with_adapters=True)
    served.batcher.start()
    with ServerThread(create_app([served], ServerConfig(request_timeout=300)), options=options) as srv:
        srv.batcher = served.batcher
        yield srv
    served.batcher.stop()


def gauges(url: str) -> dict[str, float]:
    """The unlabelled samples of ``/metrics`` (gauges and counter totals)."""
    text = httpx.get(url + "/metrics", timeout=60).text
    samples = re.finditer(r"^(corelm_\w+) ([0-9.e+-]+)$", text, flags=re.MULTILINE)
    return {m.group(1): float(m.group(2)) for m in samples}


async def send_all(url: str, requests: list[tuple[str, dict]], together: bool) -> tuple[list, float]:
    """Send ``requests`` all at once (one connection per client) or one after another."""
    async with httpx.AsyncClient(base_url=url, timeout=300,
                                 limits=httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)) as c:
        async def one(path: str, body: dict) -> tuple:
            return outcome(body, await c.post(path, json={"model": "tiny", **body}))  # body may name an adapter

        t0 = time.monotonic()
        if together:
            results = await asyncio.gather(*(one(p, b) for p, b in requests), return_exceptions=True)
        else:
            results = [await one(p, b) for p, b in requests]
        return results, time.monotonic() - t0


def test_64_concurrent_mixed_clients_equal_their_lone_requests(server):
    requests = [request(i) for i in range(CLIENTS)]
    alone, t_alone = asyncio.run(send_all(server.url, requests, together=False))
    before = gauges(server.url)
    together, t_together = asyncio.run(send_all(server.url, requests, together=True))
    errors = [r for r in together if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert together == alone  # greedy: the batch changes nothing
    after = gauges(server.url)
    # every row and queue place freed, nobody disconnected, no error counted
    assert after["corelm_running_requests"] == 0 and after["corelm_queue_depth"] == 0
    assert server.batcher.running == 0 and server.batcher.waiting == 0
    assert server.batcher.adapters_in_use() == set()  # no request holds an adapter slot any more
    assert after.get("corelm_client_disconnects_total", 0) == 0
    # the mix was what it claims: rows of both adapters, valid documents and valid calls
    adapter = [(body, r) for (_, body), r in zip(requests, together) if body.get("model", "").startswith("tiny:")]
    assert len(adapter) == 12 and len({b["model"] for b, _ in adapter}) == 2
    for (path, body), result in zip(requests, together):
        if "response_format" in body:  # compact JSON (x-guidance: no free whitespace) fits in max_tokens
            assert result[2] == "stop", result
            jsonschema.validate(json.loads(result[0]), PERSON)
        if "tools" in body:
            assert result[2] == "tool_calls" and result[1][0][0] == "get_weather", result
            jsonschema.validate(json.loads(result[1][0][1]), WEATHER["function"]["parameters"])
    generated = after["corelm_generation_tokens_total"] - before["corelm_generation_tokens_total"]
    print(f"\n{CLIENTS} clients: {len(together)} requests, 0 errors, {generated:.0f} tokens in {t_together:.1f} s "
          f"together ({generated / t_together:.0f} tok/s) vs {t_alone:.1f} s one at a time; "
          f"{after['corelm_decode_steps'] - before['corelm_decode_steps']:.0f} decode steps")
