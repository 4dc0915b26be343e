"""`mailer dev` as a user runs it: a subprocess serving the form, catching mail at /dev/inbox."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
from helpers import _wait_ready
from smtpserver import free_port


def test_mailer_dev_serves_the_form_and_catches_the_confirmation(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    env.update(
        MAILER_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'dev.db'}",
        MAILER_QUEUE_NAME=f"test-dev-{uuid.uuid4().hex[:8]}",
        MAILER_DEV_INBOX_DIR=str(tmp_path / "inbox"),
    )
    # No MAILER_REDIS_URL: `mailer dev` starts a private redis-server of its own.
    mailer = Path(sys.executable).parent / "mailer"
    proc = subprocess.Popen(
        [str(mailer), "dev", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, proc)
        form = httpx.get(base + "/subscribe")
        assert form.status_code == 200 and 'name="email"' in form.text
        r = httpx.post(base + "/subscribe", data={"email": "dev@example.com", "name": "Dev"})
        assert r.status_code == 202

        deadline = time.monotonic() + 30
        inbox = ""
        while time.monotonic() < deadline:
            inbox = httpx.get(base + "/dev/inbox").text
            if "dev@example.com" in inbox:
                break
            time.sleep(0.2)
        assert "dev@example.com" in inbox, inbox
        assert "Confirm" in inbox
        link = inbox.split('href="/dev/inbox/', 1)[1].split('"', 1)[0]
        message = httpx.get(f"{base}/dev/inbox/{link}")
        assert message.status_code == 200
        assert f"{base}/confirm/" in message.text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    text = out.decode()
    assert "/subscribe" in text and "/dev/inbox" in text  # it prints the URLs
    assert "Traceback" not in text, text
