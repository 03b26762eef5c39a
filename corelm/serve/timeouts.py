"""Slow clients cannot hold the server: a request's headers must arrive within ``header_timeout``
seconds of the connection (or of the previous response on a kept-alive connection).

uvicorn's HTTP/1.1 protocol arms no timer until a first response has been sent, and resets its
keep-alive timer on every byte received, so a client that trickles header bytes (a "slowloris")
held a connection, and its file descriptor, forever: 3,000 such sockets were held in a probe. This
subclass closes a connection whose request has not been parsed in time; the body is bounded the same
way in :mod:`corelm.serve.app` (``body_timeout`` for the whole body), and ``limit_concurrency`` caps
what is open at once. Both refusals are OpenAI's error object instead of uvicorn's plain text: malformed
HTTP (and headers over ``h11_max_incomplete_event_size``) gets a 400, and a request beyond the cap a 503
with ``Retry-After`` (uvicorn's own check answers ``Service Unavailable`` as text/plain, which the
``openai`` client cannot parse; it is turned off and the same count is made here, with ``--max-connections``
meaning what it says: that many connections are served, the next one is refused).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from corelm.serve.errors import APIError, bad_request, connection_limit


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a header deadline (``header_timeout`` seconds), OpenAI-shaped 400s and
    503s; :func:`header_timeout_protocol` makes a subclass with the deadline set."""

    header_timeout = 10.0
    _deadline: asyncio.TimerHandle | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cap, self.limit_concurrency = self.limit_concurrency, None  # uvicorn's text/plain 503 is off
        if cap is not None:
            self.app = _capped(self.app, cap, self.connections, self.tasks)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _headers_late(self) -> None:
        self._deadline = None
        if not self._in_request() and not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        super().handle_events()
        if self._in_request():  # the headers are in: the app's own limits take over
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection gets the same allowance

    def send_400_response(self, msg: str) -> None:
        error = bad_request("invalid HTTP request: malformed, or its request line and headers exceed the "
                            "server's size limit", code="invalid_http")
        body = json.dumps(error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def header_timeout_protocol(header_timeout: float) -> type[H11Protocol]:
    """An ``H11Protocol`` class that closes connections whose request headers are late and answers
    requests beyond ``limit_concurrency`` with an OpenAI-shaped 503."""
    return type("HeaderTimeoutH11", (HeaderTimeoutH11,), {"header_timeout": header_timeout})


def _capped(app: Any, cap: int, connections: set, tasks: set) -> Any:
    """``app`` behind the cap: with more than ``cap`` connections or requests open (the server's shared sets,
    this connection and this request's task already in them), a request gets the 503 of
    :func:`~corelm.serve.errors.connection_limit`."""

    async def capped(scope: dict, receive: Any, send: Any) -> None:
        if len(connections) > cap or len(tasks) > cap:
            await _send_error(send, connection_limit())
            return
        await app(scope, receive, send)

    return capped


async def _send_error(send: Any, error: APIError) -> None:
    """Answer an ASGI request with ``error`` as JSON and close the connection."""
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close"), *((k.lower().encode(), v.encode()) for k, v in error.headers.items())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
