"""A structured access log: one JSON object per HTTP request, on the ``corelm.access`` logger.

Each line holds the request id (also sent back as the ``X-Request-Id`` header, so a client's report can
be matched to the log), method, path, status, latency in milliseconds, the prompt and generated tokens
the request cost (counted where the server counts them for ``/metrics``, through
:data:`corelm.serve.metrics.REQUEST`), and the client address. A stream's line is written when its last
byte is sent, so its latency and tokens are the whole stream's. Nothing of the body -- prompts, outputs,
keys -- is logged.

``corelm serve --access-log`` turns it on (:func:`corelm.serve.server.run` wraps the app).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from corelm.serve.metrics import REQUEST

log = logging.getLogger("corelm.access")


class AccessLog:
    """Pure ASGI middleware writing one JSON line per HTTP request (BaseHTTPMiddleware would buffer streams)."""

    def __init__(self, app: Any, logger: logging.Logger = log) -> None:
        self.app = app
        self.logger = logger

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()
        rid = uuid.uuid4().hex
        entry = {"prompt_tokens": 0, "completion_tokens": 0}
        status = 500  # if the app raises before answering, uvicorn answers 500

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        token = REQUEST.set(entry)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST.reset(token)
            client = scope.get("client")
            self.logger.info(json.dumps({
                "time": round(time.time(), 3), "request_id": rid, "method": scope["method"], "path": scope["path"],
                "status": status, "latency_ms": round((time.monotonic() - t0) * 1000, 1), **entry,
                "client": f"{client[0]}:{client[1]}" if client else None}))
