"""Engine and session factory.

SQLite is the embedded default and is shared by the web process and the
workers, so every write transaction starts with ``BEGIN IMMEDIATE``: a deferred
transaction that later tries to write can fail with "database is locked"
without waiting, while an immediate one queues behind ``busy_timeout``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ARRAY, ColumnElement, any_, bindparam, event
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import InstrumentedAttribute

READONLY = "mailer_readonly"


def utcnow() -> datetime:
    return datetime.now(UTC)


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def make_engine(url: str, **kwargs: Any) -> AsyncEngine:
    if not is_sqlite(url):
        # A worker has many sessions in flight (batch jobs × lanes); a small pool opened
        # and closed overflow connections all through a blast (30 at most per process keeps
        # a few processes within PostgreSQL's default 100). No pre-ping: it doubled the
        # transactions per message (docs/benchmarks.md); recycling covers stale connections.
        kwargs.setdefault("pool_size", 20)
        kwargs.setdefault("max_overflow", 10)
        kwargs.setdefault("pool_recycle", 1800)
        return create_async_engine(url, **kwargs)

    engine = create_async_engine(url, connect_args={"timeout": 30}, **kwargs)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Reads (see ``readonly``) never wait for the write lock; in WAL mode they see the
        # last committed state without blocking anyone.
        readonly = conn.get_execution_options().get(READONLY, False)
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

    return engine


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def readonly(engine: AsyncEngine) -> AsyncEngine:
    """The same engine for sessions that only read (no write lock taken on SQLite)."""
    return engine.execution_options(**{READONLY: True})


def ids_in(column: InstrumentedAttribute[int], name: str, *, postgres: bool) -> ColumnElement[bool]:
    """``column`` is one of the ids bound as ``name`` (a list), in a form compiled once.

    An expanding ``IN`` is rendered again for every execution, one placeholder (and on
    PostgreSQL one cast) per id: on the send path that was about 5 % of a worker's CPU
    (bench/analysis.md, step 9). PostgreSQL takes the list as one array parameter,
    ``= ANY($1::INTEGER[])``; SQLite has no arrays and keeps the ``IN``.
    """
    if postgres:
        return column == any_(bindparam(name, type_=ARRAY(column.type)))
    return column.in_(bindparam(name, expanding=True))


def single_writes(engine: AsyncEngine) -> AsyncEngine | None:
    """The engine for a write that is a single statement, such as the recorder's usual
    flush (one UPDATE of the rows just sent). On PostgreSQL it runs in AUTOCOMMIT: a
    single statement is atomic by itself, and asyncpg then sends no BEGIN and no COMMIT
    (one round trip instead of three). Only for one statement: two or more belong in one
    transaction (``engine.begin()``). None on SQLite, where BEGIN is ours and costs no
    round trip: write in a transaction there."""
    if engine.dialect.name == "sqlite":
        return None
    return engine.execution_options(isolation_level="AUTOCOMMIT")


def single_reads(engine: AsyncEngine) -> AsyncEngine:
    """The engine for a read that is a single statement, such as the send-time re-check
    (docs/design.md, invariant 3), which runs for every message of a rate-limited blast.

    On PostgreSQL it runs in AUTOCOMMIT: one round trip instead of three (asyncpg would
    send BEGIN, the SELECT, then ROLLBACK when the connection goes back to the pool). The
    statement sees the same thing either way: everything committed before it started,
    as the first statement of a READ COMMITTED transaction does; so an unsubscribe
    committed before the re-check still stops the message. The isolation level is set
    on the pooled connection at checkout and reset at checkin, in Python (no round
    trip). SQLite keeps its deferred read transaction: ``BEGIN`` there is ours (see
    ``make_engine``) and costs no round trip."""
    if engine.dialect.name == "sqlite":
        return readonly(engine)
    return engine.execution_options(isolation_level="AUTOCOMMIT", **{READONLY: True})
