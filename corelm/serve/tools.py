"""Tool (function) calling: the prompt side, the grammar that forces a call, and the parsers.

A request's ``tools`` reach the model through its own chat template (``tools=`` as ``transformers``
passes them). A template that ignores them (SmolLM2's has no tool support) gets the conversation
rewritten in the Hermes/Qwen convention instead (:func:`fallback_messages`): the tool signatures go
into the system prompt, earlier calls become ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
text and tool results ``<tool_response>...</tool_response>`` user turns.

The model's output is read back by one parser per template family, chosen from the template text
(:func:`family_of`):

- ``hermes``: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks anywhere in the
  text (Qwen2.5/Qwen3, Hermes, and corelm's fallback prompt); the text around them is the content.
- ``llama3_json``: the whole output is ``{"name": ..., "parameters": {...}}`` (Llama 3.1/3.2/3.3 custom
  tools), several separated by ``;``; any other output is content.
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (Mistral-Nemo, Mistral 7B v0.3,
  Mixtral 8x22B); the text before ``[TOOL_CALLS]`` is content. ``[TOOL_CALLS]`` is a control token in
  Mistral's vocabularies, which a detokenizer that skips special tokens drops, so an output that *is* a
  JSON list of call objects is read as calls too. Its templates accept only 9-character alphanumeric
  call ids (``tool_call_id`` of the results sent back), so this family's ids are made that way.

Each reports each call's arguments as the exact JSON text the model wrote (so a streamed call's
argument fragments join to the same string as the non-streamed call's). With ``tool_choice``
``"required"`` or a named function, :func:`tool_grammar` constrains decoding to exactly one call whose
arguments validate against the tool's ``parameters`` schema (llguidance Lark with ``%json``).
"""

from __future__ import annotations

import json
import re
import secrets
import string
import uuid
from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("hermes", "llama3_json", "mistral")

FALLBACK_PROMPT = """\
You can call functions to help with the user's request. Their signatures, one JSON object per line, \
are inside <tools></tools>:
<tools>
{tools}
</tools>

To call a function, reply with a JSON object holding its name and its arguments inside \
<tool_call></tool_call> tags, one block per call:
<tool_call>
{{"name": "<function name>", "arguments": {{<the arguments as a JSON object>}}}}
</tool_call>
Each result comes back inside <tool_response></tool_response> tags. When no function is needed, \
answer in plain text."""

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_TAG = "[TOOL_CALLS]"
# A call object's start up to its arguments: {"name": "f", "arguments": (or "parameters" for Llama 3).
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_END = re.compile(r"\s*\}")
_DECODER = json.JSONDecoder()


def family_of(template: str | None) -> str:
    """The parser family a chat template's tool calls are written in (``hermes`` when unknown: it is
    also what :func:`fallback_messages` teaches)."""
    template = template or ""
    if OPEN in template:
        return "hermes"
    if MISTRAL_TAG in template:
        return "mistral"
    if "<|python_tag|>" in template or ('"parameters"' in template and "ipython" in template):
        return "llama3_json"
    return "hermes"


