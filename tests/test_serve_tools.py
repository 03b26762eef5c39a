"""Tool calling through the official ``openai`` client, on the embedded SmolLM2-135M weights.

Three served models share one batcher: SmolLM2 with its own template (no tool support: the Hermes
fallback prompt), and the same weights under a Qwen2.5 template (``<tool_call>`` family, rendered
natively) and a Llama 3.1 template (``{"name": ..., "parameters": ...}`` family). A forced call
("required" or a named function) is grammar-constrained, so even the 135M model always produces a
call whose arguments validate (``jsonschema``); the parsed call goes back as a ``tool`` message and
the model answers in text. Rendering with tools is byte-identical to ``transformers``.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import httpx
import jsonschema
import pytest
from openai import BadRequestError, OpenAI

import corelm
from corelm.serve import protocol, tools
from corelm.serve.app import ServerConfig, create_app
from corelm.serve.batcher import Batcher
from corelm.serve.server import ServerThread
from corelm.serve.service import TextModel

# Qwen2.5-Instruct's chat template (tokenizer_config.json of Qwen/Qwen2.5-*-Instruct).
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Llama 3.1-Instruct's chat template (tokenizer_config.json of meta-llama/Llama-3.1-*-Instruct).
LLAMA31_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 20},
                                  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CONVERT = {"type": "function", "function": {
    "name": "convert_currency", "description": "Convert an amount between two currencies.",
    "parameters": {"type": "object",
                   "properties": {"amount": {"type": "number", "minimum": 0, "maximum": 1e6},
                                  "source": {"type": "string", "pattern": "^[A-Z]{3}$"},
                                  "target": {"type": "string", "pattern": "^[A-Z]{3}$"}},
                   "required": ["amount", "source", "target"], "additionalProperties": False}}}
TOOLS = [WEATHER, CONVERT]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]
slow = pytest.mark.slow  # the tests that load the embedded model and serve it


def _swapped(llm, template: str):
    """The same weights and tokenizer under another chat template."""
    tokenizer = copy.copy(llm.tokenizer)
    tokenizer.chat_template = template
    return SimpleNamespace(tokenizer=tokenizer, config=llm.config, encode_prompt=llm.encode_prompt)


@pytest.fixture(scope="module")
def llm():
    return corelm.load("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def models(llm):
    batcher = Batcher(llm.model, max_batch=4, max_seq_len=1024)
    served = {"smollm2": TextModel("smollm2", llm, batcher, default_max_tokens=64),
              "qwen-style": TextModel("qwen-style", _swapped(llm, QWEN25_TEMPLATE), batcher, default_max_tokens=64),
              "llama-style": TextModel("llama-style", _swapped(llm, LLAMA31_TEMPLATE), batcher, default_max_tokens=64)}
    batcher.start()
    yield served, batcher
    batcher.stop()


@pytest.fixture(scope="module")
def server(models):
    with ServerThread(create_app(list(models[0].values()), ServerConfig())) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _check_call(call, name: str | None = None) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    assert name is None or call.function.name == name
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return arguments


def _streamed(client, **kwargs) -> tuple[str, dict[int, dict], str, list]:
    """Content, tool calls assembled from their deltas, finish_reason, and the raw tool-call deltas."""
    content, calls, reason, deltas = "", {}, None, []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            deltas.append(d)
            call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            if d.id:
                assert call["id"] is None  # the id comes once, with the name
                call["id"] = d.id
            call["name"] += (d.function.name or "") if d.function else ""
            call["arguments"] += (d.function.arguments or "") if d.function else ""
        reason = choice.finish_reason or reason
    return content, calls, reason, deltas


@slow
@pytest.mark.parametrize("model", ["smollm2", "qwen-style", "llama-style"])
def test_required_call_round_trip(client, model):
    r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                       temperature=0, max_tokens=80)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    arguments = _check_call(call)
    # the result goes back as a tool message; with tool_choice "none" the model answers in text
    history = ASK + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, **arguments})}]
    answer = client.chat.completions.create(model=model, messages=history, tools=TOOLS, tool_choice="none",
                                            temperature=0, max_tokens=24).choices[0]
    assert answer.message.tool_calls is None and answer.message.content
    assert answer.finish_reason in ("stop", "length")


@slow
@pytest.mark.parametrize("model", ["smollm2", "llama-style"])
def test_streamed_round_trip_equals_the_non_streamed_call(client, model):
    ask = {"model": model, "messages": ASK, "tools": TOOLS, "tool_choice": "required", "temperature": 0,
           "max_tokens": 80}
    whole = client.chat.completions.create(**ask).choices[0].message.tool_calls[0]
    content, calls, reason, deltas = _streamed(client, **ask)
    assert reason == "tool_calls" and content == "" and list(calls) == [0]
    assert (calls[0]["name"], calls[0]["arguments"]) == (whole.function.name, whole.function.arguments)
    assert calls[0]["id"].startswith("call_")
    # OpenAI's shape: the first delta names the function with empty arguments, fragments follow
    assert deltas[0].function.name == whole.function.name and deltas[0].function.arguments == ""
    assert len(deltas) > 2 and all(d.function.name is None and d.id is None for d in deltas[1:])
    history = ASK + [{"role": "assistant", "tool_calls": [{"id": calls[0]["id"], "type": "function",
                                                           "function": {"name": calls[0]["name"],
                                                                        "arguments": calls[0]["arguments"]}}]},
                     {"role": "tool", "tool_call_id": calls[0]["id"], "content": "18 degrees, sunny"}]
    text, calls, reason, _ = _streamed(client, model=model, messages=history, tools=TOOLS, tool_choice="none",
                                       temperature=0, max_tokens=24)
    assert text and not calls and reason in ("stop", "length")


@slow
def test_each_of_n_streamed_choices_parses_its_own_calls(client):
    calls: dict[int, dict[int, list[str]]] = {}
    reasons = {}
    for chunk in client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, tool_choice="required",
                                                n=2, temperature=1.0, seed=7, max_tokens=80, stream=True):
        for choice in chunk.choices:
            for d in choice.delta.tool_calls or []:
                entry = calls.setdefault(choice.index, {}).setdefault(d.index, ["", ""])
                entry[0] += d.function.name or ""
                entry[1] += d.function.arguments or ""
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    assert reasons == {0: "tool_calls", 1: "tool_calls"}
    for per_choice in calls.values():
        ((name, arguments),) = per_choice.values()
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@slow
@pytest.mark.parametrize("model", ["smollm2", "qwen-style", "llama-style"])
def test_named_tool_choice_produces_that_function_with_valid_arguments(client, model):
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "How many euros is 250 dollars?"}], tools=TOOLS,
        temperature=0, max_tokens=80, tool_choice={"type": "function", "function": {"name": "convert_currency"}})
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls
    _check_call(call, "convert_currency")


@slow
def test_auto_leaves_the_model_free(client, models):
    """With "auto" nothing is constrained: the greedy output equals free decoding of the same prompt."""
    served, _ = models
    r = client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, temperature=0, max_tokens=24)
    prompt = served["smollm2"].render_chat(ASK, TOOLS)
    free = client.completions.create(model="smollm2", prompt=prompt, temperature=0, max_tokens=24)
    text = free.choices[0].text
    parsed = tools.parse_hermes(text)
    message = r.choices[0].message
    if parsed.calls:
        assert [c.function.arguments for c in message.tool_calls] == [c.arguments for c in parsed.calls]
    else:
        assert message.content == text and message.tool_calls is None


DEEP: dict = {}
for _ in range(200):  # deeper than the grammar engine recurses
    DEEP = {"type": "object", "properties": {"a": DEEP}}
BAD_TOOLS = [
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": 3}}]}, "tools[0].function.description"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    # a parameters schema the grammar engine cannot compile: a 400 when a call is forced
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "strin"}}}}}], "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": DEEP}}}}], "tool_choice": {"type": "function", "function": {"name": "f"}}},
     "tools"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                                         "function": {"name": "f", "arguments": "{not json"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f"}}]}]},
     "messages[0].tool_calls[0]"),
    ({"messages": [{"role": "assistant", "tool_calls": []}]}, "messages[0].tool_calls"),
    ({"messages": ASK + [{"role": "tool", "content": "18"}]}, "messages[1].tool_call_id"),
]


@slow
@pytest.mark.parametrize("extra,param", BAD_TOOLS)
def test_bad_tool_definitions_are_400s(client, extra, param):
    with pytest.raises(BadRequestError) as info:
        client.chat.completions.create(**{"model": "smollm2", "messages": ASK, "max_tokens": 4, **extra})
    assert info.value.status_code == 400 and info.value.body["param"] == param, info.value.body


@slow
def test_tools_on_completions_are_400(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "tools": TOOLS, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"


CONVERSATION = [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "Weather in Paris and in Oslo, in celsius?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
    {"role": "tool", "tool_call_id": "call_a", "content": '{"temperature": 18}'},
    {"role": "tool", "tool_call_id": "call_b", "content": '{"temperature": -3}'},
    {"role": "assistant", "content": "Paris: 18 °C, Oslo: -3 °C."},
    {"role": "user", "content": "And 100 USD in EUR?"},
]


def _transformers_render(llm, template: str, messages: list, specs: list | None) -> str:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=llm.tokenizer.backend, **llm.tokenizer.special_tokens_map)
    tok.chat_template = template
    return tok.apply_chat_template(messages, tools=specs, tokenize=False, add_generation_prompt=True)


def _to_transformers(messages: list) -> list:
    """OpenAI's messages as transformers documents them: tool-call arguments as objects."""
    out = copy.deepcopy(messages)
    for m in out:
        for call in m.get("tool_calls", []):
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    return out


