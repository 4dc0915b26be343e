"""What a flush of the recorder writes to ``deliveries``: its statements, built once.

Built once (per dialect for the id lists, ``db.ids_in``), SQLAlchemy finds each compiled
form by identity instead of building a construct and its cache key on every flush
(docs/recording.md). ``sent_then`` puts the usual flush and a read in one statement, so a
send that has to wait for a flush gets its re-check in the same round trip.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BindParameter, Select, bindparam, update

from mailer.db import ids_in
from mailer.models import Delivery, DeliveryStatus

_ID: BindParameter[int] = bindparam("b_id", type_=Delivery.id.type)
_NOW = bindparam("b_now", type_=Delivery.sent_at.type)
SENT = {
    postgres: update(Delivery)
    .where(ids_in(Delivery.id, "b_ids", postgres=postgres))
    .values(
        status=DeliveryStatus.sent,
        sent_at=_NOW,
        lease_until=None,
        attempts=Delivery.attempts + 1,
    )
    for postgres in (False, True)
}
SKIPPED = {
    postgres: update(Delivery)
    .where(ids_in(Delivery.id, "b_ids", postgres=postgres))
    .values(status=DeliveryStatus.skipped, lease_until=None)
    for postgres in (False, True)
}
FAILED = (
    update(Delivery)
    .where(Delivery.id == _ID)
    .values(
        status=DeliveryStatus.failed,
        attempts=Delivery.attempts + bindparam("b_tried"),
        lease_until=None,
        last_code=bindparam("b_code"),
        last_error=bindparam("b_error"),
    )
)
RETRY = (
    update(Delivery)
    .where(Delivery.id == _ID)
    .values(
        status=DeliveryStatus.pending,
        next_attempt_at=bindparam("b_next", type_=Delivery.next_attempt_at.type),
        attempts=Delivery.attempts + 1,
        lease_until=None,
        last_code=bindparam("b_code"),
        last_error=bindparam("b_error"),
    )
)


_THEN: dict[int, tuple[Select[*tuple[Any, ...]], Select[*tuple[Any, ...]]]] = {}


def sent_then(read: Select[*tuple[Any, ...]]) -> Select[*tuple[Any, ...]]:
    """The usual flush on PostgreSQL (``SENT``: one UPDATE of the rows just sent) and then
    ``read``, as one statement: ``WITH flushed AS (UPDATE …) SELECT …``.

    PostgreSQL runs a data-modifying WITH exactly once, whether or not the SELECT reads
    it, and the statement commits as a whole, so the rows are written before anything
    that follows this round trip; the SELECT sees everything committed before the
    statement began, as it would alone. Built once per ``read`` (kept alive here), so the
    compiled form is cached too (``driver_sql.DriverStatement.cached``).
    """
    found = _THEN.get(id(read))
    if found is None:
        flushed = SENT[True].cte("flushed")
        found = _THEN[id(read)] = (read, read.add_cte(flushed))
    return found[1]
