"""Exposure: only MAILER_TRUSTED_PROXIES decides who the client is, and /metrics can be
closed with a bearer token (docs/deploy.md). Compose's loopback-only port is checked in
tests/test_deploy_files.py.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from helpers import events, settings_env, subscriber
from pydantic import SecretStr

from mailer.config import Settings

MAILER = str(Path(sys.executable).parent / "mailer")
TOKEN = "metrics-token-0123456789abcdef"


async def test_serve_ignores_x_forwarded_for_from_an_untrusted_peer(
    settings: Settings, web_port: int, tmp_path: Path
) -> None:
    """`mailer serve` as ops run it: uvicorn must not rewrite the client address itself
    (its default trusts X-Forwarded-For from 127.0.0.1); no proxy is trusted here."""
    assert settings.trusted_proxies == []
    log = (tmp_path / "web.log").open("wb")
    proc = subprocess.Popen(
        [MAILER, "serve", "--port", str(web_port)],
        env=settings_env(settings),
        stdout=log,
        stderr=log,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{web_port}", timeout=10) as http:
            for _ in range(300):
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
            r = await http.post(
                "/subscribe",
                data={"email": "xff@example.com"},
                headers={"x-forwarded-for": "198.51.100.77"},
            )
            assert r.status_code == 202, r.text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    sub = await subscriber(settings, "xff@example.com")
    assert sub is not None
    [signup] = [e for e in await events(settings, sub.id) if e.kind == "signup"]
    assert signup.ip == "127.0.0.1"  # the peer, not what the request claimed


async def test_metrics_are_open_without_a_token_setting(app_client: httpx.AsyncClient) -> None:
    r = await app_client.get("/metrics")
    assert r.status_code == 200 and "mailer_" in r.text


@pytest.mark.parametrize("settings_overrides", [{"metrics_token": SecretStr(TOKEN)}])
async def test_metrics_want_the_bearer_token_when_one_is_set(
    app_client: httpx.AsyncClient,
) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
    ):
        r = await app_client.get("/metrics", headers=headers)
        assert r.status_code == 401, headers
        assert "mailer_" not in r.text and r.headers["www-authenticate"].startswith("Bearer")
    for scheme in ("Bearer", "bearer"):
        r = await app_client.get("/metrics", headers={"Authorization": f"{scheme} {TOKEN}"})
        assert r.status_code == 200 and "mailer_" in r.text
    assert (await app_client.get("/healthz")).status_code == 200  # probes stay open
