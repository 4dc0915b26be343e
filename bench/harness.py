"""mailer's benchmarks, measured side by side in one run: ``make bench`` runs this.

    python bench/harness.py --profile full            # what `make bench` runs
    python bench/harness.py --profile tiny --python-tools --out /tmp/b.md   # the test

Each figure is a ratio (or a per-message cost) taken from runs made next to each other,
repeated, and reported as min / median / max, because this machine is shared and
noisy. The processes under test are real ones: ``mailer worker`` and ``mailer serve``
subprocesses configured by MAILER_* variables, Postfix's ``smtp-sink``/``smtp-source``,
PostgreSQL and Redis on loopback. Results go to docs/benchmarks.md (and a JSON copy in
bench/out/results.json); the rate run is charted in docs/bench-rate.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import (
    BENCH,
    MAILER,
    PYTHON,
    REDIS_URL,
    ROOT,
    CpuWatch,
    Sink,
    clean_redis,
    cpu_seconds,
    create_statement,
    free_port,
    load_average,
    new_queue,
    pg_create,
    pg_drop,
    pg_drop_stale,
    pg_sessions,
    pg_xacts,
    rss_bytes,
    rss_peak_bytes,
    sample_message_size,
    seed_confirmed,
    spread,
    sql,
    stop_process,
    stop_processes,
    wait_health,
    wait_port,
    wait_quiet,
)
from common import (
    mailer_env as make_env,
)
from profiles import Recorder, summary_rows

OUT = BENCH / "out"


@dataclass
class Sizes:
    repeats: int
    p1_recipients: int  # one blast per repeat, one worker process
    source_messages: int  # smtp-source's messages per repeat
    peer_recipients: int
    p4_small: int
    p4_large: int
    p5_subscribers: int
    p6_rate: float
    p6_seconds: float
    p6_workers: int
    p6_burst: int
    p6_repeats: int
    p7_seconds: float
    p7_connections: int
    p7_warmup_s: float
    p4_window_s: float = 45.0
    floor_messages: int = 100_000  # the bare pipelined sender of P3, per repeat
    smtp_connections: int = 10
    batch_size: int = 500
    profile_seconds: float = 10.0


PROFILES: dict[str, Sizes] = {
    "full": Sizes(
        repeats=3,
        p1_recipients=25_000,
        source_messages=150_000,
        peer_recipients=3_000,
        p4_small=100_000,
        p4_large=1_000_000,
        p5_subscribers=1_000_000,
        p6_rate=200,
        p6_seconds=30,
        p6_workers=2,
        p6_burst=10,
        p6_repeats=3,
        p7_seconds=10,
        p7_connections=32,
        p7_warmup_s=3,
        p4_window_s=60,
    ),
    # The test's profile: every figure must come out, with numbers; their values do not
    # matter. Each message costs a few ms of CPU across worker, sink and PostgreSQL, and
    # each `mailer` process ~1.5 s to import, so the sizes are as small as still runs
    # every step (P4's large blast is P5's database, so those two stay equal).
    "tiny": Sizes(
        repeats=1,
        p1_recipients=100,
        source_messages=200,
        peer_recipients=40,
        p4_small=50,
        p4_large=200,
        p5_subscribers=200,
        p6_rate=50,
        p6_seconds=0.6,
        p6_workers=1,  # Workers(count=2) already runs in P8; one start-up fewer
        p6_burst=5,
        p6_repeats=1,
        p7_seconds=0.4,
        p7_connections=4,
        p7_warmup_s=0.1,
        floor_messages=200,
        profile_seconds=0,
    ),
}

TARGETS = {
    "P1": "≥ 0.25 (stretch 0.4)",
    "P2": "≥ 8",
    "P3": "≤ 4× (stretch 3×)",
    "P4": "ratio ≤ 1.10, and ≤ 150 MB",
    "P5": "≤ 10 s PostgreSQL, report SQLite",
    "P6": "within 0.97–1.03, and ≤ 1.0",
    "P7": "≥ 1,000 req/s, p99 < 50 ms",
    "P8": "report (2.0 would be linear)",
    "P1-SQLite": "≥ 0.15",
}


@dataclass
class Row:
    id: str
    figure: str
    value: str  # the headline, e.g. "0.21 (0.20–0.22)"
    target: str
    met: bool | None
    numbers: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Run:
    profile: str
    sizes: Sizes
    stamp: str
    python_tools: bool
    rows: list[Row] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)
    profiles: dict[str, Any] = field(default_factory=dict)
    rate_series: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)  # --set KEY=VALUE
    explore_profile: bool = False
    template: str = ""  # the migrated database the others are copied from

    def say(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        self.log.append(line)
        print(line, flush=True)

    def command(self, text: str) -> None:
        if text not in self.commands:
            self.commands.append(text)

    async def pg_create(self, name: str) -> str:
        """A fresh, migrated database; the migrations run once per run, into a template
        that every database is then a copy of (the same tables, made cheaper)."""
        if not self.template:
            template = f"mailer_bench_{self.stamp}_template"
            try:
                await pg_create(template)
            except BaseException:
                await pg_drop(template)  # half-migrated: no figure may copy it
                raise
            self.template = template
        return await pg_create(name, template=self.template)

    async def drop_template(self) -> None:
        if self.template:
            await pg_drop(self.template)
            self.template = ""


def fmt_spread(s: dict[str, float], unit: str = "", digits: int = 2) -> str:
    f = f"{{:.{digits}f}}"
    lo, med, hi = (f.format(s[k]) for k in ("min", "median", "max"))
    return f"{med}{unit} (min {lo}, max {hi}, n={int(s['n'])})"


def env_text(settings: dict[str, Any], keys: list[str] | None = None) -> str:
    keys = keys or sorted(settings)
    return " ".join(f"MAILER_{k.upper()}={settings[k]}" for k in keys if k in settings)


# The worker under test ------------------------------------------------------------


class Workers:
    """``mailer worker`` subprocesses on one queue, with their logs under bench/out."""

    def __init__(
        self,
        run: Run,
        settings: dict[str, Any],
        name: str,
        count: int = 1,
        variant: str | None = None,
    ) -> None:
        self.run = run
        self.variant = variant
        self.settings = settings
        self.name = name
        self.count = count
        self.procs: list[subprocess.Popen[bytes]] = []

    async def __aenter__(self) -> Workers:
        logs = OUT / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.settings = self.settings | self.run.overrides
        env = make_env(self.settings)
        cmd = [MAILER, "worker"]
        if self.variant:
            cmd = [PYTHON, str(BENCH / "variants.py"), self.variant, "worker"]
        for i in range(self.count):
            out = (logs / f"{self.name}-{i}.log").open("ab")
            self.procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=out, cwd=OUT))
        await wait_health(self.settings["queue_name"], timeout=120)  # slow on a loaded machine
        for proc in self.procs:
            await asyncio.to_thread(wait_quiet, proc.pid)
        return self

    @property
    def pid(self) -> int:
        return self.procs[0].pid

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(stop_processes, self.procs)

    def log_tail(self) -> str:
        path = OUT / "logs" / f"{self.name}-0.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def base_settings(sizes: Sizes, url: str, queue: str, sink_port: int) -> dict[str, Any]:
    return {
        "env": "dev",
        "database_url": url,
        "redis_url": REDIS_URL,
        "queue_name": queue,
        "smtp_host": "127.0.0.1",
        "smtp_port": sink_port,
        "smtp_connections": sizes.smtp_connections,
        "batch_size": sizes.batch_size,
        "base_url": "https://news.example.org",
        "secret_key": "bench-secret-key-0123456789abcdef",
        "from_address": "updates@news.example.org",
        "rate_per_second": 0,
        "log_format": "text",
    }


@dataclass
class BlastResult:
    blast_id: int
    total: int
    sent: int
    elapsed_s: float  # harness clock: create → status done seen
    snapshot_s: float  # created → started_at (audience snapshot, in the worker)
    db_elapsed_s: float  # created_at → finished_at, the worker's and database's clock


class Blaster:
    """Creates blasts the way the API does (blasts.create) and waits for them."""

    def __init__(self, settings: dict[str, Any]) -> None:
        from mailer.config import load_settings
        from mailer.runtime import Runtime

        self.settings = load_settings(**settings)
        self.runtime = Runtime.create(self.settings)
        self.queue: Any = None
        self.polls = 0  # our own SQL transactions, to leave out of per-message counts

    async def __aenter__(self) -> Blaster:
        from mailer.queue import Queue

        self.queue = await Queue.connect(self.settings)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.queue.close()
        await self.runtime.close()

    async def create(self, statement_id: int) -> int:
        from mailer import blasts

        blast = await blasts.create(self.runtime, self.queue, statement_id, None, None)
        return int(blast.id)

    async def state(self, blast_id: int) -> tuple[Any, ...]:
        from sqlalchemy import text

        self.polls += 1
        async with self.runtime.engine.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT status, total, created_at, started_at, finished_at, reason"
                        " FROM blasts WHERE id = :i"
                    ),
                    {"i": blast_id},
                )
            ).one()
        return tuple(row)

    async def sent(self, blast_id: int) -> int:
        from sqlalchemy import text

        async with self.runtime.engine.connect() as conn:
            return int(
                (
                    await conn.execute(
                        text(
                            "SELECT count(*) FROM deliveries"
                            " WHERE blast_id = :i AND status = 'sent'"
                        ),
                        {"i": blast_id},
                    )
                ).scalar()
                or 0
            )

    async def blast(
        self,
        statement_id: int,
        timeout: float,
        on_tick: Callable[[], None] | None = None,
        log_tail: Callable[[], str] | None = None,
    ) -> BlastResult:
        t0 = time.perf_counter()
        blast_id = await self.create(statement_id)
        deadline = t0 + timeout
        while True:
            status, total, created, started, finished, reason = await self.state(blast_id)
            if status == "done":
                break
            if status in ("paused", "cancelled"):
                raise RuntimeError(f"blast {blast_id} is {status}: {reason}")
            if time.perf_counter() > deadline:
                tail = log_tail() if log_tail else ""
                raise RuntimeError(f"blast {blast_id} still {status} after {timeout}s\n{tail}")
            if on_tick:
                on_tick()
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - t0
        sent = await self.sent(blast_id)
        return BlastResult(
            blast_id,
            int(total),
            sent,
            elapsed,
            (_dt(started) - _dt(created)).total_seconds(),
            (_dt(finished) - _dt(created)).total_seconds(),
        )


def _dt(value: Any) -> datetime:
    if isinstance(value, str):  # SQLite hands text back through text() queries
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# P1, P2, P3: throughput against smtp-sink ---------------------------------------


def run_source(run: Run, sink: Sink, count: int, size: int, sessions: int = 20) -> float:
    """Messages per second of the reference client to the same sink (wall clock)."""
    before = sink.messages()
    if run.python_tools or shutil.which("smtp-source") is None:
        cmd = [PYTHON, str(BENCH / "pysource.py"), "127.0.0.1", str(sink.port)]
        cmd += [str(sessions), str(count), str(size)]
        run.command("python bench/pysource.py 127.0.0.1 PORT 20 M SIZE  # smtp-source missing")
    else:
        cmd = ["smtp-source", "-d", "-s", str(sessions), "-m", str(count), "-l", str(size)]
        cmd += [f"127.0.0.1:{sink.port}"]
        run.command(f"smtp-source -d -s {sessions} -m {count} -l {size} 127.0.0.1:PORT")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t0
    sink.wait_for(before + count, timeout=30)
    return count / elapsed


def run_peer(run: Run, url: str, sink: Sink, count: int, concurrency: int) -> dict[str, Any]:
    """P2's peer (bench/peer.py: fastapi-mail, a new connection per message)."""
    before = sink.messages()
    cmd = [PYTHON, str(BENCH / "peer.py"), url, str(sink.port), str(count), str(concurrency)]
    run.command(f"python bench/peer.py DATABASE_URL PORT {count} {concurrency}")
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result = dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    if result["sent"] != count:
        raise RuntimeError(f"the peer sent {result['sent']} of {count}: {proc.stderr[-500:]}")
    sink.wait_for(before + count, timeout=30)
    result["rate"] = count / result["elapsed_s"]
    return result