def fallback_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The conversation for a template without tool support, in the Hermes convention.

    Args:
        messages: transformers-format messages (assistant ``tool_calls`` with dict arguments, ``tool``
            messages with ``content``).
        tools: the request's function tools (None: no tool prompt, but tool turns are still rewritten).
    Returns:
        Plain ``{"role", "content"}`` messages (system/user/assistant only).
    """
    out: list[dict[str, Any]] = []
    after_tool = False  # consecutive tool results share one user turn
    for m in messages:
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if after_tool:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            calls = [json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                ensure_ascii=False) for c in m["tool_calls"]]
            text = [m["content"]] if m.get("content") else []
            out.append({"role": "assistant", "content": "\n".join(text + [f"{OPEN}\n{c}\n{CLOSE}" for c in calls])})
        else:
            out.append({"role": m["role"], "content": m["content"]})
        after_tool = m["role"] == "tool"
    if tools:
        prompt = FALLBACK_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": (out[0]["content"] + "\n\n" + prompt).lstrip()}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def tool_grammar(tools: list[dict[str, Any]], name: str | None, family: str,
                 tag_tokens: tuple[int, int] | None = None) -> str:
    """A Lark grammar (llguidance) for exactly one call: of ``name``, or of any tool when None.

    The call object is ``{"name": <const>, "arguments": <the tool's parameters schema>}`` (``parameters``
    for Llama 3) on one line, wrapped in ``<tool_call>`` tags for the Hermes family and written
    ``[TOOL_CALLS][<call>]`` for Mistral.

    Args:
        tag_tokens: the ids of ``<tool_call>`` and ``</tool_call>`` where the vocabulary has each as one
            added token (Qwen2.5/Qwen3), or for Mistral a 1-tuple with the id of ``[TOOL_CALLS]`` (a
            control token in Mistral's vocabularies): the grammar names those tokens, because llguidance
            keeps added tokens apart from the same text spelled in ordinary tokens.
    """
    key = "parameters" if family == "llama3_json" else "arguments"
    options = [{"type": "object",
                "properties": {"name": {"const": t["function"]["name"]},
                               key: t["function"].get("parameters") or {"type": "object"}},
                "required": ["name", key], "additionalProperties": False}
               for t in tools if name is None or t["function"]["name"] == name]
    schema = dict(options[0]) if len(options) == 1 else {"anyOf": options}
    # One line, separated as json.dumps and the templates' tojson write it: the form the model saw in
    # its prompt, and no tokens spent on indentation.
    schema["x-guidance"] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    call = "call: %json " + json.dumps(schema, ensure_ascii=False)
    if family == "llama3_json":
        return "start: call\n" + call
    if family == "mistral":
        tag = f"<[{tag_tokens[0]}]>" if tag_tokens and len(tag_tokens) == 1 else json.dumps(MISTRAL_TAG)
        return f'start: {tag} "[" call "]"\n' + call
    open_tag, close_tag = ([f"<[{t}]>" for t in tag_tokens] if tag_tokens else [json.dumps(OPEN), json.dumps(CLOSE)])
    return f'start: {open_tag} "\\n" call "\\n" {close_tag}\n' + call


# ---- parsing ----------------------------------------------------------------------------------


@dataclass
class Call:
    """One tool call read from the output; ``arguments`` is None until known, complete when ``done``."""

    name: str
    arguments: str | None = None
    done: bool = False


@dataclass
class Parsed:
    content: str  # the text outside the calls, stripped
    calls: list[Call] = field(default_factory=list)
    family: str = "hermes"  # how the calls' ids are spelled (see new_call_id)


def _call(text: str, start: int) -> tuple[Call | None, int]:
    """The call object starting at ``text[start:]`` (after whitespace): a complete call and the index
    after it, a partial one (name known, arguments so far) and -1, or (None, -1) when not readable yet
    or (None, -2) when it is not a call object."""
    head = _HEAD.match(text, start)
    try:
        name = json.loads(f'"{head.group(1)}"') if head else None
    except ValueError:  # a bad escape in the name: not readable as a call head
        name = None
    if head and name is not None:
        at = head.end()
        if text.startswith("{", at):
            try:
                _, end = _DECODER.raw_decode(text, at)
            except (ValueError, RecursionError):  # incomplete, a 4,301-digit integer, deep nesting
                return Call(name, text[at:]), -1  # inside the (unclosed) arguments object
            tail = _END.match(text, end)
            if tail:
                return Call(name, text[at:end], True), tail.end()
            if end == len(text.rstrip()):
                return Call(name, text[at:end]), -1  # the closing brace is still to come
    try:
        obj, end = _DECODER.raw_decode(text, start + len(text[start:]) - len(text[start:].lstrip()))
    except (ValueError, RecursionError):
        return None, -1
    if not (isinstance(obj, dict) and isinstance(obj.get("name"), str)):
        return None, -2
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return None, -2
    if not isinstance(args, dict):
        return None, -2
    return Call(obj["name"], json.dumps(args, ensure_ascii=False), True), end


def _hold(text: str, final: bool, tag: str = OPEN) -> str:
    """Content that is safe to send: leading/trailing whitespace is held back (the final content is
    stripped), and so is a tail that may be the start of ``tag``."""
    if not final:
        for k in range(min(len(tag) - 1, len(text)), 0, -1):
            if tag.startswith(text[-k:]):
                text = text[:-k]
                break
    return text.strip()


def parse_hermes(text: str, final: bool = True) -> Parsed:
    """``<tool_call>`` JSON blocks; ``final=False`` reads a prefix of the output (streaming)."""
    content, calls, at = [], [], 0
    while True:
        i = text.find(OPEN, at)
        if i < 0:
            content.append(text[at:])
            break
        content.append(text[at:i])
        j = text.find(CLOSE, i)
        block_end = len(text) if j < 0 else j
        call, end = _call(text[:block_end], i + len(OPEN))
        if j < 0:  # unclosed block: a call in progress (streaming) or cut off (final: it is text)
            if final:
                content.append(text[i:])
            elif call is not None:
                calls.append(call if end < 0 else Call(call.name, call.arguments))
            break
        if call is not None and end >= 0 and not text[end:j].strip():
            calls.append(call)
        else:
            content.append(text[i:j + len(CLOSE)])
        at = j + len(CLOSE)
    return Parsed(_hold("".join(content), final), calls)


def parse_llama3_json(text: str, final: bool = True) -> Parsed:
    """The whole output as ``{"name": ..., "parameters": {...}}`` objects separated by ``;``."""
    if not text.lstrip().startswith("{"):
        return Parsed(_hold(text, final))
    calls, at = [], 0
    while True:
        call, end = _call(text, at)
        if call is None:
            if end == -1 and not final:
                return Parsed("", calls)
            return Parsed(text.strip() if final else "")  # not a call after all: text
        if end < 0:
            if final:
                return Parsed(text.strip())
            return Parsed("", calls + [Call(call.name, call.arguments)])
        calls.append(call)
        rest = re.compile(r"\s*;?\s*").match(text, end).end()
        if rest == len(text):
            return Parsed("", calls)
        at = rest


_LIST_OPEN = re.compile(r"\s*\[\s*")
_LIST_NEXT = re.compile(r"\s*([,\]])\s*")


def _call_list(text: str, at: int) -> tuple[list[Call], int]:
    """The JSON list of call objects at ``text[at:]``: its calls and the index after its ``]``, or the
    calls so far (the last one possibly partial) and -1 while it is incomplete, or -2 when it is not a
    list of call objects."""
    opened = _LIST_OPEN.match(text, at)
    if not opened:
        return [], -1 if not text[at:].strip() else -2
    at, calls = opened.end(), []
    if not text.startswith("{", at) and text[at:]:
        return [], -2
    while True:
        call, end = _call(text, at)
        if call is None:
            return calls, end
        if end < 0:
            return calls + [call], -1
        calls.append(call)
        sep = _LIST_NEXT.match(text, end)
        if not sep:
            return calls, -1 if not text[end:].strip() else -2
        if sep.group(1) == "]":
            return calls, sep.end()
        at = sep.end()


def parse_mistral(text: str, final: bool = True) -> Parsed:
    """``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` after optional content; an output that is
    such a list without the tag (a detokenizer that skips special tokens drops it) is read the same way."""
    i = text.find(MISTRAL_TAG)
    if i >= 0:
        head, at = text[:i], i + len(MISTRAL_TAG)
    elif text.lstrip().startswith("["):
        head, at = "", 0
    else:
        return Parsed(_hold(text, final, MISTRAL_TAG), family="mistral")
    calls, end = _call_list(text, at)
    if end >= 0 and calls:  # a whole list: what follows it (normally nothing) is content too
        return Parsed(_hold(head + text[end:], final, MISTRAL_TAG), calls, "mistral")
    if end == -1 and not final:  # still coming
        return Parsed(_hold(head, final, MISTRAL_TAG), calls, "mistral")
    return Parsed(_hold(text, final, MISTRAL_TAG), family="mistral")  # not calls after all, or cut off: text


PARSERS = {"hermes": parse_hermes, "llama3_json": parse_llama3_json, "mistral": parse_mistral}


def new_call_id(family: str = "hermes") -> str:
    """A call id: OpenAI's ``call_...`` spelling, or 9 letters and digits for Mistral's templates (which
    refuse any other)."""
    if family == "mistral":
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    return "call_" + uuid.uuid4().hex[:24]


def message_calls(parsed: Parsed) -> list[dict[str, Any]]:
    """OpenAI's ``message.tool_calls`` for the complete calls."""
    return [{"id": new_call_id(parsed.family), "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}} for c in parsed.calls if c.done]


class ToolStream:
    """Turns a chat stream's text pieces into OpenAI deltas: ``content`` text and
    ``tool_calls[i]`` pieces (index, id and function name first, then argument fragments).

    Each piece re-reads the output so far with the family's parser (a few KB: microseconds), so the
    streamed reply and the whole one come from the same function. A call cut off by ``max_tokens`` may
    have been announced; its reply then ends with its text as content and ``finish_reason: "length"``.

    Args:
        family: one of :data:`FAMILIES`.
    """

    def __init__(self, family: str) -> None:
        self.parse = PARSERS[family]
        self.family = family
        self.text = ""
        self.sent_content = ""
        self.sent_args: list[str] = []  # per call already announced
        self.called = False  # after the final piece: whether the output holds a complete call

    def feed(self, piece: str, final: bool = False) -> dict[str, Any]:
        """The delta (``content`` and/or ``tool_calls``) that ``piece`` adds; ``final`` on the last."""
        self.text += piece
        parsed = self.parse(self.text, final)
        delta: dict[str, Any] = {}
        if parsed.content.startswith(self.sent_content) and len(parsed.content) > len(self.sent_content):
            delta["content"] = parsed.content[len(self.sent_content):]
            self.sent_content = parsed.content
        pieces = []
        for i, call in enumerate(parsed.calls):
            args = call.arguments or ""
            if i == len(self.sent_args):
                pieces.append({"index": i, "id": new_call_id(self.family), "type": "function",
                               "function": {"name": call.name, "arguments": ""}})
                self.sent_args.append("")
            if args.startswith(self.sent_args[i]) and len(args) > len(self.sent_args[i]):
                pieces.append({"index": i, "function": {"arguments": args[len(self.sent_args[i]):]}})
                self.sent_args[i] = args
        if pieces:
            delta["tool_calls"] = pieces
        if final:
            self.called = any(c.done for c in parsed.calls)
        return delta
