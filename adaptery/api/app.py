"""The FastAPI application: routers, error shape, static files, and the platform's lifetime."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adaptery import __version__
from adaptery.api import (
    adapters,
    admin,
    agents,
    arena,
    conversations,
    datasets,
    evaluations,
    fabric,
    federations,
    feedback,
    keys,
    lineage,
    members,
    sharing,
    sso,
    web,
)
from adaptery.api import metrics as engine_metrics
from adaptery.api import model_names as names
from adaptery.api.errors import install_error_handlers
from adaptery.api.guards import RequestGuard
from adaptery.api.openai import chat, embeddings, files, jobs, models
from adaptery.platform import Platform

# The page loads only its own scripts and styles; no framing, no sniffing, no referrer leaks.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}


class SecurityHeaders:
    """SECURITY_HEADERS (and HSTS over https) on every HTTP answer that does not set its own, as plain ASGI.

    Not Starlette's `BaseHTTPMiddleware` (`@app.middleware("http")`): that one relays every body chunk through a
    memory stream and runs each `receive()` in a task group of its own, whose cancellation formats the task's repr
    (anyio 4.16); with a token per server-sent event, that was a third of the event loop's time while streaming.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        https = scope.get("scheme") == "https"

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
                if https:
                    headers.setdefault("Strict-Transport-Security", "max-age=31536000")
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(platform: Platform, *, manage_lifecycle: bool = True) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if manage_lifecycle:
            platform.start_background()
        try:
            yield
        finally:
            if manage_lifecycle:
                platform.stop()

    # No /docs: Swagger UI would load from a CDN, and the platform works offline. The schema is /openapi.json.
    app = FastAPI(title="Adaptery", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.platform = platform
    app.add_middleware(RequestGuard, settings=platform.settings)
    app.add_middleware(SecurityHeaders)  # outside the guard: its refusals get them too

    install_error_handlers(app)
    for module in (models, files, jobs, chat, embeddings, datasets, adapters, keys, web, engine_metrics):
        app.include_router(module.router)
    for module in (admin, sharing, agents, fabric, lineage):
        app.include_router(module.router)
    for module in (conversations, members, federations, sso, feedback, arena, evaluations, names):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=web.STATIC_DIR), name="static")
    return app
