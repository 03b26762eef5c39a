"""Structured output and logprobs through the official ``openai`` client, on the embedded SmolLM2.

Under a JSON schema every completed document parses and validates (checked with ``jsonschema``),
also when several constrained and free requests share the batch; a regex or a GBNF grammar holds the
same way; a bad schema or grammar is a 400; logprobs are the model's own log-softmax.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
import torch
from openai import BadRequestError, OpenAI

import corelm
from corelm.generate.step import step_for
from corelm.serve.app import ServerConfig, create_app
from corelm.serve.batcher import Batcher
from corelm.serve.server import ServerThread
from corelm.serve.service import TextModel

pytestmark = pytest.mark.slow  # spawns a server

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
TOPICS = ["a baker", "a pilot", "a child", "a painter", "a doctor", "a sailor", "a farmer", "a poet", "a judge",
          "a chemist", "a runner", "a singer", "a teacher", "a nurse", "a miner", "a writer", "a dancer", "a cook",
          "a guard", "a tailor"]


@pytest.fixture(scope="module")
def llm():
    return corelm.load("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def client(llm):
    batcher = Batcher(llm.model, max_batch=8, max_seq_len=512)
    app = create_app([TextModel("smollm2", llm, batcher, default_max_tokens=64)], ServerConfig())
    batcher.start()
    with ServerThread(app) as srv:
        yield OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    batcher.stop()


def _person(client, topic: str) -> tuple[str, str]:
    r = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": f"Describe {topic} as JSON with a name and an age."}],
        max_tokens=48, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    return r.choices[0].message.content, r.choices[0].finish_reason


def test_twenty_json_schema_documents_all_validate_while_sharing_the_batch(client):
    with ThreadPoolExecutor(8) as pool:  # eight rows decode together, each under its own grammar
        results = list(pool.map(lambda t: _person(client, t), TOPICS))
    for text, reason in results:
        assert reason == "stop", (text, reason)  # the document completed inside max_tokens
        jsonschema.validate(json.loads(text), PERSON)
    # unconstrained traffic in the same batch is unaffected: the greedy text equals the lone request's
    free = {"model": "smollm2", "messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 12,
            "temperature": 0}
    alone = client.chat.completions.create(**free).choices[0].message.content
    with ThreadPoolExecutor(4) as pool:
        mixed = list(pool.map(lambda i: client.chat.completions.create(**free).choices[0].message.content
                              if i % 2 else _person(client, TOPICS[i])[0], range(4)))
    assert mixed[1] == mixed[3] == alone


def test_json_object_regex_and_gbnf(client):
    r = client.completions.create(model="smollm2", prompt="A JSON object describing a cat:", max_tokens=40,
                                  temperature=0, extra_body={"response_format": {"type": "json_object"}})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].text), dict)
    else:  # cut by max_tokens: reported as such, never as a finished document
        assert r.choices[0].finish_reason == "length"
    r = client.completions.create(model="smollm2", prompt="Today's date is", max_tokens=16, temperature=0,
                                  extra_body={"regex": r" \d{4}-\d{2}-\d{2}"})
    assert re.fullmatch(r" \d{4}-\d{2}-\d{2}", r.choices[0].text) and r.choices[0].finish_reason == "stop"
    gbnf = 'root ::= answer "."\nanswer ::= "yes" | "no"'
    r = client.completions.create(model="smollm2", prompt="Is the sky blue? Answer:", max_tokens=8,
                                  temperature=0.9, seed=3, extra_body={"grammar": gbnf})
    assert r.choices[0].text in ("yes.", "no.")


def test_bad_schemas_and_grammars_are_400s(client):
    bad = [{"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
           {"response_format": {"type": "xml"}},
           {"regex": "[a-z"},
           {"grammar": "root ::= missing-rule"},
           {"regex": "a", "grammar": "start: \"a\""}]
    for extra in bad:
        with pytest.raises(BadRequestError):
            client.completions.create(model="smollm2", prompt="x", max_tokens=4, extra_body=extra)


def test_logprobs_are_the_models_log_softmax(client, llm):
    prompt = "The capital of France is"
    r = client.completions.create(model="smollm2", prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 6 and all(len(t) <= 3 for t in lp.top_logprobs)
    ids = llm.encode_prompt(prompt)
    generated = llm.generate_ids(ids, 6, ignore_eos=True)
    step = step_for(llm.model)  # the decode path the server runs (corelm's C++ step here)
    with torch.inference_mode():
        logits = step.extend(step.new_cache(1, 64), 0, ids + generated, 0)[len(ids) - 1:-1]
    want = torch.log_softmax(logits, -1)[torch.arange(6), torch.tensor(generated)]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs), want, rtol=0, atol=1e-5)
    assert "".join(lp.tokens) == r.choices[0].text
    c = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[1].logprob


def test_a_grammar_the_matcher_gives_up_on_is_a_400_for_that_request(client):
    """A regex of one character outside the model's tokens (U+40000): llguidance's mask lets a byte token
    through and then refuses it ("ParserTooComplex"). That request alone gets a 400; the server goes on."""
    with pytest.raises(BadRequestError, match="grammar could not be followed"):
        client.completions.create(model="smollm2", prompt="x", max_tokens=4, temperature=0,
                                  extra_body={"regex": "\U00040000"})
    r = client.completions.create(model="smollm2", prompt="Is the sky blue? Answer:", max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