@slow
def test_native_templates_render_tools_like_transformers(llm, models):
    served, _ = models
    _, parsed = protocol.parse_chat({"messages": CONVERSATION, "tools": TOOLS})
    qwen = served["qwen-style"]
    assert qwen.native_tools and qwen.tool_family == "hermes"
    ours = qwen.render_chat(parsed, TOOLS)
    assert ours == _transformers_render(llm, QWEN25_TEMPLATE, _to_transformers(CONVERSATION), TOOLS)
    assert "<tool_call>\n" + '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}' in ours
    assert qwen.render_chat(parsed[:2]) == _transformers_render(llm, QWEN25_TEMPLATE, CONVERSATION[:2], None)
    # Llama 3.1: one call per assistant turn
    llama = served["llama-style"]
    assert llama.native_tools and llama.tool_family == "llama3_json"
    single = CONVERSATION[:3] + CONVERSATION[3:4]
    single[2] = {**single[2], "tool_calls": single[2]["tool_calls"][:1]}
    _, parsed = protocol.parse_chat({"messages": single, "tools": TOOLS})
    assert llama.render_chat(parsed, TOOLS) == _transformers_render(llm, LLAMA31_TEMPLATE, _to_transformers(single), TOOLS)


@slow
def test_fallback_prompt_for_a_template_without_tools(models):
    model = models[0]["smollm2"]
    assert not model.native_tools and model.tool_family == "hermes"
    _, parsed = protocol.parse_chat({"messages": CONVERSATION, "tools": TOOLS})
    prompt = model.render_chat(parsed, TOOLS)
    assert prompt.startswith("<|im_start|>system\nYou are a weather bot.\n\nYou can call functions")
    assert json.dumps(WEATHER) in prompt and json.dumps(CONVERT) in prompt
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
            '"unit": "celsius"}}\n</tool_call>\n<tool_call>') in prompt
    assert ('<|im_start|>user\n<tool_response>\n{"temperature": 18}\n</tool_response>\n<tool_response>\n'
            '{"temperature": -3}\n</tool_response><|im_end|>') in prompt
    assert "<|im_start|>tool" not in prompt and prompt.endswith("<|im_start|>assistant\n")


