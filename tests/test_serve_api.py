"""The real server on a free loopback port, driven by the official ``openai`` client and raw HTTP.

The decoder is a tiny random Llama (2 layers, width 64) with the embedded SmolLM2 tokenizer and
chat template, its weights scaled so greedy continuations differ from prompt to prompt (a model
that repeats one token could not reveal requests mixing). Exactness under batching is checked on
this model: every text is compared token for token with the same request run alone, and a few with
a plain full-forward greedy loop (no cache, no batcher).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import torch
from openai import OpenAI

import corelm
from corelm.api import LLM
from corelm.config import ModelConfig
from corelm.models import build_model
from corelm.presets import embedded_path
from corelm.serve.app import ServerConfig, create_app
from corelm.serve.batcher import Batcher
from corelm.serve.server import ServerThread
from corelm.serve.service import EmbeddingModel, TextModel
from corelm.tokenizer import Tokenizer

pytestmark = pytest.mark.slow  # spawns a server

WINDOW = 256


def tiny_llm() -> LLM:
    tok = Tokenizer.from_gguf(str(embedded_path("smollm2-135m-instruct")))
    config = ModelConfig(family="llama", vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                         d_ff=128, max_seq_len=WINDOW, tie_embeddings=True, name="tiny")
    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():  # larger weights than the training init: varied, well-separated argmaxes
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5 if "embed" in name else 0.2)
    return LLM(model, tok, config, source="random init")


@pytest.fixture(scope="module")
def llm():
    return tiny_llm()


@pytest.fixture(scope="module")
def server(llm):
    batcher = Batcher(llm.model, max_batch=16, max_seq_len=WINDOW, max_queue=64)
    models = [TextModel("tiny", llm, batcher, default_max_tokens=16),
              EmbeddingModel("minilm-l6", corelm.load("minilm-l6"))]
    app = create_app(models, ServerConfig(max_body_bytes=64 * 1024))
    batcher.start()
    with ServerThread(app) as srv:
        srv.batcher = batcher
        yield srv
    batcher.stop()


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def greedy_reference(llm, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy decoding by full forward passes: no KV cache, no batcher."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(llm.model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt_ids):]


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


PROMPTS = ["The cat sat", "Once upon a time", "1 2 3", "hello", "In 1905, Einstein", "def main():",
           "Paris is the capital of", "東京は"]


def test_completion_matches_full_forward_greedy_and_the_api(client, llm):
    for prompt in PROMPTS[:3]:
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        ids = llm.encode_prompt(prompt)
        want = llm.tokenizer.decode(greedy_reference(llm, ids, 12), skip_special_tokens=True)
        assert out.choices[0].text == want == llm.generate(prompt, max_new_tokens=12, temperature=0)  # = the CLI/API
        assert out.choices[0].finish_reason == "length"
        assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 12


def test_chat_stream_and_non_stream_agree(client, llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    pieces, usage, finish = [], None, None
    for chunk in client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    want = llm.tokenizer.decode(greedy_reference(llm, ids, 10), skip_special_tokens=True)
    assert full.choices[0].message.content == want == "".join(pieces) == llm.chat(messages, max_new_tokens=10)
    assert full.choices[0].message.role == "assistant" and finish == "length"
    assert usage.prompt_tokens == len(ids) == full.usage.prompt_tokens and usage.completion_tokens == 10


def test_stop_string_is_not_emitted(client):
    base = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0)
    text = base.choices[0].text
    stop = text[5:8]
    assert stop.strip(), "the reference continuation is too short to pick a stop string"
    out = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0, stop=[stop])
    assert out.choices[0].text == text[: text.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_32_concurrent_streaming_clients_get_their_lone_text(server, client):
    """Greedy text is identical whatever else is in the batch: 32 streams vs each request alone."""
    jobs = [(PROMPTS[i % len(PROMPTS)], 6 + (i * 5) % 17) for i in range(32)]  # different lengths: rows leave
    alone = {}
    for prompt, n in set(jobs):
        alone[prompt, n] = client.completions.create(model="tiny", prompt=prompt, max_tokens=n,
                                                     temperature=0).choices[0].text
    results: list[str | None] = [None] * len(jobs)
    steps_before = server.batcher.steps

    def run(i: int) -> None:
        prompt, n = jobs[i]
        stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, stream=True)
        results[i] = "".join(c.choices[0].text for c in stream if c.choices)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [alone[job] for job in jobs]
    # They were batched: far fewer decode steps than the sum of their lengths.
    assert server.batcher.steps - steps_before < sum(n for _, n in jobs) / 3


def test_batching_noise_is_far_below_every_greedy_margin(llm):
    """Why the 32-client equality is not luck: batched matmuls differ from a lone request's only in
    float rounding (~1e-5 here), while every greedy choice in those generations wins by far more."""
    from corelm.generate.step import ModelStep

    prompts = [llm.encode_prompt(p) for p in PROMPTS]
    margins = []
    step = ModelStep(llm.model)
    with torch.inference_mode():  # the greedy trajectories of every test prompt, 22 tokens each
        cache = step.new_cache(len(prompts), 64)
        logits = step.prefill(cache, prompts, rows=list(range(len(prompts))))
        pos = torch.tensor([len(p) for p in prompts])
        for _ in range(22):
            top2 = logits.topk(2)
            margins += (top2.values[:, 0] - top2.values[:, 1]).tolist()
            logits = step.decode(cache, top2.indices[:, 0], pos)
            pos += 1
    with torch.inference_mode():
        prompts = prompts[:4]
        alone = step.new_cache(1, 64)
        step.prefill(alone, prompts[:1])
        together = step.new_cache(4, 64)
        for row, p in enumerate(prompts):
            step.prefill(together, [p], rows=[row])
        a = step.decode(alone, torch.tensor([7]), torch.tensor([len(prompts[0])]))
        b = step.decode(together, torch.tensor([7, 8, 9, 10]), torch.tensor([len(p) for p in prompts]))
        noise = float((a[0] - b[0]).abs().max())
    print(f"smallest greedy margin {min(margins):.3g}, batching noise {noise:.3g}")
    assert min(margins) > 20 * max(noise, 1e-7), (min(margins), noise)


def test_seeded_sampling_is_independent_of_the_batch(client):
    kwargs = {"model": "tiny", "prompt": "hello", "max_tokens": 10, "temperature": 1.0, "top_p": 0.9, "seed": 1234}
    alone = client.completions.create(**kwargs).choices[0].text
    other = client.completions.create(**{**kwargs, "seed": 99}).choices[0].text
    assert other != alone  # the seed matters ...
    with_load = [None] * 6

    def run(i: int) -> None:
        k = kwargs if i % 2 == 0 else {**kwargs, "prompt": PROMPTS[i], "seed": i}
        with_load[i] = client.completions.create(**k).choices[0].text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert with_load[0] == with_load[2] == with_load[4] == alone  # ... and nothing else does


def test_n_choices(client):
    out = client.completions.create(model="tiny", prompt="hello", max_tokens=5, temperature=0.8, seed=3, n=3)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert out.usage.completion_tokens == 15
    texts, finished = ["", ""], set()
    for chunk in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=2,
                                                max_tokens=4, temperature=0, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1} and texts[0] == texts[1] != ""  # greedy: both choices agree


def test_embeddings_match_encoder(client):
    texts = ["a cat on a mat", "quantum chromodynamics"]
    out = client.embeddings.create(model="minilm-l6", input=texts)  # the client asks for base64
    got = torch.tensor([d.embedding for d in out.data])
    want = corelm.load("minilm-l6").embed(texts)
    torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=1e-5)
    assert got.shape == (2, 384) and out.usage.prompt_tokens > 4
    raw = httpx.post(client.base_url.join("embeddings").__str__(),
                     json={"model": "minilm-l6", "input": "a cat on a mat", "encoding_format": "float"}).json()
    torch.testing.assert_close(torch.tensor(raw["data"][0]["embedding"]), got[0])


def test_models_health_and_page(server, client):
    assert {m.id for m in client.models.list().data} == {"tiny", "minilm-l6"}
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    page = httpx.get(server.url + "/")
    csp = page.headers["content-security-policy"]
    assert page.status_code == 200 and "default-src 'none'" in csp and "script-src 'sha256-" in csp
    assert "unsafe-inline" not in csp and "http" not in csp.replace("'self'", "")


# ---- bad requests: status, OpenAI error shape, the parameter named, and the server keeps serving ----

LONG = "word " * 400
BAD = [
    # (path, body (dict = JSON, bytes = raw), status, param, code)
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, None, "invalid_json"),
    ("/v1/chat/completions", b"[1, 2]", 400, None, "invalid_json"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {"model": "tiny"}, 400, "messages", None),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, 400, "messages", "invalid_type"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role", None),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content", "invalid_type"),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt", None),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature", "invalid_type"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": 2.5}, 400, "temperature", None),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p", None),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", None),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1.5}, 400, "max_tokens", "invalid_type"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 0}, 400, "n", None),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "seed": -1}, 400, "seed", None),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": [1]}, 400, "stop", "invalid_type"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stream": "yes"}, 400, "stream", "invalid_type"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty",
     "unsupported_parameter"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 6}, 400, "logprobs", None),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs", None),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "response_format": {"type": "xml"}}, 400,
     "response_format.type", None),
    ("/v1/completions", {"model": "tiny", "prompt": LONG}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"model": "tiny", "prompt": "hello", "max_tokens": WINDOW}, 400, "max_tokens",
     "context_length_exceeded"),
    ("/v1/completions", {"model": "gpt-5", "prompt": "x"}, 404, "model", "model_not_found"),
    ("/v1/completions", {"model": "minilm-l6", "prompt": "x"}, 400, "model", "wrong_endpoint"),
    ("/v1/embeddings", {"model": "minilm-l6", "input": []}, 400, "input", None),
    ("/v1/embeddings", {"model": "minilm-l6", "input": [[1, 2]]}, 400, "input", "invalid_type"),
    ("/v1/embeddings", {"model": "minilm-l6", "input": "x", "encoding_format": "hex"}, 400, "encoding_format", None),
    ("/v1/completions", {"model": "tiny", "prompt": "x" * (70 * 1024)}, 413, None, "body_too_large"),
    ("/v1/nothing", {}, 404, None, "not_found"),
    ("/v1/completions", ("text/plain", b'{"model": "tiny", "prompt": "x"}'), 415, None, "unsupported_media_type"),
]


@pytest.mark.parametrize("path,body,status,param,code", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_request_shape(server, path, body, status, param, code):
    if isinstance(body, tuple):  # (content type, raw body)
        kwargs = {"content": body[1], "headers": {"content-type": body[0]}}
    elif isinstance(body, bytes):
        kwargs = {"content": body, "headers": {"content-type": "application/json"}}
    else:
        kwargs = {"json": body}
    r = httpx.post(server.url + path, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and (code is None or error["code"] == code)
    assert "Traceback" not in r.text and "/work" not in r.text and ".py" not in r.text


def test_context_errors_name_the_counts(server):
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": WINDOW})
    message = r.json()["error"]["message"]
    assert f"max_tokens ({WINDOW})" in message and f"context window of {WINDOW}" in message


def test_openai_client_raises_typed_errors(client):
    import openai

    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny", messages=[], max_tokens=3)
    assert exc.value.body["param"] == "messages"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    # ... and the server still serves.
    assert client.completions.create(model="tiny", prompt="hello", max_tokens=2).usage.completion_tokens == 2


def test_disconnect_mid_stream_frees_the_row(llm):
    # after its first token the request waits for its cancellation: it cannot finish before the client leaves
    batcher, srv = small_server(llm, max_batch=2, stall=(1, lambda request: request.cancelled))
    body = {"model": "tiny", "prompt": "hello", "max_tokens": LONG, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with srv:
        assert metric(srv, "corelm_running_requests") == 0
        with httpx.Client(timeout=HANG) as http, http.stream("POST", srv.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            assert metric(srv, "corelm_running_requests") == 1
        wait_until(lambda: metric(srv, "corelm_running_requests") == 0, "the disconnected stream's row is freed")
        assert metric(srv, "corelm_client_disconnects_total") == 1
        assert metric(srv, "corelm_generation_tokens_total") < LONG  # freed by the disconnect, not by finishing
    batcher.stop()


def test_metrics_count_requests_and_tokens(server, client):
    before = metric(server, "corelm_generation_tokens_total")
    client.completions.create(model="tiny", prompt="hello", max_tokens=7, temperature=0)
    assert metric(server, "corelm_generation_tokens_total") == before + 7
    text = httpx.get(server.url + "/metrics").text
    assert 'corelm_requests_total{endpoint="/v1/completions",status="400"}' in text
    assert "corelm_time_to_first_token_seconds_bucket" in text and "corelm_queue_depth 0" in text
    assert 'corelm_errors_total{code="model_not_found"}' in text  # errors by kind (an earlier test's 404)


# ---- limits: admission, deadlines, auth, errors after the stream started ----


HANG = 120  # seconds: a guard against a hang, not a speed assertion (a 2-core machine may be busy)


def wait_until(condition, what: str) -> None:
    """Poll ``condition`` until it holds; fail only if it never does (the test would otherwise hang)."""
    deadline = time.monotonic() + HANG
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)


LONG = 200  # max_tokens of the requests a test holds running


def small_server(llm, *, max_batch=1, max_queue=1, stall=None, **config):
    """A separate server. ``stall=(n, until)`` (test only): once a long request (``LONG`` tokens) has
    ``n`` tokens, sampling its next one waits until ``until(request)`` holds, so the test acts while the
    request is provably still running, however fast or slow the machine. Shorter requests run freely."""
    from corelm.generate.engine import sample_next

    batcher = Batcher(llm.model, max_batch=max_batch, max_seq_len=WINDOW, max_queue=max_queue)

    def stalled(logits, spec, generator, history):
        request = next(r for r in batcher._rows if r is not None and r.spec is spec)
        if request.spec.max_new_tokens == LONG and len(request.tokens) >= stall[0]:
            wait_until(lambda: stall[1](request), "the condition a stalled request waits for")
        return sample_next(logits, spec, generator, history)

    if stall is not None:
        batcher._sample = stalled
    app = create_app([TextModel("tiny", llm, batcher)], ServerConfig(**config))
    batcher.start()
    return batcher, ServerThread(app)


def test_admission_limit_answers_503_at_once(llm):
    # the running request holds its row until its client leaves; the queued one waits until then
    batcher, srv = small_server(llm, max_batch=1, max_queue=1, stall=(1, lambda request: request.cancelled))
    long = {"model": "tiny", "prompt": "hello", "max_tokens": LONG, "ignore_eos": True, "stream": True}

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=srv.url, timeout=HANG) as http:
            running = await http.send(http.build_request("POST", "/v1/completions", json=long), stream=True)
            queued = asyncio.ensure_future(http.post("/v1/completions", json={**long, "stream": False}))
            while not (batcher.running == 1 and batcher.waiting == 1):  # event: row and queue are full
                await asyncio.sleep(0.01)
            r = await http.post("/v1/completions", json=long)
            assert r.status_code == 503, r.text
            # at once: the running request is still running and the queued one still waits
            assert batcher.running == 1 and batcher.waiting == 1
            assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
            await running.aclose()
            queued.cancel()

    with srv:
        asyncio.run(asyncio.wait_for(scenario(), HANG))
        wait_until(lambda: not (batcher.running or batcher.waiting), "both clients left: row and queue are free")
        r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200
    batcher.stop()


def test_deadline_mid_stream_is_an_sse_error_then_done(llm):
    # after 3 tokens a request waits out its deadline: the deadline, not the LONG tokens, ends it
    batcher, srv = small_server(llm, request_timeout=2.0,
                                stall=(3, lambda request: time.monotonic() > request.deadline))
    with srv:
        body = {"model": "tiny", "prompt": "hello", "max_tokens": LONG, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=HANG) as r:
            events = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "deadline_exceeded"
        assert 1 <= len(events) - 2 <= 4  # mid-stream: tokens came before the error (4 at most)
        r = httpx.post(srv.url + "/v1/completions", json={**body, "stream": False}, timeout=HANG)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
    batcher.stop()


def test_internal_error_reveals_nothing(llm):
    batcher, srv = small_server(llm, max_batch=2)

    def broken(*args):
        raise RuntimeError("secret detail in /work/main/corelm/secret.py")

    batcher._sample = broken
    with srv:
        r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 3})
        assert r.status_code == 500 and r.json()["error"]["message"] == "internal server error"
        assert "secret" not in r.text and "Traceback" not in r.text
    batcher.stop()


def test_loopback_only_refuses_other_host_names(llm):
    """A page on another site that rebinds its DNS name to 127.0.0.1 still sends its own Host."""
    batcher, srv = small_server(llm, max_batch=2, loopback_only=True)
    with srv:
        assert httpx.get(srv.url + "/health").status_code == 200
        for host in ("evil.example", f"evil.example:{srv.port}", "127.0.0.1.evil.example"):
            r = httpx.get(srv.url + "/v1/models", headers={"Host": host})
            assert r.status_code == 421 and r.json()["error"]["code"] == "misdirected_request"
        assert httpx.get(f"http://localhost:{srv.port}/v1/models").status_code == 200
    batcher.stop()


def test_api_key(llm, tmp_path):
    batcher, srv = small_server(llm, max_batch=2, api_key="s3cret-key")
    with srv:
        assert httpx.get(srv.url + "/health").status_code == 200
        assert httpx.get(srv.url + "/").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"}):
            r = httpx.get(srv.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert "s3cret" not in r.text
        assert httpx.get(srv.url + "/metrics").status_code == 401
        good = OpenAI(base_url=srv.url + "/v1", api_key="s3cret-key", max_retries=0)
        assert good.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens == 2
    batcher.stop()
