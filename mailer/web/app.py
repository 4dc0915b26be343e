"""The FastAPI application: public pages, editor API, admin UI and ops endpoints.

``create_app(settings)`` builds a fresh app for each process (and each test), so
nothing global leaks between configurations.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from mailer.config import Env, Settings
from mailer.render import Renderer
from mailer.runtime import Runtime
from mailer.web import admin, api, ops, public
from mailer.web.context import AppContext
from mailer.worker import Queue

STATIC = Path(__file__).resolve().parent / "static"

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


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

    app = FastAPI(title="mailer", version="0.1.0", lifespan=lifespan)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.middleware("http")
    async def security_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            return JSONResponse(
                {"detail": f"request body larger than {settings.max_body_bytes} bytes"},
                status_code=413,
            )
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return JSONResponse({"detail": "; ".join(problems) or "invalid request"}, 422)

    @app.exception_handler(api.ApiError)
    async def api_error(request: Request, exc: api.ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, exc.status, headers=exc.headers)

    app.include_router(public.router)
    app.include_router(api.router)
    app.include_router(ops.router)
    app.include_router(admin.router)
    if settings.env is Env.dev:
        from mailer.web import devinbox

        app.include_router(devinbox.router)
    return app
