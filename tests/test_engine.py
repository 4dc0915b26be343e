"""The sending engine: rate ceilings, quotas, SMTP faults, policy pauses, TLS, DKIM, reuse."""

from __future__ import annotations

import base64
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import dkim
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from helpers import (
    blast,
    editor_token,
    progress,
    publish,
    queue_settled,
    seed_subscribers,
    sql,
    start_worker_process,
    subscriber,
    wait_status,
    wait_until,
    wait_workers,
)
from smtpserver import DROP, Received, SmtpServer

from mailer.config import Settings
from mailer.smtp import Verdict, classify


def max_window(times: list[float], width: float = 1.0) -> int:
    return busiest_window(times, width)[0]


def busiest_window(times: list[float], width: float = 1.0) -> tuple[int, float]:
    """The most messages in any window of ``width`` seconds, and where it starts."""
    times = sorted(times)
    best, start, j = 0, 0.0, 0
    for i, t in enumerate(times):
        while times[j] < t - width + 1e-9:
            j += 1
        if i - j + 1 > best:
            best, start = i - j + 1, times[j] - times[0]
    return best, start


def rate(times: list[float]) -> float:
    times = sorted(times)
    return (len(times) - 1) / (times[-1] - times[0])


@pytest.mark.parametrize(
    ("code", "message", "verdict"),
    [
        (None, "connection lost", Verdict.retry),
        (421, "4.7.0 try again later", Verdict.retry),
        (450, "4.2.1 mailbox busy", Verdict.retry),
        (451, "4.3.0 local error", Verdict.retry),
        (452, "4.5.3 too many recipients", Verdict.retry),
        (552, "5.5.3 too many recipients", Verdict.retry),
        (550, "5.1.1 no such user", Verdict.bounce),
        (550, "5.1.10 null MX", Verdict.bounce),
        (551, "5.1.6 moved", Verdict.bounce),
        (550, "5.2.1 mailbox disabled", Verdict.bounce),
        (550, "mailbox unavailable", Verdict.bounce),
        (553, "bad address syntax", Verdict.bounce),
        (550, "5.7.1 rejected by policy", Verdict.policy),
        (554, "5.7.26 unauthenticated", Verdict.policy),
        (554, "transaction failed", Verdict.policy),
        (552, "5.3.4 message too big", Verdict.reject),
        (552, "5.2.2 mailbox full", Verdict.reject),
        (500, "5.5.2 syntax error", Verdict.reject),
    ],
)
def test_reply_classification(code: int | None, message: str, verdict: Verdict) -> None:
    assert classify(code, message) is verdict


# batch_size 10: 50 jobs, more than one worker takes at once (max_jobs 10), so both send.
@pytest.mark.parametrize(
    "settings_overrides", [{"rate_per_second": 50.0, "rate_burst": 5, "batch_size": 10}]
)
@pytest.mark.slow(20)
async def test_rate_ceiling_across_two_worker_processes(
    app_client: httpx.AsyncClient, smtp: SmtpServer, settings: Settings, tmp_path: Path
) -> None:
    await seed_subscribers(settings, confirmed=500)
    token = await editor_token(settings)
    workers = [start_worker_process(settings, tmp_path / f"w{i}.log") for i in range(2)]
    try:
        await wait_workers(app_client, token, 2)  # both running before the blast starts
        bid = await blast(app_client, token, await publish(app_client, token))
        # Watched at the SMTP server, not by polling the API: this process stays quiet
        # while the workers send (it is the one that receives and stamps the mail).
        await wait_until(lambda: len(smtp.messages) >= 500, timeout=60, step=0.25)
        await wait_status(app_client, token, bid, "done", timeout=30)
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(30)
            except subprocess.TimeoutExpired:
                w.kill()
    times = [m.started for m in smtp.messages]
    assert len(times) == 500
    assert len({m.session for m in smtp.messages}) >= 2  # both workers sent
    (peak, where), achieved = busiest_window(times), rate(times)
    print(
        f"rate ceiling: max 1-s window {peak} at +{where:.2f}s (limit 55), "
        f"achieved {achieved:.2f}/s (target 50)"
    )
    assert peak <= 55
    # Below the rate only when the machine is loaded: a send whose re-check ran past its
    # slot gives the slot up (throttle.Slot.late). So the floor is loose (FLOOR in
    # tests/test_throttle.py says why); P6 of `make bench` measures the rate reached.
    assert 25 <= achieved <= 55


