"""Mistral tool calls: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}]``, read from the real Mistral-Nemo
chat template (tests/data/chat_templates, as llama.cpp ships it).

The parser and its stream agree character by character; the forced-call grammar accepts exactly one call in
Mistral's syntax (with ``[TOOL_CALLS]`` as text or as a control token named by id); call ids are the 9
letters and digits the template insists on. End to end, the embedded SmolLM2 weights served under the
Mistral-Nemo template make a forced call whose arguments validate, and the result goes back through the
template to the next turn.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import pytest
from openai import OpenAI

import corelm
from corelm.serve import protocol, tools
from corelm.serve.app import ServerConfig, create_app
from corelm.serve.batcher import Batcher
from corelm.serve.server import ServerThread
from corelm.serve.service import TextModel

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
NEMO = (TEMPLATES / "mistralai-Mistral-Nemo-Instruct-2407.jinja").read_text()

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 20},
                                  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]
CALL = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}]'
slow = pytest.mark.slow  # the tests that load the embedded model

MISTRAL = [
    (CALL, "", [("get_weather", '{"city": "Oslo", "unit": "celsius"}')]),
    # two calls, the "id" key the template writes into earlier turns, a "]" inside a string
    ('[TOOL_CALLS][{"name": "a", "arguments": {"s": "x]"}, "id": "abcDEF123"}, {"name": "b", "arguments": {}}]',
     "", [("a", '{"s": "x]"}'), ("b", "{}")]),
    ('Let me check. [TOOL_CALLS] [ {"name": "a", "arguments": {"x": [1, {"y": "}"}]}} ]',
     "Let me check.", [("a", '{"x": [1, {"y": "}"}]}')]),
    # [TOOL_CALLS] dropped by a detokenizer that skips special tokens: the list alone is read as calls
    ('[{"name": "get_time", "arguments": {"city": "Lima"}}]', "", [("get_time", '{"city": "Lima"}')]),
    ("It is sunny in Paris.", "It is sunny in Paris.", []),
    ("[1, 2] are numbers, [Note] is text.", "[1, 2] are numbers, [Note] is text.", []),
    ('[{"answer": 42}]', '[{"answer": 42}]', []),
    ("[TOOL_CALLS][]", "[TOOL_CALLS][]", []),
    ('Cut [TOOL_CALLS][{"name": "a", "arguments": {"x": 1', 'Cut [TOOL_CALLS][{"name": "a", "arguments": {"x": 1',
     []),
]


@pytest.mark.parametrize("text,content,calls", MISTRAL)
def test_parser_and_its_stream_agree(text, content, calls):
    parsed = tools.parse_mistral(text)
    assert parsed.content == content
    assert [(c.name, c.arguments) for c in parsed.calls] == calls
    assert all(c.done for c in parsed.calls)
    stream = tools.ToolStream("mistral")  # one character at a time: the worst case of token pieces
    got_content, got, ids = "", {}, []
    for k, ch in enumerate(text):
        delta = stream.feed(ch, final=k == len(text) - 1)
        got_content += delta.get("content", "")
        for d in delta.get("tool_calls", []):
            entry = got.setdefault(d["index"], ["", ""])
            entry[0] += d["function"].get("name", "")
            entry[1] += d["function"]["arguments"]
            ids += [d["id"]] if "id" in d else []
    assert got_content == content
    assert stream.called == bool(calls)
    if calls:
        assert [tuple(v) for v in got.values()] == calls
        assert len(ids) == len(calls) and all(re.fullmatch(r"[A-Za-z0-9]{9}", i) for i in ids)


def test_streamed_argument_fragments_arrive_before_the_call_closes():
    stream = tools.ToolStream("mistral")
    delta = stream.feed('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Os')
    assert delta["tool_calls"][0]["function"]["name"] == "get_weather"
    assert delta["tool_calls"][1]["function"]["arguments"] == '{"city": "Os'
    assert "content" not in delta
    assert stream.feed('lo", "unit": "celsius"}}]', final=True)["tool_calls"] == [
        {"index": 0, "function": {"arguments": 'lo", "unit": "celsius"}'}}]


def test_family_is_read_from_the_real_templates():
    assert tools.family_of(NEMO) == "mistral"
    assert tools.family_of((TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text()) == "hermes"
    assert tools.family_of((TEMPLATES / "meta-llama-Llama-3.1-8B-Instruct.jinja").read_text()) == "llama3_json"
    # Mistral 7B v0.2 has no tool support: not the Mistral family
    assert tools.family_of((TEMPLATES / "mistralai-Mistral-7B-Instruct-v0.2-v1.jinja").read_text()) == "hermes"


def test_message_calls_have_ids_the_template_accepts():
    calls = tools.message_calls(tools.parse_mistral(CALL))
    assert len(calls) == 1 and re.fullmatch(r"[A-Za-z0-9]{9}", calls[0]["id"])
    assert tools.message_calls(tools.parse_hermes('<tool_call>{"name": "a", "arguments": {}}</tool_call>'))[0][
        "id"].startswith("call_")


@pytest.fixture(scope="module")
def llm():
    return corelm.load("smollm2-135m-instruct")


def _accepts(llt, grammar: str, ids: list[int]) -> bool:
    import llguidance

    from corelm.generate.constraints import grammar_for

    matcher = llguidance.LLMatcher(llt, grammar_for(grammar=grammar))
    return all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()


@slow
def test_forced_call_grammar_is_one_call_in_mistral_syntax(llm):
    import llguidance

    llt = llguidance.LLTokenizer(llm.tokenizer.backend.to_str(), n_vocab=llm.config.vocab_size,
                                 eos_token=[llm.tokenizer.eos_token_id])
    ids = llm.tokenizer.encode(CALL, add_special_tokens=False)
    assert _accepts(llt, tools.tool_grammar(TOOLS, None, "mistral"), ids)
    assert _accepts(llt, tools.tool_grammar(TOOLS, "get_weather", "mistral"), ids)
    assert not _accepts(llt, tools.tool_grammar(TOOLS, "get_time", "mistral"), ids)  # the named function only
    any_call = tools.tool_grammar(TOOLS, None, "mistral")
    bad = CALL.replace("celsius", "kelvin")  # outside the parameters' enum
    assert not _accepts(llt, any_call, llm.tokenizer.encode(bad, add_special_tokens=False))
    two = CALL[:-1] + ', {"name": "get_time", "arguments": {"city": "Oslo"}}]'  # exactly one call
    assert not _accepts(llt, any_call, llm.tokenizer.encode(two, add_special_tokens=False))


@slow
def test_tool_calls_control_token_is_named_by_id(llm):
    """In Mistral's vocabularies ``[TOOL_CALLS]`` is one control token, which llguidance keeps apart from the
    same text in ordinary tokens: given its id, the grammar names that token."""
    import llguidance
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_str(llm.tokenizer.backend.to_str())
    tok.add_special_tokens([AddedToken(tools.MISTRAL_TAG, special=True, normalized=False)])
    tag = tok.token_to_id(tools.MISTRAL_TAG)
    llt = llguidance.LLTokenizer(tok.to_str(), n_vocab=tok.get_vocab_size(), eos_token=[llm.tokenizer.eos_token_id])
    ids = tok.encode(CALL, add_special_tokens=False).ids
    assert ids[0] == tag
    assert _accepts(llt, tools.tool_grammar(TOOLS, None, "mistral", (tag,)), ids)
    assert not _accepts(llt, tools.tool_grammar(TOOLS, None, "mistral"), ids)  # the literal text misses the token


def _nemo(llm):
    tokenizer = copy.copy(llm.tokenizer)
    tokenizer.chat_template = NEMO
    return SimpleNamespace(tokenizer=tokenizer, config=llm.config, encode_prompt=llm.encode_prompt)


@pytest.fixture(scope="module")
def client(llm):
    batcher = Batcher(llm.model, max_batch=2, max_seq_len=1024)
    served = TextModel("mistral-style", _nemo(llm), batcher, default_max_tokens=64)
    batcher.start()
    with ServerThread(create_app([served], ServerConfig())) as srv:
        yield served, OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    batcher.stop()


@slow
def test_required_call_round_trip_through_the_mistral_template(client):
    served, client = client
    assert served.native_tools and served.tool_family == "mistral"
    ask = {"model": "mistral-style", "messages": ASK, "tools": TOOLS, "tool_choice": "required", "temperature": 0,
           "max_tokens": 64}
    choice = client.chat.completions.create(**ask).choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert re.fullmatch(r"[A-Za-z0-9]{9}", call.id)
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    # streamed: the same call, its arguments in fragments
    name, args, reason = "", "", None
    for chunk in client.chat.completions.create(stream=True, **ask):
        for d in chunk.choices[0].delta.tool_calls or []:
            name += (d.function.name or "") if d.function else ""
            args += (d.function.arguments or "") if d.function else ""
        reason = chunk.choices[0].finish_reason or reason
    assert (name, args, reason) == (call.function.name, call.function.arguments, "tool_calls")
    # the call and its result render through the template (which refuses ids other than 9 alphanumerics)
    history = ASK + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18})}]
    _, parsed = protocol.parse_chat({"messages": history, "tools": TOOLS})
    prompt = served.render_chat(parsed, TOOLS)
    assert f'[TOOL_CALLS][{{"name": "{call.function.name}", "arguments": {call.function.arguments}, ' \
           f'"id": "{call.id}"}}]' in prompt
    assert prompt.endswith(f'[TOOL_RESULTS]{{"content": {{"temperature": 18}}, "call_id": "{call.id}"}}[/TOOL_RESULTS]')
    answer = client.chat.completions.create(model="mistral-style", messages=history, tools=TOOLS, tool_choice="none",
                                            temperature=0, max_tokens=16).choices[0]
    # (the 135M model under a foreign template may answer with EOS at once: only the turn's shape is checked)
    assert answer.message.tool_calls is None and answer.finish_reason in ("stop", "length")
