"""The admin API (`[admin] token_sha256`): API keys over HTTP and the usage report.

    GET/POST           /admin/v1/keys          list / create (the secret shown once)
    GET/PATCH/DELETE   /admin/v1/keys/{id}     read / update / revoke
    GET                /admin/v1/usage         the `tierq usage --json` report
    GET                /admin/v1/openapi.json  the description of these routes

Every call needs `Authorization: Bearer <token>` whose sha256 is the configured
one, compared in constant time; a missing and a wrong token get the same 401.
Where it answers: on the main port for loopback clients only (403 for any
other peer), or, with `[admin] listen`, only on that address, to any peer that
reaches it. Each call is one line on the `tierq.admin` logger; no token or key
secret is ever in it. A key changed here is dropped from this worker's cache at
once and every other worker of the host is told (`Gateway.keys_changed`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson
from aiohttp import web

from tierq.config import AdminConfig
from tierq.errors import JSON_TYPE, ApiError
from tierq.gateway import GATEWAY, Gateway
from tierq.intake import is_loopback
from tierq.keys import (KEEP, MAX_BUDGET_USD, MAX_LIMIT, MAX_RAMP_GROWTH, RAMP_WINDOW_RANGE, KeyInfo,
                        budget_text, parse_public_id, updated, validate_new_key)
from tierq.stores import KeyStoreLike
from tierq.usage import parse_since, usage_report

__all__ = ["PREFIX", "add_admin_routes", "openapi"]

log = logging.getLogger("tierq.admin")

PREFIX: Final = "/admin/v1"
# What a key's body may hold: a new key needs its name, an update any of them.
_FIELDS: Final = ("name", "rpm", "tpm", "weight", "trusted", "priority_budget_usd",
                   "ramp_min_tpm", "ramp_max_growth", "ramp_window_s", "enforce")
_UNAUTHORIZED: Final = ("Missing or incorrect admin token. Pass it as "
                        "'Authorization: Bearer ADMIN_TOKEN'.")

_Handler = Callable[[web.Request, Gateway], Awaitable[tuple[int, object, str]]]


def add_admin_routes(app: web.Application, admin: AdminConfig) -> None:
    """The admin routes on `app`, when `admin` has a token; else none at all."""
    if admin.token_sha256 is None:
        return
    want = admin.token_sha256.encode("ascii")
    port = admin.listen[1] if admin.listen is not None else None
    for method, path, handler in _ROUTES:
        app.router.add_route(method, PREFIX + path, _guarded(handler, want, port))


def _guarded(handler: _Handler, want: bytes, port: int | None) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def route(request: web.Request) -> web.StreamResponse:
        status, note = 500, "failed"
        try:
            _check_place(request, port)
            _check_token(request, want)
            status, body, note = await handler(request, request.app[GATEWAY])
            return web.Response(status=status, body=orjson.dumps(body), content_type=JSON_TYPE)
        except ApiError as e:
            status, note = e.status, e.code or "refused"
            raise
        except web.HTTPException as e:
            status, note = e.status, e.reason
            raise
        finally:
            # The path holds a key's public id at most; headers (the token) never.
            log.info("admin %s %s -> %d: %s (from %s)", request.method, request.path, status,
                     note, request.remote)

    route.__name__ = handler.__name__
    return route


def _check_place(request: web.Request, port: int | None) -> None:
    """On its own listener (`port`) only there; else on loopback only."""
    if port is not None:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        if not sockname or sockname[1] != port:
            raise web.HTTPNotFound()
    elif not is_loopback(request.remote):
        raise ApiError(403, "The admin API serves loopback clients only; set [admin] listen "
                       "to serve it on another address.", code="admin_loopback_only")


def _check_token(request: web.Request, want: bytes) -> None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    got = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).hexdigest()
    # Both checks always run, and the hashes are compared in constant time: a
    # missing, malformed and wrong token take the same path and get the same body.
    ok = hmac.compare_digest(got.encode("ascii"), want)
    if not (ok and scheme.lower() == "bearer"):
        raise ApiError(401, _UNAUTHORIZED, code="invalid_admin_token")


# ------------------------------------------------------------------ keys


def key_json(key: KeyInfo) -> dict[str, object]:
    return {"id": key.public_id, "object": "api_key", "name": key.name, "created": key.created,
            "revoked": key.revoked, "revoked_at": key.revoked_at, "rpm": key.rpm, "tpm": key.tpm,
            "weight": key.weight, "trusted": key.trusted,
            # Exact decimal text, as every cost tierq shows.
            "priority_budget_usd": budget_text(key.priority_budget_usd),
            "ramp_min_tpm": key.ramp_min_tpm, "ramp_max_growth": key.ramp_max_growth,
            "ramp_window_s": key.ramp_window_s, "enforce": key.enforce}


def _store(gw: Gateway) -> KeyStoreLike:
    if gw.keys is None:
        raise ApiError(409, "This gateway has no key store: add [keys] to its config.",
                       code="no_key_store")
    return gw.keys


async def _body(request: web.Request) -> dict[str, Any]:
    """The JSON object sent, every field known; 400 naming what is wrong."""
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "The body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The body must be a JSON object.", code="invalid_json")
    for name in body:
        if name not in _FIELDS:
            shown = name if len(name) <= 64 and name.isprintable() else name[:64].encode("unicode_escape").decode()
            raise ApiError(400, f"Unknown field '{shown}': a key has {', '.join(_FIELDS)}.",
                           param=shown, code="unknown_parameter")
    return body


def _checked(base: KeyInfo, body: dict[str, Any]) -> KeyInfo:
    """`base` with `body`'s fields, each checked by the key rules on its own so the
    400 names the field at fault."""
    for name in _FIELDS:
        if name in body:
            try:
                updated(base, **{name: body[name]})
            except ValueError as e:
                raise ApiError(400, f"Invalid '{name}': {e}.", param=name,
                               code="invalid_value") from None
    return updated(base, **{name: body.get(name, KEEP) for name in _FIELDS})


def _public_id(request: web.Request) -> str:
    public_id = parse_public_id(request.match_info["id"])
    if public_id is None:
        raise ApiError(404, "No such key.", param="id", code="key_not_found")
    return public_id


async def _create(request: web.Request, gw: Gateway) -> tuple[int, object, str]:
    store = _store(gw)
    body = await _body(request)
    if "name" not in body:
        raise ApiError(400, "Missing required field 'name'.", param="name",
                       code="missing_required_parameter")
    new = _checked(validate_new_key("unnamed", None, None), body)
    key, token = await asyncio.to_thread(
        lambda: store.create(new.name, new.rpm, new.tpm, weight=new.weight, trusted=new.trusted,
                             priority_budget_usd=new.priority_budget_usd,
                             ramp_min_tpm=new.ramp_min_tpm, ramp_max_growth=new.ramp_max_growth,
                             ramp_window_s=new.ramp_window_s, enforce=new.enforce))
    gw.keys_changed()  # a token another worker refused a moment ago is now good
    return 201, {**key_json(key), "secret": token}, f"created key {key.public_id}"


async def _list(request: web.Request, gw: Gateway) -> tuple[int, object, str]:
    keys = await asyncio.to_thread(_store(gw).list)
    return 200, {"object": "list", "data": [key_json(k) for k in keys]}, f"{len(keys)} keys"


async def _get(request: web.Request, gw: Gateway) -> tuple[int, object, str]:
    public_id = _public_id(request)
    key = await asyncio.to_thread(_store(gw).get, public_id)
    if key is None:
        raise ApiError(404, "No such key.", param="id", code="key_not_found")
    return 200, key_json(key), f"read key {public_id}"


async def _update(request: web.Request, gw: Gateway) -> tuple[int, object, str]:
    public_id = _public_id(request)
    store = _store(gw)
    body = await _body(request)
    if not body:
        raise ApiError(400, f"Nothing to change: give one of {', '.join(_FIELDS)}.",
                       code="missing_required_parameter")
    _checked(validate_new_key("unnamed", None, None), body)  # each field's 400 before any read
    try:
        key = await asyncio.to_thread(lambda: store.update(public_id, **body))
    except ValueError as e:  # the whole key as it would be (checked field by field above)
        raise ApiError(400, f"Invalid key: {e}.", code="invalid_value") from None
    if key is None:
        raise ApiError(404, "No live key with this id.", param="id", code="key_not_found")
    gw.keys_changed()
    return 200, key_json(key), f"updated key {public_id}: {', '.join(sorted(body))}"


async def _revoke(request: web.Request, gw: Gateway) -> tuple[int, object, str]:
    public_id = _public_id(request)
    store = _store(gw)
    revoked = await asyncio.to_thread(store.revoke, public_id)
    gw.keys_changed()
    key = await asyncio.to_thread(store.get, public_id)
    if key is None:
        raise ApiError(404, "No such key.", param="id", code="key_not_found")
    return 200, key_json(key), (f"revoked key {public_id}" if revoked
                                else f"key {public_id} was already revoked")


# ------------------------------------------------------------------ usage


async def _usage(request: web.Request, gw: Gateway) -> tuple[int, object, str]:
    q = request.query
    for name in q:
        if name not in ("since", "key", "model", "by"):
            raise ApiError(400, f"Unknown query parameter '{name[:64]}': give since, key, model "
                           "or by.", param=name[:64], code="unknown_parameter")
    since = None
    if "since" in q:
        try:
            since = parse_since(q["since"])
        except ValueError as e:
            raise ApiError(400, str(e).removeprefix("--since "), param="since",
                           code="invalid_value") from None
    by = q.get("by", "key")
    if by not in ("key", "fairness-id"):
        raise ApiError(400, "Invalid 'by': expected key or fairness-id.", param="by",
                       code="invalid_value")
    lines = await asyncio.to_thread(gw.ledger.usage, since, q.get("key"), q.get("model"),
                                    by == "fairness-id")
    return 200, usage_report(lines, by == "fairness-id"), f"{len(lines)} usage lines"


# ------------------------------------------------------------------ description


async def _openapi(request: web.Request, gw: Gateway) -> tuple[int, object, str]:
    return 200, openapi(), "description"


_ROUTES: Final[tuple[tuple[str, str, _Handler], ...]] = (
    ("GET", "/keys", _list),
    ("POST", "/keys", _create),
    ("GET", "/keys/{id}", _get),
    ("PATCH", "/keys/{id}", _update),
    ("DELETE", "/keys/{id}", _revoke),
    ("GET", "/usage", _usage),
    ("GET", "/openapi.json", _openapi),
)

_ERROR: Final[dict[str, object]] = {"description": "An OpenAI-shaped error naming the field at fault",
                 "content": {JSON_TYPE: {"schema": {"$ref": "#/components/schemas/Error"}}}}
_KEY_REF: Final[dict[str, object]] = {"content": {JSON_TYPE: {"schema": {"$ref": "#/components/schemas/Key"}}}}
_ID: Final = {"name": "id", "in": "path", "required": True,
              "schema": {"type": "string", "pattern": "^(tq-)?[a-z0-9]{12}$"}}
_LIMIT: Final = {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_LIMIT,
                 "description": "per minute; null is unlimited"}
_SETTINGS: Final = {
    "name": {"type": "string", "minLength": 1, "maxLength": 200},
    "rpm": _LIMIT, "tpm": _LIMIT,
    "weight": {"type": "number", "minimum": 0.01, "maximum": 100,
               "description": "fair share of a busy lane against a key of weight 1"},
    "trusted": {"type": "boolean", "description": "may split its traffic by x-tierq-fairness-id"},
    "priority_budget_usd": {
        "type": ["string", "number", "null"], "pattern": r"^[0-9]+(\.[0-9]{1,9})?$",
        "description": "priority spend per UTC day (USD, at most 9 decimals, up to "
                       f"{MAX_BUDGET_USD}), then its priority requests are served default "
                       "(x-tierq-service-tier-reason: budget); null: no budget. Answered as "
                       "exact text"},
    "ramp_min_tpm": {"type": "integer", "minimum": 0, "maximum": MAX_LIMIT,
                     "description": "ramp rule: priority tokens per minute always allowed"},
    "ramp_max_growth": {"type": ["number", "null"], "exclusiveMinimum": 0,
                        "maximum": MAX_RAMP_GROWTH,
                        "description": "ramp rule: the most its priority tokens per minute "
                                       "grow over ramp_window_s (0.5: 50%); the excess is "
                                       "served default (reason ramp); null: no ramp rule"},
    "ramp_window_s": {"type": "integer", "minimum": RAMP_WINDOW_RANGE[0],
                      "maximum": RAMP_WINDOW_RANGE[1], "description": "ramp rule: its window"},
    "enforce": {"type": "boolean",
                "description": "false: shadow mode, its rpm/tpm refusals and downgrades are counted "
                               "(tierq_shadow_decisions_total, the access line) and not applied"},
}


def _answers(code: str, answer: dict[str, object], *errors: str) -> dict[str, object]:
    """An operation's responses: `answer` on `code`, the error on the others."""
    return {code: answer, **{e: _ERROR for e in ("400", "401", "403", *errors)}}


