"""Helpers shared by the test modules: reading state back (rows in SQL, links in received
mail), seeding, driving the editor API, worker processes, and waiting for a condition.

Test modules import from here (and from smtpserver), never from each other.
"""

from __future__ import annotations

import asyncio
import csv
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis
from forkrun import MailerProcess, run_mailer, spawn_mailer
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, text

from mailer.config import Settings
from mailer.db import make_engine, make_sessionmaker
from mailer.models import Subscriber, SubscriberEvent


async def sql(settings: Settings, query: str, **params: Any) -> list[tuple[Any, ...]]:
    engine = make_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(text(query), params)
            return [tuple(r) for r in result]
    finally:
        await engine.dispose()


async def table_counts(settings: Settings) -> dict[str, int]:
    tables = ["subscribers", "subscriber_events", "statements", "blasts", "deliveries"]
    out = {}
    for table in tables:
        rows = await sql(settings, f"SELECT count(*) FROM {table}")  # noqa: S608
        out[table] = int(rows[0][0])
    return out


async def subscriber(settings: Settings, email: str) -> Subscriber | None:
    engine = make_engine(settings.database_url)
    try:
        async with make_sessionmaker(engine)() as session:
            return await session.scalar(select(Subscriber).where(Subscriber.email == email))
    finally:
        await engine.dispose()


async def events(settings: Settings, subscriber_id: int) -> list[SubscriberEvent]:
    engine = make_engine(settings.database_url)
    try:
        async with make_sessionmaker(engine)() as session:
            rows = await session.scalars(
                select(SubscriberEvent)
                .where(SubscriberEvent.subscriber_id == subscriber_id)
                .order_by(SubscriberEvent.id)
            )
            return list(rows)
    finally:
        await engine.dispose()


async def count_subscribers(settings: Settings) -> int:
    engine = make_engine(settings.database_url)
    try:
        async with make_sessionmaker(engine)() as session:
            return int(await session.scalar(select(func.count()).select_from(Subscriber)) or 0)
    finally:
        await engine.dispose()


def find_link(body: str, kind: str) -> str:
    match = re.search(rf"https?://[^\s\"'<>]+/{kind}/[A-Za-z0-9_.\-]+", body)
    assert match, f"no /{kind}/ link in: {body[:500]}"
    return match.group(0)


def text_body(msg: Any) -> str:
    part = msg.get_body(preferencelist=("plain",))
    assert part is not None, "no text/plain part"
    return str(part.get_content())


async def seed_subscribers(
    settings: Settings,
    *,
    confirmed: int = 0,
    pending: int = 0,
    unsubscribed: int = 0,
    domain: str = "example.com",
    prefix: str = "",
) -> dict[str, list[str]]:
    """Insert subscribers directly (bulk), returning their addresses by status."""
    from mailer.db import utcnow

    out: dict[str, list[str]] = {"confirmed": [], "pending": [], "unsubscribed": []}
    rows = []
    now = utcnow()
    for status, n in (
        ("confirmed", confirmed),
        ("pending", pending),
        ("unsubscribed", unsubscribed),
    ):
        for i in range(n):
            email = f"{prefix}{status[:4]}{i:06d}@{domain}"
            out[status].append(email)
            rows.append({"email": email, "status": status, "created_at": now, "updated_at": now})
    engine = make_engine(settings.database_url)
    try:
        async with engine.begin() as conn:
            for start in range(0, len(rows), 5000):
                await conn.execute(Subscriber.__table__.insert(), rows[start : start + 5000])
    finally:
        await engine.dispose()
    return out


async def editor_token(settings: Settings, name: str = "editor") -> str:
    from mailer.editors import add_editor

    engine = make_engine(settings.database_url)
    try:
        async with make_sessionmaker(engine)() as session:
            return await add_editor(session, name)
    finally:
        await engine.dispose()


async def subscriber_ids(settings: Settings, emails: list[str]) -> dict[str, int]:
    engine = make_engine(settings.database_url)
    try:
        async with make_sessionmaker(engine)() as session:
            rows = await session.execute(
                select(Subscriber.email, Subscriber.id).where(Subscriber.email.in_(emails))
            )
            return {e: i for e, i in rows}
    finally:
        await engine.dispose()


