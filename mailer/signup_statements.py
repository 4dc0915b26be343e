"""The SQL of a sign-up (mailer/subscriptions.py), built once as Core statements.

Module-level constructs with named parameters: SQLAlchemy compiles each once per
dialect and finds it in its cache by identity afterwards, where building a statement per
request (or going through an ORM session) cost more CPU than the round trips themselves
(docs/design.md, "The sign-up request"). Parameter names start with ``p_`` because
SQLAlchemy reserves the column names for the VALUES and SET clauses.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import String, Table, Text, bindparam, literal, or_, select, update
from sqlalchemy import insert as core_insert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Dialect

from mailer.driver_sql import DriverStatement
from mailer.models import Subscriber, SubscriberEvent, SubscriberStatus, UTCDateTime

_SUBS = cast(Table, Subscriber.__table__)
_EVENTS = cast(Table, SubscriberEvent.__table__)


def _new_row(insert: Any) -> Any:
    """INSERT a pending row unless the address exists, returning its id (None: it does)."""
    return (
        insert(_SUBS)
        .values(
            email=bindparam("p_email", type_=String()),
            name=bindparam("p_name", type_=String()),
            status=SubscriberStatus.pending.value,
            created_at=bindparam("p_now", type_=UTCDateTime()),
            updated_at=bindparam("p_now", type_=UTCDateTime()),
            confirm_due_at=bindparam("p_due", type_=UTCDateTime()),
        )
        .on_conflict_do_nothing(index_elements=["email"])
        .returning(_SUBS.c.id)
    )


def _event_columns(subscriber_id: Any, kind: Any) -> list[Any]:
    return [
        subscriber_id,
        kind,
        bindparam("p_now", type_=UTCDateTime()),
        bindparam("p_ip", type_=String()),
        bindparam("p_ua", type_=String()),
        bindparam("p_detail", type_=Text()),
    ]


_EVENT_NAMES = ["subscriber_id", "kind", "at", "ip", "user_agent", "detail"]
_PG_NEW = _new_row(pg_insert).cte("new_subscriber")
# PostgreSQL: the row and its "signup" event in one statement; the id, or no row.
PG_SIGNUP = (
    core_insert(_EVENTS)
    .from_select(_EVENT_NAMES, select(*_event_columns(_PG_NEW.c.id, literal("signup"))))
    .returning(_EVENTS.c.subscriber_id)
)
SQLITE_NEW = _new_row(sqlite_insert)
# Any sign-up event: the kind and the subscriber are bound per call.
EVENT = core_insert(_EVENTS).values(
    dict(
        zip(
            _EVENT_NAMES,
            _event_columns(
                bindparam("p_sid", type_=_EVENTS.c.subscriber_id.type),
                bindparam("p_kind", type_=String()),
            ),
            strict=True,
        )
    )
)
FIND = select(_SUBS.c.id, _SUBS.c.status).where(_SUBS.c.email == bindparam("p_email"))
ASKED_AGAIN = (
    update(_SUBS)
    .where(_SUBS.c.id == bindparam("p_sid"))
    .values(resubscribe_requested_at=bindparam("p_now", type_=UTCDateTime()))
)
# Owe the mail unless one is owed already or went out within the cooldown.
CLAIM = (
    update(_SUBS)
    .where(_SUBS.c.id == bindparam("p_sid"), _SUBS.c.confirm_due_at.is_(None))
    .where(
        or_(
            _SUBS.c.confirm_sent_at.is_(None),
            _SUBS.c.confirm_sent_at < bindparam("p_cutoff", type_=UTCDateTime()),
        )
    )
    .values(confirm_due_at=bindparam("p_now", type_=UTCDateTime()), confirm_attempts=0)
)


def pg_signup_for(dialect: Dialect) -> DriverStatement:
    """``PG_SIGNUP`` for this dialect, compiled on first use (one per dialect class)."""
    return DriverStatement.cached(PG_SIGNUP, dialect)
