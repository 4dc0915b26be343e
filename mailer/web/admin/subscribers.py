"""Subscribers: search and filter, one subscriber's history, erase (GDPR)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import func, select

from mailer import privacy
from mailer.models import Subscriber, SubscriberEvent, SubscriberStatus
from mailer.subscriptions import has_control, search
from mailer.web.admin.session import Post, Signed, admin_router, log, redirect, render
from mailer.web.context import get_ctx
from mailer.web.deps import Offset, SubscriberId

PAGE_SIZE = 50

router = admin_router()


@router.get("/subscribers", response_class=HTMLResponse)
async def subscribers_page(
    request: Request,
    admin: Signed,
    q: Annotated[str, Query(max_length=320)] = "",
    status: Annotated[str, Query(max_length=20)] = "",
    offset: Offset = 0,
) -> Response:
    ctx = get_ctx(request)
    q = "".join(" " if has_control(ch) else ch for ch in q)  # NUL would break PostgreSQL
    wanted = status if status in {s.value for s in SubscriberStatus} else ""
    async with ctx.runtime.sessions() as session:
        by_status = dict(
            (s, int(n))
            for s, n in await session.execute(
                select(Subscriber.status, func.count()).group_by(Subscriber.status)
            )
        )
        matching, rows = await search(
            session,
            status=wanted or None,
            contains=q.strip().lower(),
            limit=PAGE_SIZE,
            offset=offset,
            newest_first=True,
        )
    counts = {s.value: by_status.get(s.value, 0) for s in SubscriberStatus}
    return render(
        request,
        "subscribers.html",
        admin,
        section="subscribers",
        counts=counts,
        total=sum(by_status.values()),
        rows=rows,
        matching=matching,
        q=q,
        status_filter=wanted,
        offset=offset,
        page_size=PAGE_SIZE,
        statuses=[s.value for s in SubscriberStatus],
    )


@router.get("/subscribers/{subscriber_id}", response_class=HTMLResponse)
async def subscriber_page(request: Request, subscriber_id: SubscriberId, admin: Signed) -> Response:
    async with get_ctx(request).runtime.sessions() as session:
        sub = await session.get(Subscriber, subscriber_id)
        if sub is None:
            return render(
                request,
                "error.html",
                admin,
                404,
                heading="No such subscriber",
                message=f"There is no subscriber #{subscriber_id}; they may have been erased.",
            )
        events = list(
            await session.scalars(
                select(SubscriberEvent)
                .where(SubscriberEvent.subscriber_id == subscriber_id)
                .order_by(SubscriberEvent.id)
            )
        )
    return render(request, "subscriber.html", admin, section="subscribers", sub=sub, events=events)


@router.post("/subscribers/{subscriber_id}/erase", response_class=HTMLResponse)
async def erase(request: Request, subscriber_id: SubscriberId, posted: Post) -> Response:
    ctx = get_ctx(request)
    async with ctx.runtime.sessions() as session:
        erased = await privacy.erase_subscriber(session, ctx.runtime.settings, subscriber_id)
    if not erased:
        return redirect(
            request, "/admin/subscribers", f"Subscriber #{subscriber_id} does not exist.", "error"
        )
    log.info("admin: editor %s erased subscriber %s", posted.admin.editor_id, subscriber_id)
    return redirect(
        request,
        "/admin/subscribers",
        f"Subscriber #{subscriber_id} erased: their address and history are gone, and the "
        "address is on the suppression list.",
    )
