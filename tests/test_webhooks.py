"""Provider webhooks end to end: a real blast, then each provider's bounce and complaint
events for the messages our SMTP server received, signed with keys made in the test,
posted to the app; the next blast reaches only who is left. Forged, unsigned, stale,
replayed, oversized and malformed requests are refused and write nothing."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

import httpx
import pytest
from helpers import (
    blast,
    editor_token,
    publish,
    rows,
    seed_subscribers,
    sql,
    status_of,
    subscriber,
    wait_status,
)
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from pydantic import SecretStr
from smtpserver import SmtpServer
from webhook_payloads import (
    MAILGUN_KEY,
    POSTMARK_PASSWORD,
    POSTMARK_USER,
    TOPIC,
    MailgunHook,
    PostmarkHook,
    Request,
    SendGridHook,
    SesHook,
    Sns,
    basic,
    mailgun_event,
    mailgun_signature,
    postmark_bounce,
    ses_bounce,
    ses_complaint,
)

from mailer.bounces.providers import mailgun, postmark, sendgrid
from mailer.bounces.providers import ses as ses_provider
from mailer.bounces.providers.common import Received, Rejected
from mailer.config import Settings, SettingsError, load_settings
from mailer.keys import Keys
from mailer.privacy import email_hash
from mailer.web.app import create_app

PROVIDERS = ["ses", "postmark", "sendgrid", "mailgun"]
SENDGRID = SendGridHook()  # one key pair: its public half goes into the settings
CONFIGURED = {
    "ses_topic_arns": [TOPIC],
    "postmark_webhook_user": POSTMARK_USER,
    "postmark_webhook_password": SecretStr(POSTMARK_PASSWORD),
    "sendgrid_webhook_public_key": SENDGRID.public_key,
    "mailgun_signing_key": SecretStr(MAILGUN_KEY),
}


class Hook(Protocol):
    path: str

    def hard(self, email: str, message_id: str | None) -> Request: ...
    def soft(self, email: str, message_id: str | None) -> Request: ...
    def complaint(self, email: str, message_id: str | None) -> Request: ...
    def forged(self, request: Request) -> Request: ...
    def unsigned(self, request: Request) -> Request: ...


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return dict(CONFIGURED)


@pytest.fixture
def sns() -> Sns:
    return Sns(key=SNS_KEY.key)


SNS_KEY = Sns()  # RSA key generation is slow: one key, a fresh request log per test


@pytest.fixture
async def client(settings: Settings, sns: Sns) -> AsyncIterator[httpx.AsyncClient]:
    """The app over ASGI, its SNS requests answered by the local stand-in."""
    app = create_app(settings)
    app.state.sns_transport = sns.transport()
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 5000))
        async with httpx.AsyncClient(transport=transport, base_url=settings.base_url) as c:
            yield c


def hook(provider: str, sns: Sns) -> Hook:
    hooks: dict[str, Hook] = {
        "ses": SesHook(sns),
        "postmark": PostmarkHook(),
        "sendgrid": SENDGRID,
        "mailgun": MailgunHook(),
    }
    return hooks[provider]


async def post(client: httpx.AsyncClient, path: str, request: Request) -> httpx.Response:
    body, headers = request
    return await client.post(path, content=body, headers=headers)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_blast_to_ten_then_3_hard_1_soft_1_complaint_next_blast_reaches_the_6_left(
    provider: str,
    client: httpx.AsyncClient,
    sns: Sns,
    smtp: SmtpServer,
    settings: Settings,
    start_worker: Any,
) -> None:
    a = sorted((await seed_subscribers(settings, confirmed=10))["confirmed"])
    ids = {e: (await subscriber(settings, e)).id for e in a}  # type: ignore[union-attr]
    token = await editor_token(settings)
    await start_worker()
    first = await blast(client, token, await publish(client, token))
    await wait_status(client, token, first, "done")
    got = {m.rcpt: m.message for m in smtp.messages}
    assert sorted(got) == a
    mid = {e: str(got[e]["Message-ID"]) for e in a}
    h = hook(provider, sns)

    # Forged and unsigned calls naming real subscribers: refused, nothing written.
    r = await post(client, h.path, h.forged(h.hard(a[6], mid[a[6]])))
    assert r.status_code == 403, r.text
    r = await post(client, h.path, h.unsigned(h.complaint(a[7], mid[a[7]])))
    assert r.status_code == 401, r.text
    assert await rows(settings) == []

    requests = [
        h.hard(a[0], mid[a[0]]),
        h.hard(a[1], mid[a[1]]),
        h.hard(a[2], None),  # no Message-ID: the provider-verified address names them
        h.soft(a[3], mid[a[3]]),
        h.complaint(a[4], mid[a[4]]),
    ]
    for request in requests:
        r = await post(client, h.path, request)
        assert r.status_code == 200, r.text
        assert r.json()["stored"] == 1 and r.json()["duplicates"] == 0, r.json()

    # The provider retries the first one: it counts once.
    r = await post(client, h.path, requests[0])
    if provider == "mailgun":  # the same signature token twice is a replay
        assert r.status_code == 403 and "already used" in r.json()["detail"]
        body = json.loads(requests[0][0])
        body["signature"] = mailgun_signature()  # Mailgun's retry, signed afresh
        r = await post(client, h.path, (json.dumps(body).encode(), requests[0][1]))
    assert r.status_code == 200, r.text
    assert r.json()["stored"] == 0 and r.json()["duplicates"] == 1

    source = f"webhook:{provider}"
    assert await rows(settings) == [
        ("hard", ids[a[0]], first, "message-id", source),
        ("hard", ids[a[1]], first, "message-id", source),
        ("hard", ids[a[2]], None, "provider", source),
        ("soft", ids[a[3]], first, "message-id", source),
        ("complaint", ids[a[4]], first, "message-id", source),
    ]
    assert [await status_of(settings, e) for e in a] == [
        "bounced", "bounced", "bounced", "confirmed", "unsubscribed",
        "confirmed", "confirmed", "confirmed", "confirmed", "confirmed",
    ]  # fmt: skip
    suppressed = await sql(settings, "SELECT email_hash, reason FROM suppressions")
    assert suppressed == [(email_hash(settings, a[4]), "complaint")]

    smtp.recorder.clear()
    second = await blast(client, token, await publish(client, token, title="Another"))
    done = await wait_status(client, token, second, "done")
    assert done["sent"] == 6
    assert sorted(smtp.recorder.counts()) == [a[3], *a[5:]]


# Refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize("settings_overrides", [{}])
async def test_each_webhook_is_disabled_until_configured(client: httpx.AsyncClient) -> None:
    for provider in PROVIDERS:
        r = await client.post(f"/webhooks/{provider}", content=b"{}")
        assert r.status_code == 404, (provider, r.text)
        assert "disabled: set MAILER_" in r.json()["detail"]


async def test_postmark_basic_auth(client: httpx.AsyncClient, settings: Settings) -> None:
    await seed_subscribers(settings, confirmed=1)
    email = "conf000000@example.com"
    body = json.dumps(postmark_bounce(email, None)).encode()
    r = await client.post("/webhooks/postmark", content=body)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic ")
    for user, password in ((POSTMARK_USER, "wrong"), ("someone", POSTMARK_PASSWORD), ("", "")):
        r = await client.post("/webhooks/postmark", content=body, headers=basic(user, password))
        assert r.status_code == 403, r.text
    r = await client.post(
        "/webhooks/postmark", content=body, headers={"Authorization": "Basic !!!"}
    )
    assert r.status_code == 401
    assert await rows(settings) == [] and await status_of(settings, email) == "confirmed"
    r = await client.post(
        "/webhooks/postmark", content=body, headers=basic(POSTMARK_USER, POSTMARK_PASSWORD)
    )
    assert r.status_code == 200 and await status_of(settings, email) == "bounced"


@pytest.mark.parametrize("provider", ["sendgrid", "mailgun"])
async def test_stale_signatures_are_refused_as_replays(
    provider: str, client: httpx.AsyncClient, settings: Settings
) -> None:
    await seed_subscribers(settings, confirmed=1)
    email = "conf000000@example.com"
    old = int(time.time()) - settings.webhook_max_age_s - 60
    if provider == "sendgrid":
        event = SENDGRID.event(email, None, "spamreport")
        request = SENDGRID.signed(json.dumps([event]).encode(), timestamp=old)
    else:
        data = mailgun_event(email, None, "complained")
        request = MailgunHook.request(data, mailgun_signature(timestamp=old))
    r = await post(client, f"/webhooks/{provider}", request)
    assert r.status_code == 403 and "replay" in r.json()["detail"]
    assert await rows(settings) == [] and await status_of(settings, email) == "confirmed"


async def test_mailgun_token_is_remembered_in_redis_and_used_once(
    client: httpx.AsyncClient, settings: Settings, redis: Any
) -> None:
    await seed_subscribers(settings, confirmed=1)
    signature = mailgun_signature()
    request = MailgunHook.request(
        mailgun_event("conf000000@example.com", None, "complained"), signature
    )
    assert (await post(client, "/webhooks/mailgun", request)).status_code == 200
    key = Keys(settings.queue_name).webhook_token("mailgun", signature["token"])
    assert 0 < await redis.ttl(key) <= 2 * settings.webhook_max_age_s
    again = await post(client, "/webhooks/mailgun", request)
    assert again.status_code == 403
    assert len(await rows(settings)) == 1


async def test_a_database_outage_answers_503_and_frees_the_mailgun_token_for_the_retry(
    settings: Settings, client: httpx.AsyncClient, sns: Sns
) -> None:
    await seed_subscribers(settings, confirmed=1)
    request = MailgunHook().hard("conf000000@example.com", None)
    down = create_app(
        settings.model_copy(
            update={"database_url": "postgresql+asyncpg://postgres@127.0.0.1:9/none"}
        )
    )
    async with down.router.lifespan_context(down):
        transport = httpx.ASGITransport(app=down)
        async with httpx.AsyncClient(transport=transport, base_url=settings.base_url) as c:
            r = await post(c, "/webhooks/mailgun", request)
    assert r.status_code == 503 and "try again later" in r.json()["detail"]
    r = await post(client, "/webhooks/mailgun", request)  # Mailgun's retry, same token
    assert r.status_code == 200 and r.json()["stored"] == 1
    assert await status_of(settings, "conf000000@example.com") == "bounced"


async def test_bodies_over_the_cap_get_413_and_write_nothing(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    await seed_subscribers(settings, confirmed=1)
    data = mailgun_event("conf000000@example.com", None, "complained", padding="x" * 70_000)
    r = await post(client, "/webhooks/mailgun", MailgunHook.request(data))
    assert r.status_code == 413 and "larger than 65536 bytes" in r.json()["detail"]
    assert await rows(settings) == []


async def test_malformed_json_is_a_400_naming_the_problem(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    auth = basic(POSTMARK_USER, POSTMARK_PASSWORD)
    cases = {
        "ses": (b'{"Type": "Notification", ', {}),
        "postmark": (b"[1, 2", auth),
        "sendgrid": SENDGRID.signed(b'[{"event": "bounce"'),
        "mailgun": (b"\xff\xfe not json", {}),
    }
    for provider, (body, headers) in cases.items():
        r = await client.post(f"/webhooks/{provider}", content=body, headers=headers)
        assert r.status_code == 400, (provider, r.text)
        assert "not valid JSON" in r.json()["detail"], provider
    r = await post(client, "/webhooks/sendgrid", SENDGRID.signed(b'{"event": "bounce"}'))
    assert r.status_code == 400 and "JSON array" in r.json()["detail"]
    r = await client.post("/webhooks/postmark", content=b'"text"', headers=auth)
    assert r.status_code == 400 and "JSON object" in r.json()["detail"]
    assert await rows(settings) == []


# What is stored --------------------------------------------------------------------------


async def test_unknown_event_types_answer_200_and_are_stored_as_ignored(
    client: httpx.AsyncClient, settings: Settings, sns: Sns
) -> None:
    await seed_subscribers(settings, confirmed=1)
    email = "conf000000@example.com"
    ses = SesHook(sns)
    mystery = ses_bounce(email, None) | {"notificationType": "Mystery"}
    auto_reply = postmark_bounce(email, None, kind="AutoResponder", details="Out of office")
    requests = {
        "ses": ses._request(mystery),
        "postmark": PostmarkHook()._request(auto_reply),
        "sendgrid": SENDGRID.signed(
            json.dumps(
                [
                    SENDGRID.event(email, None, "delivered", response="250 OK"),
                    SENDGRID.event(email, None, "account_status_change"),
                ]
            ).encode()
        ),
        "mailgun": MailgunHook.request(mailgun_event(email, None, "list_member_uploaded")),
    }
    for provider, request in requests.items():
        r = await post(client, f"/webhooks/{provider}", request)
        assert r.status_code == 200, (provider, r.text)
        assert r.json()["stored"] == 1, (provider, r.json())
    assert [row[0] for row in await rows(settings)] == ["ignored"] * 4
    assert (await post(client, "/webhooks/sendgrid", requests["sendgrid"])).json()[
        "skipped"
    ] == 1  # the delivery: not a bounce, not stored
    assert await status_of(settings, email) == "confirmed"


async def test_codes_soften_a_providers_verdict_and_strangers_stay_unmatched(
    client: httpx.AsyncClient, settings: Settings, sns: Sns
) -> None:
    """A policy refusal (5.7.1) is never held against the subscriber, "not-spam" is not a
    complaint, and a verified address that is no subscriber of ours changes nothing."""
    await seed_subscribers(settings, confirmed=1)
    email = "conf000000@example.com"
    ses = SesHook(sns)
    policy = ses_bounce(
        email, None, status="5.7.1", diagnostic="smtp; 550 5.7.1 Message rejected as spam"
    )
    for path, request in (
        (ses.path, ses._request(policy)),
        (ses.path, ses._request(ses_complaint(email, None, feedback="not-spam"))),
        (SENDGRID.path, SENDGRID.hard("stranger@example.net", None)),
    ):
        r = await post(client, path, request)
        assert r.status_code == 200, r.text
    found = await rows(settings)
    assert [(r[0], r[3]) for r in found] == [
        ("policy", "provider"),
        ("ignored", "provider"),
        ("unmatched", "provider"),
    ]
    assert found[2][1] is None
    assert await status_of(settings, email) == "confirmed"


def test_webhook_settings_are_checked_at_start_up() -> None:
    cases = [
        ({"ses_topic_arns": "arn:aws:sqs:us-east-1:123456789012:q"}, "MAILER_SES_TOPIC_ARNS"),
        ({"sendgrid_webhook_public_key": "bm90IGEga2V5"}, "MAILER_SENDGRID_WEBHOOK_PUBLIC_KEY"),
        ({"postmark_webhook_user": "hooks"}, "set both or neither"),
        (
            {"postmark_webhook_user": "hooks", "postmark_webhook_password": "short"},
            "MAILER_POSTMARK_WEBHOOK_PASSWORD: at least 16",
        ),
    ]
    valid = {"env": "dev", "secret_key": "webhook-test-secret-key-0123456789abcdef"}
    for overrides, message in cases:
        with pytest.raises(SettingsError) as stopped:
            load_settings(**valid, **overrides)
        assert message in str(stopped.value), stopped.value
    ok = load_settings(
        **valid,
        ses_topic_arns=f"{TOPIC}, {TOPIC}-2",
        sendgrid_webhook_public_key=SENDGRID.public_key,
    )
    assert ok.ses_topic_arns == [TOPIC, f"{TOPIC}-2"]


async def test_odd_numbers_in_headers_and_payloads_are_refused_not_crashed_on(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    """``str.isdigit`` accepts "²" and "١٢٣", which ``int`` then refuses: a 500 waiting."""
    await seed_subscribers(settings, confirmed=1)
    body, headers = SENDGRID.hard("conf000000@example.com", None)
    for stamp in ("²", "¹²³", "-5", "1e9", ""):  # header values arrive as Latin-1
        bad = headers | {"X-Twilio-Email-Event-Webhook-Timestamp": stamp.encode("latin-1")}
        r = await client.post("/webhooks/sendgrid", content=body, headers=bad)
        assert r.status_code in (401, 403), (stamp, r.status_code, r.text)
    status = {"delivery-status": {"code": "²", "message": "5.1.1 gone"}}
    odd = MailgunHook.request(
        mailgun_event("conf000000@example.com", None, "failed", severity="permanent", **status)
    )
    r = await post(client, "/webhooks/mailgun", odd)
    assert r.status_code == 200 and r.json()["stored"] == 1
    body = json.loads(odd[0])
    body["signature"]["timestamp"] = "١٧٠٠٠٠٠٠٠٠"
    r = await client.post("/webhooks/mailgun", content=json.dumps(body))
    assert r.status_code == 403
    assert len(await rows(settings)) == 1


# Hostile payloads: the mappers never raise but Rejected ----------------------------------

LEAF = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
    | st.sampled_from(["²", "550 5.1.1 gone", "<b1.abc@x>", "smtp; 452 4.2.2 full", "a@b.c"])
)
JSON = st.recursive(
    LEAF,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)


def shaped(**fields: Any) -> Any:
    """A dict with (some of) these keys, each value mostly its strategy, else anything."""
    return st.fixed_dictionaries({}, optional={k: st.one_of(v, v, JSON) for k, v in fields.items()})


NUMBERISH = st.sampled_from(["²", "¹²³", "١٢٣", "550", 550, -1, 10**30, 1e300, "5.1.1", ""])


ADDRESS = st.sampled_from(["conf000000@example.com", "", "no-at-sign", "x@" + "y" * 300])
RECIPIENTS = st.lists(
    shaped(emailAddress=ADDRESS, status=LEAF, diagnosticCode=LEAF, action=LEAF), max_size=3
)
SES = shaped(
    notificationType=st.sampled_from(["Bounce", "Complaint", "Delivery", "Rendering Failure"]),
    bounce=shaped(bounceType=st.sampled_from(["Permanent", "Transient", "Weird"]),
                  bouncedRecipients=RECIPIENTS, feedbackId=LEAF),
    complaint=shaped(complainedRecipients=RECIPIENTS, complaintFeedbackType=LEAF),
    mail=shaped(headers=st.lists(shaped(name=LEAF, value=LEAF), max_size=3),
                commonHeaders=shaped(messageId=LEAF)),
)  # fmt: skip
POSTMARK = shaped(
    RecordType=st.sampled_from(["Bounce", "SpamComplaint", "Delivery", "Other"]),
    Type=st.sampled_from(["HardBounce", "SoftBounce", "AutoResponder", "Nope"]),
    ID=NUMBERISH, Email=ADDRESS, Details=LEAF, Content=LEAF,
)  # fmt: skip
SENDGRID_EVENT = shaped(
    event=st.sampled_from(["bounce", "dropped", "spamreport", "delivered", "odd"]),
    type=LEAF, reason=LEAF, status=LEAF, email=ADDRESS, sg_event_id=LEAF,
    **{"smtp-id": LEAF},
)  # fmt: skip
MAILGUN = shaped(
    event=st.sampled_from(["failed", "complained", "delivered", "odd"]),
    severity=st.sampled_from(["permanent", "temporary"]), reason=LEAF, recipient=ADDRESS,
    id=LEAF, timestamp=NUMBERISH,
    message=shaped(headers=shaped(**{"message-id": LEAF})),
    **{"delivery-status": shaped(code=NUMBERISH, message=LEAF, description=LEAF)},
)  # fmt: skip


def well_formed(received: Received) -> None:
    for item in received.events:
        assert len(item.event.fingerprint) <= 100 and item.event.source.startswith("webhook:")
        assert item.event.email is None or "@" in item.event.email
        assert item.event.code is None or 200 <= item.event.code < 600


@hsettings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(ses=SES, postmark_record=POSTMARK, events=st.lists(SENDGRID_EVENT | JSON, max_size=4),
       mailgun_data=MAILGUN)  # fmt: skip
def test_hostile_payloads_map_or_are_refused_never_crash(
    ses: Any, postmark_record: Any, events: Any, mailgun_data: Any
) -> None:
    envelope = {"MessageId": "m-1", "Message": json.dumps(ses)}
    well_formed(ses_provider.notification(envelope, 100))
    for body in (json.dumps(postmark_record).encode(), json.dumps(events).encode()):
        for receive in (postmark.receive, sendgrid.receive):
            try:
                well_formed(receive(body))
            except Rejected as refused:
                assert refused.status == 400
    well_formed(mailgun.receive({"event-data": mailgun_data}, 100, "t" * 50))