def openapi() -> dict[str, object]:
    """The OpenAPI 3.1 description of the admin routes (GET /admin/v1/openapi.json)."""
    key_body = {"required": True, "content": {JSON_TYPE: {"schema": {
        "$ref": "#/components/schemas/KeySettings"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "tierq admin API", "version": "1"},
        "security": [{"bearer": []}],
        "paths": {
            PREFIX + "/keys": {
                "get": {"summary": "List the keys (never their secrets)",
                        "responses": _answers("200", {"description": "The keys", "content": {JSON_TYPE: {
                            "schema": {"type": "object", "properties": {
                                "object": {"const": "list"},
                                "data": {"type": "array",
                                         "items": {"$ref": "#/components/schemas/Key"}}}}}}})},
                "post": {"summary": "Create a key; its secret is in this answer only",
                         "requestBody": key_body,
                         "responses": _answers("201", {"description": "The key and its secret", "content": {
                             JSON_TYPE: {"schema": {"allOf": [
                                 {"$ref": "#/components/schemas/Key"},
                                 {"type": "object", "properties": {"secret": {"type": "string"}}}]}}}})},
            },
            PREFIX + "/keys/{id}": {
                "parameters": [_ID],
                "get": {"summary": "Read a key",
                        "responses": _answers("200", {"description": "The key", **_KEY_REF}, "404")},
                "patch": {"summary": "Change a live key's name, limits, weight or trust",
                          "requestBody": key_body,
                          "responses": _answers("200", {"description": "The key as it now is",
                                                       **_KEY_REF}, "404")},
                "delete": {"summary": "Revoke a key: 401 on every worker of this host at once, "
                                      "on every host within [keys] refresh_s",
                           "responses": _answers("200", {"description": "The revoked key", **_KEY_REF},
                                                 "404")},
            },
            PREFIX + "/usage": {
                "get": {"summary": "Spend by key, model and tier (tierq usage --json)",
                        "parameters": [
                            {"name": "since", "in": "query", "schema": {"type": "string"},
                             "description": "30m, 1h, 7d or an ISO date/time (naive is UTC)"},
                            {"name": "key", "in": "query", "schema": {"type": "string"}},
                            {"name": "model", "in": "query", "schema": {"type": "string"}},
                            {"name": "by", "in": "query",
                             "schema": {"enum": ["key", "fairness-id"]}}],
                        "responses": _answers("200", {"description": "Lines and their total; costs "
                                                                    "are exact decimal strings"})},
            },
            PREFIX + "/openapi.json": {
                "get": {"summary": "This description",
                        "responses": _answers("200", {"description": "OpenAPI 3.1"})},
            },
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "the token whose sha256 is "
                                                          "[admin] token_sha256"}},
            "schemas": {
                "KeySettings": {"type": "object", "additionalProperties": False,
                                "properties": _SETTINGS},
                "Key": {"type": "object", "properties": {
                    "id": {"type": "string"}, "object": {"const": "api_key"},
                    **_SETTINGS, "created": {"type": "number"}, "revoked": {"type": "boolean"},
                    "revoked_at": {"type": ["number", "null"]}}},
                "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                    "message": {"type": "string"}, "type": {"type": "string"},
                    "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}},
            },
        },
    }
