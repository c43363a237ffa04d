"""The FastAPI application: routers, error shape, static files, and the platform's lifetime."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.staticfiles import StaticFiles

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
    app.add_middleware(RequestGuard, settings=platform.settings)  # inside security_headers: its refusals get them

    @app.middleware("http")
    async def security_headers(request: Request, call_next):  # noqa: ANN001, ANN202 - Starlette's signature
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if request.url.scheme == "https":
            response.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
        return response

    install_error_handlers(app)
    for module in (models, files, jobs, chat, embeddings, datasets, adapters, keys, web, engine_metrics):
        app.include_router(module.router)
    for module in (admin, sharing, agents, fabric, lineage):
        app.include_router(module.router)
    for module in (conversations, members, federations, sso, feedback, arena, evaluations, names):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=web.STATIC_DIR), name="static")
    return app
