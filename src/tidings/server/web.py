"""The browser side: `/tidings.js`, the demo inbox `/demo` and the admin dashboard `/admin`.

The pages are static files in ``tidings/web/``. The demo (and its dev-token endpoint)
is on when ``TIDINGS_DEMO`` is true, or unset and the server runs in dev mode (no JWT
key configured, loopback). `POST /demo/token` mints tokens with the dev secret, so it
answers only in dev mode, whatever ``TIDINGS_DEMO`` says.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..auth import MAX_ID_LENGTH, mint_token
from ..config import Settings
from ..errors import Forbidden, InvalidRequest, NotFound
from .http import JSONResponse, json_body, state

DEMO_TOKEN_TTL_S = 12 * 3600.0
_HTML_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@cache
def asset(name: str) -> bytes:
    """A file of the ``tidings.web`` package data (read once)."""
    return files("tidings").joinpath("web", name).read_bytes()


def demo_enabled(settings: Settings) -> bool:
    return settings.demo if settings.demo is not None else settings.dev_mode


async def tidings_js(request: Request) -> Response:
    return Response(
        asset("tidings.js"),
        media_type="application/javascript; charset=utf-8",
        headers={"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff"},
    )


async def demo(request: Request) -> Response:
    if not demo_enabled(state(request).settings):
        raise NotFound("the demo is off (TIDINGS_DEMO, on by default in dev mode)")
    return Response(
        asset("demo.html"), media_type="text/html; charset=utf-8", headers=_HTML_HEADERS
    )


async def demo_token(request: Request) -> JSONResponse:
    """``{"user", "tenant"?}`` → ``{"token"}``: a dev token that may also publish."""
    settings = state(request).settings
    if not demo_enabled(settings):
        raise NotFound("the demo is off (TIDINGS_DEMO, on by default in dev mode)")
    if not settings.dev_mode or settings.jwt_secret is None:
        raise Forbidden("demo tokens are minted only in dev mode (no JWT key configured)")
    body = await json_body(request)
    user = body.get("user") if isinstance(body, dict) else None
    tenant = body.get("tenant", "") if isinstance(body, dict) else ""
    if not isinstance(user, str) or not 0 < len(user) <= MAX_ID_LENGTH:
        raise InvalidRequest(f'the body is {{"user": "<1–{MAX_ID_LENGTH} characters>"}}')
    if not isinstance(tenant, str) or len(tenant) > MAX_ID_LENGTH:
        raise InvalidRequest("`tenant` must be a string")
    token = mint_token(
        settings.jwt_secret.get_secret_value(),
        user,
        tenant=tenant,
        publish=True,
        name=user,
        ttl_s=DEMO_TOKEN_TTL_S,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
    )
    return JSONResponse({"token": token}, headers={"Cache-Control": "no-store"})


async def admin_page(request: Request) -> Response:
    return Response(
        asset("admin.html"), media_type="text/html; charset=utf-8", headers=_HTML_HEADERS
    )


routes = [
    Route("/tidings.js", tidings_js, methods=["GET"]),
    Route("/demo", demo, methods=["GET"]),
    Route("/demo/token", demo_token, methods=["POST"]),
    Route("/admin", admin_page, methods=["GET"]),
]
