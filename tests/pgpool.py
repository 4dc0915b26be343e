"""PostgreSQL databases for tests, reused: emptied between tests instead of made anew.

Creating a test's database from the migrated template and dropping it afterwards cost
PostgreSQL about 0.2 s of CPU, and the first connection to a new database about 0.24 s
more (the server builds that database's catalog cache from scratch). With some 170 tests
on PostgreSQL in a run, that was over a minute of a CPU-bound suite. Emptying a database
that has served a test costs about 0.08 s (docs/testing.md).

A test still gets a database that no other test uses, under a name no test had before:

- A database coming back has every session still connected to it ended, and every
  table but ``alembic_version`` emptied, identity sequences restarted, which is what a
  fresh copy of the template holds (the migrations insert no other rows).
- Handed out again, it is renamed first, so the guard in ``isolation.py`` sees a new URL
  for every test, and a process an earlier test left behind cannot reconnect to it by
  its old name.
- A database whose tables or migration version differ from the template's (a test
  changed its schema), or that cannot be emptied or renamed, is dropped, not reused.
"""

from __future__ import annotations

import uuid

import asyncpg

_TABLES = """SELECT string_agg(quote_ident(tablename), ', ' ORDER BY tablename)
             FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'"""
_VERSION = "SELECT string_agg(version_num, ',' ORDER BY version_num) FROM alembic_version"
_OTHERS = """SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()"""


class PgPool:
    """Migrated databases for the tests of one pytest process."""

    def __init__(self, dsn: str, template: str) -> None:
        self.dsn = dsn  # of the maintenance database, for CREATE/ALTER/DROP DATABASE
        self.template = template
        self.free: list[str] = []
        self._schema: tuple[str, str] | None = None  # the template's tables and version

    def _dsn_of(self, database: str) -> str:
        return f"{self.dsn.rsplit('/', 1)[0]}/{database}"

    async def _admin(self, statement: str) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    async def _drop(self, name: str) -> None:
        await self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    async def take(self) -> str:
        """The name of an empty, migrated database for one test."""
        name = f"mailer_test_{uuid.uuid4().hex[:12]}"
        while self.free:
            old = self.free.pop()
            try:
                await self._admin(f'ALTER DATABASE "{old}" RENAME TO "{name}"')
                return name
            except asyncpg.PostgresError:  # connected to since it came back
                await self._drop(old)
        await self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        if self._schema is None:  # read from a copy: a session on the template blocks copies
            self._schema = await self._schema_of(name)
        return name

    async def give_back(self, name: str) -> None:
        """End its sessions and empty it for the next test, or drop it."""
        try:
            conn = await asyncpg.connect(self._dsn_of(name))
        except (OSError, asyncpg.PostgresError):
            await self._drop(name)  # a test dropped or broke it
            return
        try:
            await conn.execute(_OTHERS)
            tables, version = await conn.fetchval(_TABLES), await conn.fetchval(_VERSION)
            reusable = self._schema is not None and (tables, version) == self._schema
            if reusable:
                # Waits for the sessions just ended to let go of their locks.
                await conn.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
        except asyncpg.PostgresError:
            reusable = False
        finally:
            await conn.close()
        if reusable:
            self.free.append(name)
        else:
            await self._drop(name)

    async def _schema_of(self, database: str) -> tuple[str, str]:
        conn = await asyncpg.connect(self._dsn_of(database))
        try:
            return await conn.fetchval(_TABLES), await conn.fetchval(_VERSION)
        finally:
            await conn.close()

    async def close(self) -> None:
        while self.free:
            await self._drop(self.free.pop())
