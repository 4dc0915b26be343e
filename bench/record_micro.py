"""Micro-benchmark: one flush of the recorder (mailer/record.py), statements and time.

    python bench/record_micro.py [--flushes 300] [--repeats 3] [--baseline REV] [--db both]

Each flush writes FLUSH_EVERY (20) outcomes of one blast, all rows in status 'sending',
in one of three mixes:

- ``common``: 16 sent, 2 skipped, 1 retry (451), 1 failed without a code (an address that
  cannot be put on the wire): a blast going well;
- ``greylist``: 10 sent, 10 retry (451): a receiving domain deferring everyone;
- ``refusals``: 14 sent, 1 skipped, 2 retry, 1 failed without a code, 1 hard refusal
  (550 5.1.1: a bounce event, the subscriber bounced) and 1 policy refusal (554: a bounce
  event and the blast's policy counter). Pause thresholds are set out of reach, so every
  flush does the same work.

For each database (a SQLite file, a PostgreSQL database ``mailer_bench_*`` created and
dropped here) and mix it prints, per flush: SQL statements sent to the driver (an
executemany counts once), transactions (COMMITs), wall and CPU milliseconds
(``time.process_time`` of this process: the worker's share), median over the repeats.
``--baseline REV`` compares: each repeat runs the whole ``mailer`` package as it was at REV
(``git archive``, first on PYTHONPATH) and then this checkout's, each in a process of its
own and on a fresh database, so both meet the same neighbours on a shared machine.
``--show`` prints the SQL of one flush of each mix.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import event, insert, literal, select, update

from mailer.config import load_settings
from mailer.db import make_engine, utcnow
from mailer.migrate import upgrade
from mailer.models import Blast, BlastStatus, Delivery, DeliveryStatus, Statement, Subscriber
from mailer.runtime import Runtime
from mailer.stats import OutcomeStatus

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("MAILER_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_DSN = os.environ.get("MAILER_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
SIZE = 20
MIXES = ("common", "greylist", "refusals")


def mix(kind: str) -> list[tuple[str, int | None, str | None, bool]]:
    """(status, code, error, policy) for the 20 outcomes of one flush."""
    sent = (OutcomeStatus.sent, None, None, False)
    skipped = (OutcomeStatus.skipped, None, None, False)
    retry = (OutcomeStatus.retry, 451, "4.7.1 greylisted, try again later", False)
    unsendable = (OutcomeStatus.failed, None, "address cannot be put on the wire", False)
    hard = (OutcomeStatus.failed, 550, "5.1.1 user unknown", False)
    policy = (OutcomeStatus.failed, 554, "5.7.1 rejected by policy", True)
    if kind == "common":
        return [sent] * 16 + [skipped] * 2 + [retry] + [unsendable]
    if kind == "greylist":
        return [sent] * 10 + [retry] * 10
    return [sent] * 14 + [skipped, retry, retry, unsendable, hard, policy]


@dataclass
class Database:
    name: str
    url: str
    drop: Callable[[], Any]


async def make_database(kind: str, tmp: Path) -> Database:
    if kind == "sqlite":
        path = tmp / "bench.db"
        return Database("sqlite", f"sqlite+aiosqlite:///{path}", lambda: None)
    name = f"mailer_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()

    async def drop() -> None:
        admin = await asyncpg.connect(PG_DSN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    base = PG_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return Database("postgres", f"{base}/{name}", drop)


async def seed(url: str, rows: int) -> int:
    """A sending blast with ``rows`` confirmed subscribers and delivery rows; its id."""
    engine = make_engine(url)
    try:
        await upgrade(engine)
        now = utcnow()
        async with engine.begin() as conn:
            statement = await conn.scalar(
                insert(Statement)
                .values(title="t", body_markdown="b", body_html="<p>b</p>", body_text="b")
                .returning(Statement.id)
            )
            blast = await conn.scalar(
                insert(Blast)
                .values(statement_id=statement, status=BlastStatus.sending, total=rows)
                .returning(Blast.id)
            )
            subs = [
                {"email": f"s{i:07d}@example.com", "status": "confirmed",
                 "created_at": now, "updated_at": now}
                for i in range(rows)
            ]  # fmt: skip
            for start in range(0, rows, 5000):
                await conn.execute(insert(Subscriber), subs[start : start + 5000])
            await conn.execute(
                Delivery.__table__.insert().from_select(
                    ["blast_id", "subscriber_id", "status", "attempts"],
                    select(
                        literal(blast),
                        Subscriber.id,
                        literal(DeliveryStatus.sending.value),
                        literal(0),
                    ).order_by(Subscriber.id),
                )
            )
        return int(blast or 0)
    finally:
        await engine.dispose()


class Counter:
    """Statements and transactions seen by one engine (SQLAlchemy events)."""

    def __init__(self, engine: Any) -> None:
        self.statements = 0
        self.commits = 0
        self.log: list[str] = []  # what one flush sent, for --show
        sync = engine.sync_engine
        event.listen(sync, "before_cursor_execute", self._statement)
        event.listen(sync, "commit", self._commit)

    def _statement(self, conn: Any, cursor: Any, sql: str, *args: Any) -> None:
        many = " (executemany)" if args and args[-1] else ""
        self.log.append(" ".join(sql.split())[:110] + many)
        if not sql.lstrip().upper().startswith("BEGIN"):  # SQLite's BEGIN IMMEDIATE
            self.statements += 1

    def _commit(self, conn: Any) -> None:
        self.log.append("COMMIT")
        self.commits += 1


@dataclass
class Figures:
    statements: float
    commits: float
    wall_ms: float
    cpu_ms: float


async def run_flushes(
    record: Any,
    runtime: Runtime,
    counter: Counter,
    blast_id: int,
    ids: list[tuple[int, int]],
    kind: str,
    show: bool = False,
) -> Figures:
    plan = mix(kind)
    assert len(plan) == SIZE
    recorder = record.Recorder(runtime)
    statements, commits = counter.statements, counter.commits
    wall = cpu = 0.0
    flushes = 0
    for start in range(0, len(ids) - SIZE + 1, SIZE):
        chunk = ids[start : start + SIZE]
        later = utcnow() + timedelta(minutes=5)
        recorder.buffer = [
            record.Outcome(
                blast_id, delivery_id, subscriber_id, status, code, error,
                next_attempt_at=later if status == OutcomeStatus.retry else None,
                policy=policy,
            )
            for (delivery_id, subscriber_id), (status, code, error, policy)
            in zip(chunk, plan, strict=True)
        ]  # fmt: skip
        counter.log.clear()
        w, c = time.perf_counter(), time.process_time()
        await recorder.flush()
        wall += time.perf_counter() - w
        cpu += time.process_time() - c
        flushes += 1
        if show and flushes == 2:  # the second: a blast's first refusal differs a little
            print(f"--- one flush, mix {kind}:", *counter.log, sep="\n    ")
    return Figures(
        (counter.statements - statements) / flushes,
        (counter.commits - commits) / flushes,
        wall / flushes * 1000,
        cpu / flushes * 1000,
    )


async def reset(runtime: Runtime, blast_id: int) -> None:
    """Every row back to 'sending', every subscriber confirmed, no bounce stored."""
    from mailer.models import StoredBounce, SubscriberEvent

    async with runtime.engine.begin() as conn:
        await conn.execute(
            update(Delivery)
            .values(status=DeliveryStatus.sending, attempts=0, lease_until=utcnow(),
                    sent_at=None, last_code=None, last_error=None, next_attempt_at=None)
        )  # fmt: skip
        await conn.execute(update(Subscriber).values(status="confirmed", bounced_at=None))
        await conn.execute(StoredBounce.__table__.delete())
        await conn.execute(SubscriberEvent.__table__.delete())
        await conn.execute(
            update(Blast)
            .where(Blast.id == blast_id)
            .values(status=BlastStatus.sending, policy_failures=0, reason=None)
        )


async def bench_database(kind: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every mix on one fresh database, ``args.repeats`` times: one result per mix."""
    import mailer.record as record

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        db = await make_database(kind, Path(tmp))
        try:
            rows = args.flushes * SIZE
            blast_id = await seed(db.url, rows)
            settings = load_settings(
                env="dev",
                database_url=db.url,
                redis_url=REDIS_URL,
                queue_name=f"bench-record-{uuid.uuid4().hex[:8]}",
                secret_key="bench-secret-key-0123456789abcdef-0123",
                policy_failures_pause=10**9,
                bounce_pause_min_sent=10**9,
                soft_bounce_limit=1000,
            )
            runtime = Runtime.create(settings)
            counter = Counter(runtime.engine)
            try:
                async with runtime.engine.connect() as conn:
                    ids = [
                        (int(r[0]), int(r[1]))
                        for r in await conn.execute(
                            select(Delivery.id, Delivery.subscriber_id).order_by(Delivery.id)
                        )
                    ]
                for mix_kind in MIXES:
                    figures = []
                    for repeat in range(args.repeats):
                        await reset(runtime, blast_id)
                        figures.append(
                            await run_flushes(
                                record, runtime, counter, blast_id, ids, mix_kind,
                                show=args.show and repeat == 0,
                            )
                        )  # fmt: skip
                    out.append({
                        "db": kind,
                        "mix": mix_kind,
                        "statements": figures[0].statements,
                        "commits": figures[0].commits,
                        "wall_ms": [f.wall_ms for f in figures],
                        "cpu_ms": [f.cpu_ms for f in figures],
                    })  # fmt: skip
                await runtime.redis.delete(
                    runtime.keys.counters, runtime.keys.blast_counters, runtime.keys.sent_log,
                    runtime.keys.smtp_latency,
                )  # fmt: skip
            finally:
                await runtime.close()
        finally:
            result = db.drop()
            if asyncio.iscoroutine(result):
                await result
    return out


