"""OpenAI-shaped API errors.

Every error the server returns has the body ``{"error": {"message", "type", "param", "code"}}`` that
the official clients parse (``openai.BadRequestError`` etc.), and a status that says who must act:
4xx the caller, 503/504 the server's load. Messages name the parameter and the numbers involved and
never contain file paths, stack traces or keys.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error answered to the client as OpenAI-shaped JSON (or an SSE error event mid-stream).

    Args:
        status: HTTP status code.
        message: one sentence for the user.
        type: OpenAI error type (``invalid_request_error``, ``authentication_error``, ...).
        param: the request field at fault, if any.
        code: a machine-readable code (``context_length_exceeded``, ``model_not_found``, ...).
        headers: extra response headers (``Retry-After`` on overload).
    """

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    """400: the request is malformed or a parameter is out of range."""
    return APIError(400, message, param=param, code=code)


def context_exceeded(message: str, param: str) -> APIError:
    """400: the prompt, or prompt + max_tokens, does not fit the context window."""
    return APIError(400, message, param=param, code="context_length_exceeded")


def model_not_found(name: str, served: list[str]) -> APIError:
    return APIError(404, f"model {name!r} is not served here; available: {', '.join(served)}",
                    param="model", code="model_not_found")


def unauthorized() -> APIError:
    return APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                    type="authentication_error", code="invalid_api_key")


def overloaded(retry_after: int = 1) -> APIError:
    """503 answered at once when the running batch and the waiting queue are both full."""
    return APIError(503, "server is at capacity (running batch and waiting queue are full); retry shortly",
                    type="server_overloaded", code="queue_full", headers={"Retry-After": str(retry_after)})


def deadline_exceeded(seconds: float) -> APIError:
    return APIError(504, f"request exceeded the server's deadline of {seconds:g} s",
                    type="timeout_error", code="deadline_exceeded")


class NonFiniteLogits(ArithmeticError):
    """A row's logits hold NaN or infinity: the model (its weights or a kernel) is at fault, not the request."""


def model_fault() -> APIError:
    """500 for a request whose logits were not finite. A server error -- the client did nothing wrong and a
    retry of the same request will fail the same way -- named apart from ``internal_error`` so that it can
    be told from a bug; the request's row is freed and the other rows of the batch are not affected."""
    return APIError(500, "the model produced non-finite logits (NaN or infinity) for this request; other "
                         "requests are not affected", type="server_error", code="model_output_invalid")


def connection_limit() -> APIError:
    """503 when ``--max-connections`` connections or requests are open already (answered by the HTTP layer)."""
    return APIError(503, "server has too many open connections; retry shortly", type="server_overloaded",
                    code="connection_limit", headers={"Retry-After": "1"})


def shutting_down() -> APIError:
    """503 for a request still running when a shutdown's drain deadline passes."""
    return APIError(503, "server is shutting down", type="server_error", code="shutdown")


def internal_error() -> APIError:
    """500 with a fixed message: details go to the server log only, never to the client."""
    return APIError(500, "internal server error", type="server_error", code="internal_error")