# The slow domain takes ~7 s; the fast one may wait at most one chunk's share of it
# (claims.DOMAIN_CHUNK_S, 2 s) and is otherwise bound only by CPU.
@pytest.mark.parametrize(
    "settings_overrides", [{"domain_rates": {"slow.test": 2.0}, "rate_burst": 1}]
)
@pytest.mark.slow(10)
async def test_per_domain_rate(
    app_client: httpx.AsyncClient, smtp: SmtpServer, settings: Settings, start_worker: Any
) -> None:
    await seed_subscribers(settings, confirmed=15, domain="slow.test", prefix="s")
    await seed_subscribers(settings, confirmed=200, domain="fast.test", prefix="f")
    token = await editor_token(settings)
    await start_worker()
    bid = await blast(app_client, token, await publish(app_client, token))
    await wait_until(lambda: len(smtp.messages) >= 215, timeout=60, step=0.25)  # quietly
    await wait_status(app_client, token, bid, "done", timeout=30)
    slow = sorted(m.started for m in smtp.messages if m.rcpt.endswith("@slow.test"))
    fast = sorted(m.started for m in smtp.messages if m.rcpt.endswith("@fast.test"))
    assert len(slow) == 15 and len(fast) == 200
    print(f"slow.test: {rate(slow):.2f}/s, max window {max_window(slow)}; fast.test span "
          f"{fast[-1] - fast[0]:.2f}s, slow span {slow[-1] - slow[0]:.2f}s")  # fmt: skip
    assert rate(slow) <= 2.1
    assert max_window(slow) <= 3  # rate + burst
    assert fast[-1] - fast[0] < (slow[-1] - slow[0]) / 2  # the fast domain did not wait


@pytest.mark.parametrize("settings_overrides", [{"daily_quota": 100, "daily_window_s": 6}])
async def test_daily_quota_waits_then_resumes(
    app_client: httpx.AsyncClient, smtp: SmtpServer, settings: Settings, start_worker: Any
) -> None:
    # The 24-hour window is shortened to 6 s: time travel for the rolling window.
    people = await seed_subscribers(settings, confirmed=150)
    token = await editor_token(settings)
    await start_worker()
    bid = await blast(app_client, token, await publish(app_client, token))
    await wait_until(lambda: len(smtp.messages) >= 100, timeout=30)
    # Every batch job due now has ended; the rest waits in SQL, and a follow-up job is
    # queued for when the window lets it go (a few seconds ahead, past the horizon).
    await queue_settled(settings, horizon_s=1)
    assert len(smtp.messages) == 100  # the quota holds
    p = await progress(app_client, token, bid)
    assert p["status"] == "sending" and p["sent"] == 100 and p["pending"] == 50
    assert p["reason"] and "daily quota of 100" in p["reason"] and "resumes at" in p["reason"]
    done = await wait_status(app_client, token, bid, "done", timeout=60)
    assert done["sent"] == 150 and done["reason"] is None
    counts = smtp.recorder.counts()
    assert sorted(counts) == sorted(people["confirmed"]) and set(counts.values()) == {1}
    first_100 = sorted(m.at for m in smtp.messages)
    assert first_100[100] - first_100[99] >= 3  # the rest waited for the window


# The reconciler would take the blast up only after three of its intervals without a claim
# (3 minutes here), so the retries can only be taken up by the follow-up job of their range.
@pytest.mark.parametrize("settings_overrides", [{"reconcile_interval_s": 60}])
async def test_retries_go_out_when_due_without_the_reconciler(
    app_client: httpx.AsyncClient, smtp: SmtpServer, settings: Settings, start_worker: Any
) -> None:
    people = await seed_subscribers(settings, confirmed=40)
    token = await editor_token(settings)
    smtp.recorder.plan = lambda rcpt, attempt: "451 4.3.0 greylisted" if attempt <= 2 else None
    await start_worker()
    bid = await blast(app_client, token, await publish(app_client, token))
    done = await wait_status(app_client, token, bid, "done", timeout=30)
    assert done["sent"] == 40 and done["failed"] == 0
    assert smtp.recorder.counts() == {a: 1 for a in people["confirmed"]}
    assert len(smtp.recorder.refused) == 80  # two greylistings each, then the mail


def fault_plan(rcpt: str, attempt: int) -> str | None:
    n = int(re.sub(r"\D", "", rcpt))
    if n % 100 == 7:
        return f"550 5.1.1 <{rcpt}>: no such user"
    if n % 50 == 3 and attempt == 1:
        return DROP
    if n % 10 == 1 and attempt <= 2:
        return "421 4.7.0 try again later" if n % 20 == 1 else "451 4.3.0 greylisted"
    return None


