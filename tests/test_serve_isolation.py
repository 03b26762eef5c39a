"""One request's failure fails that request alone: the other rows of the batch finish with exactly the
tokens they get when served alone (SECURITY.md, "HTTP requests")."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch

from corelm.generate import engine
from corelm.generate.engine import SamplingParams
from corelm.serve.app import ServerConfig, create_app
from corelm.serve.batcher import Batcher
from corelm.serve.server import ServerThread
from corelm.serve.service import TextModel
from tests.test_serve_api import HANG, tiny_llm, wait_until

POISON = 666  # the seed that marks the request whose own step raises


@pytest.fixture(scope="module")
def model():
    return tiny_llm().model


def _lone(model, prompt: list[int], n: int) -> list[int]:
    return engine.generate(model, [prompt], SamplingParams(max_new_tokens=n, ignore_eos=True))[0]


async def _serve(batcher: Batcher, requests: list[tuple[list[int], SamplingParams]]) -> list[tuple[list[int], str]]:
    async def one(prompt, spec):
        tokens, end = [], ""
        async for event in batcher.submit(prompt, spec):
            if event.kind == "token":
                tokens.append(event.token)
            else:
                end = event.kind if event.kind == "error" else event.finish_reason
        return tokens, end

    return await asyncio.gather(*(one(p, s) for p, s in requests))


def test_a_failing_batched_forward_fails_that_steps_rows_and_the_batcher_serves_on(model, monkeypatch) -> None:
    prompts = [[1, 17, 33, 90], [5, 6], [7, 300, 12, 9, 4, 2]]
    lone = [_lone(model, p, 10) for p in prompts]
    spec = SamplingParams(max_new_tokens=10, ignore_eos=True)
    calls = []
    batcher = Batcher(model, max_batch=4, max_seq_len=64)
    real = batcher.step.decode

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure in the batched forward")
        return real(*args, **kwargs)

    monkeypatch.setattr(batcher.step, "decode", flaky)
    batcher.start()
    try:
        first = asyncio.run(_serve(batcher, [(p, spec) for p in prompts]))
        # the rows in the failed step end with an error event; a row admitted after it is untouched
        assert any(end == "error" for _, end in first)
        for (tokens, end), want in zip(first, lone):
            assert (end == "error" and tokens == want[:len(tokens)]) or (end == "length" and tokens == want)
        assert batcher.running == 0
        later = asyncio.run(_serve(batcher, [(p, spec) for p in prompts]))  # the same worker thread goes on
        assert later == [(want, "length") for want in lone]
    finally:
        batcher.stop()


@pytest.mark.parametrize("fail_after", [0, 3])  # 0: the request's prefill step fails; 3: a later decode step
def test_an_exception_in_one_rows_step_fails_that_row_alone(model, fail_after: int) -> None:
    def sample(logits, spec, generator, history):
        if spec.seed == POISON and len(history) >= spec_prompt_len[id(spec)] + fail_after:
            raise RuntimeError("injected failure in this row's step")
        return engine.sample_next(logits, spec, generator, history)

    prompts = [[1, 17, 33, 90], [5, 6], [7, 300, 12, 9, 4, 2], [11]]
    specs = [SamplingParams(max_new_tokens=10, ignore_eos=True, seed=POISON if i == 1 else None)
             for i in range(len(prompts))]
    spec_prompt_len = {id(s): len(p) for p, s in zip(prompts, specs)}
    batcher = Batcher(model, max_batch=4, max_seq_len=64, sample=sample)
    batcher.start()
    try:
        results = asyncio.run(_serve(batcher, list(zip(prompts, specs))))
    finally:
        batcher.stop()
    for i, (prompt, (tokens, end)) in enumerate(zip(prompts, results)):
        if i == 1:
            assert end == "error" and len(tokens) == fail_after
        else:
            assert end == "length" and tokens == _lone(model, prompt, 10), i
    assert batcher.running == 0


def test_extreme_sampling_values_give_tokens_not_errors(model) -> None:
    """Accepted values whose arithmetic underflows or overflows fp32 still sample: temperature 1e-300 is
    greedy, a repetition penalty of 1e-300 or 1e300 only reorders tokens."""
    prompt = [1, 17, 33, 90]
    greedy = _lone(model, prompt, 6)
    cases = [{"temperature": 1e-300}, {"temperature": 1e-40}, {"temperature": 0.7, "repetition_penalty": 1e-300},
             {"temperature": 0.7, "repetition_penalty": 1e300}, {"temperature": 1e300},
             {"temperature": 1e-300, "top_p": 0.5}, {"temperature": 1e-300, "top_k": 3},
             {"temperature": 1, "top_p": 1e-300}]
    for kwargs in cases:
        out = engine.generate(model, [prompt], SamplingParams(max_new_tokens=6, ignore_eos=True, seed=1, **kwargs))[0]
        assert len(out) == 6 and all(0 <= t < model.config.vocab_size for t in out), kwargs
        if kwargs.get("temperature", 1) < 1e-30 and "repetition_penalty" not in kwargs:
            assert out == greedy, kwargs  # a vanishing temperature is greedy decoding
    logits = torch.tensor([[1.0, 1.0 + 1e-7, -3.0]])
    from corelm.ops.sampling import apply_repetition_penalty, temperature_probs

    for t in (1e-300, 1e-40, 1e-3, 1.0, 1e300):
        p = temperature_probs(logits, t)
        assert torch.isfinite(p).all() and abs(float(p.sum()) - 1) < 1e-5, t
    seen = torch.tensor([[True, False, True]])
    for penalty in (1e-300, 1e300):
        assert torch.isfinite(apply_repetition_penalty(logits, seen, penalty)).all()


def test_over_http_a_failing_row_gets_an_error_event_and_the_other_streams_their_lone_text() -> None:
    """Three streams share the batch; the poisoned one fails at its 3rd token, once all three are running.
    It gets OpenAI's error event and ``[DONE]``; the others stream exactly the text each gets alone."""
    llm = tiny_llm()
    batcher = Batcher(llm.model, max_batch=4, max_seq_len=128)

    def sample(logits, spec, generator, history):
        if spec.seed == POISON and len(next(r for r in batcher._rows if r and r.spec is spec).tokens) == 3:
            wait_until(lambda: batcher.running == 3, "all three streams share the batch")
            raise RuntimeError("injected failure in this row's step")
        return engine.sample_next(logits, spec, generator, history)

    batcher._sample = sample
    server = ServerThread(create_app([TextModel("tiny", llm, batcher)], ServerConfig()))
    prompts = ["The cat", "Numbers: one two", "Once upon a time"]

    async def stream(http, prompt: str, seed: int | None) -> tuple[str, list[dict]]:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                "stream": True, "seed": seed}
        async with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            events = [line[5:].strip() async for line in r.aiter_lines() if line.startswith("data:")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        return "".join(c["choices"][0]["text"] for c in chunks if "choices" in c), chunks

    async def serve(requests: list[tuple[str, int | None]]) -> list[tuple[str, list[dict]]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=HANG) as http:
            return await asyncio.gather(*(stream(http, p, seed) for p, seed in requests))

    batcher.start()
    with server:
        alone = [asyncio.run(serve([(p, None)]))[0][0] for p in prompts]  # one at a time
        together = asyncio.run(serve([(prompts[0], None), (prompts[1], POISON), (prompts[2], None)]))
        assert batcher.running == 0
    batcher.stop()
    (text0, _), (_, poisoned), (text2, _) = together
    assert [text0, text2] == [alone[0], alone[2]]
    error = poisoned[-1]["error"]
    assert error["type"] == "server_error" and error["message"] == "internal server error"
    assert sum("choices" in c for c in poisoned) == 3  # the tokens before the failure were streamed
