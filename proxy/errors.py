"""The few errors the proxy answers with, all rendered as OpenAI-shaped JSON bodies."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from starlette.responses import Response


class ProxyError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, object]:
        return openai_error(self.message, self.type, self.code, self.param)


def openai_error(message: str, type: str, code: str | None, param: str | None) -> dict[str, object]:
    """The one shape of every error body the proxy sends: OpenAI's, which the SDKs and LibreChat read."""
    return {"error": {"message": message, "type": type, "code": code, "param": param}}


class BadRequest(ProxyError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class Unauthorized(ProxyError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class Forbidden(ProxyError):
    status, type, code = 403, "permission_error", "forbidden"


class NotFound(ProxyError):
    status, type, code = 404, "invalid_request_error", "not_found"


class MethodNotAllowed(ProxyError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"


class ClientClosed(ProxyError):
    # nginx's 499: nobody reads this answer, but the ledger records how the request ended.
    status, type, code = 499, "invalid_request_error", "client_closed"


class RequestTimeout(ProxyError):
    status, type, code = 408, "invalid_request_error", "request_timeout"


class PayloadTooLarge(ProxyError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class QuotaExceeded(ProxyError):
    # `insufficient_quota` is what stops LangChain (LibreChat) from retrying a 429 six times,
    # and `x-should-retry: false` stops the official OpenAI SDKs' two retries.
    status, type, code = 429, "insufficient_quota", "insufficient_quota"


class RateLimited(ProxyError):
    # Retry-After <= 60 s: LangChain and the OpenAI SDKs wait and retry, which is right here.
    status, type, code = 429, "rate_limit_exceeded", "rate_limit_exceeded"


class UpstreamError(ProxyError):
    status, type, code = 502, "api_error", "upstream_error"


class UpstreamTimeout(ProxyError):
    status, type, code = 504, "api_error", "upstream_timeout"


class ServiceUnavailable(ProxyError):
    status, type, code = 503, "api_error", "service_unavailable"


# What the caller is told when something the proxy depends on fails: said here, and only here.


def budget_store_down(exc: BaseException) -> ServiceUnavailable:
    """Redis did not answer (a RedisError)."""
    return ServiceUnavailable(f"Budget service unavailable ({exc.__class__.__name__}); try again shortly.")


def ledger_down_for_rebuild() -> ServiceUnavailable:
    """A counter or binding Redis lost must be read back from PostgreSQL, which is unreachable."""
    return ServiceUnavailable("Budget counters are being rebuilt but PostgreSQL is unreachable; try again shortly.")


def history_down() -> ServiceUnavailable:
    return ServiceUnavailable("Usage history is unavailable right now (database unreachable); try again shortly.")


def shutting_down() -> ServiceUnavailable:
    """The instance is stopping: the client (or its SDK's retry) should go to another one."""
    return ServiceUnavailable("This proxy instance is shutting down; retry the request.", code="shutting_down")


def upstream_failed(exc: BaseException, *, answering: bool) -> ProxyError:
    """The model server failed (http_wire's WireError, or the OS's): before its answer began, or during it."""
    name = exc.__class__.__name__
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"The model server did not {'finish its answer' if answering else 'answer'} in time.")
    if answering:
        return UpstreamError(f"The model server broke off its answer ({name}).")
    if isinstance(exc, ConnectionError):
        return ServiceUnavailable(f"The model server is unreachable ({name}).")
    return UpstreamError(f"The model server request failed ({name}).")


_STATUS_ERRORS: dict[int, type[ProxyError]] = {404: NotFound, 405: MethodNotAllowed}


def error_for_status(status: int, message: str) -> ProxyError:
    """Map a framework-level HTTP status (unknown route, wrong method) to our error type."""
    return _STATUS_ERRORS.get(status, BadRequest if status < 500 else ProxyError)(message)


def error_response(exc: ProxyError, headers: Mapping[str, str] | None = None) -> Response:
    merged = {**exc.headers, **(headers or {})}
    return Response(orjson.dumps(exc.body()), status_code=exc.status, headers=merged, media_type="application/json")