@pytest.mark.parametrize("settings_overrides", [{"batch_size": 100}])
@pytest.mark.slow(90)
async def test_faults_on_a_2000_blast(
    app_client: httpx.AsyncClient, smtp: SmtpServer, settings: Settings, start_worker: Any
) -> None:
    people = await seed_subscribers(settings, confirmed=2000)
    token = await editor_token(settings)
    smtp.recorder.plan = fault_plan
    worker = await start_worker()
    bid = await blast(app_client, token, await publish(app_client, token))
    done = await wait_status(app_client, token, bid, "done", timeout=120)
    counts = smtp.recorder.counts()
    hard = [a for a in people["confirmed"] if int(re.sub(r"\D", "", a)) % 100 == 7]
    others = [a for a in people["confirmed"] if a not in hard]
    assert len(hard) == 20
    assert {a: counts.get(a, 0) for a in others} == {a: 1 for a in others}  # exactly once
    assert not any(a in counts for a in hard)
    assert done["sent"] == 1980 and done["failed"] == 20 and done["pending"] == 0
    for a in hard[:5]:
        sub = await subscriber(settings, a)
        assert sub is not None and sub.status == "bounced"
    transient = sum(1 for _, r in smtp.recorder.refused if r == DROP or r.startswith("4"))
    assert transient >= 200  # the faults really happened
    assert worker.jobs_failed == 0  # no job crashed
    # A bounced address gets nothing more: a second statement skips them at the snapshot.
    smtp.recorder.clear()
    bid2 = await blast(app_client, token, await publish(app_client, token, title="again"))
    done2 = await wait_status(app_client, token, bid2, "done", timeout=120)
    assert done2["total"] == 1980 and not any(a in smtp.recorder.counts() for a in hard)


@pytest.mark.parametrize("settings_overrides", [{"policy_failures_pause": 20}])
async def test_policy_rejections_pause_the_blast(
    app_client: httpx.AsyncClient, smtp: SmtpServer, settings: Settings, start_worker: Any
) -> None:
    bad = await seed_subscribers(settings, confirmed=20, domain="strict.test", prefix="p")
    await seed_subscribers(settings, confirmed=300, domain="ok.test")
    token = await editor_token(settings)
    smtp.recorder.plan = lambda rcpt, attempt: (
        "550 5.7.1 message rejected by policy" if rcpt.endswith("@strict.test") else None
    )
    await start_worker()
    bid = await blast(app_client, token, await publish(app_client, token))
    p = await wait_status(app_client, token, bid, "paused", timeout=30)
    assert "5.7.1" in p["reason"] and "policy" in p["reason"]
    assert p["failed"] == 20
    for a in bad["confirmed"]:
        sub = await subscriber(settings, a)
        assert sub is not None and sub.status == "confirmed"  # not suppressed


def _tls_settings(settings: Settings, server: SmtpServer, security: str, ca: Path) -> Settings:
    return settings.model_copy(
        update={"smtp_port": server.port, "smtp_security": security, "smtp_ca_file": ca}
    )


