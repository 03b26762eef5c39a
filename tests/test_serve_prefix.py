"""The server's prefix cache and chunked prefill change the work, never the tokens: greedy outputs equal
each request served alone, on the model's own forward and on corelm's C++ step; a running stream gets a
token at every step while a long prompt is prefilled in chunks; ``cached_tokens`` counts what was reused."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest
import torch

from corelm import kernels
from corelm.generate import engine
from corelm.generate.engine import SamplingParams
from corelm.generate.step import KernelStep, ModelStep, step_for
from corelm.serve.app import ServerConfig, create_app
from corelm.serve.batcher import Batcher
from corelm.serve.prefix import PrefixCache
from corelm.serve.server import ServerThread
from corelm.serve.service import TextModel
from tests.test_generate_step import _tiny
from tests.test_serve_api import HANG, tiny_llm

SYSTEM = [5, 17, 3, 88, 41, 9, 2, 33, 12, 70, 71, 6, 44, 19, 23, 80, 7, 7, 1, 60, 61, 62, 63, 64, 30]  # 25 tokens


@pytest.fixture(scope="module", params=[ModelStep, KernelStep], ids=["model-step", "kernel-step"])
def model(request):
    with pytest.MonkeyPatch.context() as env:
        if request.param is KernelStep:
            assert kernels.load(), kernels.load_error()
        else:  # a float model runs on the C++ step too, unless asked for its forward
            env.setenv("CORELM_STEP", "pytorch")
        model = _tiny("int4" if request.param is KernelStep else None, seed=3)
        assert isinstance(step_for(model), request.param)
        yield model


def _lone(model, prompt: list[int], n: int) -> list[int]:
    return engine.generate(model, [prompt], SamplingParams(max_new_tokens=n, ignore_eos=True))[0]


async def _collect(handle) -> tuple[list[int], list[int]]:
    tokens, steps = [], []
    async for event in handle:
        assert event.kind != "error", event.error
        if event.kind == "token":
            tokens.append(event.token)
            steps.append(event.step)
    return tokens, steps


def _serve(batcher: Batcher, requests: list[tuple[list[int], int]], start: bool = True):
    """Submit every request (in order, before the worker runs when ``start``), then collect them."""
    async def go():
        handles = [batcher.submit(p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for p, n in requests]
        if start:
            batcher.start()
        out = await asyncio.wait_for(asyncio.gather(*(_collect(h) for h in handles)), HANG)
        return out, [h.cached_tokens for h in handles]

    return asyncio.run(go())


def test_prefix_reuse_gives_the_lone_tokens(model):
    tails = [[50, 51, 52], [90, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [4]]
    prompts = [SYSTEM + t for t in tails]
    lone = [_lone(model, p, 12) for p in prompts]
    batcher = Batcher(model, max_batch=3, max_seq_len=64, prefix_block=8, prefill_chunk=16)
    try:
        (first,), cached = _serve(batcher, [(prompts[0], 12)])
        assert first[0] == lone[0] and cached == [0]
        assert batcher.prefixes.tokens == 24  # the three whole blocks of the 28-token prompt
        # three more that share the system prompt's first 24 tokens, batched together and with a fresh prompt
        fresh = [77, 78, 79, 1, 2]
        out, cached = _serve(batcher, [(prompts[1], 12), (fresh, 12), (prompts[2], 12), (prompts[3], 12)],
                             start=False)
        assert [tokens for tokens, _ in out] == [lone[1], _lone(model, fresh, 12), lone[2], lone[3]]
        assert cached == [24, 0, 24, 24]
        # the whole prompt again: everything but its last token's block comes from the cache
        out, cached = _serve(batcher, [(prompts[2], 12)], start=False)
        assert out[0][0] == lone[2] and cached == [32]  # 35 tokens: blocks 0..3 (the 5th would hold the last token)
        assert batcher.prefixes.hits == 4 and batcher.prefixes.hit_tokens == 24 * 3 + 32
    finally:
        batcher.stop()


def test_requests_admitted_together_prefill_a_shared_head_once(model):
    """n > 1, or a burst with a new system prompt: the later requests wait for the first one's blocks."""
    same = SYSTEM + [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54]  # 40 tokens
    other = SYSTEM[:20] + [3, 3, 3, 3, 3, 3]
    lone = [_lone(model, p, 8) for p in (same, other)]
    batcher = Batcher(model, max_batch=4, max_seq_len=64, prefix_block=8, prefill_chunk=16)
    try:
        out, cached = _serve(batcher, [(same, 8), (same, 8), (other, 8), (same, 8)])
    finally:
        batcher.stop()
    assert [tokens for tokens, _ in out] == [lone[0], lone[0], lone[1], lone[0]]
    # the first prefills the 40 tokens; the other two copy its first 32 (the block with the last token is
    # always computed) and `other` copies the 16 it shares with it
    assert cached == [0, 32, 16, 32]


