"""Ops endpoints: liveness, readiness (Redis and SQL), Prometheus metrics, queue figures.

``/healthz`` and ``/readyz`` are open, because load balancers carry no token; ``/metrics``
is open unless ``MAILER_METRICS_TOKEN`` is set (Prometheus can send a bearer token).
Keep them reachable from the monitoring network only (docs/deploy.md).
``/api/queue`` names workers and blasts, so it wants an editor token like the editor API.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from mailer.db import readonly
from mailer.ops.figures import queue_overview
from mailer.ops.prometheus import Exporter
from mailer.web.context import get_ctx
from mailer.web.deps import EDITOR_ERRORS, EditorDep

router = APIRouter()


def _exporter(app: FastAPI) -> Exporter:
    """The app's own registry, made on first scrape so app.py needs no wiring for it."""
    exporter = getattr(app.state, "metrics_exporter", None)
    if not isinstance(exporter, Exporter):
        exporter = app.state.metrics_exporter = Exporter()
    return exporter


def _metrics_allowed(request: Request, expected: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), expected.encode())


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    ctx = get_ctx(request)
    token = ctx.runtime.settings.metrics_token
    if token is not None and not _metrics_allowed(request, token.get_secret_value()):
        return Response(
            "metrics need Authorization: Bearer <MAILER_METRICS_TOKEN>\n",
            401,
            media_type="text/plain",
            headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
        )
    body = await _exporter(request.app).render(ctx.runtime, ctx.queue)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/api/queue", responses=EDITOR_ERRORS)
async def api_queue(request: Request, _: EditorDep) -> dict[str, Any]:
    ctx = get_ctx(request)
    return await queue_overview(ctx.runtime, ctx.queue)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Redis or SQL is unreachable"}})
async def readyz(request: Request) -> JSONResponse:
    ctx = get_ctx(request)
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(ctx.runtime.redis.ping(), 2)
        checks["redis"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
        checks["redis"] = f"unavailable: {type(exc).__name__}"
    try:  # read-only: a flood of probes never queues for SQLite's write lock
        async with readonly(ctx.runtime.engine).connect() as conn:
            await asyncio.wait_for(conn.execute(text("SELECT 1")), 2)
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["database"] = f"unavailable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"ready": ready, **checks}, 200 if ready else 503)
