"""Ops figures: /metrics adds up across worker processes, /api/queue, JSON logs without secrets."""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from forkrun import MailerProcess, spawn_mailer
from helpers import (
    auth,
    blast,
    editor_token,
    progress,
    publish,
    scrape,
    seed_subscribers,
    settings_env,
    value,
    wait_status,
    wait_until,
)
from smtpserver import SmtpServer

from mailer.config import Settings
from mailer.stats import SMTP_BUCKETS


class Workers:
    """Worker processes with their logs in files (a full pipe would stall them)."""

    def __init__(self, settings: Settings, tmp_path: Path, **env: str) -> None:
        self.env = settings_env(settings) | env
        self.tmp_path = tmp_path
        self.procs: list[tuple[MailerProcess, Path]] = []

    def start(self, n: int = 1) -> None:
        for _ in range(n):
            log = self.tmp_path / f"worker{len(self.procs)}.log"
            self.procs.append((spawn_mailer(["worker"], env=self.env, output=log), log))

    def stop(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def logs(self) -> list[str]:
        return [log.read_text() for _, log in self.procs]


@pytest.fixture
def workers(settings: Settings, tmp_path: Path) -> Iterator[Workers]:
    w = Workers(settings, tmp_path)
    yield w
    w.stop()


# Rate-limited and in small batches, so the 20 batch jobs outlast one worker's 10 job slots
# and the second worker process takes some: the totals must add up over both.
@pytest.mark.parametrize(
    "settings_overrides", [{"rate_per_second": 200, "rate_burst": 5, "batch_size": 5}]
)
@pytest.mark.slow(20)
async def test_metrics_add_up_across_two_worker_processes(
    app_client: httpx.AsyncClient, smtp: SmtpServer, settings: Settings, workers: Workers
) -> None:
    await seed_subscribers(settings, confirmed=100, pending=7, unsubscribed=3)
    token = await editor_token(settings)
    workers.start(2)

    async def both_alive() -> bool:
        return value(await scrape(app_client), "mailer_workers_alive") == 2

    await wait_until(both_alive, timeout=90, step=0.1)  # process start-ups: slow when busy
    bid = await blast(app_client, token, await publish(app_client, token))
    done = await wait_status(app_client, token, bid, "done", timeout=30)
    assert done["sent"] == 100 and len(smtp.messages) == 100

    async def settled() -> dict[str, list[tuple[dict[str, str], float]]] | None:
        # SQL commits each flush before Redis counts it, and the last job may still be ending.
        m = await scrape(app_client)
        quiet = value(m, "mailer_queue_jobs", state="in_progress") == 0
        return m if quiet and value(m, "mailer_messages_total", outcome="sent") == 100 else None

    m = await wait_until(settled, timeout=10)
    sent = [(lab, v) for lab, v in m["mailer_messages_total"] if lab["outcome"] == "sent"]
    assert sum(v for _, v in sent) == 100
    assert {lab["blast"] for lab, _ in sent} == {str(bid)}
    assert value(m, "mailer_messages_total", outcome="failed") == 0
    assert value(m, "mailer_subscribers", status="confirmed") == 100
    assert value(m, "mailer_subscribers", status="pending") == 7
    assert value(m, "mailer_subscribers", status="unsubscribed") == 3
    assert value(m, "mailer_subscribers", status="bounced") == 0
    assert value(m, "mailer_blasts", status="done") == 1
    assert value(m, "mailer_blasts") == 1  # and no other status
    assert value(m, "mailer_jobs_total", function="send_batch", outcome="complete") >= 20
    assert value(m, "mailer_jobs_total", function="start_blast", outcome="complete") == 1
    # Every message was timed, in both processes: the histogram holds all 100.
    assert value(m, "mailer_smtp_transaction_seconds_count") == 100
    assert value(m, "mailer_smtp_transaction_seconds_bucket", le="+Inf") == 100
    assert len(m["mailer_smtp_transaction_seconds_bucket"]) == len(SMTP_BUCKETS) + 1
    assert value(m, "mailer_smtp_transaction_seconds_sum") > 0
    assert value(m, "mailer_send_rate_per_second") > 0  # within the last 10 s
    assert value(m, "mailer_dependency_up", dependency="redis") == 1
    assert value(m, "mailer_dependency_up", dependency="database") == 1

    # Each process sent part of it: arq logs batch results ("sent N failed …"), though a
    # batch that finds its blast already done says so instead, so only the share is checked.
    per_process = [
        sum(int(n) for n in re.findall(r"send_batch ● '?sent (\d+)", log)) for log in workers.logs()
    ]
    assert all(n > 0 for n in per_process) and sum(per_process) <= 100, per_process

    workers.stop()  # a clean exit leaves the roll at once
    assert value(await scrape(app_client), "mailer_workers_alive") == 0


@pytest.mark.parametrize("settings_overrides", [{"rate_per_second": 20, "rate_burst": 1}])
async def test_api_queue_during_a_slow_blast(
    app_client: httpx.AsyncClient, smtp: SmtpServer, settings: Settings, start_worker: Any
) -> None:
    await seed_subscribers(settings, confirmed=200)
    token = await editor_token(settings)
    r = await app_client.get("/api/queue")
    assert r.status_code == 401
    assert (await app_client.get("/api/queue", headers=auth(token + "x"))).status_code == 403
    await start_worker()
    bid = await blast(app_client, token, await publish(app_client, token))
    await wait_until(lambda: len(smtp.messages) >= 30, timeout=20)

    r = await app_client.get("/api/queue", headers=auth(token))
    assert r.status_code == 200
    q = r.json()
    assert {
        "queued", "in_progress", "deferred", "send_rate_per_s", "workers",
        "worker_heartbeats", "blasts", "sent_per_minute",
    } <= q.keys()  # fmt: skip
    assert all(isinstance(q[k], int) for k in ("queued", "in_progress", "deferred", "workers"))
    assert q["in_progress"] >= 1 and q["workers"] == 1
    assert 0 < q["send_rate_per_s"] <= 20 + 1  # the ceiling, give or take the burst
    [w] = q["worker_heartbeats"]
    assert w["alive"] and w["jobs"] >= 1 and w["age_s"] < 30
    [b] = q["blasts"]
    assert b["id"] == bid and b["status"] == "sending" and b["total"] == 200
    assert 0 < b["sent"] < 200 and b["sent"] + b["pending"] == 200
    series = q["sent_per_minute"]
    assert len(series) == 60 and series[-1]["minute"].endswith("Z")
    # Redis counts a flush after SQL commits it, and the series was read first.
    assert 0 < sum(p["sent"] for p in series) <= b["sent"]

    m = await scrape(app_client)
    assert value(m, "mailer_throttle_wait_seconds_total") > 0  # 20/s: lanes wait their turn
    assert value(m, "mailer_queue_jobs", state="in_progress") >= 1

    r = await app_client.post(f"/api/blasts/{bid}/cancel", headers=auth(token))
    assert r.status_code == 200
    await wait_until(lambda: _queue_quiet(app_client, token), timeout=20)


async def _queue_quiet(client: httpx.AsyncClient, token: str) -> bool:
    q = (await client.get("/api/queue", headers=auth(token))).json()
    return bool(q["blasts"] == [] and q["in_progress"] == 0)


@pytest.fixture
def capture_blast_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="mailer")
    return caplog


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # logs don't depend on the DB
@pytest.mark.slow(10)
async def test_json_logs_carry_state_changes_and_no_secrets(
    app_client: httpx.AsyncClient,
    smtp: SmtpServer,
    settings: Settings,
    tmp_path: Path,
    capture_blast_logs: pytest.LogCaptureFixture,
) -> None:
    people = await seed_subscribers(settings, confirmed=40)
    refused = set(people["confirmed"][:6])
    deferred = set(people["confirmed"][6:9])

    def plan(rcpt: str, attempt: int) -> str | None:
        if rcpt in refused:
            return "550 5.1.1 mailbox unavailable"
        if rcpt in deferred and attempt == 1:
            return "451 4.3.0 try again later"
        return None

    smtp.recorder.plan = plan
    token = await editor_token(settings)
    password = "smtp-Pa55word-never-logged"
    w = Workers(settings, tmp_path, MAILER_LOG_FORMAT="json", MAILER_SMTP_PASSWORD=password)
    try:
        w.start()
        bid = await blast(app_client, token, await publish(app_client, token))
        done = await wait_status(app_client, token, bid, "done", timeout=30)
    finally:
        w.stop()
    assert done["sent"] == 34 and done["failed"] == 6

    [text] = w.logs()
    lines = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object
    assert lines and all({"ts", "level", "logger", "msg"} <= rec.keys() for rec in lines)
    secret_key = settings_env(settings)["MAILER_SECRET_KEY"]
    for secret in ("/unsubscribe/", "/confirm/", password, secret_key):
        assert secret not in text
    changes = [rec for rec in lines if rec.get("blast_id") == bid and "status" in rec]
    assert [rec["status"] for rec in changes] == ["sending", "done"]
    warnings = [rec for rec in lines if rec["level"] == "warning" and rec.get("blast_id") == bid]
    failed = [rec for rec in warnings if rec["outcome"] == "failed"]
    assert sum(rec["count"] for rec in failed) == 6 and {rec["code"] for rec in failed} == {550}
    assert len(failed) < 6  # aggregated per flush, not one line per message
    retried = [rec for rec in warnings if rec["outcome"] == "retry"]
    assert sum(rec["count"] for rec in retried) == 3 and {rec["code"] for rec in retried} == {451}

    # The editor's transitions happen in the web process: one record each, with fields.
    capture_blast_logs.clear()
    sid = await publish(app_client, token, title="second")
    b2 = await blast(app_client, token, sid)  # no worker now: it stays queued
    h = auth(token)
    for action in ("pause", "resume", "pause", "cancel"):
        assert (await app_client.post(f"/api/blasts/{b2}/{action}", headers=h)).status_code == 200
    records = [r for r in capture_blast_logs.records if getattr(r, "blast_id", None) == b2]
    assert [r.__dict__["status"] for r in records] == [
        "queued", "paused", "queued", "paused", "cancelled",
    ]  # fmt: skip
    assert (await progress(app_client, token, b2))["status"] == "cancelled"
    assert all("/unsubscribe/" not in r.getMessage() for r in capture_blast_logs.records)