def settings_env(settings: Settings) -> dict[str, str]:
    """The MAILER_* environment that reproduces ``settings`` in a subprocess."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        if isinstance(value, dict):
            value = ",".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ",".join(
                str(v.get_secret_value() if hasattr(v, "get_secret_value") else v) for v in value
            )
        elif hasattr(value, "value"):
            value = value.value
        env[f"MAILER_{name.upper()}"] = str(value)
    return env


async def within_one_limiter_window(seconds_needed: float = 20.0) -> None:
    """Start early enough in a clock minute for the requests to share one window.

    The per-IP sign-up limit counts in fixed one-minute windows (by design: one Redis
    INCR per request), so a test that counts 429s must not straddle a minute boundary.
    """
    import asyncio
    import time

    into = time.time() % 60
    if into > 60 - seconds_needed:
        await asyncio.sleep(60 - into + 0.05)


async def wait_until(
    predicate: Callable[[], Any], timeout: float = 20.0, step: float = 0.01, most: float = 0.25
) -> Any:
    """Poll an (async) predicate until it returns something truthy.

    For state that only shows from outside (mail arriving at the SMTP server, rows written
    by a worker process); a stage that can be run directly is better run directly. The
    pause between polls starts at ``step`` and grows to ``most``: a short wait ends within
    milliseconds, a long one does not spend the CPU it is waiting for on polling.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(step)
        step = min(most, step * 1.5)


async def queue_settled(settings: Settings, timeout: float = 30.0, horizon_s: float = 60) -> None:
    """Wait until every job queued so far, retries included, has run to its end.

    arq keeps a job in its queue until the job ends, and a job that queues more work does
    so before it ends, so a queue holding nothing but the reconciler's next cron entry (and
    jobs due more than ``horizon_s`` ahead, such as a blast for next year) has no work in
    hand: a deterministic stand-in for "wait a while and see that nothing more comes".
    """
    from mailer.worker import worker_settings

    cron = tuple(f"{job.name}:".encode() for job in worker_settings(settings)["cron_jobs"])
    client = aioredis.Redis.from_url(settings.redis_url)
    try:

        async def settled() -> bool:
            soon = (time.time() + horizon_s) * 1000
            jobs = await client.zrangebyscore(settings.queue_name, "-inf", soon)
            return all(job.startswith(cron) for job in jobs)

        await wait_until(settled, timeout=timeout, step=0.005, most=0.05)
    finally:
        await client.aclose()


async def clean_redis(redis: aioredis.Redis, queue: str) -> None:
    """Delete every key of one queue (ours are prefixed by its name, arq's contain it)."""
    for pattern in (f"{queue}*", f"arq:*:{queue}:*"):
        keys = [k async for k in redis.scan_iter(match=pattern, count=1000)]
        if keys:
            await redis.delete(*keys)


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


# The editor API ---------------------------------------------------------------------------


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def publish(client: httpx.AsyncClient, token: str, **fields: Any) -> int:
    body = {"title": "A statement", "body_markdown": "Hello **everyone**."} | fields
    r = await client.post("/api/statements", json=body, headers=auth(token))
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


async def blast(client: httpx.AsyncClient, token: str, statement_id: int, **extra: Any) -> int:
    r = await client.post(
        "/api/blasts", json={"statement_id": statement_id} | extra, headers=auth(token)
    )
    assert r.status_code == 202, r.text
    return int(r.json()["id"])


async def progress(client: httpx.AsyncClient, token: str, blast_id: int) -> dict[str, Any]:
    r = await client.get(f"/api/blasts/{blast_id}", headers=auth(token))
    assert r.status_code == 200, r.text
    return dict(r.json())


async def wait_status(
    client: httpx.AsyncClient, token: str, blast_id: int, status: str, timeout: float = 60
) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        p = await progress(client, token, blast_id)
        return p if p["status"] == status else None

    return dict(await wait_until(check, timeout=timeout, step=0.05))


async def reconcile_once(settings: Settings) -> None:
    """Run the reconciler once, here and now, as its cron job would."""
    from mailer import reconcile
    from mailer.queue import Queue
    from mailer.runtime import Runtime

    runtime = Runtime.create(settings)
    queue = await Queue.connect(settings)
    try:
        await reconcile.reconcile(runtime, queue)
    finally:
        await queue.close()
        await runtime.close()


