"""The FastAPI application: public pages, editor API, admin UI and ops endpoints.

``create_app(settings)`` builds a fresh app for each process (and each test), so
nothing global leaks between configurations.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from mailer.config import Env, Settings
from mailer.errors import one_line
from mailer.queue import Queue
from mailer.render import Renderer
from mailer.runtime import Runtime
from mailer.web import admin, api, api_bounces, ops, public, site_form, webhooks
from mailer.web.context import AppContext
from mailer.web.cors import site_origins
from mailer.web.deps import ApiError
from mailer.web.guards import Guards, security_headers

STATIC = Path(__file__).resolve().parent / "static"
# FastAPI's words for a body it could not decode (not UTF-8, nested too deep).
_UNPARSABLE = "There was an error parsing the body"


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime.create(settings)
        queue = await Queue.connect(settings)
        templates = Jinja2Templates(directory=str(settings.templates_dir / "web"))
        templates.env.globals["base_url"] = settings.base_url
        app.state.ctx = AppContext(
            runtime=runtime, queue=queue, templates=templates, renderer=Renderer(settings)
        )
        try:
            yield
        finally:
            await queue.close()
            await runtime.close()

    # No /docs or /redoc: those pages need inline and third-party scripts, which the CSP
    # forbids. The OpenAPI document itself stays at /openapi.json.
    app = FastAPI(title="mailer", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    # One middleware for the form's CORS, the body limit and the security headers (one
    # wrapped send per request, not three): mailer/web/guards.py.
    app.add_middleware(
        Guards,
        limit=settings.max_body_bytes,
        headers=security_headers(settings.base_url),
        origins=sorted(site_origins(settings)),
    )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = one_line(exc, where=lambda loc: ".".join(p for p in loc if p != "body"))
        return JSONResponse({"detail": detail or "invalid request"}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400 and exc.detail == _UNPARSABLE:
            return JSONResponse(
                {"detail": "body: is not valid JSON (it must be UTF-8 text, not nested too deep)"},
                422,
            )
        return await http_exception_handler(request, exc)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, exc.status, headers=exc.headers)

    app.router.routes.insert(0, public.SIGNUP_ROUTE)  # the sign-up's short way in
    app.include_router(public.router)
    app.include_router(site_form.router)
    app.include_router(api.router)
    app.include_router(api_bounces.router)
    app.include_router(ops.router)
    app.include_router(admin.router)
    app.include_router(webhooks.router)
    if settings.env is Env.dev:
        from mailer.web import devinbox
        from mailer.web.admin import devlogin

        app.include_router(devinbox.router)
        app.include_router(devlogin.router)
    return app
