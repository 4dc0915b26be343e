"""``mailer status`` as ops run it: a separate process reading Redis and SQL directly."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from forkrun import run_mailer
from helpers import (
    MAILER,
    auth,
    blast,
    editor_token,
    progress,
    publish,
    queue_settled,
    seed_subscribers,
    settings_env,
    wait_until,
)
from smtpserver import SmtpServer, free_port

from mailer.config import Settings, load_settings

STATUSES = {"scheduled", "queued", "sending", "paused", "done", "cancelled"}


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    return settings_env(settings) | {"COLUMNS": "200", "NO_COLOR": "1"} | extra


def row(output: str, blast_id: int) -> list[str]:
    """The cells of a blast's row in the rich table."""
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line) if c.strip()]
        if len(cells) > 1 and cells[0] == str(blast_id) and cells[1] in STATUSES:
            return cells
    raise AssertionError(f"no row for blast {blast_id} in:\n{output}")


@pytest.mark.parametrize("settings_overrides", [{"rate_per_second": 20, "rate_burst": 1}])
@pytest.mark.slow(12)
async def test_status_shows_workers_queue_and_blasts(
    app_client: httpx.AsyncClient,
    smtp: SmtpServer,
    settings: Settings,
    start_worker: Any,
    tmp_path: Path,
) -> None:
    await seed_subscribers(settings, confirmed=100)
    token = await editor_token(settings)
    await start_worker()
    paused = await blast(app_client, token, await publish(app_client, token, title="one"))
    await wait_until(lambda: len(smtp.messages) >= 10, timeout=20)
    r = await app_client.post(f"/api/blasts/{paused}/pause", headers=auth(token))
    assert r.status_code == 200
    later = await blast(
        app_client,
        token,
        await publish(app_client, token, title="two"),
        send_at="2099-01-01T09:00:00Z",
    )

    await queue_settled(settings)  # in-flight messages are recorded after the pause
    p = await progress(app_client, token, paused)
    assert len(smtp.messages) == p["sent"]

    # --watch runs alongside; both start at once to spare the suite a process start-up.
    out_file, err_file = tmp_path / "watch.out", tmp_path / "watch.err"
    with out_file.open("w") as out_fh, err_file.open("w") as err_fh:
        watch = subprocess.Popen(
            [MAILER, "status", "--watch"], env=env_for(settings), stdout=out_fh, stderr=err_fh
        )
    try:
        done = await asyncio.to_thread(run_mailer, ["status"], env=env_for(settings), timeout=30)
        assert done.returncode == 0, done.stderr
        out = done.stdout
        cells = row(out, paused)
        assert cells[1] == "paused"
        # total, sent, failed, skipped, pending, then the reason
        numbers = [c for c in cells[2:] if c.isdigit()]
        assert numbers == [str(p["total"]), str(p["sent"]), "0", "0", str(p["pending"])], cells
        assert p["sent"] > 0 and p["pending"] > 0 and p["total"] == 100
        assert "paused by an editor" in out
        scheduled = row(out, later)
        assert scheduled[1] == "scheduled" and "starts 2099-01-01 09:00:00 UTC" in out
        assert "1 alive" in out and "Workers" in out and "send rate" in out
        assert done.stderr == ""

        # A frame on screen means the watch's SIGINT handler is in place: Ctrl-C ends it.
        await wait_until(lambda: "Active blasts" in out_file.read_text(), 15)
        watch.send_signal(signal.SIGINT)
        await asyncio.to_thread(watch.wait, 15)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    stderr = err_file.read_text()
    assert watch.returncode == 0, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert row(out_file.read_text(), paused)[1] == "paused"


async def test_status_without_redis_says_so_in_one_line(tmp_path: Path) -> None:
    settings = load_settings(
        env="dev",
        secret_key="status-test-secret-key-0123456789abcdef",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'mailer.db'}",
    )
    env = env_for(settings)
    done = await asyncio.to_thread(run_mailer, ["status"], env=env, timeout=30)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Redis (MAILER_REDIS_URL)"), done.stderr