def run_floor(run: Run, sink: Sink, count: int, size: int, sessions: int) -> dict[str, Any]:
    """P3's reference (bench/floor.py: a bare pipelined asyncio sender on uvloop)."""
    before = sink.messages()
    cmd = [PYTHON, str(BENCH / "floor.py"), "127.0.0.1", str(sink.port), str(sessions)]
    cmd += [str(count), str(size)]
    run.command(f"python bench/floor.py 127.0.0.1 PORT {sessions} {count} {size}")
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result = dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    sink.wait_for(before + count, timeout=30)
    result["rate"] = count / result["elapsed_s"]
    result["cpu_us"] = result["cpu_s"] / count * 1e6
    return result


async def figure_throughput(run: Run, sink: Sink) -> None:
    """P1, P2, P3 and P8, side by side in every repeat: smtp-source, the floor, a blast with
    one worker, the same with two, and fastapi-mail, all into the same sink."""
    sizes = run.sizes
    db = f"mailer_bench_{run.stamp}_p1"
    url = await run.pg_create(db)
    lite_path = OUT / f"p1-{run.stamp}.db"
    try:
        await seed_confirmed(url, sizes.p1_recipients)
        statement = await create_statement(url)
        queue = new_queue("p1")
        settings = base_settings(sizes, url, queue, sink.port)
        run.settings["P1–P3, P8 workers"] = settings
        # P1 on SQLite: the same blast from a SQLite file (the default database).
        from common import migrate

        lite_url = f"sqlite+aiosqlite:///{lite_path}"
        await migrate(lite_url)
        await seed_confirmed(lite_url, sizes.p1_recipients)
        lite_statement = await create_statement(lite_url)
        lite_queue = new_queue("p1s")
        lite_settings = base_settings(sizes, lite_url, lite_queue, sink.port)
        run.settings["P1 on SQLite worker"] = lite_settings
        size = sample_message_size(settings)
        run.context["message_bytes"] = size
        run.command(f"{env_text(settings)} mailer worker")
        n = sizes.p1_recipients
        r: dict[str, list[float]] = {
            k: []
            for k in (
                "one",
                "two",
                "source",
                "peer",
                "peer_cpu",
                "floor",
                "floor_cpu",
                "cpu1",
                "cpu2",
                "lite",
            )
        }
        neighbours: list[dict[str, float]] = []
        peer_name = ""
        for rep in range(sizes.repeats):
            src = await asyncio.to_thread(run_source, run, sink, sizes.source_messages, size)
            r["source"].append(src)
            floor = await asyncio.to_thread(
                run_floor, run, sink, sizes.floor_messages, size, sizes.smtp_connections
            )
            r["floor"].append(floor["rate"])
            r["floor_cpu"].append(floor["cpu_us"])
            for count, key in ((1, "one"), (2, "two")):
                before = sink.messages()
                name = f"p1-r{rep}" if count == 1 else f"p8-r{rep}"
                async with Workers(run, settings, name, count=count) as workers:
                    assert sink.proc is not None
                    watch = CpuWatch(workers.pids, database=db, sink_pid=sink.proc.pid)
                    async with Blaster(settings) as blaster:
                        watch.begin()
                        result = await blaster.blast(
                            statement, timeout=600, log_tail=workers.log_tail
                        )
                        used = watch.end()
                if result.sent != n:
                    raise RuntimeError(f"blast sent {result.sent} of {n}")
                sink.wait_for(before + n, timeout=30)
                r[key].append(n / result.elapsed_s)
                r[f"cpu{count}"].append(used["target"] / n * 1e6)
                if count == 1:
                    neighbours.append(used)
            before = sink.messages()
            async with Workers(run, lite_settings, f"p1s-r{rep}") as workers:
                async with Blaster(lite_settings) as blaster:
                    result = await blaster.blast(
                        lite_statement, timeout=600, log_tail=workers.log_tail
                    )
            if result.sent != n:
                raise RuntimeError(f"SQLite blast sent {result.sent} of {n}")
            sink.wait_for(before + n, timeout=30)
            r["lite"].append(n / result.elapsed_s)
            peer = await asyncio.to_thread(
                run_peer, run, url, sink, sizes.peer_recipients, sizes.smtp_connections
            )
            peer_name = peer["peer"]
            r["peer"].append(peer["rate"])
            r["peer_cpu"].append(peer["cpu_s"] / sizes.peer_recipients * 1e6)
            run.say(
                f"P1-P3, P8 repeat {rep + 1}: smtp-source {src:,.0f}/s, floor "
                f"{floor['rate']:,.0f}/s at {floor['cpu_us']:.0f} µs CPU/msg; mailer 1 worker "
                f"{r['one'][-1]:,.0f}/s at {r['cpu1'][-1]:.0f} µs, 2 workers "
                f"{r['two'][-1]:,.0f}/s at {r['cpu2'][-1]:.0f} µs; on SQLite "
                f"{r['lite'][-1]:,.0f}/s; "
                f"{peer_name} {peer['rate']:,.0f}/s"
            )
        ratios = {
            "P1": [a / b for a, b in zip(r["one"], r["source"], strict=True)],
            "P1-SQLite": [a / b for a, b in zip(r["lite"], r["source"], strict=True)],
            "P2": [a / b for a, b in zip(r["one"], r["peer"], strict=True)],
            "P3": [a / b for a, b in zip(r["cpu1"], r["floor_cpu"], strict=True)],
            "P8": [a / b for a, b in zip(r["two"], r["one"], strict=True)],
        }
        sp = {k: spread(v) for k, v in ratios.items()}
        walls = [x["wall"] for x in neighbours]
        share = {
            k: sum(x[k] for x in neighbours) / sum(walls)
            for k in ("target", "postgres", "redis", "sink", "machine_busy")
        }
        common_numbers = {
            "mailer_rate": spread(r["one"]),
            "mailer_rate_2_workers": spread(r["two"]),
            "mailer_rate_sqlite": spread(r["lite"]),
            "smtp_source_rate": spread(r["source"]),
            "peer_rate": spread(r["peer"]),
            "peer_cpu_us_per_message": spread(r["peer_cpu"]),
            "floor_rate": spread(r["floor"]),
            "floor_cpu_us_per_message": spread(r["floor_cpu"]),
            "cpu_us_per_message": spread(r["cpu1"]),
            "cpu_us_per_message_2_workers": spread(r["cpu2"]),
            "cpu_cores_busy_during_blast": share,
        }
        us = " µs"
        linear = [2 * a / b for a, b in zip(r["cpu1"], r["cpu2"], strict=True)]
        rows = [
            ("P1", "end-to-end blast throughput (one worker) ÷ smtp-source's rate to the same "
             "sink", fmt_spread(sp["P1"]), sp["P1"]["median"] >= 0.25,
             [f"mailer {fmt_spread(spread(r['one']), ' msg/s', 0)} ({n:,} recipients per "
              "blast, one worker, clock from blasts.create to status done)",
              f"smtp-source {fmt_spread(spread(r['source']), ' msg/s', 0)} (20 sessions, "
              f"{sizes.source_messages:,} messages of {size:,} bytes)",
              f"sink: {sink.kind}"]),
            ("P1-SQLite", "the same blast from SQLite (one worker) ÷ smtp-source's rate",
             fmt_spread(sp["P1-SQLite"]), sp["P1-SQLite"]["median"] >= 0.15,
             [f"mailer on SQLite {fmt_spread(spread(r['lite']), ' msg/s', 0)} "
              f"({n:,} recipients, the same settings and sink)"]),
            ("P2", f"the same blast ÷ {peer_name or 'the peer'} (a new connection and message "
             "per recipient)", fmt_spread(sp["P2"]), sp["P2"]["median"] >= 8,
             [f"{peer_name} {fmt_spread(spread(r['peer']), ' msg/s', 0)} "
              f"({sizes.peer_recipients:,} recipients, {sizes.smtp_connections} at once), "
              f"{fmt_spread(spread(r['peer_cpu']), us, 0)} of its own CPU per message "
              f"(mailer's worker: {fmt_spread(spread(r['cpu1']), us, 0)})"]),
            ("P3", "worker CPU per message, end to end ÷ the CPU per message of a bare "
             "pipelined asyncio sender (bench/floor.py) into the same sink",
             fmt_spread(sp["P3"], "×"), sp["P3"]["median"] <= 4,
             [f"worker {fmt_spread(spread(r['cpu1']), us, 0)} per message "
              "(/proc/<pid>/stat utime+stime over the blast)",
              f"floor {fmt_spread(spread(r['floor_cpu']), us, 1)} per message, "
              f"{fmt_spread(spread(r['floor']), ' msg/s', 0)} ({sizes.floor_messages:,} "
              f"messages, {sizes.smtp_connections} connections, uvloop, its own CPU clock)",
              "cores busy while the one-worker blast ran (CPU s ÷ wall s): worker "
              f"{share['target']:.2f}, postgres {share['postgres']:.2f}, "
              f"redis {share['redis']:.2f}, smtp-sink {share['sink']:.2f}, "
              f"whole machine {share['machine_busy']:.2f} of {os.cpu_count()}"]),
            ("P8", "blast throughput with 2 worker processes ÷ with 1, same sink and "
             "database", fmt_spread(sp["P8"]), None,
             [f"2 workers {fmt_spread(spread(r['two']), ' msg/s', 0)}, together "
              f"{fmt_spread(spread(r['cpu2']), us, 0)} of CPU per message",
              "where each worker had a core of its own (and PostgreSQL, Redis and the sink "
              "theirs), 2 × (CPU per message with 1 ÷ with 2) = "
              f"{fmt_spread(spread(linear))}; on this 2-core machine the two workers share "
              "the cores with everything else"]),
        ]  # fmt: skip
        for fid, figure, value, met, notes in rows:
            numbers = {"ratio": sp[fid], **common_numbers}
            run.rows.append(Row(fid, figure, value, TARGETS[fid], met, numbers, notes))
        missed = sp["P1"]["median"] < 0.25 or sp["P3"]["median"] > 4
        if sizes.profile_seconds > 0 and missed:
            await profile_worker(run, sink, settings, statement)
        await clean_redis(queue)
        await clean_redis(lite_queue)
    finally:
        await pg_drop(db)
        lite_path.unlink(missing_ok=True)


