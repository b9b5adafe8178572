"""The HTTP app: ``build_app(settings)`` wires the scheduler, the serving
layer and one router per API (server/routes/), with errors in TGI's shape.

Routes: TGI's ``/``, ``/generate``, ``/generate_stream`` and ``/tokenize``;
OpenAI's ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``;
vLLM's ``/tokenize``, ``/detokenize`` and ``/tokenizer_info``; ``/health``,
``/info``, ``/metrics``; ``/docs`` (Swagger UI served from the installed
swagger-ui-bundle, so it works offline).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from treespec import __version__

from .http import ApiError, error_response
from .metrics import Metrics
from .routes import openai, ops, tgi
from .scheduler import LoadCancelled, Scheduler
from .serving import Serving
from .settings import Settings

log = logging.getLogger("treespec.server")

GENERATE_ROUTES = ("/", "/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions")
# How an ApiError's status is counted in treespec_request_failure.
FAILURE_REASON = {401: "unauthorized", 413: "too_large", 415: "validation", 422: "validation", 400: "validation",
                  429: "overloaded", 499: "disconnected", 503: "unavailable"}


def build_app(settings: Settings, *, scheduler: Scheduler | None = None, metrics: Metrics | None = None,
              load: bool = True, on_load_failed: Callable[[], None] | None = None,
              on_ready: Callable[[], None] | None = None) -> FastAPI:
    """The app. With ``load`` the lifespan loads the bundle in a thread (so
    /health answers 503 until it is ready, and ``on_ready`` runs once it is)
    and stops the scheduler on shutdown."""
    metrics = metrics or (scheduler.metrics if scheduler else Metrics())
    scheduler = scheduler or Scheduler(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = None
        if load:
            async def load_in_thread():
                try:
                    await asyncio.to_thread(scheduler.load)
                except LoadCancelled:  # stopped while loading: the shutdown is under way
                    return
                except Exception:
                    if on_load_failed is not None:
                        on_load_failed()
                    return
                if on_ready is not None and scheduler.ready:  # not if a shutdown began as it finished
                    on_ready()
            loader = asyncio.create_task(load_in_thread())
        try:
            yield
        finally:
            if loader is not None and not loader.done():
                await asyncio.wait([loader], timeout=settings.graceful_timeout_s + 60)
            await asyncio.to_thread(scheduler.shutdown, settings.graceful_timeout_s)

    app = FastAPI(title="treespec", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler, app.state.metrics, app.state.settings = scheduler, metrics, settings
    app.state.serving = Serving(scheduler, settings, metrics)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    for router in (tgi.router, openai.router, ops.router):
        app.include_router(router)
    _mount_docs(app)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        if e.counted and request.url.path in GENERATE_ROUTES:
            metrics.failure.labels(getattr(request.state, "drafter", "unknown"),
                                   FAILURE_REASON.get(e.status, "internal")).inc()
        return error_response(e.status, e.error, e.error_type, e.headers, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http")
        return error_response(e.status_code, str(e.detail), kind, getattr(e, "headers", None), request.url.path)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        if request.url.path in GENERATE_ROUTES:
            metrics.failure.labels(getattr(request.state, "drafter", "unknown"), "internal").inc()
        return error_response(500, f"Internal server error: {type(e).__name__}: {e}", "internal",
                              path=request.url.path)

    return app


def _mount_docs(app: FastAPI) -> None:
    """Swagger UI from the installed swagger-ui-bundle, so /docs works
    without the internet (FastAPI's default loads it from a CDN)."""
    from swagger_ui_bundle import swagger_ui_path

    app.mount("/docs-assets", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="treespec API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")

    @app.get("/redoc", include_in_schema=False)
    async def redoc():
        # ReDoc has no offline package to serve it from: say where the docs are.
        return HTMLResponse('<!doctype html><title>treespec API</title><p>This server serves its API docs '
                            'offline at <a href="/docs">/docs</a> (Swagger UI); the schema is at '
                            '<a href="/openapi.json">/openapi.json</a>.</p>')
