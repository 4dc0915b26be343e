"""``GET /api/bounces``: the bounce log for scripts, filtered as in the admin UI.

Every stored report (``mailer/bounces/``): bounces, complaints, policy refusals, and
the reports that changed nothing (``ignored``, ``unmatched``), newest first. The
per-blast counts and rates are on ``GET /api/blasts/{id}`` (``bounces``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from mailer.bounces import stats
from mailer.models import BounceKind, StoredBounce
from mailer.web.context import MAX_SQL_INT, get_ctx
from mailer.web.deps import EDITOR_ERRORS, ApiError, EditorDep, EditorRoute, Offset

router = APIRouter(prefix="/api", responses=EDITOR_ERRORS, route_class=EditorRoute)


def _event_json(e: StoredBounce, email: str | None) -> dict[str, Any]:
    return {
        "id": e.id,
        "kind": e.kind,
        "blast_id": e.blast_id,
        "subscriber_id": e.subscriber_id,
        "email": email,
        "status": e.status,
        "code": e.code,
        "diagnostic": e.diagnostic,
        "report": e.report,
        "source": e.source,
        "evidence": e.evidence,
        "note": e.note,
        "paused_blast": e.paused_blast,
        "raw_size": e.raw_size,
        "received_at": e.received_at.isoformat(),
    }


@router.get("/bounces")
async def list_bounces(
    request: Request,
    _: EditorDep,
    blast_id: Annotated[int | None, Query(ge=1, le=MAX_SQL_INT)] = None,
    kind: BounceKind | None = None,
    subscriber_id: Annotated[int | None, Query(ge=1, le=MAX_SQL_INT)] = None,
    since: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Offset = 0,
) -> dict[str, Any]:
    """Stored bounce and complaint reports, newest first; ``since`` is an ISO 8601 time
    (UTC when it names no zone)."""
    if since is not None:
        try:
            since = since.replace(tzinfo=UTC) if since.tzinfo is None else since.astimezone(UTC)
        except OverflowError:
            raise ApiError(422, "query.since: is out of range once converted to UTC") from None
    ctx = get_ctx(request)
    async with ctx.runtime.sessions() as session:
        events = await stats.log(
            session,
            blast_id=blast_id,
            kind=kind.value if kind else None,
            subscriber_id=subscriber_id,
            since=since,
            limit=limit,
            offset=offset,
        )
        emails = await stats.emails_of(session, events)
    items = [
        _event_json(e, emails.get(e.subscriber_id) if e.subscriber_id else None) for e in events
    ]
    return {"limit": limit, "offset": offset, "items": items}