async def profile_worker(run: Run, sink: Sink, settings: dict[str, Any], statement: int) -> None:
    """Another blast like P1's with py-spy attached to the worker for a few seconds; then
    the blast is cancelled (the profile, not the blast, is the point)."""
    from mailer import blasts
    from mailer.errors import MailerError

    async with Workers(run, settings, "p1-profile") as workers:
        rec = Recorder(workers.pid, OUT / "profile-worker")
        if not rec.available:
            run.say("py-spy not installed: no worker profile")
            return
        async with Blaster(settings) as blaster:
            blast_id = await blaster.create(statement)
            while (await blaster.state(blast_id))[0] != "sending":
                await asyncio.sleep(0.02)
            await asyncio.sleep(1.0)  # past the fan-out, into steady sending
            rec.start()
            run.command(rec.command.replace(str(workers.pid), "WORKER_PID"))
            before, t0 = sink.messages(), time.perf_counter()
            await asyncio.sleep(run.sizes.profile_seconds)
            rate = (sink.messages() - before) / (time.perf_counter() - t0)
            prof = rec.stop()
            try:
                await blasts.cancel(blaster.runtime, blast_id)
            except MailerError:
                pass  # it finished while being profiled: nothing left to stop
    if prof is None:
        run.say("py-spy wrote no profile")
        return
    run.profiles["worker"] = {
        "samples": prof.samples,
        "raw": str(Path(prof.raw_path).relative_to(ROOT)),
        "rate_under_profiler": rate,
        **summary_rows(prof),
    }
    run.say(f"profiled the worker: {rate:,.0f} msg/s under py-spy, {prof.samples} samples")


