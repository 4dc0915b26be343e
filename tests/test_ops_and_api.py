"""Readiness, statement preview and test sends."""

from __future__ import annotations

from typing import Any

import httpx
from helpers import auth, editor_token, publish
from smtpserver import SmtpServer, free_port

from mailer.config import Settings
from mailer.web.app import create_app


async def _ready(settings: Settings) -> httpx.Response:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get("/readyz")


async def test_readyz(settings: Settings, app_client: httpx.AsyncClient) -> None:
    assert (await app_client.get("/healthz")).json() == {"status": "ok"}
    r = await app_client.get("/readyz")
    assert r.status_code == 200 and r.json()["redis"] == "ok" and r.json()["database"] == "ok"
    no_redis = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    r = await _ready(no_redis)
    assert r.status_code == 503 and r.json()["redis"] != "ok" and r.json()["database"] == "ok"
    url = settings.database_url
    broken = (
        url.replace("127.0.0.1:5432", f"127.0.0.1:{free_port()}")
        if "postgresql" in url
        else "sqlite+aiosqlite:////nonexistent-dir/x/mailer.db"
    )
    r = await _ready(settings.model_copy(update={"database_url": broken}))
    assert r.status_code == 503 and r.json()["database"] != "ok"


async def test_preview_and_test_send(
    app_client: httpx.AsyncClient, smtp: SmtpServer, settings: Settings, start_worker: Any
) -> None:
    token = await editor_token(settings)
    sid = await publish(app_client, token, title="Preview me", body_markdown="Some *text*")
    r = await app_client.get(f"/api/statements/{sid}/preview", headers=auth(token))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "Preview me" in r.text and "<em>text</em>" in r.text
    r = await app_client.get(f"/api/statements/{sid}", headers=auth(token))
    assert r.json()["title"] == "Preview me"
    assert (await app_client.get("/api/statements/999", headers=auth(token))).status_code == 404

    r = await app_client.post(
        f"/api/statements/{sid}/test",
        json={"to": ["Editor@Example.com", "second@example.com"]},
        headers=auth(token),
    )
    assert r.status_code == 200, r.text
    assert r.json()["results"] == {"editor@example.com": "sent", "second@example.com": "sent"}
    got = smtp.wait_for(2)
    msg = got[0].message
    assert msg["Subject"].startswith("[TEST]") and "Preview me" in msg["Subject"]
    assert msg["X-Mailer-Test"] == "yes"
    r = await app_client.post(
        f"/api/statements/{sid}/test", json={"to": ["nope"]}, headers=auth(token)
    )
    assert r.status_code == 422 and "to:" in r.json()["detail"]
    assert len(smtp.messages) == 2
