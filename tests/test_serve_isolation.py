"""One request's failure fails that request alone: the other rows of the batch finish with exactly the
tokens they get when served alone (SECURITY.md, "HTTP requests")."""

from __future__ import annotations

import asyncio

import pytest
import torch

from corelm.generate import engine
from corelm.generate.engine import SamplingParams
from corelm.serve.batcher import Batcher
from tests.test_serve_api import tiny_llm

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
    real, calls = engine.decode_one, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure in the batched forward")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "decode_one", flaky)
    batcher = Batcher(model, max_batch=4, max_seq_len=64)
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
             {"temperature": 1e-300, "top_p": 0.5}, {"temperature": 1e-300, "top_k": 3}, {"temperature": 1, "top_p": 1e-300}]
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