def test_prefix_cache_is_bounded_and_evicts_leaves_first(model):
    step = step_for(model)
    row = step.new_cache(1, 64)
    cache = PrefixCache(step, block=8, max_tokens=32)  # room for 4 blocks
    prompt_a = list(range(1, 41))  # 5 blocks
    with torch.inference_mode():
        step.prefill(row, [prompt_a], rows=[0])
    cache.store(row, 0, prompt_a)
    assert cache.tokens == 32  # bounded: the deepest block went first
    assert cache.load(row, 0, prompt_a + [9]) == 32  # the four blocks that stay are the prompt's head
    other = [90, 91] + list(range(3, 41))
    with torch.inference_mode():
        step.prefill(row, [other], rows=[0])
    cache.store(row, 0, other)
    assert cache.tokens == 32 and cache.load(row, 0, prompt_a + [9]) == 0  # evicted by the newer prompt
    assert cache.load(row, 0, other[:17]) == 16


def test_chunked_prefill_keeps_the_running_stream_going(model):
    short, long_prompt = [8, 9, 10, 11], [int(t) for t in torch.randint(0, 96, (60,), generator=torch.Generator()
                                                                          .manual_seed(1))]
    chunk = 8
    batcher = Batcher(model, max_batch=2, max_seq_len=96, prefill_chunk=chunk, prefix_cache_mib=0)
    try:
        (a, a_steps), (b, b_steps) = _serve(batcher, [(short, 20), (long_prompt, 6)])[0]
    finally:
        batcher.stop()
    assert a == _lone(model, short, 20) and b == _lone(model, long_prompt, 6)  # chunked prefill changes no token
    # the short prompt and the long prompt's first 4 tokens share step 1; the other 56 take one step per chunk,
    # and in every one of those steps the running stream got its next token
    assert b_steps[0] - a_steps[0] == math.ceil((60 - (chunk - len(short))) / chunk)
    assert a_steps == list(range(a_steps[0], a_steps[0] + 20))


def test_cached_tokens_in_usage_over_http():
    llm = tiny_llm()
    batcher = Batcher(llm.model, max_batch=4, max_seq_len=256, prefix_block=16)
    model = TextModel("tiny", llm, batcher, default_max_tokens=8)
    system = {"role": "system", "content": "You are a careful assistant who answers in one short sentence, "
                                            "citing the source of every fact you state and nothing else."}
    chats = [[system, {"role": "user", "content": q}] for q in ("What is 2+2?", "Name a color.")]
    ids = [model.encode_chat(c) for c in chats]
    common = next(i for i, (x, y) in enumerate(zip(*ids)) if x != y)
    want = min(common, len(ids[1]) - 1) // 16 * 16
    assert want >= 32
    batcher.start()
    with ServerThread(create_app([model], ServerConfig())) as srv, httpx.Client(base_url=srv.url, timeout=HANG) as http:
        def ask(messages, **extra):
            r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 8,
                                                         "temperature": 0, **extra})
            assert r.status_code == 200, r.text
            return r

        first = ask(chats[0]).json()
        assert first["usage"]["prompt_tokens"] == len(ids[0])
        assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        second = ask(chats[1]).json()
        assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": want}
        streamed = ask(chats[1], stream=True, stream_options={"include_usage": True}).text
        events = [json.loads(line[5:]) for line in streamed.splitlines() if line.startswith("data: {")]
        usage = [e["usage"] for e in events if e.get("usage")][-1]
        assert usage["prompt_tokens_details"] == {"cached_tokens": (len(ids[1]) - 1) // 16 * 16}  # its own blocks too
        completion = http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}).json()
        assert completion["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        metrics = http.get("/metrics").text
        assert "corelm_prefix_cache_hits 2.0" in metrics
    batcher.stop()