@slow
def test_tool_call_tags_that_are_added_tokens_are_named_by_id(llm):
    """Qwen's vocabulary has ``<tool_call>``/``</tool_call>`` as added tokens, which llguidance keeps apart
    from the same text in ordinary tokens: the forced-call grammar names them by id."""
    import llguidance
    from tokenizers import AddedToken, Tokenizer

    from corelm.generate.constraints import grammar_for

    tok = Tokenizer.from_str(llm.tokenizer.backend.to_str())
    tok.add_tokens([AddedToken(tools.OPEN, special=False, normalized=False),
                    AddedToken(tools.CLOSE, special=False, normalized=False)])
    tags = (tok.token_to_id(tools.OPEN), tok.token_to_id(tools.CLOSE))
    llt = llguidance.LLTokenizer(tok.to_str(), n_vocab=tok.get_vocab_size(), eos_token=[llm.tokenizer.eos_token_id])
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>'
    ids = tok.encode(text).ids
    assert ids[0] == tags[0] and ids[-1] == tags[1]

    def accepts(grammar: str) -> bool:
        matcher = llguidance.LLMatcher(llt, grammar_for(grammar=grammar))
        return all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()

    assert accepts(tools.tool_grammar(TOOLS, None, "hermes", tags))
    assert not accepts(tools.tool_grammar(TOOLS, None, "hermes"))  # the literal tags miss the added tokens
    assert not accepts(tools.tool_grammar(TOOLS, "convert_currency", "hermes", tags))


