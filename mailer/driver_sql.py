"""Statements SQLAlchemy compiled, run by the driver itself (asyncpg) on a pooled connection.

For asyncpg, SQLAlchemy's execute path (execution context, cursor adapter, result) and
its async pool wrapper cost about 150 µs of CPU per call around a statement asyncpg runs
in under 80 (bench/analysis.md, "Round two, step 3"). The statements that run for every
sign-up and for every few messages of a blast (the send-time re-check, the recorder's
usual flush) skip that path on asyncpg; the others, and SQLite, keep it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, NamedTuple, cast

from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

_COMPILED: dict[tuple[int, type[Dialect]], DriverStatement] = {}


class DriverStatement(NamedTuple):
    """A statement compiled by SQLAlchemy for one dialect, to run on the driver itself.

    The SQL, the order of its parameters, their fixed values and the bind processors of
    their types (``UTCDateTime``) all still come from SQLAlchemy, so the statement is the
    same one.
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

    @classmethod
    def cached(cls, statement: ClauseElement, dialect: Dialect) -> DriverStatement:
        """``compile``, once per statement (built once, at import) and dialect class."""
        key = (id(statement), type(dialect))
        found = _COMPILED.get(key)
        if found is None:
            found = _COMPILED[key] = cls.compile(statement, dialect)
        return found


def on_driver(engine: AsyncEngine) -> bool:
    """Whether this engine's statements can skip SQLAlchemy's execute path (asyncpg)."""
    return engine.dialect.driver == "asyncpg"


@asynccontextmanager
async def driver_connection(engine: AsyncEngine) -> AsyncIterator[Any]:
    """asyncpg's own connection, checked out of the engine's pool, outside any transaction
    (each statement commits by itself). One that raised is never reused: SQLAlchemy did
    not see it fail, so it is invalidated instead of going back to the pool."""
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        try:
            yield raw
        except BaseException:
            await conn.invalidate()
            raise


async def fetch(
    engine: AsyncEngine, statement: DriverStatement, values: dict[str, Any]
) -> list[Any]:
    """Run ``statement`` on the driver, and return its rows (asyncpg ``Record``s)."""
    async with driver_connection(engine) as raw:
        return cast(list[Any], await raw.fetch(statement.sql, *statement.args(values)))


async def execute(engine: AsyncEngine, statement: DriverStatement, values: dict[str, Any]) -> None:
    """Run ``statement``, which returns no rows, on the driver."""
    async with driver_connection(engine) as raw:
        await raw.execute(statement.sql, *statement.args(values))