@pytest.mark.parametrize("security", ["starttls", "tls"])
async def test_tls(
    security: str,
    app_client: httpx.AsyncClient,
    settings: Settings,
    start_worker: Any,
    tls_ca: Any,
    tmp_path: Path,
) -> None:
    import trustme

    cert = tls_ca.issue_cert("127.0.0.1", "localhost")
    server_ctx = __import__("ssl").create_default_context(__import__("ssl").Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    if security == "tls":
        server = SmtpServer(tls_context=server_ctx).start()
    else:
        server = SmtpServer(starttls_context=server_ctx, require_starttls=True).start()
    good_ca, wrong_ca = tmp_path / "ca.pem", tmp_path / "wrong.pem"
    tls_ca.cert_pem.write_to_path(good_ca)
    trustme.CA().cert_pem.write_to_path(wrong_ca)
    token = await editor_token(settings)
    await seed_subscribers(settings, confirmed=5)
    try:
        s = _tls_settings(settings, server, security, good_ca)
        worker = await start_worker(settings=s)
        bid = await blast(app_client, token, await publish(app_client, token, title="good"))
        assert (await wait_status(app_client, token, bid, "done"))["sent"] == 5
        assert len(server.messages) == 5
        await worker.close()

        bad = _tls_settings(settings, server, security, wrong_ca)
        await start_worker(settings=bad)
        server.recorder.clear()
        bid2 = await blast(app_client, token, await publish(app_client, token, title="bad"))
        p = await wait_status(app_client, token, bid2, "paused", timeout=30)
        assert "TLS" in p["reason"] and "certificate" in p["reason"].lower()
        assert p["sent"] == 0 and p["pending"] == 5 and server.messages == []
        rows = await sql(
            settings, "SELECT count(*) FROM deliveries WHERE blast_id=:b AND status='sent'", b=bid2
        )
        assert rows[0][0] == 0
    finally:
        server.stop()


@pytest.mark.parametrize("settings_overrides", [{"feedback_id": "a:b:c:mailer"}])
async def test_dkim_signature_verifies(
    app_client: httpx.AsyncClient,
    smtp: SmtpServer,
    settings: Settings,
    start_worker: Any,
    tmp_path: Path,
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    (tmp_path / "dkim.pem").write_bytes(pem)
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)
    s = settings.model_copy(
        update={
            "dkim_domain": "example.org",
            "dkim_selector": "mail",
            "dkim_key_file": tmp_path / "dkim.pem",
        }
    )
    await seed_subscribers(settings, confirmed=2)
    token = await editor_token(settings)
    await start_worker(settings=s)
    bid = await blast(app_client, token, await publish(app_client, token))
    await wait_status(app_client, token, bid, "done")
    looked_up: list[bytes] = []

    def dns(name: bytes, timeout: int = 5) -> bytes:
        looked_up.append(name)
        return record

    for m in smtp.messages:
        assert m.data.startswith(b"DKIM-Signature:")
        assert dkim.verify(m.data, dnsfunc=dns)
        sig = m.data.split(b"\r\n\r\n", 1)[0].decode()
        h = re.search(r"h=([^;]+);", re.sub(r"\s+", "", sig.split("DKIM-Signature:", 1)[1]))
        assert h is not None
        signed = {x.lower() for x in h.group(1).split(":")}
        assert {"from", "subject", "list-unsubscribe", "list-unsubscribe-post"} <= signed
        assert "feedback-id" in signed
        tampered = m.data.replace(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click",
                                  b"List-Unsubscribe-Post: List-Unsubscribe=Two-Click")  # fmt: skip
        assert not dkim.verify(tampered, dnsfunc=dns)
    assert looked_up and looked_up[0] == b"mail._domainkey.example.org."


# Two connections, many lanes (ten batches at once): while the relay sits on both, the
# other lanes must not book slots and then queue for a connection, or they all leave at
# once when it answers (SmtpPool.held; before it, 60 and 70 in one second).
@pytest.mark.parametrize(
    "settings_overrides",
    [{"rate_per_second": 50.0, "rate_burst": 5, "batch_size": 10, "smtp_connections": 2}],
)
@pytest.mark.slow(8)
async def test_a_relay_slow_to_answer_does_not_bunch_sends_past_the_ceiling(
    app_client: httpx.AsyncClient, smtp: SmtpServer, settings: Settings, start_worker: Any
) -> None:
    await seed_subscribers(settings, confirmed=200)
    token = await editor_token(settings)
    # The 60th and 61st messages go on different connections (one is already held).
    smtp.recorder.hold = lambda n: 1.2 if n in (60, 61) else 0.0
    await start_worker()
    bid = await blast(app_client, token, await publish(app_client, token))
    assert (await wait_status(app_client, token, bid, "done", timeout=60))["sent"] == 200
    times = [m.started for m in smtp.messages]
    assert len(times) == 200
    peak, where = busiest_window(times)
    print(f"slow relay: max 1-s window {peak} at +{where:.2f}s (limit 55)")
    assert peak <= 55


@pytest.mark.parametrize("settings_overrides", [{"batch_size": 100, "smtp_connections": 3}])
@pytest.mark.slow(15)
async def test_connections_are_reused(
    app_client: httpx.AsyncClient, smtp: SmtpServer, settings: Settings, start_worker: Any
) -> None:
    await seed_subscribers(settings, confirmed=1000)
    token = await editor_token(settings)
    await start_worker()
    bid = await blast(app_client, token, await publish(app_client, token))
    assert (await wait_status(app_client, token, bid, "done", timeout=60))["sent"] == 1000
    assert len(smtp.messages) == 1000
    assert smtp.recorder.connections <= 3
    assert len({m.session for m in smtp.messages}) <= 3


def _unused(*_: Received) -> None:  # keep the import honest for type checkers
    return None