# ---- the parsers, without a server ----

HERMES = [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
     "", [("get_weather", '{"city": "Paris", "unit": "celsius"}')]),
    (('Checking.\n<tool_call>\n{"name": "a", "arguments": {"x": [1, {"y": "}"}]}}\n</tool_call>\n'
      '<tool_call>{"arguments": {"z": 1}, "name": "b"}</tool_call>'),
     "Checking.", [("a", '{"x": [1, {"y": "}"}]}'), ("b", '{"z": 1}')]),
    ('<tool_call>\n{"name": "a", "arguments": "{\\"x\\": 2}"}\n</tool_call>', "", [("a", '{"x": 2}')]),
    ("No tools needed: 4 < 5 and <tool is not a tag.", "No tools needed: 4 < 5 and <tool is not a tag.", []),
    ("Broken <tool_call>{not json}</tool_call> end", "Broken <tool_call>{not json}</tool_call> end", []),
    ('Cut <tool_call>\n{"name": "a", "arguments": {"x": 1', 'Cut <tool_call>\n{"name": "a", "arguments": {"x": 1', []),
]
LLAMA = [
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', "",
     [("get_weather", '{"city": "Paris", "unit": "celsius"}')]),
    ('{"name": "a", "parameters": {"s": "x;y"}}; {"name": "b", "arguments": {}}', "", [("a", '{"s": "x;y"}'), ("b", "{}")]),
    ('{"answer": 42}', '{"answer": 42}', []),
    ("The weather is fine.", "The weather is fine.", []),
]


@pytest.mark.parametrize("family,text,content,calls",
                         [("hermes", *c) for c in HERMES] + [("llama3_json", *c) for c in LLAMA])
def test_parsers_and_their_streams_agree(family, text, content, calls):
    parsed = tools.PARSERS[family](text)
    assert parsed.content == content
    assert [(c.name, c.arguments) for c in parsed.calls] == calls
    stream = tools.ToolStream(family)  # fed one character at a time, as a worst case of token pieces
    got_content, got = "", {}
    for k, ch in enumerate(text):
        delta = stream.feed(ch, final=k == len(text) - 1)
        got_content += delta.get("content", "")
        for d in delta.get("tool_calls", []):
            entry = got.setdefault(d["index"], ["", ""])
            entry[0] += d["function"].get("name", "")
            entry[1] += d["function"]["arguments"]
    assert stream.called == bool(calls)
    if calls:
        assert got_content == content and [tuple(v) for v in got.values()] == calls
    else:  # a call cut off mid-way may have been announced; what matters is the final text
        assert got_content == content


def test_family_is_read_from_the_template():
    assert tools.family_of(QWEN25_TEMPLATE) == "hermes"
    assert tools.family_of(LLAMA31_TEMPLATE) == "llama3_json"
    assert tools.family_of("{{ messages }}") == "hermes"  # unknown: the fallback convention
