"""The sign-up form is not a relay: no stranger's text in the confirmation mail, one mail
per inbox however it is spelled, and a cap per recipient domain (docs/security.md).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from helpers import subscriber, wait_until
from smtpserver import SmtpServer

from mailer.config import Settings
from mailer.subscriptions import canonical_address

PHISH = "Your account is locked, verify at https://evil.example/login now"


async def quiet(smtp: SmtpServer, seconds: float = 1.0) -> None:
    """Long enough for any further confirmation job to have arrived."""
    count = len(smtp.messages)
    await asyncio.sleep(seconds)
    assert len(smtp.messages) == count, "mail still arriving"


async def test_the_name_typed_in_the_form_stays_out_of_the_confirmation_mail(
    app_client: httpx.AsyncClient, settings: Settings, smtp: SmtpServer, start_worker: Any
) -> None:
    await start_worker()
    r = await app_client.post("/subscribe", data={"email": "target@example.com", "name": PHISH})
    assert r.status_code == 202
    await wait_until(lambda: smtp.recorder.to("target@example.com"))
    received = smtp.recorder.to("target@example.com")[0]
    assert b"evil.example" not in received.data and b"locked" not in received.data
    assert str(received.message["To"]) == "target@example.com"
    text = received.message.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    assert text.lstrip().startswith("Hello,")
    sub = await subscriber(settings, "target@example.com")
    assert sub is not None and sub.name == PHISH  # kept as typed, for the editors only


@pytest.mark.parametrize(
    ("spelled", "canonical"),
    [
        ("Victim@Example.com", "victim@example.com"),
        ("victim+news@example.com", "victim@example.com"),
        ("victim+a+b@example.com", "victim@example.com"),
        ("vic.tim@example.com", "vic.tim@example.com"),  # dots count outside Gmail
        ("Vic.Tim+x@gmail.com", "victim@gmail.com"),
        ("v.i.c.t.i.m@googlemail.com", "victim@gmail.com"),
        ("+only@example.com", "+only@example.com"),  # nothing left without the tag: kept
        ("...@gmail.com", "...@gmail.com"),
    ],
)
def test_canonical_address(spelled: str, canonical: str) -> None:
    assert canonical_address(spelled) == canonical


async def test_one_confirmation_mail_per_inbox_however_it_is_spelled(
    app_client: httpx.AsyncClient, smtp: SmtpServer, start_worker: Any
) -> None:
    await start_worker()
    spellings = [
        "victim.name@gmail.com",
        "victimname@gmail.com",
        "Victim.Name+1@gmail.com",
        "v.i.c.t.i.m.n.a.m.e+2@googlemail.com",
        "boss@corp.example",
        "boss+hr@corp.example",
        "BOSS+it@corp.example",
    ]
    answers = set()
    for email in spellings:
        r = await app_client.post("/subscribe", json={"email": email})
        assert r.status_code == 202
        answers.add(r.content)
    assert len(answers) == 1  # the same reply whether a mail went out or not
    await wait_until(lambda: len(smtp.messages) >= 2)
    await quiet(smtp)
    assert sorted(m.rcpt for m in smtp.messages) == ["boss@corp.example", "victim.name@gmail.com"]
    # A different mailbox at the same provider is not held back by it.
    r = await app_client.post("/subscribe", json={"email": "victim.other@gmail.com"})
    await wait_until(lambda: smtp.recorder.to("victim.other@gmail.com"))


@pytest.mark.parametrize(
    ("settings_overrides", "mailed"),
    [({"confirm_domain_limit_per_hour": 3}, 3), ({"confirm_domain_limit_per_hour": 0}, 6)],
)
async def test_confirmation_mails_per_recipient_domain_are_capped(
    app_client: httpx.AsyncClient, smtp: SmtpServer, start_worker: Any, mailed: int
) -> None:
    await start_worker()
    answers = set()
    for i in range(6):
        r = await app_client.post("/subscribe", json={"email": f"staff{i}@victim-corp.example"})
        assert r.status_code == 202
        answers.add(r.content)
    for i in range(2):  # other domains keep their own allowance
        r = await app_client.post("/subscribe", json={"email": f"reader{i}@elsewhere.example"})
        answers.add(r.content)
    assert len(answers) == 1
    await wait_until(lambda: len(smtp.messages) >= mailed + 2)
    await quiet(smtp)
    by_domain = [m.rcpt.rpartition("@")[2] for m in smtp.messages]
    assert by_domain.count("victim-corp.example") == mailed
    assert by_domain.count("elsewhere.example") == 2
