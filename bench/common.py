"""Shared pieces of the benchmark harness: processes, /proc readings, databases, Redis, sinks.

Everything under test runs in its own process (a ``mailer worker``, ``mailer serve``,
``smtp-sink``, ``smtp-source``), so CPU time and memory come from ``/proc/<pid>`` and the
harness never competes with the code it measures for the GIL.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PYTHON = sys.executable
MAILER = str(Path(sys.executable).parent / "mailer")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

REDIS_URL = os.environ.get("MAILER_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_DSN = os.environ.get("MAILER_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


# /proc --------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (threads included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_peak_bytes(pid: int) -> int:
    """VmHWM: the peak resident set size of the process so far."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def pids_named(*names: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm in names:
            out.append(int(entry))
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine from /proc/stat, all cores."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    total = sum(parts[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


@dataclass
class CpuWatch:
    """CPU seconds spent over a span by the processes under test and by their neighbours.

    PostgreSQL counts only the backends serving ``database`` (their command line names
    it), so other people's tests on the same server are left out; Redis is shared and
    counted whole.
    """

    pids: list[int]
    database: str = ""
    sink_pid: int | None = None
    start: dict[str, dict[int, float]] = field(default_factory=dict)
    wall0: float = 0.0
    machine0: tuple[float, float] = (0.0, 0.0)
    result: dict[str, float] = field(default_factory=dict)

    def _groups(self) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {"target": list(self.pids), "redis": []}
        groups["postgres"] = []
        for pid in pids_named("postgres", "redis-server"):
            line = cmdline(pid)
            if line.startswith("redis-server"):
                groups["redis"].append(pid)
            elif self.database and f" {self.database} " in line:
                groups["postgres"].append(pid)
        groups["sink"] = [self.sink_pid] if self.sink_pid else []
        return groups

    def _read(self) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for name, pids in self._groups().items():
            out[name] = {}
            for pid in pids:
                try:
                    out[name][pid] = cpu_seconds(pid)
                except OSError:
                    pass
        return out

    def begin(self) -> None:
        self.start = self._read()
        self.wall0 = time.perf_counter()
        self.machine0 = machine_busy()

    def end(self) -> dict[str, float]:
        now = self._read()
        busy, total = machine_busy()
        self.result = {
            name: sum(v - self.start.get(name, {}).get(pid, 0.0) for pid, v in values.items())
            for name, values in now.items()
        }
        self.result["wall"] = time.perf_counter() - self.wall0
        self.result["machine_busy"] = busy - self.machine0[0]
        return self.result


def load_average() -> tuple[float, float, float]:
    a, b, c = os.getloadavg()
    return a, b, c


# Processes ----------------------------------------------------------------------


