"""Shared fixtures: real Redis, real SMTP (aiosmtpd), SQLite and PostgreSQL, real uvicorn.

Each test gets its own database (a fresh SQLite file or a fresh PostgreSQL
database) and its own queue name, which prefixes every Redis key it touches.
Services that are missing make the test fail, never skip. The ``isolation`` plugin
makes sure no test ever sees another test's fixtures (see docs/testing.md).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import shutil
import ssl
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
import uvicorn
from arq.worker import Worker
from helpers import clean_redis
from pgpool import PgPool
from smtpserver import SmtpServer, free_port

from mailer.config import Settings, load_settings
from mailer.db import make_engine
from mailer.migrate import upgrade
from mailer.web.app import create_app
from mailer.worker import worker_settings

pytest_plugins = ["isolation", "pytester"]

# The suite sees the same settings on every machine: none of the developer's MAILER_*
# variables (MAILER_TEST_* name the services) and no .env file, here or in the `mailer`
# processes tests start (they inherit this environment).
for _name in [
    n for n in os.environ if n.startswith("MAILER_") and not n.startswith("MAILER_TEST_")
]:
    del os.environ[_name]
os.environ["MAILER_ENV_FILE"] = os.devnull


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slowest tests first (``@pytest.mark.slow(seconds)``), the rest in file order.

    Under xdist (``--dist load --maxschedchunk 1``) each worker takes the next test as it
    frees up, so the long tests start at once and the short ones fill the gaps: the run
    ends when the work does, not when the last long test, started late, ends.
    """

    def seconds(item: pytest.Item) -> float:
        mark = item.get_closest_marker("slow")
        return float(mark.args[0]) if mark and mark.args else 0.0

    items.sort(key=lambda item: -seconds(item))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Everything imported and collected lives until the run ends: out of the cyclic
    collector's sight, so its full passes no longer walk every module, class and test item
    again (collection took 10.1 s of a pytest worker's CPU before, 7.0 after, on the same
    100 tests; docs/testing.md)."""
    gc.collect()
    gc.freeze()


REDIS_URL = os.environ.get("MAILER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_DSN = os.environ.get("MAILER_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def pg_url(database: str) -> str:
    base = PG_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{database}"


@dataclass(frozen=True)
class Templates:
    sqlite: Path  # a migrated SQLite file
    postgres: str  # the name of a migrated PostgreSQL database


# Database URLs that come migrated (copies of the templates): `settings` skips the upgrade.
MIGRATED: set[str] = set()


async def _pg_admin(statement: str) -> None:
    admin = await asyncpg.connect(PG_DSN)
    try:
        await admin.execute(statement)
    finally:
        await admin.close()


@pytest.fixture(scope="session")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Templates]:
    """Both databases migrated once per session (per xdist worker); tests get copies.

    A copy costs a file copy (SQLite) or ``CREATE DATABASE … TEMPLATE`` (PostgreSQL)
    instead of running every migration again for each of some 300 tests. The migrations
    themselves still run on both databases here, and `mailer migrate` is tested on its own.
    """
    sqlite = tmp_path_factory.mktemp("template") / "mailer.db"
    name = f"mailer_template_{uuid.uuid4().hex[:12]}"

    async def build() -> None:
        await _pg_admin(f'CREATE DATABASE "{name}"')
        for url in (f"sqlite+aiosqlite:///{sqlite}", pg_url(name)):
            engine = make_engine(url)
            try:
                await upgrade(engine)
            finally:
                await engine.dispose()

    asyncio.run(build())
    assert not sqlite.with_name("mailer.db-wal").exists(), "copy the WAL too"
    yield Templates(sqlite, name)
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def pg_pool(templates: Templates) -> Iterator[PgPool]:
    """Copies of the PostgreSQL template, emptied and renamed between tests."""
    pool = PgPool(PG_DSN, templates.postgres)
    yield pool
    asyncio.run(pool.close())


@pytest.fixture(params=["sqlite", "postgres"])
async def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh database with no schema at all, for tests of the migrations themselves."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
        return
    name = f"mailer_empty_{uuid.uuid4().hex[:12]}"
    await _pg_admin(f'CREATE DATABASE "{name}"')
    try:
        yield pg_url(name)
    finally:
        await _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
async def db_url(
    request: pytest.FixtureRequest, tmp_path: Path, templates: Templates, pg_pool: PgPool
) -> AsyncIterator[str]:
    """A fresh, migrated database for this test alone."""
    if request.param == "sqlite":
        path = tmp_path / "mailer.db"
        shutil.copyfile(templates.sqlite, path)
        url = f"sqlite+aiosqlite:///{path}"
        MIGRATED.add(url)
        yield url
        return
    name = await pg_pool.take()  # empty, migrated, renamed for this test (tests/pgpool.py)
    url = pg_url(name)
    MIGRATED.add(url)
    try:
        yield url
    finally:
        await pg_pool.give_back(name)


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer().start()
    yield server
    server.stop()


@pytest.fixture
async def redis() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL)
    await client.ping()  # fails loudly when Redis is down
    yield client
    await client.aclose()


@pytest.fixture
def web_port() -> int:
    return free_port()


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    """Override per test with @pytest.mark.parametrize("settings_overrides", [{...}])."""
    return {}


@pytest.fixture
async def settings(
    db_url: str,
    smtp: SmtpServer,
    redis: aioredis.Redis,
    web_port: int,
    tmp_path: Path,
    settings_overrides: dict[str, Any],
) -> AsyncIterator[Settings]:
    queue = f"test-{uuid.uuid4().hex[:10]}"
    s = load_settings(
        env="dev",
        database_url=db_url,
        redis_url=REDIS_URL,
        queue_name=queue,
        smtp_host="127.0.0.1",
        smtp_port=smtp.port,
        smtp_timeout_s=30,  # a busy test process is slow to answer; no test waits on it
        smtp_connections=4,
        base_url=f"http://127.0.0.1:{web_port}",
        secret_key="test-secret-key-0123456789abcdef-0123",
        retry_base_s=0.05,
        reconcile_interval_s=1,
        batch_size=50,
        dev_inbox_dir=tmp_path / "inbox",
        subscribe_limit_per_minute=1000,
        delivery_lease_s=5,
    ).model_copy(
        update={
            k: v.format(port=web_port) if isinstance(v, str) else v
            for k, v in settings_overrides.items()
        }
    )
    if db_url not in MIGRATED:  # a test's own db_url fixture
        engine = make_engine(db_url)
        await upgrade(engine)
        await engine.dispose()
    yield s
    await clean_redis(redis, queue)


@pytest.fixture(scope="session")
def tls_ca() -> Any:
    import trustme

    return trustme.CA()


@functools.cache
def _default_tls() -> ssl.SSLContext:
    """One client TLS context for every plain-http ``live`` client: httpx would load the
    CA bundle for each client (25 ms of CPU), though none of them speaks TLS."""
    return ssl.create_default_context()


@pytest.fixture
async def live(
    settings: Settings, web_port: int, tls_ca: Any, tmp_path: Path
) -> AsyncIterator[httpx.AsyncClient]:
    """The app served by uvicorn on a real socket (TLS when BASE_URL is https), and a client."""
    tls: dict[str, Any] = {}
    verify: Any = _default_tls()
    if settings.base_url.startswith("https://"):
        cert = tls_ca.issue_cert("127.0.0.1", "localhost")
        cert.private_key_pem.write_to_path(tmp_path / "key.pem")
        cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
        tls = {"ssl_keyfile": str(tmp_path / "key.pem"), "ssl_certfile": str(tmp_path / "cert.pem")}
        tls_ca.cert_pem.write_to_path(tmp_path / "ca.pem")
        verify = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=web_port, log_config=None, **tls
        )
    )
    task = asyncio.create_task(server.serve())
    for _ in range(200):
        if server.started:
            break
        await asyncio.sleep(0.02)
    assert server.started, "uvicorn did not start"
    async with httpx.AsyncClient(base_url=settings.base_url, timeout=10, verify=verify) as client:
        yield client
    server.should_exit = True
    await task


@pytest.fixture
async def app_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app over ASGI (no socket), lifespan included."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 5000))
        async with httpx.AsyncClient(transport=transport, base_url=settings.base_url) as client:
            yield client


class InProcessWorker(Worker):
    """arq's Worker, with a ``close()`` that ends its running jobs and cannot trip over them.

    arq's own ``close()`` cancels the running jobs and then gathers them without
    ``return_exceptions``, so a job still running (its Redis pipeline cancelled) raises
    ``CancelledError`` out of it, and the pool and ``on_shutdown`` are never closed.
    Here the jobs and the main loop are cancelled and awaited first, the cancellation
    they answer with is expected and absorbed, and only then does arq close the rest.
    Anything else a job task or the main loop ended with is a real error and is raised
    (as an ``Exception``) once everything is closed.
    """

    async def close(self) -> None:
        self.allow_pick_jobs = False
        tasks = [t for t in self.tasks.values() if not t.done()]
        if self.main_task is not None:
            tasks.append(self.main_task)
        for task in tasks:
            task.cancel()
        ended = await asyncio.gather(*tasks, return_exceptions=True)
        self.tasks.clear()  # all done: arq's close() has nothing left to gather
        await super().close()
        errors = [
            e
            for e in ended
            if isinstance(e, BaseException) and not isinstance(e, asyncio.CancelledError)
        ]
        if errors:
            raise RuntimeError(f"the test worker ended with {errors!r}") from errors[0]


@pytest.fixture
async def start_worker(settings: Settings) -> AsyncIterator[Callable[..., Any]]:
    """Start in-process arq workers; all are closed at the end of the test."""
    workers: list[tuple[InProcessWorker, asyncio.Task[None]]] = []

    async def _start(**overrides: Any) -> InProcessWorker:
        s = overrides.pop("settings", settings)
        worker = InProcessWorker(**worker_settings(s, handle_signals=False, **overrides))
        task = asyncio.create_task(worker.async_run())
        workers.append((worker, task))
        return worker

    yield _start
    errors: list[BaseException] = []
    for worker, task in workers:
        try:
            await worker.close()
        except Exception as exc:  # noqa: BLE001 - close every worker, then report
            errors.append(exc)
        await asyncio.gather(task, return_exceptions=True)  # cancelled by close()
    if errors:
        raise errors[0]
