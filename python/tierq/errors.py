"""OpenAI-shaped errors: `ApiError`, the middleware that turns every failure into
one, and the shed and drain answers (429/503 with their retry hints, from
`tierq.retry_after`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final

import orjson
from aiohttp import web

from tierq.retry_after import retry_after

#: The error code of a request refused while the cluster's Redis is
#: unreachable (`[cluster] on_redis_down = "closed"`).
CLUSTER_DOWN_CODE: Final = "cluster_unavailable"

__all__ = [
    "DRAIN_RETRY_AFTER_S",
    "JSON_TYPE",
    "SHED_MESSAGES",
    "ApiError",
    "api_errors",
    "drain_error",
    "invalid_type",
    "shed_error",
]

log = logging.getLogger("tierq.app")  # the gateway's logger, named for its app

JSON_TYPE: Final = "application/json"
# A drained request is best retried at once: another worker or host takes it.
DRAIN_RETRY_AFTER_S: Final = 1.0


class ApiError(Exception):
    """An OpenAI-shaped error response, raised anywhere in a handler."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        *,
        body: dict[str, object] | None = None,
    ) -> None:
        """`body`: the JSON to answer instead of the usual one built from the
        fields (an engine's own error object, passed on as it came)."""
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.body = body

    def response(self) -> web.Response:
        body = self.body if self.body is not None else {
            "error": {"message": self.message, "type": self.type,
                      "param": self.param, "code": self.code}}
        headers = self.headers
        if "Content-Type" not in headers:
            headers["Content-Type"] = JSON_TYPE
        return web.Response(status=self.status, body=orjson.dumps(body), headers=headers)


_STATUS_TYPES: Final = {401: "invalid_request_error", 403: "invalid_request_error",
                        404: "invalid_request_error", 405: "invalid_request_error",
                        413: "invalid_request_error", 429: "rate_limit_error"}


@web.middleware
async def api_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error leaves as OpenAI-shaped JSON; nothing leaks a traceback."""
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()
    except web.HTTPException as e:
        if e.status < 400:
            raise
        if e.status == 404:
            message = f"Unknown request URL: {request.method} {request.path}."
            code: str | None = "unknown_url"
        elif e.status == 405:
            message = f"Method {request.method} is not allowed for {request.path}."
            code = "method_not_allowed"
        elif e.status == 413:
            message = "Request body too large."
            code = "request_too_large"
        else:
            message, code = e.reason, None
        err = ApiError(e.status, message, _STATUS_TYPES.get(e.status, "invalid_request_error"),
                       None, code)
        return err.response()
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return ApiError(500, "The gateway hit an unexpected error.", "server_error",
                        None, "internal_error").response()


def invalid_type(param: str, expected: str) -> ApiError:
    return ApiError(400, f"Invalid type for '{param}': expected {expected}.",
                    param=param, code="invalid_type")


SHED_MESSAGES: Final = {
    "server_overloaded": "The model is overloaded and its queue is full. Retry after the "
                         "time given, or send service_tier=\"priority\" on a priority-enabled model.",
    "queue_timeout": "The request waited in the queue longer than allowed and was shed.",
    "rate_limit_exceeded": "Rate limit reached for this model.",
    "resource_unavailable": "No idle capacity for this flex request. Retry after the time "
                            "given, or send it at the default tier.",
}


def _retry_headers(wait_s: float) -> dict[str, str]:
    headers: dict[str, str] = {}
    retry_after(wait_s).add_to(headers)
    return headers


def shed_error(code: str, wait_s: float, message: str) -> ApiError:
    """The 429 of a request shed by its pool or its key's limits; `wait_s` is the
    exact wait (the core's), turned into its retry headers."""
    return ApiError(429, message, "rate_limit_error", None, code, _retry_headers(wait_s))


def cluster_down_error(retry_after_s: float) -> ApiError:
    """The 503 of a request refused while the cluster's Redis is unreachable
    and `[cluster] on_redis_down = "closed"`."""
    return ApiError(503, "The gateway cannot reach its cluster state (Redis); retry the "
                    "request.", "server_error", None, CLUSTER_DOWN_CODE,
                    _retry_headers(retry_after_s))


def drain_error() -> ApiError:
    """The 503 of a request shed because the gateway is shutting down."""
    return ApiError(503, "The gateway is shutting down; retry the request.", "server_error",
                    None, "server_shutting_down", _retry_headers(DRAIN_RETRY_AFTER_S))