# P4: peak RSS, 100k vs 1M recipients ----------------------------------------------


async def figure_memory_and_start(run: Run, sink: Sink) -> None:
    """P5 (blast start, in-process, PostgreSQL and SQLite) and P4 (worker peak RSS)."""
    sizes = run.sizes
    assert sizes.p4_large == sizes.p5_subscribers, "P4's large blast reuses P5's database"
    big_db = f"mailer_bench_{run.stamp}_big"
    small_db = f"mailer_bench_{run.stamp}_small"
    big = await run.pg_create(big_db)
    small = await run.pg_create(small_db)
    sqlite_path = OUT / f"p5-{run.stamp}.db"
    try:
        t_seed = await seed_confirmed(big, sizes.p5_subscribers)
        run.say(f"seeded {sizes.p5_subscribers:,} subscribers on PostgreSQL in {t_seed:.1f}s")
        await seed_confirmed(small, sizes.p4_small)
        pg_starts = await blast_starts(run, big, sink, "PostgreSQL")

        sqlite_url = f"sqlite+aiosqlite:///{sqlite_path}"
        from common import migrate

        await migrate(sqlite_url)
        t_seed = await seed_confirmed(sqlite_url, sizes.p5_subscribers)
        run.say(f"seeded {sizes.p5_subscribers:,} subscribers on SQLite in {t_seed:.1f}s")
        sqlite_starts = await blast_starts(run, sqlite_url, sink, "SQLite")
        pg_total = spread([s["total_s"] for s in pg_starts])
        lite_total = spread([s["total_s"] for s in sqlite_starts])
        run.rows.append(
            Row(
                "P5",
                f"blast start (snapshot + fan-out enqueued), {sizes.p5_subscribers:,} confirmed",
                f"PostgreSQL {fmt_spread(pg_total, ' s')}; SQLite {fmt_spread(lite_total, ' s')}",
                TARGETS["P5"],
                pg_total["median"] <= 10,
                {
                    "postgres": {
                        "total_s": pg_total,
                        "snapshot_s": spread([s["snapshot_s"] for s in pg_starts]),
                        "fan_out_s": spread([s["fan_out_s"] for s in pg_starts]),
                        "jobs": pg_starts[0]["jobs"],
                    },
                    "sqlite": {
                        "total_s": lite_total,
                        "snapshot_s": spread([s["snapshot_s"] for s in sqlite_starts]),
                        "fan_out_s": spread([s["fan_out_s"] for s in sqlite_starts]),
                        "jobs": sqlite_starts[0]["jobs"],
                    },
                },
                [
                    "PostgreSQL: snapshot "
                    f"{fmt_spread(spread([s['snapshot_s'] for s in pg_starts]), ' s')}, "
                    f"fan-out {fmt_spread(spread([s['fan_out_s'] for s in pg_starts]), ' s')} "
                    f"({pg_starts[0]['jobs']:,} batch jobs)",
                    "SQLite: snapshot "
                    f"{fmt_spread(spread([s['snapshot_s'] for s in sqlite_starts]), ' s')}, "
                    f"fan-out {fmt_spread(spread([s['fan_out_s'] for s in sqlite_starts]), ' s')}",
                    "timed in the harness process calling blasts.start_due (what the "
                    "start_blast job runs), no worker consuming meanwhile",
                ],
            )
        )
        sqlite_path.unlink(missing_ok=True)

        # P4: a fresh worker runs a whole blast (snapshot, fan-out, every send) per size.
        await sql(big, "TRUNCATE deliveries")
        peaks: dict[str, dict[str, Any]] = {}
        for label, url, n in (("small", small, sizes.p4_small), ("large", big, sizes.p4_large)):
            peaks[label] = await worker_peak(run, sink, url, n, label)
        ratio = peaks["large"]["peak"] / peaks["small"]["peak"]
        mb_large = peaks["large"]["peak"] / 2**20
        mb_small = peaks["small"]["peak"] / 2**20
        run.rows.append(
            Row(
                "P4",
                f"worker peak RSS, {sizes.p4_large:,}- vs {sizes.p4_small:,}-recipient blast "
                "(PostgreSQL)",
                f"ratio {ratio:.3f}; {mb_large:.0f} MB vs {mb_small:.0f} MB",
                TARGETS["P4"],
                ratio <= 1.10 and mb_large <= 150,
                {
                    "ratio": ratio,
                    "large_peak_mb": mb_large,
                    "small_peak_mb": mb_small,
                    "large": peaks["large"],
                    "small": peaks["small"],
                },
                [
                    "VmHWM of a fresh `mailer worker` that ran the blast (snapshot, fan-out, "
                    "sending); RSS when idle before it: "
                    f"{peaks['small']['idle'] / 2**20:.0f} MB / "
                    f"{peaks['large']['idle'] / 2**20:.0f} MB; one run per size",
                    *(
                        f"{p['n']:,} recipients: {p['sent']:,} sent in {p['elapsed_s']:.0f} s "
                        f"({p['rate']:,.0f} msg/s, snapshot {p['snapshot_s']:.1f} s), "
                        + (
                            "done"
                            if p["finished"]
                            else f"cancelled after the {sizes.p4_window_s:g}-s window"
                        )
                        + "; RSS MB over time: "
                        + ", ".join(f"{t:g}s {r:g}" for t, r in p["rss_mb_over_time"][:12])
                        for p in (peaks["small"], peaks["large"])
                    ),
                ],
            )
        )
    finally:
        sqlite_path.unlink(missing_ok=True)
        for suffix in ("-wal", "-shm"):
            Path(str(sqlite_path) + suffix).unlink(missing_ok=True)
        await pg_drop(big_db)
        await pg_drop(small_db)