def child(args: argparse.Namespace, db: str, pythonpath: str | None) -> list[dict[str, Any]]:
    """One run in a process of its own, on the ``mailer`` found first on ``pythonpath``."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run(
        [sys.executable, __file__, "--json", "--repeats", "1", "--flushes", str(args.flushes),
         "--db", db],
        env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return list(json.loads(done.stdout))


def print_row(name: str, r: dict[str, Any], runs: int, flushes: int) -> None:
    print(
        f"{r['db']:8} {r['mix']:8} {name:10} "
        f"statements {r['statements']:5.1f}  commits {r['commits']:3.1f}  "
        f"wall ms {statistics.median(r['wall_ms']):6.2f}  "
        f"cpu ms {statistics.median(r['cpu_ms']):6.2f}  "
        f"(median of {runs} x {flushes} flushes)",
        flush=True,
    )


def compare(args: argparse.Namespace, dbs: tuple[str, ...]) -> None:
    """The mailer of git revision ``args.baseline`` against this one, run by run in turn."""
    with tempfile.TemporaryDirectory() as tree:
        archive = subprocess.run(
            ["git", "archive", args.baseline, "mailer"], cwd=ROOT, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        variants = {f"@{args.baseline}": tree, "current": str(ROOT)}
        runs: dict[tuple[str, str, str], dict[str, Any]] = {}
        for _ in range(args.repeats):
            for db in dbs:
                for name, path in variants.items():
                    for r in child(args, db, path):
                        key = (r["db"], r["mix"], name)
                        if key in runs:
                            runs[key]["wall_ms"] += r["wall_ms"]
                            runs[key]["cpu_ms"] += r["cpu_ms"]
                        else:
                            runs[key] = r
    for db in dbs:
        for mix_kind in MIXES:
            for name in variants:
                print_row(name, runs[(db, mix_kind, name)], args.repeats, args.flushes)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flushes", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", help="also run mailer as of this git revision, in turn")
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--show", action="store_true", help="print the SQL of one flush")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # a child
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the recorder's one line per failure, per flush
    dbs = ("sqlite", "postgres") if args.db == "both" else (args.db,)
    if not args.json:
        print(f"python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.2f}")
    if args.baseline:
        compare(args, dbs)
        return
    results = [r for db in dbs for r in await bench_database(db, args)]
    if args.json:
        print(json.dumps(results))
        return
    for r in results:
        print_row("current", r, args.repeats, args.flushes)


if __name__ == "__main__":
    asyncio.run(main())
