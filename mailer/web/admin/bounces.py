"""The bounce log: every bounce, complaint and ignored report, newest first, filterable by
blast and kind, a page at a time (``mailer.bounces.stats.log``).

The filters come from a GET form, so an empty field arrives as an empty string; a value
that is not a blast id or a kind gets a 422 page naming it rather than a silently
unfiltered list.
"""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import Request
from fastapi.responses import HTMLResponse, Response

from mailer.bounces import stats
from mailer.models import BounceKind
from mailer.web.admin.session import Flash, Signed, admin_router, render
from mailer.web.context import MAX_SQL_INT, get_ctx

PAGE_SIZE = 50
MAX_PAGE = 10_000
KINDS = [k.value for k in BounceKind]

router = admin_router()


class BadFilter(ValueError):
    pass


def _number(name: str, raw: str, *, low: int, high: int) -> int | None:
    raw = raw.strip()
    if not raw:
        return None
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise BadFilter(f"{name}: {raw[:40]!r} is not a number from {low} to {high}")
    return int(raw)


def _filters(blast: str, kind: str, page: str) -> tuple[int | None, str | None, int]:
    blast_id = _number("blast", blast.removeprefix("#"), low=1, high=MAX_SQL_INT)
    kind = kind.strip()
    if kind and kind not in KINDS:
        raise BadFilter(f"kind: {kind[:40]!r} is not one of {', '.join(KINDS)}")
    return blast_id, kind or None, _number("page", page, low=1, high=MAX_PAGE) or 1


@router.get("/bounces", response_class=HTMLResponse)
async def bounce_log(
    request: Request, admin: Signed, blast: str = "", kind: str = "", page: str = ""
) -> Response:
    status, flash = 200, None
    try:
        blast_id, wanted, number = _filters(blast, kind, page)
    except BadFilter as exc:
        status, flash = 422, Flash("error", f"Not filtered. {exc}")
        blast_id, wanted, number = None, None, 1
    async with get_ctx(request).runtime.sessions() as session:
        # One row more than a page tells whether there is a next page.
        events = await stats.log(
            session,
            blast_id=blast_id,
            kind=wanted,
            limit=PAGE_SIZE + 1,
            offset=(number - 1) * PAGE_SIZE,
        )
        emails = await stats.emails_of(session, events)
    more = len(events) > PAGE_SIZE

    def page_url(n: int) -> str:
        return "/admin/bounces?" + urlencode(
            {"blast": blast_id or "", "kind": wanted or "", "page": n}
        )

    return render(
        request,
        "bounces.html",
        admin,
        status,
        flash,
        section="bounces",
        rows=[{"e": e, "email": emails.get(e.subscriber_id or 0)} for e in events[:PAGE_SIZE]],
        blast_id=blast_id,
        kind=wanted or "",
        kinds=KINDS,
        page=number,
        newer=page_url(number - 1) if number > 1 else None,
        older=page_url(number + 1) if more else None,
    )