async def blast_starts(run: Run, url: str, sink: Sink, label: str) -> list[dict[str, Any]]:
    from mailer import blasts
    from mailer.db import utcnow

    sizes = run.sizes
    statement = await create_statement(url)
    out = []
    for rep in range(sizes.repeats):
        queue = new_queue("p5")
        settings = base_settings(sizes, url, queue, sink.port)
        run.settings[f"P5 ({label})"] = settings
        async with Blaster(settings) as blaster:
            blast_id = await blaster.create(statement)
            t_wall = utcnow()
            t0 = time.perf_counter()
            await blasts.start_due(blaster.runtime, blaster.queue, blast_id)
            total_s = time.perf_counter() - t0
            _, total, _, started, _, _ = await blaster.state(blast_id)
            jobs = int(await blaster.queue.pool.zcard(queue))
        snapshot_s = (_dt(started) - t_wall).total_seconds()
        if int(total) != sizes.p5_subscribers:
            raise RuntimeError(f"snapshot holds {total} rows, expected {sizes.p5_subscribers}")
        out.append(
            {"total_s": total_s, "snapshot_s": snapshot_s, "fan_out_s": total_s - snapshot_s,
             "jobs": jobs - 1}  # minus the start_blast job that create() enqueued
        )  # fmt: skip
        run.say(
            f"P5 {label} repeat {rep + 1}: start {total_s:.2f}s (snapshot {snapshot_s:.2f}s, "
            f"{jobs - 1} batch jobs)"
        )
        await sql(url, "UPDATE blasts SET status = 'done' WHERE id = :i", i=blast_id)
        pg = url.startswith("postgresql")
        await sql(url, "TRUNCATE deliveries" if pg else "DELETE FROM deliveries")
        await clean_redis(queue)
    return out


async def worker_peak(run: Run, sink: Sink, url: str, n: int, label: str) -> dict[str, Any]:
    """Peak RSS of a fresh worker that runs a whole blast: snapshot, fan-out, sending.

    A blast still sending after ``p4_window_s`` is cancelled there (a million messages at
    a couple of thousand a second would take most of the time `make bench` has); the
    part that grows with the audience, snapshot and fan-out, is behind it by then, and
    the RSS samples show whether sending itself grows."""
    from mailer import blasts

    sizes = run.sizes
    queue = new_queue(f"p4{label}")
    settings = base_settings(sizes, url, queue, sink.port)
    run.settings["P4 worker"] = settings
    statement = await create_statement(url)
    before = sink.messages()
    async with Workers(run, settings, f"p4-{label}") as workers:
        idle = rss_bytes(workers.pid)
        samples: list[tuple[float, float]] = []
        async with Blaster(settings) as blaster:
            t0 = time.perf_counter()
            blast_id = await blaster.create(statement)
            while True:
                status, total, created, started, _, reason = await blaster.state(blast_id)
                now = time.perf_counter() - t0
                if not samples or now - samples[-1][0] >= 0.5:
                    samples.append((now, rss_bytes(workers.pid) / 2**20))
                if status == "done" or now > sizes.p4_window_s:
                    break
                if status in ("paused", "cancelled"):
                    raise RuntimeError(f"P4 {label}: blast {status}: {reason}")
                await asyncio.sleep(0.05)
            elapsed = time.perf_counter() - t0
            sent_at_end = sink.messages() - before
            finished = status == "done"
            peak = rss_peak_bytes(workers.pid)
            if not finished:
                await blasts.cancel(blaster.runtime, blast_id)
            snapshot_s = (_dt(started) - _dt(created)).total_seconds() if started else 0.0
    if finished:
        sink.wait_for(before + n, timeout=30)
    await clean_redis(queue)
    run.say(
        f"P4 {label}: {n:,} recipients, {sent_at_end:,} sent in {elapsed:.1f}s "
        f"({'done' if finished else 'cancelled at the window'}), peak RSS {peak / 2**20:.1f} MB"
    )
    return {
        "n": n,
        "peak": peak,
        "idle": idle,
        "finished": finished,
        "sent": sent_at_end,
        "elapsed_s": elapsed,
        "snapshot_s": snapshot_s,
        "rate": sent_at_end / elapsed,
        "rss_mb_over_time": [(round(t, 1), round(r, 1)) for t, r in samples[::4]],
    }


# P6: rate accuracy, two workers ---------------------------------------------------


def windows(times: list[float], width: float = 1.0) -> int:
    """The most arrivals in any window [t, t + width), t sliding over every arrival."""
    best = 0
    j = 0
    for i, t in enumerate(times):
        while j < len(times) and times[j] < t + width:
            j += 1
        best = max(best, j - i)
    return best


