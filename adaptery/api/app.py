"""The FastAPI application: routers, error shape, static files, and the platform's lifetime."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from adaptery import __version__
from adaptery.api import adapters, datasets, keys, web
from adaptery.api.errors import install_error_handlers
from adaptery.api.openai import chat, embeddings, files, jobs, models
from adaptery.platform import Platform


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

    app = FastAPI(title="Adaptery", version=__version__, lifespan=lifespan)
    app.state.platform = platform
    install_error_handlers(app)
    for module in (models, files, jobs, chat, embeddings, datasets, adapters, keys, web):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=web.STATIC_DIR), name="static")
    return app
