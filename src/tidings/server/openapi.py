"""`/openapi.json` and `/docs`: the OpenAPI 3.1 description of the REST API (API.md §8).

Written out by hand rather than derived: the routes are plain Starlette
handlers, and the contract (API.md) is the source of truth. Streams (SSE and
WebSocket) are described in prose, as OpenAPI cannot express them well.
A test checks that every REST route of the app appears here.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from .http import JSONResponse

_ERROR = {"$ref": "#/components/schemas/Error"}
_OBJ: dict[str, Any] = {"type": "object"}


def _op(
    summary: str,
    ok: int,
    *,
    body: dict[str, Any] | None = None,
    params: list[dict[str, Any]] | None = None,
    errors: tuple[int, ...] = (400, 401, 403),
    tag: str = "publish",
) -> dict[str, Any]:
    responses: dict[str, Any] = {
        str(ok): {"description": "OK", "content": {"application/json": {"schema": _OBJ}}}
        if ok != 204
        else {"description": "No Content"}
    }
    for status in errors:
        responses[str(status)] = {
            "description": "Error (API.md §2)",
            "content": {"application/json": {"schema": _ERROR}},
        }
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": responses}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if params:
        op["parameters"] = params
    return op


def _q(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_MESSAGE = {"$ref": "#/components/schemas/PublishMessage"}

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "tidings",
        "version": "1",
        "description": (
            "Real-time notifications. Streams: `GET /api/v1/stream` (Server-Sent Events; also "
            "`/api/v1/notifications/stream`, `/api/sse/events`, `/sse/stream`) and "
            "`GET /api/v1/ws` (WebSocket; also `/api/v1/notifications/ws`): see docs/api.md. "
            "Users authenticate with a JWT (Bearer header, `?token=`, or the `tidings_token` "
            "cookie), backends with an API key (Bearer header)."
        ),
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["code", "message"],
                        "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                    }
                },
            },
            "PublishMessage": {
                "type": "object",
                "properties": {
                    "tenant": {"type": "string"},
                    "users": {"type": "array", "items": {"type": "string"}, "maxItems": 1000},
                    "topics": {"type": "array", "items": {"type": "string"}, "maxItems": 100},
                    "broadcast": {"type": "boolean"},
                    "event": {"type": "string", "default": "message"},
                    "data": {},
                    "idempotency_key": {"type": "string", "maxLength": 200},
                },
            },
            "NewNotification": {
                "type": "object",
                "required": ["recipients", "type", "title"],
                "properties": {
                    "tenant": {"type": "string"},
                    "recipients": {"type": "array", "items": {"type": "string"}},
                    "type": {"type": "string"},
                    "title": {"type": "string"},
                    "content": {"type": "string"},
                    "priority": {"enum": ["low", "normal", "high", "urgent"]},
                    "data": {"type": "object"},
                    "sender": {"type": ["object", "null"]},
                    "idempotency_key": {"type": "string"},
                },
            },
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/api/v1/publish": {"post": _op("Publish an event", 202, body=_MESSAGE)},
        "/api/v1/publish/batch": {
            "post": _op(
                "Publish up to 1000 events",
                202,
                body={
                    "type": "object",
                    "properties": {
                        "messages": {"type": "array", "items": _MESSAGE, "maxItems": 1000}
                    },
                },
            )
        },
        "/api/v1/notifications": {
            "post": _op(
                "Create inbox notifications",
                201,
                tag="inbox",
                body={"$ref": "#/components/schemas/NewNotification"},
            ),
            "get": _op(
                "List the caller's notifications, newest first",
                200,
                tag="inbox",
                params=[
                    _q("page", {"type": "integer", "minimum": 1}),
                    _q("page_size", {"type": "integer", "minimum": 1, "maximum": 100}),
                    _q("unread", {"type": "boolean"}),
                    _q("type", {"type": "string"}),
                ],
            ),
        },
        "/api/v1/notifications/unread-count": {"get": _op("Unread count", 200, tag="inbox")},
        "/api/v1/notifications/read": {
            "put": _op(
                "Mark several or all read",
                200,
                tag="inbox",
                body={
                    "type": "object",
                    "properties": {
                        "ids": {"type": "array", "items": {"type": "string"}},
                        "all": {"type": "boolean"},
                    },
                },
            )
        },
        "/api/v1/notifications/{id}": {
            "get": _op("One notification", 200, tag="inbox", params=[_ID], errors=(401, 404)),
            "delete": _op("Delete one", 204, tag="inbox", params=[_ID], errors=(401, 404)),
        },
        "/api/v1/notifications/{id}/read": {
            "put": _op(
                "Mark one read (idempotent)", 200, tag="inbox", params=[_ID], errors=(401, 404)
            )
        },
        "/api/v1/stats": {
            "get": _op(
                "Stats (API key or admin JWT)",
                200,
                tag="operations",
                params=[_q("tenant", {"type": "string"})],
            )
        },
        "/api/v1/presence": {
            "get": _op(
                "Users online in a tenant",
                200,
                tag="operations",
                params=[_q("tenant", {"type": "string"})],
            )
        },
        "/api/v1/presence/{user_id}": {
            "get": _op(
                "Is a user online",
                200,
                tag="operations",
                params=[
                    {
                        "name": "user_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
            )
        },
        "/api/v1/disconnect": {
            "post": _op(
                "Close a user's connections on every instance",
                200,
                tag="operations",
                body={
                    "type": "object",
                    "required": ["user"],
                    "properties": {"tenant": {"type": "string"}, "user": {"type": "string"}},
                },
            )
        },
        "/healthz": {"get": _op("The process serves", 200, tag="operations", errors=())},
        "/readyz": {"get": _op("Broker and database answer", 200, tag="operations", errors=(503,))},
    },
}

_DOCS = """<!doctype html><html><head><meta charset="utf-8"><title>tidings API</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css">
</head><body><div id="ui"><p>Interactive docs load Swagger UI from a CDN; the description
itself is at <a href="openapi.json">openapi.json</a>.</p></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>window.onload = () => SwaggerUIBundle({url: "openapi.json", dom_id: "#ui"});</script>
</body></html>"""


async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(SPEC)


async def docs(request: Request) -> HTMLResponse:
    return HTMLResponse(_DOCS)


routes = [
    Route("/openapi.json", openapi, methods=["GET"]),
    Route("/docs", docs, methods=["GET"]),
]