async def figure_rate(run: Run) -> None:
    sizes = run.sizes
    n = int(sizes.p6_rate * sizes.p6_seconds)
    db = f"mailer_bench_{run.stamp}_p6"
    url = await run.pg_create(db)
    sink = Sink(python=run.python_tools, record_times=True).start()
    run.command(sink.command.replace(str(sink.port), "PORT"))
    try:
        await seed_confirmed(url, n)
        statement = await create_statement(url)
        accuracy: list[float] = []
        peaks: list[float] = []
        for rep in range(sizes.p6_repeats):
            queue = new_queue("p6")
            settings = base_settings(sizes, url, queue, sink.port) | {
                "rate_per_second": sizes.p6_rate,
                "rate_burst": sizes.p6_burst,
            }
            run.settings["P6 workers"] = settings
            before = sink.messages()
            async with Workers(run, settings, f"p6-r{rep}", count=sizes.p6_workers) as workers:
                sink.clear_times()
                async with Blaster(settings) as blaster:
                    result = await blaster.blast(
                        statement, timeout=sizes.p6_seconds * 3 + 60, log_tail=workers.log_tail
                    )
            sink.wait_for(before + n, timeout=30)
            arrivals: list[float] = []
            last = before
            for t, count in sink.times:
                if count <= before:
                    continue
                arrivals.extend([t] * (min(count, before + n) - max(last, before)))
                last = count
            arrivals = arrivals[:n]
            span = arrivals[-1] - arrivals[0]
            achieved = (len(arrivals) - 1) / span if span > 0 else float("inf")
            peak = windows(arrivals)
            ceiling = sizes.p6_rate + sizes.p6_burst
            accuracy.append(achieved / sizes.p6_rate)
            peaks.append(peak / ceiling)
            start = arrivals[0]
            run.rate_series.append(
                {"repeat": rep + 1, "arrivals": [round(a - start, 4) for a in arrivals]}
            )
            run.say(
                f"P6 repeat {rep + 1}: {achieved:.1f}/s over {span:.1f}s "
                f"(ratio {achieved / sizes.p6_rate:.4f}), max 1-s window {peak} of {ceiling}"
            )
            if result.sent != n:
                raise RuntimeError(f"P6: sent {result.sent} of {n}")
            await clean_redis(queue)
        acc = spread(accuracy)
        pk = spread(peaks)
        run.rows.append(
            Row(
                "P6",
                f"rate accuracy: {sizes.p6_workers} workers at {sizes.p6_rate:g}/s for "
                f"{sizes.p6_seconds:g} s: achieved ÷ target; max 1-s window ÷ (rate + burst)",
                f"{fmt_spread(acc, '', 4)}; {fmt_spread(pk, '', 3)}",
                TARGETS["P6"],
                0.97 <= acc["min"] and acc["max"] <= 1.03 and pk["max"] <= 1.0,
                {"accuracy": acc, "max_window_ratio": pk, "burst": sizes.p6_burst},
                [
                    f"arrival times read at the sink ({sink.kind} counter stream"
                    + (", sink and reader at nice -10" if sink.boosted else "")
                    + "); burst "
                    f"{sizes.p6_burst}, so the ceiling is {sizes.p6_rate + sizes.p6_burst:g} "
                    "in any sliding 1-s window",
                    "achieved = (messages − 1) ÷ (last arrival − first arrival)",
                ],
            )
        )
    finally:
        sink.stop()
        await pg_drop(db)


# P7: POST /subscribe under load -----------------------------------------------------