def stop_process(proc: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    stop_processes([proc], timeout)


def stop_processes(procs: Sequence[subprocess.Popen[Any]], timeout: float = 30.0) -> None:
    """SIGTERM to every process first, then wait for each: their shutdowns (~0.5 s for a
    worker) overlap instead of adding up."""
    running = [proc for proc in procs if proc.poll() is None]
    for proc in running:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in running:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_quiet(pid: int, timeout: float = 30.0, window: float = 0.25) -> None:
    """Wait until a freshly started process has finished its imports and start-up work
    (uses under 15% of a core over a short window)."""
    deadline = time.monotonic() + timeout
    last = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(window)
        now = cpu_seconds(pid)
        if now - last < 0.15 * window:
            return
        last = now
    raise RuntimeError(f"process {pid} stayed busy for {timeout}s after start")


def mailer_env(settings: dict[str, Any]) -> dict[str, str]:
    """The environment of a ``mailer`` subprocess: ours minus MAILER_*, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    for key, value in settings.items():
        env[f"MAILER_{key.upper()}"] = str(value)
    return env


def spread(values: Sequence[float]) -> dict[str, float]:
    return {
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
        "n": float(len(values)),
    }


# Databases ----------------------------------------------------------------------


def pg_url(database: str) -> str:
    base = PG_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{database}"


async def pg_create(name: str, template: str = "") -> str:
    """A fresh, migrated database. With ``template`` (a migrated database nobody is
    connected to) PostgreSQL copies it instead of the migrations running again: the same
    tables, for a few ms of CPU instead of ~0.2 s of the caller's and the server's."""
    import asyncpg

    admin = await asyncpg.connect(PG_DSN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        copy = f' TEMPLATE "{template}"' if template else ""
        await admin.execute(f'CREATE DATABASE "{name}"{copy}')
    finally:
        await admin.close()
    url = pg_url(name)
    if not template:
        await migrate(url)
    return url


async def pg_drop(name: str) -> None:
    import asyncpg

    admin = await asyncpg.connect(PG_DSN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def pg_drop_stale(prefix: str = "mailer_bench_") -> list[str]:
    """Databases left by an interrupted earlier run (older than an hour by their name)."""
    import asyncpg

    admin = await asyncpg.connect(PG_DSN)
    try:
        names = [
            r[0]
            for r in await admin.fetch(
                "SELECT datname FROM pg_database WHERE datname LIKE $1", prefix + "%"
            )
        ]
    finally:
        await admin.close()
    dropped = []
    now = int(time.time())
    for name in names:
        m = re.match(re.escape(prefix) + r"(\d+)_", name)
        if m and now - int(m.group(1)) > 3600:
            await pg_drop(name)
            dropped.append(name)
    return dropped


async def migrate(url: str) -> None:
    from mailer.db import make_engine
    from mailer.migrate import upgrade

    engine = make_engine(url)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()


async def seed_confirmed(url: str, n: int, domain: str = "example.com") -> float:
    """Insert n confirmed subscribers by the fast path; returns the seconds it took.

    PostgreSQL: one INSERT … SELECT generate_series. SQLite: a recursive CTE.
    """
    from sqlalchemy import text

    from mailer.db import make_engine

    t0 = time.perf_counter()
    engine = make_engine(url)
    try:
        async with engine.begin() as conn:
            start = int(
                (await conn.execute(text("SELECT coalesce(max(id), 0) FROM subscribers"))).scalar()
                or 0
            )
            if url.startswith("postgresql"):
                await conn.execute(text("SET LOCAL synchronous_commit = off"))
                await conn.execute(
                    text(
                        "INSERT INTO subscribers (email, status, created_at, updated_at,"
                        " confirmed_at, consent_at, consent_source)"
                        " SELECT 'r' || g || '@' || :domain, 'confirmed', now(), now(), now(),"
                        " now(), 'bench'"
                        " FROM generate_series(CAST(:a AS bigint), CAST(:b AS bigint)) AS g"
                    ),
                    {"a": start + 1, "b": start + n, "domain": domain},
                )
            else:
                now = "strftime('%Y-%m-%d %H:%M:%f', 'now')"
                await conn.execute(
                    text(
                        "WITH RECURSIVE g(i) AS (SELECT :a UNION ALL SELECT i + 1 FROM g"
                        " WHERE i < :b) INSERT INTO subscribers (email, status, created_at,"
                        " updated_at, confirmed_at, consent_at, consent_source)"
                        f" SELECT 'r' || i || '@' || :domain, 'confirmed', {now}, {now}, {now},"
                        f" {now}, 'bench' FROM g"
                    ),
                    {"a": start + 1, "b": start + n, "domain": domain},
                )
        if url.startswith("postgresql"):
            async with engine.connect() as conn:
                await conn.execute(text("COMMIT"))
                await conn.execute(text("VACUUM ANALYZE subscribers"))
    finally:
        await engine.dispose()
    return time.perf_counter() - t0


async def pg_sessions(database: str) -> int:
    """Connections ever opened to one database (pg_stat_database.sessions, PostgreSQL 14+)."""
    import asyncpg

    conn = await asyncpg.connect(PG_DSN)
    try:
        return int(
            await conn.fetchval(
                "SELECT sessions FROM pg_stat_database WHERE datname = $1", database
            )
            or 0
        )
    finally:
        await conn.close()


async def pg_xacts(database: str) -> int:
    """Transactions committed or rolled back in one database so far (pg_stat_database).

    Backends publish their counts when they exit or go idle for a while, so read this
    after the processes under test have stopped."""
    import asyncpg

    conn = await asyncpg.connect(PG_DSN)
    try:
        return int(
            await conn.fetchval(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1",
                database,
            )
            or 0
        )
    finally:
        await conn.close()


async def sql(url: str, query: str, **params: Any) -> list[tuple[Any, ...]]:
    from sqlalchemy import text

    from mailer.db import make_engine

    engine = make_engine(url)
    try:
        async with engine.begin() as conn:
            result = await conn.execute(text(query), params)
            return [tuple(r) for r in result] if result.returns_rows else []
    finally:
        await engine.dispose()


STATEMENT_MD = "\n\n".join(
    [
        "We are publishing this statement to keep every supporter informed about the "
        "campaign, the next public meetings, and what each of us can do this week. " * 2
    ]
    * 4
) + (
    "\n\n- Come to the town hall on **Thursday**\n- Bring a friend\n- [Read more](https://example.org/news)\n"
)


async def create_statement(url: str, title: str = "A statement about the campaign") -> int:
    from mailer.db import make_engine, make_sessionmaker
    from mailer.statements import StatementIn, create_statement

    engine = make_engine(url)
    try:
        async with make_sessionmaker(engine)() as session:
            data = StatementIn(title=title, body_markdown=STATEMENT_MD, author="The team")
            statement = await create_statement(session, data, None)
            return int(statement.id)
    finally:
        await engine.dispose()


def sample_message_size(settings: dict[str, Any]) -> int:
    """Bytes on the wire of one blast message, so the reference sends the same size."""
    return len(sample_message(settings))


def sample_message(settings: dict[str, Any]) -> bytes:
    """One blast message as the worker builds it (the bench statement, one recipient)."""
    from mailer.config import load_settings
    from mailer.render import Renderer, StatementContent, make_message_id
    from mailer.runtime import Runtime
    from mailer.statements import render_markdown

    s = load_settings(**settings)
    html, text = render_markdown(STATEMENT_MD)
    content = StatementContent("A statement about the campaign", html, text, "The team", None)
    compiled = Renderer(s).compile_statement(content, blast_id=1)
    runtime = Runtime.create(s)
    return compiled.build(
        to="r123456@example.com",
        unsubscribe_url=runtime.unsubscribe_url(123456),
        message_id=make_message_id(s, 1, 123456),
    )


# Redis ---------------------------------------------------------------------------


async def clean_redis(queue: str) -> int:
    """Delete every key of one queue (ours and arq's); never anything else."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    deleted = 0
    try:
        for pattern in (f"{queue}*", f"arq:*:{queue}:*"):
            keys = [k async for k in client.scan_iter(match=pattern, count=5000)]
            for i in range(0, len(keys), 1000):
                deleted += int(await client.delete(*keys[i : i + 1000]))
    finally:
        await client.aclose()
    return deleted


async def wait_health(queue: str, timeout: float = 30.0) -> None:
    """arq writes ``<queue>:health-check`` once a worker has run its start-up."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await client.exists(f"{queue}:health-check"):
                return
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()
    raise RuntimeError(f"no worker reported healthy on queue {queue} within {timeout}s")


def new_queue(tag: str) -> str:
    return f"bench-{tag}-{uuid.uuid4().hex[:8]}"


# The SMTP sink -------------------------------------------------------------------


_MESG = re.compile(rb"mesg=(\d+)\r")


class Sink:
    """Postfix's smtp-sink (C), or the Python fallback that prints the same counters.

    Both print ``… mesg=N`` followed by a carriage return each time a message is
    accepted; a reader thread timestamps every change, which gives the arrival times for
    the rate figure and the totals that check every message arrived.
    """

    def __init__(self, *, python: bool = False, record_times: bool = False) -> None:
        """``record_times``: keep every arrival time. Then the sink and the thread that reads
        its counter run at a higher priority (nice -10, when root), so that on a busy
        machine the timestamps say when mail arrived, not when the reader got the CPU."""
        self.port = free_port()
        self.python = python or shutil.which("smtp-sink") is None
        self.kind = "aiosmtpd (Python fallback)" if self.python else "smtp-sink (Postfix)"
        self.record_times = record_times
        self.count = 0
        self.times: list[tuple[float, int]] = []
        self._lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Sink:
        if self.python:
            cmd = [PYTHON, str(BENCH / "pysink.py"), "127.0.0.1", str(self.port)]
        else:
            cmd = ["smtp-sink", "-c", "-u", "nobody", f"127.0.0.1:{self.port}", "1000"]
        self.boosted = self.record_times and os.geteuid() == 0 and shutil.which("nice") is not None
        if self.boosted:
            cmd = ["nice", "-n", "-10", *cmd]
        self.command = " ".join(cmd)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=self._read, daemon=True).start()
        wait_port(self.port)
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        if self.boosted:  # niceness is per thread on Linux: only this reader gets it
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), -10)
        stream = self.proc.stdout
        tail = b""
        while True:
            chunk = stream.read1(65536)
            if not chunk:
                return
            data = tail + chunk
            matches = _MESG.findall(data)
            tail = data[-64:]
            if not matches:
                continue
            value = int(matches[-1])
            now = time.perf_counter()
            with self._lock:
                if value > self.count:
                    self.count = value
                    if self.record_times:
                        self.times.append((now, value))

    def messages(self) -> int:
        with self._lock:
            return self.count

    def wait_for(self, total: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.messages() < total:
            if time.monotonic() > deadline:
                raise RuntimeError(f"sink has {self.messages()} messages, expected {total}")
            time.sleep(0.01)

    def clear_times(self) -> None:
        with self._lock:
            self.times = []

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
