"""The OpenAPI document the server publishes at ``/openapi.json``: OpenAI's request and response shapes.

The routes read their bodies by hand (:mod:`corelm.serve.protocol`, for OpenAI-shaped 400s that name
the parameter), so FastAPI alone would publish every body as an untyped object. The pydantic models here
exist only to describe the API: clients and generators read them (``tests/test_serve_schemathesis.py``
fuzzes the server with requests generated from this document), the server never validates with them.

Each request model says what the parser accepts field by field -- types, ranges, enums -- and no more:
rules that span fields (at most one of ``response_format``/``regex``/``grammar``, ``top_logprobs``
needs ``logprobs``, prompt + ``max_tokens`` within the context window, a model that is served) are the
parser's, and a request breaking them gets a 400 or 404. Unknown fields are accepted (and ignored), as
OpenAI's API does. Every error response is the :class:`ErrorResponse` object of
:mod:`corelm.serve.errors`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from corelm.serve import protocol

Number = float
Text = Annotated[str, Field(min_length=1)]
Stop = Text | Annotated[list[Text], Field(max_length=protocol.MAX_STOP)]


class _Open(BaseModel):
    """Unknown fields are allowed (requests: ignored by the parser; responses: room for extensions)."""

    model_config = ConfigDict(extra="allow")


# ---- requests ------------------------------------------------------------------------------------

class StreamOptions(_Open):
    include_usage: bool | None = Field(None, description="send a last chunk holding only `usage`")


class JSONSchemaSpec(_Open):
    name: Any = Field(None, description="accepted and ignored")
    description: Any = Field(None, description="accepted and ignored")
    schema_: dict[str, Any] | bool = Field(default_factory=dict, alias="schema",
                                           description="the JSON schema the output must validate against")
    strict: Any = Field(None, description="accepted and ignored: the output always follows the schema")


class TextFormat(_Open):
    type: Literal["text"]


class JSONObjectFormat(_Open):
    type: Literal["json_object"]


class JSONSchemaFormat(_Open):
    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


ResponseFormat = TextFormat | JSONObjectFormat | JSONSchemaFormat
GRAMMAR = {"min_length": 1, "max_length": protocol.MAX_GRAMMAR_CHARS}


class _Generation(_Open):
    """Fields /v1/completions and /v1/chat/completions share (:func:`corelm.serve.protocol._common`)."""

    model: str | None = Field(None, description="a served model id (GET /v1/models); default: the first decoder")
    max_tokens: int | None = Field(None, ge=1, description="output limit (default: the server's --default-max-tokens)")
    temperature: Number | None = Field(None, ge=0, le=2, description="0 = greedy")
    top_p: Number | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="extension: sample from the k most likely tokens (0 = off)")
    repetition_penalty: Number | None = Field(None, gt=0, le=10, description="extension: 1.0 = off")
    seed: int | None = Field(None, ge=0, lt=2**63, description="same seed, same text")
    stop: Stop | None = Field(None, description=f"up to {protocol.MAX_STOP} non-empty strings; never emitted")
    n: int | None = Field(None, ge=1, le=protocol.MAX_N, description="choices per request")
    stream: bool | None = Field(None, description="server-sent events ending in `data: [DONE]`")
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = Field(None, description="extension: keep generating past end-of-sequence")
    presence_penalty: Number | None = Field(None, ge=0, le=0, description="only 0 is supported")
    frequency_penalty: Number | None = Field(None, ge=0, le=0, description="only 0 is supported")
    logit_bias: dict[str, Number] | None = Field(None, max_length=0, description="only {} is supported")
    response_format: ResponseFormat | None = Field(None, description="structured output (docs: structured output)")
    regex: str | None = Field(None, **GRAMMAR, description="extension: the output matches this regular expression")
    grammar: str | None = Field(None, **GRAMMAR, description="extension: a Lark or GBNF grammar the output follows")
    user: Any = Field(None, description="accepted and ignored")


class CompletionRequest(_Generation):
    """``POST /v1/completions``."""

    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1)] = Field(
        description="one non-empty prompt (a list holding one string is accepted)")
    logprobs: Annotated[int, Field(ge=0, le=5)] | Literal[False] | None = Field(
        None, description="k: each token's log-probability and the k most likely (false: off)")
    best_of: Literal[1] | None = None
    echo: Literal[False] | None = None
    suffix: Literal[""] | None = None


class TextPart(_Open):
    type: Literal["text"]
    text: str


class FunctionCall(_Open):
    name: str
    arguments: str = Field(description="a JSON object, as text")


class ToolCall(_Open):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


Content = str | list[TextPart]


class InstructionMessage(_Open):
    role: Literal["system", "developer", "user"]
    content: Content
    name: Any = Field(None, description="accepted and ignored")


class AssistantTurn(_Open):
    role: Literal["assistant"]
    content: Content | None = Field(None, description="may be null on a turn with tool_calls")
    tool_calls: list[ToolCall] | None = Field(None, min_length=1, description="the calls it made")
    name: Any = Field(None, description="accepted and ignored")


class ToolMessage(_Open):
    role: Literal["tool"]
    content: Content
    tool_call_id: str = Field(description="the call this result answers")


Message = Annotated[InstructionMessage | AssistantTurn | ToolMessage, Field(discriminator="role")]


class FunctionSpec(_Open):
    name: str = Field(pattern="^" + protocol.TOOL_NAME.pattern + "$")  # anchored: the parser uses fullmatch
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of type 'object'")
    strict: bool | None = None


class Tool(_Open):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Open):
    name: str


class NamedToolChoice(_Open):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Generation):
    """``POST /v1/chat/completions``."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="the same as max_tokens")
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=protocol.MAX_TOP_LOGPROBS, description="needs logprobs: true")
    tools: list[Tool] | None = Field(None, max_length=protocol.MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


class EmbeddingRequest(_Open):
    """``POST /v1/embeddings``."""

    model: str | None = None
    input: Text | Annotated[list[Text], Field(min_length=1, max_length=256)] = Field(
        description="non-empty text(s), up to 256")
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: None = Field(None, description="not supported")
    user: Any = Field(None, description="accepted and ignored")


# ---- responses -----------------------------------------------------------------------------------

class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error, whatever its status (:mod:`corelm.serve.errors`)."""

    error: ErrorBody


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Open):
    token: str
    logprob: Number
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Open):
    content: list[TokenLogprob]
    refusal: None = None


class CompletionLogprobs(_Open):
    tokens: list[str]
    token_logprobs: list[Number]
    top_logprobs: list[dict[str, Number]]
    text_offset: list[int]


FinishReason = Literal["stop", "length", "tool_calls"]


class CompletionChoice(_Open):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None


class Completion(_Open):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ResponseToolCall(_Open):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(_Open):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(_Open):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None


class ChatCompletion(_Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Embedding(_Open):
    object: Literal["embedding"]
    index: int
    embedding: list[Number] | str = Field(description="floats, or base64 of little-endian float32")


class EmbeddingUsage(_Open):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(_Open):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(_Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Open):
    object: Literal["list"]
    data: list[ModelCard]


class AdapterLoadRequest(_Open):
    """``POST /v1/adapters``: load a LoRA run (a ``corelm finetune --method lora`` output directory)."""

    name: Text = Field(description="the adapter's id: requests send model '<base>:<name>' or '<name>'")
    path: Text = Field(description="the run directory on the server's disk")
    model: str | None = Field(None, description="the base model to load it on (default: the first with slots)")


class AdapterLoaded(_Open):
    id: str
    object: Literal["model"]
    parent: str
    rank: int
    loaded: Literal[True]


class AdapterDeleted(_Open):
    id: str
    object: Literal["model"]
    deleted: Literal[True]


class Health(_Open):
    status: str
    models: list[str]


# ---- the document --------------------------------------------------------------------------------

MODELS: list[type[BaseModel]] = [CompletionRequest, ChatCompletionRequest, EmbeddingRequest, AdapterLoadRequest,
                                 ErrorResponse, Completion, ChatCompletion, EmbeddingList, ModelList, AdapterLoaded,
                                 AdapterDeleted, Health]
# Statuses an operation may answer besides 200, each with the OpenAI error object.
ERRORS = {"400": "malformed request or a parameter out of range", "401": "missing or wrong API key",
          "403": "adapter admin without an API key on a server other machines can reach",
          "404": "model (or adapter) not served", "408": "request body too slow",
          "409": "adapter name or slots taken", "413": "request body too large",
          "415": "request body not JSON", "421": "Host is not a loopback name (server bound to loopback)",
          "500": "a server fault (details in the server log only)",
          "503": "at capacity (Retry-After) or shutting down", "504": "request deadline exceeded"}
# One event of a stream (OpenAPI before 3.2: a sequential media type's ``schema`` describes each event).
SSE = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}},
    "description": "`data: <chunk>` events (a chunk object, or {\"error\": ...} after a failure), then "
                   "`data: [DONE]`"}}}
# (path, method) -> request model or None, 200 response model or a literal media map, errors that apply
ROUTES: dict[tuple[str, str], tuple[str | None, str | dict, tuple[str, ...]]] = {
    ("/v1/completions", "post"): ("CompletionRequest", "Completion",
                                  ("400", "401", "404", "408", "413", "415", "421", "500", "503", "504")),
    ("/v1/chat/completions", "post"): ("ChatCompletionRequest", "ChatCompletion",
                                       ("400", "401", "404", "408", "413", "415", "421", "500", "503", "504")),
    ("/v1/embeddings", "post"): ("EmbeddingRequest", "EmbeddingList",
                                 ("400", "401", "404", "408", "413", "415", "421", "500", "503")),
    ("/v1/models", "get"): (None, "ModelList", ("401", "421")),
    ("/v1/adapters", "get"): (None, "ModelList", ("401", "421")),
    ("/v1/adapters", "post"): ("AdapterLoadRequest", "AdapterLoaded",
                               ("400", "401", "403", "404", "408", "409", "413", "415", "421")),
    ("/v1/adapters/{name}", "delete"): (None, "AdapterDeleted", ("401", "403", "404", "421")),
    ("/health", "get"): (None, "Health", ("421",)),
    ("/metrics", "get"): (None, {"text/plain": {"schema": {"type": "string"}}}, ("401", "421")),
    ("/", "get"): (None, {"text/html": {"schema": {"type": "string"}}}, ("421",)),
}


def openapi_document(title: str = "corelm", version: str = "") -> dict[str, Any]:
    """The OpenAPI 3.1 document of the server's routes, with typed request and response bodies."""
    _, defs = models_json_schema([(m, "validation") for m in MODELS], by_alias=True,
                                 ref_template="#/components/schemas/{model}")
    paths: dict[str, Any] = {}
    for (path, method), (request, ok, errors) in ROUTES.items():
        content = ok if isinstance(ok, dict) else {"application/json": {"schema": _ref(ok)}}
        if path in ("/v1/completions", "/v1/chat/completions"):
            content = {**content, **SSE}  # "stream": true
        responses = {"200": {"description": "OK", "content": content}}
        responses.update({code: {"description": ERRORS[code], "content": {"application/json": {
            "schema": _ref("ErrorResponse")}}} for code in errors})
        operation: dict[str, Any] = {"operationId": re.sub(r"\W+", "_", method + path).strip("_"),
                                     "responses": responses}
        if request is not None:
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(request)}}}
        if "{name}" in path:
            operation["parameters"] = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
                                        "description": "the adapter: 'name' or 'base:name'"}]
        paths.setdefault(path, {})[method] = operation
    return {"openapi": "3.1.0", "info": {"title": title, "version": version or _version()}, "paths": paths,
            "components": {"schemas": defs.get("$defs", {})}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _version() -> str:
    from corelm import __version__

    return __version__


def publish(app: Any) -> None:
    """Make ``app.openapi()`` (served at the app's ``openapi_url``) return :func:`openapi_document`."""
    document = openapi_document(app.title)
    app.openapi = lambda: document
