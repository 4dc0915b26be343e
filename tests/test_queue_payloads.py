"""Redis is not code execution (docs/security.md): job payloads and results are msgpack,
so whoever can write to Redis can plant data, never code, and the worker carries on.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import Any

import httpx
import msgpack  # type: ignore[import-untyped]
import pytest
import redis.asyncio as aioredis
from arq.constants import job_key_prefix, result_key_prefix
from burst import run_burst
from helpers import blast, editor_token, progress, publish, seed_subscribers, subscriber
from smtpserver import SmtpServer

from mailer.config import Settings
from mailer.importer import ImportOptions, import_csv


@pytest.fixture
def db_url(tmp_path: Path) -> str:  # one database is enough: this is about Redis
    return f"sqlite+aiosqlite:///{tmp_path / 'mailer.db'}"


class Planted:
    """Unpickling this creates a file: proof that the payload ran as code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


async def plant(redis: aioredis.Redis, settings: Settings, job_id: str, payload: bytes) -> None:
    now_ms = int(time.time() * 1000)
    await redis.psetex(job_key_prefix + job_id, 60_000, payload)
    await redis.zadd(settings.queue_name, {job_id: now_ms})


async def test_a_pickle_planted_in_redis_runs_no_code_and_the_worker_carries_on(
    app_client: httpx.AsyncClient,
    settings: Settings,
    smtp: SmtpServer,
    redis: aioredis.Redis,
    tmp_path: Path,
) -> None:
    marker = tmp_path / "pwned"
    evil = {"t": 1, "f": "send_confirmation", "a": [Planted(marker)], "k": {}, "et": 0}
    planted = f"{settings.queue_name}:planted"
    await plant(redis, settings, planted, pickle.dumps(evil))
    # msgpack that is not a job fails that one job, nothing else.
    odd = f"{settings.queue_name}:odd"
    await plant(redis, settings, odd, msgpack.packb({"f": "send_batch", "a": "x", "k": []}))
    r = await app_client.post("/subscribe", json={"email": "ada@example.com"})
    assert r.status_code == 202  # queued after the planted jobs, run by the same worker

    worker = await run_burst(settings)
    assert not marker.exists(), "the planted pickle ran"
    assert len(smtp.recorder.to("ada@example.com")) == 1  # normal jobs still run
    assert (worker.jobs_failed, worker.jobs_complete) == (2, 1)
    # The planted job failed with a result that is data too.
    result = msgpack.unpackb(await redis.get(result_key_prefix + planted), raw=False)
    assert result["s"] is False and "unable to deserialize" in result["r"]


async def test_payloads_and_results_are_msgpack_on_every_path(
    app_client: httpx.AsyncClient,
    settings: Settings,
    smtp: SmtpServer,
    redis: aioredis.Redis,
    tmp_path: Path,
) -> None:
    """arq's enqueue_job (the sign-up), the hand-written pipeline (imports) and the results."""
    await app_client.post("/subscribe", json={"email": "form@example.com"})
    csv_file = tmp_path / "list.csv"
    csv_file.write_text("email\nlist@example.com\n")
    await import_csv(settings, csv_file, ImportOptions())
    job_ids = [
        j.decode() for j in await redis.zrange(settings.queue_name, 0, -1)
    ]  # fmt: skip
    assert len(job_ids) == 2
    for job_id in job_ids:
        raw = await redis.get(job_key_prefix + job_id)
        assert not raw.startswith(b"\x80"), "a pickle"
        job = msgpack.unpackb(raw, raw=False)
        assert job["f"] == "send_confirmation" and isinstance(job["a"][0], int)
    await run_burst(settings)
    assert sorted(smtp.recorder.counts()) == ["form@example.com", "list@example.com"]
    for job_id in job_ids:
        result = msgpack.unpackb(await redis.get(result_key_prefix + job_id), raw=False)
        assert result["s"] is True and result["r"] == "sent"
    sub = await subscriber(settings, "form@example.com")
    assert sub is not None and sub.confirm_sent_at is not None


async def test_a_blast_dated_more_than_a_day_back_starts_now(
    app_client: httpx.AsyncClient, settings: Settings, smtp: SmtpServer
) -> None:
    """arq keeps a payload for its defer time + 1 day: dated back further, that was a
    negative expiry, a Redis error and a 500 (the schema fuzzer found it)."""
    people = await seed_subscribers(settings, confirmed=2)
    token = await editor_token(settings)
    sid = await publish(app_client, token)
    bid = await blast(app_client, token, sid, send_at="2000-01-01T02:00:00Z")
    await run_burst(settings)
    assert sorted(smtp.recorder.counts()) == people["confirmed"]
    assert (await progress(app_client, token, bid))["status"] == "done"
