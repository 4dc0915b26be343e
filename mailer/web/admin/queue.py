"""The queue panel: queue depth, workers' jobs and a chart of the last hour's sends."""

from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sqlalchemy import func, select

from mailer import blasts
from mailer.models import Blast
from mailer.stats import sent_per_minute
from mailer.web.admin.session import Signed, admin_router, render
from mailer.web.context import get_ctx

router = admin_router()


@router.get("/queue", response_class=HTMLResponse)
async def queue_page(request: Request, admin: Signed) -> Response:
    return render(
        request,
        "queue.html",
        admin,
        section="queue",
        rate_limit=get_ctx(request).runtime.settings.rate_per_second,
    )


@router.get("/queue.json")
async def queue_json(request: Request, _: Signed) -> JSONResponse:
    ctx = get_ctx(request)
    now = int(time.time())
    stats = await ctx.queue.stats()
    start = (now // 60 - 59) * 60
    series = await sent_per_minute(ctx.runtime.redis, ctx.runtime.keys, now)
    per_minute = [{"minute": start + i * 60, "sent": n} for i, n in enumerate(series)]
    async with ctx.runtime.sessions() as session:
        active = await session.scalar(
            select(func.count()).select_from(Blast).where(Blast.status.in_(blasts.ACTIVE))
        )
    return JSONResponse(
        {
            **stats,
            "active_blasts": int(active or 0),
            "per_minute": per_minute,
            "sent_last_hour": sum(m["sent"] for m in per_minute),
            "rate_limit_per_second": ctx.runtime.settings.rate_per_second,
            "now": now,
        }
    )
