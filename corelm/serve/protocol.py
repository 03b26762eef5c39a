"""Parse and validate OpenAI request bodies into plain values, with 400s that name the parameter.

Written by hand rather than with pydantic models so each mistake gets OpenAI's error shape and a
sentence a user understands (FastAPI's default is a 422 listing pydantic internals). Parameters
corelm does not implement (``presence_penalty``/``frequency_penalty`` other than 0, ``logit_bias``,
the legacy ``functions``) are rejected with a 400 instead of being silently ignored. Chat requests
may carry function ``tools`` and ``tool_choice`` (:mod:`corelm.serve.tools`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from corelm.serve.errors import bad_request
from corelm.serve.service import TextOptions

MAX_N = 8
MAX_STOP = 4
ROLES = ("system", "user", "assistant", "tool")
# Parameters corelm does not implement -> the values that mean "off" and are accepted.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logit_bias": ({},), "functions": ([],), "function_call": ("none",),
    "best_of": (1,), "echo": (False,), "suffix": ("",),
}
MAX_TOOLS = 128
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
MAX_TOP_LOGPROBS = 20
MAX_GRAMMAR_CHARS = 1 << 16


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying what is wrong with it.

    Every way a body can break the parser is a client error: bytes that are not UTF-8 (decoded here
    strictly -- ``json.loads`` on bytes would let CESU-8 surrogates through), nesting deeper than the
    parser recurses, an integer longer than Python's 4,300-digit limit, and strings with lone
    surrogates (``"\\udcff"``), which no tokenizer or JSON encoder downstream can handle.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"request body is not UTF-8 (byte {exc.start}: {exc.reason})", code="invalid_json") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad_request(f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                          code="invalid_json") from None
    except RecursionError:
        raise bad_request("request body is nested too deeply", code="invalid_json") from None
    except ValueError as exc:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise bad_request(f"request body has a value corelm cannot read: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object", code="invalid_json")
    _check_strings(body)
    return body


def _check_strings(body: dict[str, Any]) -> None:
    """400 for a string (or key) holding a lone surrogate, naming the top-level field it is under.

    Iterative, so a deeply nested (but parseable) body cannot exhaust the stack here either.
    """
    stack: list[tuple[str, Any]] = [(str(k), v) for k, v in body.items()]
    for key in body:
        stack.append((str(key), key))
    while stack:
        field, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                name = field.encode("utf-8", "backslashreplace").decode()  # the key itself may be the culprit
                raise bad_request(f"'{name}' holds a lone surrogate (U+{ord(value[exc.start]):04X}): not valid "
                                  "Unicode text", name, code="invalid_text") from None
        elif isinstance(value, dict):
            stack.extend((field, k) for k in value)
            stack.extend((field, v) for v in value.values())
        elif isinstance(value, list):
            stack.extend((field, v) for v in value)


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def _field(body: dict[str, Any], name: str, kind: str, default: Any = None) -> Any:
    """Read ``body[name]`` checking its JSON type (``null`` means the default)."""
    value = body.get(name)
    if value is None:
        return default
    if kind == "int" and isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON has one number type: 2.0 is the integer 2, as JSON Schema and pydantic read it
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
        "list": isinstance(value, list),
        "dict": isinstance(value, dict),
    }[kind]
    if kind == "number" and ok and not _finite(value):
        raise bad_request(f"'{name}' must be a finite number, got {_describe(value)}", name, code="invalid_value")
    if not ok:
        want = {"int": "an integer", "number": "a number", "str": "a string", "bool": "a boolean",
                "list": "an array", "dict": "an object"}[kind]
        raise bad_request(f"'{name}' must be {want}, got {_type_name(value)}", name, code="invalid_type")
    return value


def _finite(value: float) -> bool:
    """A JSON number fits a float and is finite (NaN, Infinity, 1e400 and 401-digit integers do not)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _describe(value: float) -> str:
    if isinstance(value, int):
        return f"an integer of {len(str(abs(value)))} digits"
    return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"