def run_load(run: Run, port: int, seconds: float, connections: int, tag: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/subscribe"
    if not run.python_tools and shutil.which("wrk"):
        cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
        cmd += ["-s", str(BENCH / "subscribe.lua"), url]
        run.command(
            f"wrk -t1 -c{connections} -d{max(1, round(seconds))}s --latency "
            "-s bench/subscribe.lua http://127.0.0.1:PORT/subscribe"
        )
        env = dict(os.environ, BENCH_PREFIX=tag)
        proc = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        line = [x for x in proc.stdout.splitlines() if x.startswith("JSON ")][-1]
        result = dict(json.loads(line[5:]))
        result["tool"] = "wrk"
    else:
        cmd = [PYTHON, str(BENCH / "loadgen.py"), url, str(seconds), str(connections), tag]
        run.command(f"python bench/loadgen.py http://127.0.0.1:PORT/subscribe S {connections} TAG")
        proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
        result = dict(json.loads(proc.stdout.strip().splitlines()[-1]))
        result["tool"] = "loadgen.py (asyncio)"
    return result


def web_settings(url: str, queue: str) -> dict[str, Any]:
    return {
        "env": "dev",
        "database_url": url,
        "redis_url": REDIS_URL,
        "queue_name": queue,
        "base_url": "https://news.example.org",
        "secret_key": "bench-secret-key-0123456789abcdef",
        "subscribe_limit_per_minute": 10**9,
        # Every sign-up still queues its mail, as before the per-domain cap existed.
        "confirm_domain_limit_per_hour": 0,
        "log_format": "text",
    }


async def figure_subscribe(run: Run) -> None:
    sizes = run.sizes
    db = f"mailer_bench_{run.stamp}_p7"
    url = await run.pg_create(db)
    queue = new_queue("p7")
    port = free_port()
    settings = web_settings(url, queue)
    run.settings["P7 web"] = settings
    run.command(f"{env_text(settings)} mailer serve --port PORT")
    logs = OUT / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out = (logs / "p7-web.log").open("ab")
    proc = subprocess.Popen(
        [MAILER, "serve", "--port", str(port)], env=make_env(settings), stdout=out, stderr=out
    )
    try:
        await asyncio.to_thread(wait_port, port, 30)
        await asyncio.to_thread(wait_quiet, proc.pid)
        await asyncio.to_thread(
            run_load, run, port, sizes.p7_warmup_s, sizes.p7_connections, f"warm{run.stamp}"
        )
        rates: list[float] = []
        p99s: list[float] = []
        p50s: list[float] = []
        cpu_per_req: list[float] = []
        for rep in range(sizes.repeats):
            c0 = cpu_seconds(proc.pid)
            result = await asyncio.to_thread(
                run_load, run, port, sizes.p7_seconds, sizes.p7_connections, f"r{rep}x{run.stamp}"
            )
            used = cpu_seconds(proc.pid) - c0
            if result["errors"] or result["non2xx"]:
                raise RuntimeError(f"P7: errors in the load run: {result}")
            rates.append(result["requests"] / result["duration_s"])
            p99s.append(result["p99_ms"])
            p50s.append(result["p50_ms"])
            cpu_per_req.append(used / max(1, result["requests"]) * 1e3)
            run.say(
                f"P7 repeat {rep + 1}: {rates[-1]:,.0f} req/s, p50 {result['p50_ms']:.1f} ms, "
                f"p99 {result['p99_ms']:.1f} ms, {cpu_per_req[-1]:.2f} ms CPU/request"
            )
        rows = await sql(url, "SELECT count(*) FROM subscribers")
        r = spread(rates)
        p = spread(p99s)
        needs_profile = r["median"] < 1000 or p["median"] >= 50
        if needs_profile and sizes.profile_seconds > 0:
            rec = Recorder(proc.pid, OUT / "profile-web")
            if rec.available:
                rec.start()
                run.command(rec.command)
                await asyncio.to_thread(
                    run_load, run, port, sizes.profile_seconds, sizes.p7_connections, "prof"
                )
                prof = rec.stop()
                if prof is not None:
                    run.profiles["web"] = {
                        "samples": prof.samples,
                        "raw": str(Path(prof.raw_path).relative_to(ROOT)),
                        **summary_rows(prof),
                    }
        run.rows.append(
            Row(
                "P7",
                f"POST /subscribe, one uvicorn process, {sizes.p7_connections} connections: "
                "requests/s and p99",
                f"{fmt_spread(r, ' req/s', 0)}; p99 {fmt_spread(p, ' ms', 1)}",
                TARGETS["P7"],
                r["median"] >= 1000 and p["median"] < 50,
                {
                    "rps": r,
                    "p99_ms": p,
                    "p50_ms": spread(p50s),
                    "cpu_ms_per_request": spread(cpu_per_req),
                    "tool": result["tool"],
                    "subscribers_created": int(rows[0][0]),
                },
                [
                    f"load generator: {result['tool']} on the same machine, form-encoded "
                    "body with a new address per request (each one inserts a subscriber and "
                    "an event and enqueues a confirmation job); HTML 202 reply",
                    f"web process CPU per request {fmt_spread(spread(cpu_per_req), ' ms', 2)}",
                ],
            )
        )
    finally:
        stop_process(proc)
        await clean_redis(queue)
        await pg_drop(db)


# Exploring proposals (not part of make bench) --------------------------------------


async def explore_worker(run: Run, sink: Sink, variants: list[str], recipients: int) -> None:
    """P1/P3 for each variant of the worker (bench/variants.py), interleaved per repeat."""
    sizes = run.sizes
    db = f"mailer_bench_{run.stamp}_explore"
    url = await run.pg_create(db)
    results: dict[str, dict[str, list[float]]] = {
        v: {"rate": [], "cpu_us": [], "ratio": [], "xacts": []} for v in variants
    }
    profiles: dict[str, Any] = {}
    try:
        await seed_confirmed(url, recipients)
        statement = await create_statement(url)
        size = sample_message_size(base_settings(sizes, url, "x", sink.port))
        for rep in range(sizes.repeats):
            src = await asyncio.to_thread(run_source, run, sink, sizes.source_messages, size)
            order = variants[rep % len(variants) :] + variants[: rep % len(variants)]
            for variant in order:
                queue = new_queue("explore")
                settings = base_settings(sizes, url, queue, sink.port) | run.overrides
                run.settings["explore worker"] = settings
                before = sink.messages()
                xacts = await pg_xacts(db)
                sessions = await pg_sessions(db)
                async with Workers(run, settings, f"explore-{variant}", variant=variant) as w:
                    assert sink.proc is not None
                    watch = CpuWatch([w.pid], database=db, sink_pid=sink.proc.pid)
                    rec = (
                        Recorder(w.pid, OUT / f"profile-{variant}") if run.explore_profile else None
                    )
                    if rec is not None and rep == 0:
                        rec.start()
                    async with Blaster(settings) as blaster:
                        watch.begin()
                        # 100 msg/s at least (mailer sends thousands): a variant that breaks
                        # the worker is reported in minutes, not after a quarter of an hour.
                        limit = max(120.0, recipients / 100)
                        result = await blaster.blast(statement, timeout=limit, log_tail=w.log_tail)
                        used = watch.end()
                    if rec is not None and rep == 0:
                        prof = rec.stop()
                        if prof is not None:
                            profiles[variant] = summary_rows(prof, top=12)
                await asyncio.sleep(0.5)
                xacts = await pg_xacts(db) - xacts - blaster.polls
                sessions = await pg_sessions(db) - sessions
                results[variant]["xacts"].append(xacts / recipients * 100)
                sink.wait_for(before + recipients, timeout=30)
                rate = recipients / result.elapsed_s
                steady = steady_rate(sink, before, recipients)
                results[variant]["rate"].append(rate)
                results[variant]["cpu_us"].append(used["target"] / recipients * 1e6)
                results[variant]["ratio"].append(rate / src)
                run.say(
                    f"explore {variant} repeat {rep + 1}: {rate:,.0f} msg/s "
                    f"({rate / src:.3f} of smtp-source {src:,.0f}; steady {steady:,.0f}/s), "
                    f"{used['target'] / recipients * 1e6:.0f} µs CPU/msg, "
                    f"{xacts / recipients * 100:.1f} SQL transactions per 100 msgs, "
                    f"{sessions} PostgreSQL connections opened; busy cores: "
                    f"worker {used['target'] / used['wall']:.2f}, "
                    f"postgres {used['postgres'] / used['wall']:.2f}, "
                    f"redis {used['redis'] / used['wall']:.2f}, "
                    f"machine {used['machine_busy'] / used['wall']:.2f}"
                )
                await clean_redis(queue)
    finally:
        await pg_drop(db)
    base = results[variants[0]]
    lines = [
        f"Worker variants, {recipients:,} recipients per blast, {sizes.repeats} repeats "
        f"(interleaved), settings {env_text(run.overrides) or 'as in P1'}:",
        "",
        "| variant | msg/s | ÷ smtp-source | worker CPU µs/msg | CPU vs first "
        "| SQL transactions per 100 msgs |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for variant, r in results.items():
        rel = spread(r["cpu_us"])["median"] / spread(base["cpu_us"])["median"]
        lines.append(
            f"| {variant} | {fmt_spread(spread(r['rate']), '', 0)} | "
            f"{fmt_spread(spread(r['ratio']), '', 3)} | {fmt_spread(spread(r['cpu_us']), '', 0)} | "
            f"{rel:.2f} | {fmt_spread(spread(r['xacts']), '', 1)} |"
        )
    for variant, rows in profiles.items():
        lines += ["", f"py-spy, {variant} (share of samples, by family / hottest self):", ""]
        lines += [f"- {name}: {share:.1f} %" for name, share in rows["families_self"][:8]]
        lines += [f"- `{name}`: {share:.1f} % self" for name, share in rows["self"][:10]]
    run.context["explore_worker"] = "\n".join(lines)


def steady_rate(sink: Sink, before: int, n: int) -> float:
    """Messages per second at the sink between 10 % and 90 % of a blast's messages."""
    lo, hi = before + n // 10, before + n * 9 // 10
    t_lo = next((t for t, c in sink.times if c >= lo), None)
    t_hi = next((t for t, c in sink.times if c >= hi), None)
    if t_lo is None or t_hi is None or t_hi <= t_lo:
        return float("nan")
    return (hi - lo) / (t_hi - t_lo)


async def explore_web(run: Run, variants: list[str]) -> None:
    sizes = run.sizes
    results: dict[str, dict[str, list[float]]] = {}
    for variant in variants:
        results[variant] = {"rps": [], "p99": [], "cpu_ms": []}
    for rep in range(sizes.repeats):
        for variant in variants:
            r = await subscribe_run(run, variant, sizes.p7_seconds)
            results[variant]["rps"].append(r["rps"])
            results[variant]["p99"].append(r["p99_ms"])
            results[variant]["cpu_ms"].append(r["cpu_ms"])
            run.say(
                f"explore web {variant} repeat {rep + 1}: {r['rps']:,.0f} req/s, "
                f"p99 {r['p99_ms']:.1f} ms, {r['cpu_ms']:.2f} ms CPU/request"
            )
    lines = [
        f"Web variants, POST /subscribe, {sizes.p7_connections} connections, "
        f"{sizes.p7_seconds:g} s each, {sizes.repeats} repeats:",
        "",
        "| variant | req/s | p99 ms | web CPU ms/request |",
        "| --- | --- | --- | --- |",
    ]
    for variant, r in results.items():
        lines.append(
            f"| {variant} | {fmt_spread(spread(r['rps']), '', 0)} | "
            f"{fmt_spread(spread(r['p99']), '', 1)} | {fmt_spread(spread(r['cpu_ms']), '', 2)} |"
        )
    run.context["explore_web"] = "\n".join(lines)


async def subscribe_run(run: Run, variant: str, seconds: float) -> dict[str, float]:
    """One web process (a variant), warmed up, then one load run against it."""
    sizes = run.sizes
    db = f"mailer_bench_{run.stamp}_web"
    url = await run.pg_create(db)
    queue = new_queue("web")
    port = free_port()
    settings = web_settings(url, queue) | run.overrides
    cmd = [PYTHON, str(BENCH / "variants.py"), variant, "serve", "--port", str(port)]
    out = (OUT / "logs" / f"explore-web-{variant}.log").open("ab")
    proc = subprocess.Popen(cmd, env=make_env(settings), stdout=out, stderr=out)
    try:
        await asyncio.to_thread(wait_port, port, 30)
        await asyncio.to_thread(wait_quiet, proc.pid)
        await asyncio.to_thread(run_load, run, port, sizes.p7_warmup_s, sizes.p7_connections, "w")
        c0 = cpu_seconds(proc.pid)
        r = await asyncio.to_thread(run_load, run, port, seconds, sizes.p7_connections, "m")
        used = cpu_seconds(proc.pid) - c0
    finally:
        stop_process(proc)
        await clean_redis(queue)
        await pg_drop(db)
    return {
        "rps": r["requests"] / r["duration_s"],
        "p99_ms": r["p99_ms"],
        "cpu_ms": used / max(1, r["requests"]) * 1e3,
    }


# Machine and versions ---------------------------------------------------------------


def _cmd_output(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


async def machine_context(run: Run) -> None:
    import importlib.metadata as md

    import asyncpg
    import redis.asyncio as aioredis
    from common import PG_DSN

    ctx = run.context
    cpu_model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    ctx["cpu"] = f"{os.cpu_count()} cores, {cpu_model}"
    ctx["memory"] = f"{mem_kb / 2**20:.1f} GiB"
    ctx["kernel"] = platform.release()
    ctx["os"] = _cmd_output(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"])
    ctx["python"] = platform.python_version()
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        info = await client.info("server")
        ctx["redis"] = str(info.get("redis_version"))
    finally:
        await client.aclose()
    conn = await asyncpg.connect(PG_DSN)
    try:
        ctx["postgres"] = str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()
    deps = [
        "aiosmtplib", "arq", "asyncpg", "aiosqlite", "sqlalchemy", "redis", "hiredis",
        "fastapi", "starlette", "uvicorn", "uvloop", "jinja2", "pydantic", "css-inline",
    ]  # fmt: skip
    versions = {}
    for name in deps:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "not installed"
    ctx["packages"] = versions
    ctx["postfix"] = _cmd_output(["dpkg-query", "-W", "-f=${Version}", "postfix"]) or "missing"
    ctx["wrk"] = _cmd_output(["dpkg-query", "-W", "-f=${Version}", "wrk"]) or "missing"
    ctx["py-spy"] = _cmd_output([str(Path(PYTHON).parent / "py-spy"), "--version"]) or "missing"
    ctx["git"] = _cmd_output(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])


# Main -----------------------------------------------------------------------------------

FIGURES = ("P1", "P1-SQLite", "P2", "P3", "P4", "P5", "P6", "P7", "P8")


async def main(args: argparse.Namespace) -> int:
    sizes = PROFILES[args.profile]
    if args.repeats:
        sizes.repeats = args.repeats
    stamp = str(int(time.time()))
    run = Run(args.profile, sizes, stamp, args.python_tools)
    for item in args.set:
        key, _, value = item.partition("=")
        run.overrides[key.strip().lower().removeprefix("mailer_")] = value
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "logs").mkdir(exist_ok=True)
    run.explore_profile = args.explore_profile
    if args.explore or args.explore_web:
        return await run_explore(run, args)
    only = set(args.only.split(",")) if args.only else set(FIGURES)
    started = time.perf_counter()
    for name in await pg_drop_stale():
        run.say(f"dropped database {name} left by an interrupted run")
    await machine_context(run)
    run.context["load_before"] = load_average()
    busy0 = __import__("common").machine_busy()
    run.say(f"profile {args.profile}; load average {run.context['load_before']}")

    steps: list[tuple[set[str], Any]] = []
    sink = Sink(python=args.python_tools).start()
    run.context["sink"] = sink.kind
    run.command(sink.command.replace(str(sink.port), "PORT"))
    throughput = {"P1", "P1-SQLite", "P2", "P3", "P8"}
    steps.append((throughput, lambda: figure_throughput(run, sink)))
    steps.append(({"P4", "P5"}, lambda: figure_memory_and_start(run, sink)))
    steps.append(({"P6"}, lambda: figure_rate(run)))
    steps.append(({"P7"}, lambda: figure_subscribe(run)))
    try:
        for ids, step in steps:
            if not ids & only:
                continue
            t0 = time.perf_counter()
            try:
                await step()
            except Exception as exc:  # noqa: BLE001 - record it, go on with the next figure
                run.errors.append(f"{'/'.join(sorted(ids))}: {exc!r}\n{traceback.format_exc()}")
                run.say(f"{'/'.join(sorted(ids))} failed: {exc!r}")
            run.say(f"{'/'.join(sorted(ids))} took {time.perf_counter() - t0:.0f}s")
    finally:
        sink.stop()
        await run.drop_template()
    busy1 = __import__("common").machine_busy()
    run.context["load_after"] = load_average()
    run.context["machine_busy_cores"] = (
        (busy1[0] - busy0[0]) / max(1e-9, busy1[1] - busy0[1]) * (os.cpu_count() or 1)
    )
    run.context["total_s"] = time.perf_counter() - started
    run.rows.sort(key=lambda r: r.id)

    from report import write_chart, write_markdown

    chart = Path(args.chart) if args.chart else None
    if chart is not None and run.rate_series:
        write_chart(run, chart)
    write_markdown(run, Path(args.out), chart)
    results = Path(args.json) if args.json else OUT / "results.json"
    results.write_text(json.dumps(asdict(run), indent=1, default=str))
    run.say(f"wrote {args.out} ({run.context['total_s']:.0f}s in all)")
    return 1 if run.errors else 0


async def run_explore(run: Run, args: argparse.Namespace) -> int:
    await machine_context(run)
    sink = Sink(python=args.python_tools, record_times=True).start()
    try:
        if args.explore:
            await explore_worker(run, sink, args.explore.split(","), args.explore_recipients)
        if args.explore_web:
            await explore_web(run, args.explore_web.split(","))
    finally:
        sink.stop()
        await run.drop_template()
    text = "\n\n".join(
        run.context[k] for k in ("explore_worker", "explore_web") if k in run.context
    )
    header = (
        f"Explored {time.strftime('%Y-%m-%d %H:%M')} (git {run.context.get('git')}), "
        f"load average before {load_average()[0]:.2f}.\n\n"
    )
    path = OUT / f"explore-{run.stamp}.md"
    path.write_text(header + text + "\n")
    print(header + text)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--chart", default=str(ROOT / "docs" / "bench-rate.png"))
    parser.add_argument("--json", default="")
    parser.add_argument("--only", default="", help="comma-separated figure ids, e.g. P1,P7")
    parser.add_argument("--repeats", type=int, default=0)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a MAILER_* setting of the processes under test, e.g. smtp_connections=20",
    )
    parser.add_argument("--explore", default="", help="worker variants, e.g. base,pipelining")
    parser.add_argument("--explore-web", default="", help="web variants, e.g. base,bigpool")
    parser.add_argument("--explore-recipients", type=int, default=20_000)
    parser.add_argument("--explore-profile", action="store_true", help="py-spy each variant")
    parser.add_argument(
        "--python-tools",
        action="store_true",
        help="use the Python sink, source and load generator even when Postfix/wrk exist",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    sys.exit(asyncio.run(main(parse_args())))
