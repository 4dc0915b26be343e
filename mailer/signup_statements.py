"""The SQL of a sign-up (mailer/subscriptions.py), built once as Core statements.

Module-level constructs with named parameters: SQLAlchemy compiles each once per
dialect and finds it in its cache by identity afterwards, where building a statement per
request (or going through an ORM session) cost more CPU than the round trips themselves
(docs/design.md, "The sign-up request"). Parameter names start with ``p_`` because
SQLAlchemy reserves the column names for the VALUES and SET clauses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

from sqlalchemy import String, Table, Text, bindparam, literal, or_, select, update
from sqlalchemy import insert as core_insert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

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


class DriverStatement(NamedTuple):
    """A statement compiled by SQLAlchemy for one dialect, to run on the driver itself.

    For asyncpg, SQLAlchemy's execute path (execution context, cursor adapter, result)
    and its async pool wrapper cost about 150 µs of CPU per call around a statement
    asyncpg runs in under 80 (bench/analysis.md, "Round two, step 3"). The SQL, the order
    of its parameters, their fixed values and the bind processors of their types
    (``UTCDateTime``) all still come from SQLAlchemy, so the statement is the same one.
    """

    sql: str
    names: tuple[str, ...]
    fixed: dict[str, Any]
    processors: tuple[Callable[[Any], Any] | None, ...]

    @classmethod
    def compile(cls, statement: ClauseElement, dialect: Dialect) -> DriverStatement:
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect))
        names = tuple(compiled.positiontup or ())
        processors = tuple(
            compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)
            for name in names
        )
        return cls(str(compiled), names, dict(compiled.params), processors)

    def args(self, values: dict[str, Any]) -> list[Any]:
        """The positional arguments for ``values`` (named as in the statement)."""
        merged = {**self.fixed, **values}
        return [
            merged[name] if process is None else process(merged[name])
            for name, process in zip(self.names, self.processors, strict=True)
        ]


_COMPILED: dict[type[Dialect], DriverStatement] = {}


def pg_signup_for(dialect: Dialect) -> DriverStatement:
    """``PG_SIGNUP`` for this dialect, compiled on first use (one per dialect class)."""
    found = _COMPILED.get(type(dialect))
    if found is None:
        found = _COMPILED[type(dialect)] = DriverStatement.compile(PG_SIGNUP, dialect)
    return found