def _range(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> None:
    below = value <= lo if lo_open else value < lo
    if below or value > hi:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise bad_request(f"'{name}' must be in {interval}, got {_show(value)}", name)


def _show(value: float) -> str:
    """A number for an error message: integers as given (a 401-digit one has no float to format with
    ``:g``), abbreviated past 24 digits."""
    if isinstance(value, int):
        return str(value) if abs(value) < 10**24 else _describe(value)
    return f"{value:g}"


@dataclass
class Common:
    model: str | None
    stream: bool
    include_usage: bool
    n: int
    options: TextOptions
    tools: list[dict[str, Any]] | None = None  # chat only: validated function tools
    tool_choice: str | dict[str, Any] = "none"  # "none" | "auto" | "required" | {"type": "function", ...}


def _common(body: dict[str, Any], max_tokens_names: tuple[str, ...]) -> Common:
    model = _field(body, "model", "str")
    stream = _field(body, "stream", "bool", False)
    include_usage = _include_usage(body)
    n = _field(body, "n", "int", 1)
    _range("n", n, 1, MAX_N)

    max_tokens = None
    for name in max_tokens_names:
        value = _field(body, name, "int")
        if value is not None:
            if value < 1:
                raise bad_request(f"'{name}' must be at least 1, got {_show(value)}", name)
            max_tokens = value
    temperature = float(_field(body, "temperature", "number", 1.0))
    _range("temperature", temperature, 0.0, 2.0)
    top_p = float(_field(body, "top_p", "number", 1.0))
    _range("top_p", top_p, 0.0, 1.0, lo_open=True)
    top_k = _field(body, "top_k", "int", 0)  # extension (vLLM, llama.cpp): 0 = off
    if top_k < 0:
        raise bad_request(f"'top_k' must be >= 0, got {_show(top_k)}", "top_k")
    repetition_penalty = float(_field(body, "repetition_penalty", "number", 1.0))  # extension
    _range("repetition_penalty", repetition_penalty, 0.0, 10.0, lo_open=True)
    seed = _field(body, "seed", "int")
    if seed is not None and not 0 <= seed < 2**63:
        raise bad_request(f"'seed' must be in [0, 2^63), got {_show(seed)}", "seed")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise bad_request("'stop' must be a string or an array of strings", "stop", code="invalid_type")
    if len(stops) > MAX_STOP:
        raise bad_request(f"'stop' may hold at most {MAX_STOP} strings, got {len(stops)}", "stop")
    if any(s == "" for s in stops):
        raise bad_request("'stop' strings must not be empty", "stop")
    ignore_eos = _field(body, "ignore_eos", "bool", False)  # extension, for benchmarks

    for name in ("presence_penalty", "frequency_penalty"):
        value = _field(body, name, "number", 0.0)
        _range(name, value, -2.0, 2.0)
        if value != 0.0:
            raise bad_request(f"'{name}' is not supported by corelm (only 0); use 'repetition_penalty' "
                              "(1.0 = off, e.g. 1.1)", name, code="unsupported_parameter")
    for name, harmless in UNSUPPORTED.items():
        value = body.get(name)
        # the type too: best_of: true and echo: 0 equal 1 and False in Python, not in JSON
        if value is not None and not any(value == h and type(value) is type(h) for h in harmless):
            raise bad_request(f"'{name}' is not supported by corelm", name, code="unsupported_parameter")
    options = TextOptions(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                          repetition_penalty=repetition_penalty, seed=seed, stop=stops,
                          ignore_eos=ignore_eos, structure=_structure(body))
    return Common(model, stream, include_usage, n, options)


def _include_usage(body: dict[str, Any]) -> bool:
    """``stream_options.include_usage``: a boolean (default false)."""
    value = _field(body, "stream_options", "dict", {}).get("include_usage")
    if value is not None and not isinstance(value, bool):
        raise bad_request("'stream_options.include_usage' must be a boolean", "stream_options.include_usage",
                          code="invalid_type")
    return bool(value)


def _structure(body: dict[str, Any]) -> dict[str, Any] | None:
    """``response_format`` (OpenAI), or the ``regex``/``grammar`` extensions (Lark or GBNF), as one
    keyword argument of :func:`corelm.generate.constraints.grammar_for`; None for free text."""
    given = [name for name in ("response_format", "regex", "grammar") if body.get(name) is not None]
    if len(given) > 1:
        raise bad_request(f"give at most one of {', '.join(given)}", given[1])
    for name in ("regex", "grammar"):
        value = _field(body, name, "str")
        if value is not None:
            if not value or len(value) > MAX_GRAMMAR_CHARS:
                raise bad_request(f"'{name}' must be 1 to {MAX_GRAMMAR_CHARS} characters", name)
            return {name: value}
    fmt = _field(body, "response_format", "dict")
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind != "json_schema":
        raise bad_request("'response_format.type' must be 'text', 'json_object' or 'json_schema'",
                          "response_format.type")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
        raise bad_request("'response_format.json_schema' must be an object with a 'schema' object",
                          "response_format.json_schema", code="invalid_type")
    schema = spec.get("schema", {})
    if len(json.dumps(schema)) > MAX_GRAMMAR_CHARS:
        raise bad_request(f"'response_format.json_schema.schema' is longer than {MAX_GRAMMAR_CHARS} characters",
                          "response_format.json_schema.schema")
    return {"json_schema": schema}


def _logprobs(body: dict[str, Any], chat: bool) -> int | None:
    """How many alternatives to report per token (0: the chosen token's only), or None for off.
    Chat takes ``logprobs: true`` + ``top_logprobs``; completions take ``logprobs: k``."""
    if chat:
        on = _field(body, "logprobs", "bool", False)
        top = _field(body, "top_logprobs", "int")
        if top is not None:
            _range("top_logprobs", top, 0, MAX_TOP_LOGPROBS)
            if not on:
                raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return (top or 0) if on else None
    k = body.get("logprobs")
    if k is None or k is False:
        return None
    k = _field(body, "logprobs", "int")
    _range("logprobs", k, 0, 5)
    return k


def parse_completion(body: dict[str, Any]) -> tuple[Common, str]:
    """``POST /v1/completions``: returns the common options and the prompt text."""
    common = _common(body, ("max_tokens",))
    common.options.logprobs = _logprobs(body, chat=False)
    for name in ("tools", "tool_choice"):
        if body.get(name) not in (None, [], "none"):
            raise bad_request(f"'{name}' is only supported by /v1/chat/completions", name,
                              code="unsupported_parameter")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if prompt is None:
        raise bad_request("'prompt' is required", "prompt", code="missing_required_parameter")
    if not isinstance(prompt, str):
        raise bad_request(f"'prompt' must be a string (one prompt per request), got {_type_name(prompt)}",
                          "prompt", code="invalid_type")
    if not prompt:
        raise bad_request("'prompt' must not be empty", "prompt")
    return common, prompt


def _tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """``tools``: function tools, each ``{"type": "function", "function": {"name", "description"?,
    "parameters"? (a JSON schema object), "strict"?}}``; None when absent or empty."""
    tools = _field(body, "tools", "list")
    if not tools:
        return None
    if len(tools) > MAX_TOOLS:
        raise bad_request(f"'tools' may hold at most {MAX_TOOLS} tools, got {len(tools)}", "tools")
    names = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise bad_request(f"'{where}' must be an object", where, code="invalid_type")
        if tool.get("type") != "function":
            raise bad_request(f"'{where}.type' must be 'function' (the only tool type corelm supports), "
                              f"got {tool.get('type')!r}", f"{where}.type")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise bad_request(f"'{where}.function' must be an object", f"{where}.function", code="invalid_type")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise bad_request(f"'{where}.function.name' must be 1 to 64 letters, digits, '_' or '-', got {name!r}",
                              f"{where}.function.name")
        if name in names:
            raise bad_request(f"'{where}.function.name' repeats the tool name {name!r}", f"{where}.function.name")
        names.add(name)
        if not isinstance(function.get("description", ""), str):
            raise bad_request(f"'{where}.function.description' must be a string", f"{where}.function.description",
                              code="invalid_type")
        params = function.get("parameters", {})
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise bad_request(f"'{where}.function.parameters' must be a JSON schema object of type 'object'",
                              f"{where}.function.parameters", code="invalid_type")
        if not isinstance(function.get("strict", False), bool):
            raise bad_request(f"'{where}.function.strict' must be a boolean", f"{where}.function.strict",
                              code="invalid_type")
    if len(json.dumps(tools)) > MAX_GRAMMAR_CHARS:
        raise bad_request(f"'tools' is longer than {MAX_GRAMMAR_CHARS} characters", "tools")
    return tools


def _tool_choice(body: dict[str, Any], tools: list[dict[str, Any]] | None) -> str | dict[str, Any]:
    """``tool_choice``: "none" | "auto" (the default with tools) | "required" | a named function."""
    choice = body.get("tool_choice")
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise bad_request(f"'tool_choice' must be 'none', 'auto', 'required' or a function, got {choice!r}",
                              "tool_choice")
    elif not (isinstance(choice, dict) and choice.get("type") == "function"
              and isinstance(choice.get("function"), dict) and isinstance(choice["function"].get("name"), str)):
        raise bad_request("'tool_choice' must be a string or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                          "tool_choice", code="invalid_type")
    if choice != "none" and not tools:
        raise bad_request("'tool_choice' needs 'tools'", "tool_choice")
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        if name not in [t["function"]["name"] for t in tools or []]:
            raise bad_request(f"'tool_choice' names the function {name!r}, which is not in 'tools'", "tool_choice")
        return {"type": "function", "function": {"name": name}}
    return choice


def _text(content: Any, where: str) -> str:
    """A message's content as one string (text parts joined)."""
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad_request(f"'{where}.content' parts must be text parts", f"{where}.content")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise bad_request(f"'{where}.content' must be a string", f"{where}.content", code="invalid_type")
    return content


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls`` in the shape chat templates read (transformers'):
    ``arguments`` parsed from OpenAI's JSON string into an object."""
    if not isinstance(calls, list) or not calls:
        raise bad_request(f"'{where}.tool_calls' must be a non-empty array", f"{where}.tool_calls",
                          code="invalid_type")
    out = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)
                and isinstance(function.get("arguments"), str) and call.get("type", "function") == "function"):
            raise bad_request(f"'{at}' must be {{\"type\": \"function\", \"id\": ..., \"function\": "
                              "{\"name\": ..., \"arguments\": \"<JSON text>\"}}", at, code="invalid_type")
        try:
            arguments = json.loads(function["arguments"] or "{}")
        except (ValueError, RecursionError):  # also a 4,301-digit integer
            arguments = None
        if not isinstance(arguments, dict):
            raise bad_request(f"'{at}.function.arguments' must be a JSON object in a string",
                              f"{at}.function.arguments")
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise bad_request(f"'{at}.id' must be a string", f"{at}.id", code="invalid_type")
        out.append({**({"id": call_id} if call_id is not None else {}), "type": "function",
                    "function": {"name": function["name"], "arguments": arguments}})
    return out


def parse_chat(body: dict[str, Any]) -> tuple[Common, list[dict[str, Any]]]:
    """``POST /v1/chat/completions``: returns the common options (with ``tools``/``tool_choice``) and
    the messages: text ``content``, plus ``tool_calls`` on assistant turns and ``tool_call_id`` on
    ``tool`` turns, in the shape chat templates read."""
    common = _common(body, ("max_tokens", "max_completion_tokens"))
    common.options.logprobs = _logprobs(body, chat=True)
    common.tools = _tools(body)
    common.tool_choice = _tool_choice(body, common.tools)
    _field(body, "parallel_tool_calls", "bool")  # accepted; a forced call is always a single call
    if common.tool_choice not in ("none", "auto") and common.options.structure is not None:
        raise bad_request("'tool_choice' forcing a call cannot be combined with 'response_format', 'regex' "
                          "or 'grammar'", "tool_choice")
    messages = body.get("messages")
    if messages is None:
        raise bad_request("'messages' is required", "messages", code="missing_required_parameter")
    if not isinstance(messages, list):
        raise bad_request(f"'messages' must be an array, got {_type_name(messages)}", "messages",
                          code="invalid_type")
    if not messages:
        raise bad_request("'messages' must not be empty", "messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"'{where}' must be an object", where, code="invalid_type")
        role = message.get("role")
        if role == "developer":  # newer OpenAI name for the system role
            role = "system"
        if role not in ROLES:
            raise bad_request(f"'{where}.role' must be one of {', '.join(ROLES)}, got {role!r}",
                              f"{where}.role")
        if role == "assistant" and message.get("tool_calls") is not None:
            content = message.get("content")
            out.append({"role": role, "content": "" if content is None else _text(content, where),
                        "tool_calls": _tool_calls(message["tool_calls"], where)})
            continue
        content = _text(message.get("content"), where)
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str):
                raise bad_request(f"'{where}.tool_call_id' is required on a tool message (a string)",
                                  f"{where}.tool_call_id", code="missing_required_parameter")
            out.append({"role": role, "content": content, "tool_call_id": call_id})
            continue
        out.append({"role": role, "content": content})
    if not any(m["content"] or m.get("tool_calls") for m in out):
        raise bad_request("'messages' must contain some text", "messages")
    return common, out


def parse_embeddings(body: dict[str, Any]) -> tuple[str | None, list[str], str]:
    """``POST /v1/embeddings``: returns (model, texts, encoding_format)."""
    model = _field(body, "model", "str")
    data = body.get("input")
    if data is None:
        raise bad_request("'input' is required", "input", code="missing_required_parameter")
    texts = [data] if isinstance(data, str) else data
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise bad_request("'input' must be a string or an array of strings (token arrays are not supported)",
                          "input", code="invalid_type")
    if not texts or any(t == "" for t in texts):
        raise bad_request("'input' must not be empty (and no input string may be empty)", "input")
    if len(texts) > 256:
        raise bad_request(f"'input' may hold at most 256 strings, got {len(texts)}", "input")
    encoding = _field(body, "encoding_format", "str", "float")
    if encoding not in ("float", "base64"):
        raise bad_request(f"'encoding_format' must be 'float' or 'base64', got {encoding!r}", "encoding_format")
    if _field(body, "dimensions", "int") is not None:
        raise bad_request("'dimensions' is not supported by corelm", "dimensions", code="unsupported_parameter")
    return model, texts, encoding