async def wait_workers(client: httpx.AsyncClient, token: str, n: int) -> None:
    """Wait until ``n`` workers report in (a process start-up: slow on a busy machine)."""

    async def alive() -> bool:
        r = await client.get("/api/queue", headers=auth(token))
        return r.status_code == 200 and int(r.json()["workers"]) >= n

    await wait_until(alive, timeout=90, step=0.05, most=0.1)


# Worker processes -------------------------------------------------------------------------

MAILER = str(Path(sys.executable).parent / "mailer")


def start_worker_process(settings: Settings, log: Path) -> MailerProcess:
    """`mailer worker` in its own process (forked: tests/forkrun.py), its output appended
    to ``log``."""
    return spawn_mailer(["worker"], env=settings_env(settings), output=log, append=True)


def value(
    figures: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    matches = [v for lab, v in figures.get(name, []) if labels.items() <= lab.items()]
    assert matches, f"no sample {name}{labels}"
    return sum(matches)


async def scrape(client: httpx.AsyncClient) -> dict[str, list[tuple[dict[str, str], float]]]:
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=")
    return samples(r.text)


async def rows(settings: Settings) -> list[tuple[Any, ...]]:
    return await sql(
        settings,
        "SELECT kind, subscriber_id, blast_id, evidence, source FROM bounce_events ORDER BY id",
    )


async def status_of(settings: Settings, email: str) -> str:
    sub = await subscriber(settings, email)
    assert sub is not None
    return str(sub.status)


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of a scrape by sample name; parsing it is itself the format check."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


CHROMIUM = "/usr/bin/chromium"


CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def csrf_of(html: str) -> str:
    match = CSRF.search(html)
    assert match, "no CSRF field in the page"
    return match.group(1)


async def login(client: httpx.AsyncClient, token: str) -> httpx.Response:
    r = await client.post("/admin/login", data={"token": token})
    assert r.status_code == 303 and r.headers["location"] == "/admin/statements", r.text
    return r


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise AssertionError(f"mailer dev exited early ({proc.returncode}):\n{out}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("mailer dev did not become ready")


def mailer(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`mailer ARGS` with ``settings``, in a process forked with mailer imported (forkrun)."""
    return run_mailer(list(args), env=settings_env(settings) | env, timeout=60)


CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


async def sending_blast(settings: Settings, emails: list[str]) -> tuple[int, dict[str, int]]:
    """A blast already sending to ``emails`` (subscribers that exist), every delivery row
    claimed (status 'sending', under a lease) as a batch holds them: the blast's id and
    each address's delivery id."""
    from datetime import timedelta

    from sqlalchemy import insert

    from mailer.db import utcnow
    from mailer.models import Blast, Delivery, Statement

    ids = await subscriber_ids(settings, emails)
    engine = make_engine(settings.database_url)
    try:
        async with engine.begin() as conn:
            statement_id = await conn.scalar(
                insert(Statement)
                .values(title="t", body_markdown="b", body_html="<p>b</p>", body_text="b")
                .returning(Statement.id)
            )
            blast_id = int(
                await conn.scalar(
                    insert(Blast)
                    .values(statement_id=statement_id, status="sending", total=len(ids))
                    .returning(Blast.id)
                )
                or 0
            )
            lease = utcnow() + timedelta(seconds=settings.delivery_lease_s)
            deliveries = {}
            for email in emails:
                deliveries[email] = int(
                    await conn.scalar(
                        insert(Delivery)
                        .values(
                            blast_id=blast_id,
                            subscriber_id=ids[email],
                            status="sending",
                            attempts=0,
                            lease_until=lease,
                        )
                        .returning(Delivery.id)
                    )
                    or 0
                )
    finally:
        await engine.dispose()
    return blast_id, deliveries


def tampered(token: str) -> str:
    """``token`` with its last character changed, so it can never equal the real one
    (replacing the end with fixed characters gave the real token back when it already
    ended in them: 1 run in 256)."""
    return token[:-1] + ("1" if token[-1] == "0" else "0")
