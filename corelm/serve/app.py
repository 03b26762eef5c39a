"""The OpenAI-compatible HTTP adapter (FastAPI): parse, authenticate, submit, format. No model logic.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON or SSE
``data: ...`` chunks ending in ``data: [DONE]``), ``POST /v1/embeddings``, ``GET /health`` (public),
``GET /metrics`` (Prometheus text) and ``GET /`` (the web chat page, public: it holds no secret).
LoRA adapters (:mod:`corelm.serve.adapters`): a request's ``model`` may be ``"<base>:<adapter>"``;
``GET/POST /v1/adapters`` and ``DELETE /v1/adapters/{name}`` list, load and unload them (behind the API
key; refused on a server without a key that other machines can reach).

Every error is OpenAI-shaped (:mod:`corelm.serve.errors`). An error after a stream has started is
sent as an SSE ``{"error": ...}`` event followed by ``[DONE]``. A client that disconnects, streaming
or not, has its request cancelled, which frees its batch row before the next decode step.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import struct
import time
import uuid
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from corelm.errors import CorelmError
from corelm.serve import adapters, errors, protocol, schema, tools
from corelm.serve.errors import APIError
from corelm.serve.metrics import CONTENT_TYPE, Metrics
from corelm.serve.service import EmbeddingModel, TextModel, TextStream

log = logging.getLogger("corelm.serve")

# The chat page loads nothing from elsewhere and runs only its own inline script (hash-pinned below).
_CSP = ("default-src 'none'; script-src {script}; style-src {style}; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                    "X-Frame-Options": "DENY"}


def _chat_page() -> tuple[str, str]:
    """The page's HTML and its CSP, which allows exactly its inline script and style by SHA-256 hash."""
    import hashlib
    import re

    html = resources.files("corelm.serve").joinpath("static/chat.html").read_text(encoding="utf-8")
    def pins(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
        hashes = ["'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() + "'" for b in blocks]
        return " ".join(hashes) or "'none'"

    return html, _CSP.format(script=pins("script"), style=pins("style"))


class ServerConfig:
    """Limits of one server (set from ``corelm serve`` options).

    Args:
        api_key: when set, ``/v1/*`` and ``/metrics`` need ``Authorization: Bearer <key>``.
        max_body_bytes: larger request bodies get 413.
        request_timeout: seconds from arrival after which a request is ended (504 / SSE error).
        body_timeout: seconds a request's whole body may take to arrive (408 after that).
        loopback_only: answer only requests whose ``Host`` is a loopback name (set when bound to
            127.0.0.1): a web page on another site cannot reach the server through DNS rebinding.
    """

    def __init__(self, api_key: str | None = None, max_body_bytes: int = 1 << 20,
                 request_timeout: float = 600.0, loopback_only: bool = False, body_timeout: float = 30.0) -> None:
        self.api_key = api_key
        self.body_timeout = body_timeout
        self.max_body_bytes = max_body_bytes
        self.request_timeout = request_timeout
        self.loopback_only = loopback_only


# C901: an app factory; ruff adds its nested route and error handlers (each small) into its score
def create_app(models: list[TextModel | EmbeddingModel], config: ServerConfig | None = None,  # noqa: C901
               metrics: Metrics | None = None) -> FastAPI:
    """Build the ASGI app serving ``models`` (the first is the default when a request names none)."""
    config = config or ServerConfig()
    metrics = metrics or Metrics()
    by_name = {m.name: m for m in models}
    page, page_csp = _chat_page()
    app = FastAPI(title="corelm", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    schema.publish(app)  # typed OpenAI request/response bodies (the routes parse bodies by hand)
    app.add_middleware(_CountRequests, metrics=metrics)
    if config.loopback_only:
        app.add_middleware(_LoopbackHostOnly)
    app.state.metrics = metrics
    app.state.models = by_name

    batchers = [m.batcher for m in models if isinstance(m, TextModel)]
    for name, help, read in (
        ("corelm_running_requests", "Requests holding a batch row.", lambda b: b.running),
        ("corelm_queue_depth", "Requests waiting for a batch row.", lambda b: b.waiting),
        ("corelm_batch_rows", "Rows in the running batch (max concurrent requests).", lambda b: b.max_batch),
        ("corelm_decode_steps", "Batched decode steps run since start.", lambda b: b.steps),
        ("corelm_prefix_cache_hits", "Requests whose prompt head came from the prefix cache.",
         lambda b: b.prefixes.hits),
        ("corelm_prefix_cache_hit_tokens", "Prompt tokens copied from the prefix cache instead of prefilled.",
         lambda b: b.prefixes.hit_tokens),
        ("corelm_prefix_cache_tokens", "Token slots the prefix cache holds now.", lambda b: b.prefixes.tokens),
    ):
        metrics.gauge(name, help, lambda read=read: sum(read(b) for b in batchers))

    # ---- errors: always OpenAI-shaped, never a path or a traceback ----

    def error_response(exc: APIError) -> Response:
        body = exc.body().get("error", {})
        metrics.count_error(str(body.get("code") or body.get("type") or exc.status))
        # ASCII JSON (json.dumps' default): a message quoting any request text always encodes.
        return Response(json.dumps(exc.body(), separators=(",", ":")), status_code=exc.status,
                        headers=exc.headers, media_type="application/json")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return error_response(APIError(exc.status_code, message.get(exc.status_code, "request failed"), code=code))

    @app.exception_handler(CorelmError)
    async def _corelm_error(request: Request, exc: CorelmError) -> Response:
        return error_response(errors.bad_request(str(exc)))  # user-fixable by contract (corelm.errors)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(errors.bad_request("invalid request"))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return error_response(errors.internal_error())

    # ---- helpers ----

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        # compare_digest: the time taken does not reveal how many leading characters matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), config.api_key.encode()):
            raise errors.unauthorized()

    async def read_body(request: Request) -> dict[str, Any]:
        # Only JSON: the form/text types a web page may POST cross-site without a CORS preflight are
        # refused, so another site cannot make a key-less local server generate.
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
            raise APIError(415, f"request body must be JSON: send 'Content-Type: application/json' (got {kind})",
                           code="unsupported_media_type")
        declared = request.headers.get("content-length")
        too_big = APIError(413, f"request body exceeds the limit of {config.max_body_bytes} bytes",
                           code="body_too_large")
        if declared is not None and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise too_big
        chunks, size = [], 0
        stream = request.stream().__aiter__()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.body_timeout
        while True:
            # The whole body is bounded, not each read: a client trickling a byte at a time, or stopping
            # mid-body, cannot hold the request (and its connection) past the deadline.
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), max(deadline - loop.time(), 0))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise APIError(408, f"request body not received within {config.body_timeout:g} s",
                               code="body_timeout") from None
            size += len(chunk)
            if size > config.max_body_bytes:
                raise too_big
            chunks.append(chunk)
        return protocol.parse_json(b"".join(chunks))

    def pick(name: str | None, kind: str) -> Any:
        if name is None:
            candidates = [m for m in models if m.kind == kind]
            if not candidates:
                what = "embedding" if kind == "embed" else "text generation"
                raise APIError(404, f"no {what} model is served here; available: {', '.join(by_name)}",
                               param="model", code="model_not_found")
            return candidates[0]
        model = by_name.get(name)
        if model is None:
            raise errors.model_not_found(name, list(by_name))
        if model.kind != kind:
            endpoint = "/v1/embeddings" if model.kind == "embed" else "/v1/completions or /v1/chat/completions"
            raise errors.bad_request(f"model {name!r} cannot serve this endpoint; use {endpoint}", "model",
                                     code="wrong_endpoint")
        return model

    def pick_text(name: str | None) -> tuple[TextModel, str, int]:
        """A generation's model, the id its responses echo, and its LoRA adapter slot (0: none)."""
        if name is None or name in by_name:
            model = pick(name, "generate")
            return model, model.name, 0
        found = adapters.resolve(name, [m for m in models if isinstance(m, TextModel)])
        if found is None:
            raise errors.model_not_found(name, adapters.served_ids(models))
        return found

    def authorize_admin(request: Request) -> None:
        authorize(request)
        if config.api_key is None and not config.loopback_only:
            raise APIError(403, "loading and unloading adapters needs an API key on a server other machines can "
                                "reach (--api-key-file)", type="permission_error", code="admin_needs_api_key")

    async def until_disconnect(request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    def observe(arrival: float, streams: list[TextStream]) -> None:
        metrics.count_tokens(sum(s.n_prompt for s in streams), sum(s.n_generated for s in streams))
        metrics.observe(metrics.latency, time.monotonic() - arrival)
        for s in streams:
            if s.handle.admitted:
                metrics.observe(metrics.queue_wait, s.handle.admitted - s.handle.arrival)
            if s.first_token_at is not None:
                metrics.observe(metrics.ttft, s.first_token_at - s.handle.arrival)
                if s.n_generated > 1:
                    metrics.observe(metrics.tpot, (s.last_token_at - s.first_token_at) / (s.n_generated - 1))

    def usage(streams: list[TextStream]) -> dict[str, Any]:
        prompt = streams[0].n_prompt
        completion = sum(s.n_generated for s in streams)
        cached = min(s.n_cached for s in streams)  # prompt tokens not prefilled: the prefix cache held them
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    # ---- generation (shared by /v1/completions and /v1/chat/completions) ----

    # one request's lifecycle in order: parse, encode, start n streams, stream or collect, shape the reply
    async def generate(request: Request, chat: bool) -> Response:  # noqa: C901
        arrival = time.monotonic()
        authorize(request)
        body = await read_body(request)
        common, payload = protocol.parse_chat(body) if chat else protocol.parse_completion(body)
        model, served_id, adapter = pick_text(common.model)
        prompt_param = "messages" if chat else "prompt"
        specs = common.tools if chat and common.tool_choice != "none" else None  # "none": no tools in the prompt
        family = model.tool_family if specs else None  # parse the output for tool calls
        structure_param = None
        if specs and (forced := model.tool_structure(specs, common.tool_choice)) is not None:
            common.options.structure, structure_param = forced, "tools"  # exactly one valid call
        model.constraint(common.options.structure, structure_param)  # a bad schema or grammar is a 400 before any work
        try:
            prompt_ids = model.encode_chat(payload, specs) if chat else model.encode_prompt(payload)
        except CorelmError as exc:  # a template that raises on these messages (e.g. role order)
            raise errors.bad_request(f"the chat template rejected the messages: {exc}", prompt_param) from None
        max_tokens = model.budget(len(prompt_ids), common.options.max_tokens, prompt_param)
        deadline = arrival + config.request_timeout
        streams: list[TextStream] = []
        try:
            for i in range(common.n):
                options = common.options
                if options.seed is not None and i:  # n > 1: distinct, reproducible samples
                    options = protocol.TextOptions(**{**options.__dict__, "seed": options.seed + i})
                streams.append(model.start(prompt_ids, options, max_tokens, deadline,
                                           model.constraint(options.structure, structure_param), adapter))
        except APIError:
            for s in streams:
                s.cancel()
            raise
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        if common.stream:
            events = _merge(streams)
            return StreamingResponse(
                _sse(events, streams, rid, created, served_id, chat, common.include_usage,
                     lambda: observe(arrival, streams), usage, metrics, family),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        async def collect() -> list[tuple[str, str | None, list[dict] | None]]:
            out = []
            try:
                for s in streams:
                    text, logprobs = [], []
                    async for piece in s.pieces():
                        text.append(piece.text)
                        logprobs += piece.logprobs or []
                    out.append(("".join(text), s.finish_reason,
                                logprobs if common.options.logprobs is not None else None))
            except APIError:
                for s in streams:  # n > 1: one failed, free the others' rows too
                    s.cancel()
                raise
            return out

        work = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(until_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():  # client went away: free the rows now
                work.cancel()
                for s in streams:
                    s.cancel()
                metrics.count_disconnect()
        if not work.done() or work.cancelled():
            return Response(status_code=499)
        results = work.result()  # re-raises an APIError (deadline, shutdown)
        observe(arrival, streams)
        if chat:
            choices = [{"index": i, **chat_message(text, reason, family), "logprobs": chat_logprobs(lps)}
                       for i, (text, reason, lps) in enumerate(results)]
        else:
            choices = [{"index": i, "text": text, "finish_reason": reason, "logprobs": completion_logprobs(lps)}
                       for i, (text, reason, lps) in enumerate(results)]
        return JSONResponse({"id": rid, "object": kind, "created": created, "model": served_id,
                             "choices": choices, "usage": usage(streams)})

    # ---- routes ----

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": page_csp, **SECURITY_HEADERS})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": list(by_name)}

    @app.get("/metrics")
    async def metrics_route(request: Request) -> PlainTextResponse:
        authorize(request)
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        authorize(request)
        data = [{"id": m.name, "object": "model", "created": 0, "owned_by": "corelm",
                 "context_window": m.context_window, "kind": m.kind} for m in models]
        return {"object": "list", "data": data + adapters.model_entries(models)}

    @app.get("/v1/adapters")
    async def list_adapters(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": adapters.model_entries(models)}

    @app.post("/v1/adapters")
    async def load_adapter(request: Request) -> dict[str, Any]:
        authorize_admin(request)
        return await adapters.load_route(await read_body(request), models)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(request: Request, name: str) -> dict[str, Any]:
        authorize_admin(request)
        return adapters.unload_route(name, models)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, chat=True)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        arrival = time.monotonic()
        authorize(request)
        name, texts, encoding = protocol.parse_embeddings(await read_body(request))
        model: EmbeddingModel = pick(name, "embed")
        counts = model.count_tokens(texts)
        for i, n in enumerate(counts):
            if n > model.context_window:
                raise errors.context_exceeded(
                    f"input[{i}] has {n} tokens but the model accepts at most {model.context_window}", "input")
        vectors = await model.embed(texts)
        data = []
        for i, vec in enumerate(vectors):
            value: Any = vec
            if encoding == "base64":  # little-endian float32, as the OpenAI client decodes it
                value = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            data.append({"object": "embedding", "index": i, "embedding": value})
        metrics.count_tokens(sum(counts), 0)
        metrics.observe(metrics.latency, time.monotonic() - arrival)
        return JSONResponse({"object": "list", "data": data, "model": model.name,
                             "usage": {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}})

    return app


class _LoopbackHostOnly:
    """Pure ASGI middleware: 421 unless the ``Host`` header names this machine (DNS-rebinding guard)."""

    NAMES = ("127.0.0.1", "localhost", "[::1]")

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
            if host.startswith("["):  # [::1]:8000
                name = host[: host.find("]") + 1]
            else:  # 127.0.0.1:8000, localhost
                name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
            if name not in self.NAMES:
                error = APIError(421, "this server only answers requests addressed to 127.0.0.1 or localhost",
                                 code="misdirected_request")
                await JSONResponse(error.body(), status_code=421)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _CountRequests:
    """Pure ASGI middleware counting ``/v1/*`` responses by status (BaseHTTPMiddleware would get in
    the way of streaming and disconnect detection)."""

    ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings")

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = scope["path"] if scope["path"] in self.ENDPOINTS else "other"
            self.metrics.count_request(endpoint, status)


async def _merge(streams: list[TextStream]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave the pieces of ``n`` streams as ``(index, piece | APIError)``."""
    if len(streams) == 1:
        try:
            async for piece in streams[0].pieces():
                yield 0, piece
        except APIError as exc:
            yield 0, exc
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: TextStream) -> None:
        try:
            async for piece in s.pieces():
                await queue.put((i, piece))
        except APIError as exc:
            await queue.put((i, exc))
        await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def chat_message(text: str, reason: str | None, family: str | None) -> dict[str, Any]:
    """A chat choice's ``message`` and ``finish_reason``: the tool calls in ``text`` (read by the
    template family's parser) with ``finish_reason: "tool_calls"``, or the text as content."""
    if family is not None:
        parsed = tools.PARSERS[family](text)
        calls = tools.message_calls(parsed)
        if calls:
            return {"message": {"role": "assistant", "content": parsed.content or None, "tool_calls": calls},
                    "finish_reason": "tool_calls"}
    return {"message": {"role": "assistant", "content": text}, "finish_reason": reason}


def chat_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """Chat's ``logprobs`` object: ``{"content": [per-token entries]}`` (None when not asked for)."""
    return None if entries is None else {"content": entries, "refusal": None}


def completion_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """The legacy completions ``logprobs`` object: parallel lists of tokens, their log-probabilities,
    the top alternatives as ``{token: logprob}`` and each token's character offset."""
    if entries is None:
        return None
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


# one SSE event loop; its branches are the protocol's cases (piece, tool-call delta, error, end)
async def _sse(events: AsyncIterator[tuple[int, Any]], streams: list[TextStream], rid: str, created: int,  # noqa: C901
               model: str, chat: bool, include_usage: bool, on_end, usage, metrics: Metrics,
               tool_family: str | None = None) -> AsyncIterator[str]:
    """Format pieces as OpenAI SSE chunks; cancels the generations if the client goes away.
    With ``tool_family`` a chat stream's text goes through a :class:`corelm.serve.tools.ToolStream`
    per choice, so tool calls arrive as ``delta.tool_calls`` pieces."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    parsers = [tools.ToolStream(tool_family) for _ in streams] if chat and tool_family else None

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        body = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices, **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def choice(i: int, text: str | None, reason: str | None, first: bool = False,
               logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if parsers is not None and not first:
                delta.update(parsers[i].feed(text or "", final=reason is not None))
                if reason is not None and parsers[i].called:
                    reason = "tool_calls"
            elif text:
                delta["content"] = text
            return {"index": i, "delta": delta, "finish_reason": reason, "logprobs": chat_logprobs(logprobs)}
        return {"index": i, "text": text or "", "finish_reason": reason, "logprobs": completion_logprobs(logprobs)}

    finished = False
    try:
        if chat:
            yield chunk([choice(i, None, None, first=True) for i in range(len(streams))])
        open_streams = len(streams)
        async for i, item in events:
            if isinstance(item, APIError):
                # Headers are already sent: report the error in-band, then end the stream.
                metrics.count_error(str(item.code or item.type or item.status))
                yield f"data: {json.dumps(item.body())}\n\n"
                for s in streams:
                    s.cancel()
                break
            if item.finish_reason is None:
                part = choice(i, item.text, None, logprobs=item.logprobs)
                if not chat or part["delta"] or part["logprobs"]:  # a held-back piece sends nothing yet
                    yield chunk([part])
                continue
            open_streams -= 1
            extra = {"usage": usage(streams)} if open_streams == 0 else {}
            yield chunk([choice(i, item.text, item.finish_reason, logprobs=item.logprobs)], **extra)
        else:
            if include_usage:
                yield chunk([], usage=usage(streams))
        yield "data: [DONE]\n\n"
        finished = True
    finally:
        if not finished:  # the client disconnected (the task was cancelled): free the rows now
            for s in streams:
                s.cancel()
            metrics.count_disconnect()
        on_end()
