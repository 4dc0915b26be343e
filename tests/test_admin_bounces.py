"""What editors see of bounces and complaints (issue 14): per blast, the counts and rates on
the blast page and in ``GET /api/blasts/{id}``; the bounce log, filterable by blast and
kind, a page at a time, in the admin UI and at ``GET /api/bounces``.

A real blast to 10 goes through a worker to the recording SMTP server; real-shaped
DSNs and an ARF complaint built from the messages it received go through the ingest
pipeline (as ``mailer bounces ingest`` does); on SQLite and PostgreSQL.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from bounce_reports import arf, exim_dsn, exim_prose, out_of_office, postfix_dsn, tamper
from helpers import (
    auth,
    blast,
    editor_token,
    login,
    publish,
    seed_subscribers,
    subscriber_ids,
    wait_status,
)
from smtpserver import SmtpServer

from mailer.bounces import ingest
from mailer.config import Settings
from mailer.runtime import Runtime
from mailer.web.admin.bounces import PAGE_SIZE

VERP = {"verp_domain": "bounce.test"}
ROW = re.compile(r'<tr class="bounce" data-kind="([a-z]+)">(.*?)</tr>', re.S)


def log_rows(html: str) -> list[tuple[str, str]]:
    """(kind, row text) for each row of the bounce log table."""
    return [(kind, re.sub(r"<[^>]+>", " ", body)) for kind, body in ROW.findall(html)]


def field(html: str, name: str) -> str:
    match = re.search(rf'<dd data-field="{name}">([^<]*)</dd>', html)
    assert match, f"no {name} on the page"
    return match.group(1)


async def blast_with_bounces(
    settings: Settings, client: httpx.AsyncClient, smtp: SmtpServer, start_worker: Any
) -> tuple[int, str, list[str]]:
    """Blast to 10, then 3 hard (Postfix, Exim, Exim prose), 1 soft, 1 complaint, 1 forged
    DSN (unmatched) and 1 auto-reply (ignored). Returns (blast id, token, addresses)."""
    a = sorted((await seed_subscribers(settings, confirmed=10))["confirmed"])
    token = await editor_token(settings)
    await start_worker()
    first = await blast(client, token, await publish(client, token))
    await wait_status(client, token, first, "done")
    got = {m.rcpt: m for m in smtp.messages}
    assert sorted(got) == a

    def env(i: int) -> str:
        return got[a[i]].mail_from

    reports = [
        (postfix_dsn(got[a[0]].data, a[0], env(0)), env(0)),
        (exim_dsn(got[a[1]].data, a[1], env(1)), env(1)),
        (exim_prose(got[a[2]].data, a[2], env(2)), env(2)),
        (
            postfix_dsn(
                got[a[3]].data,
                a[3],
                env(3),
                status="4.2.2",
                action="delayed",
                diagnostic=f"smtp; 452 4.2.2 <{a[3]}>: Mailbox full",
            ),
            env(3),
        ),
        (arf(got[a[4]].data), "complaints@bounce.test"),
        (
            postfix_dsn(
                f"From: x@example.net\r\nTo: {a[6]}\r\nSubject: hi\r\n\r\nhi\r\n".encode(),
                a[6],
                tamper(env(5)),
                whole_message=False,
            ),
            tamper(env(5)),
        ),
        (out_of_office(env(7)), env(7)),
    ]
    runtime = Runtime.create(settings)
    try:
        kinds = [
            (await ingest(runtime, raw, source="cli", envelope_to=to)).kind for raw, to in reports
        ]
        # The same DSN again counts once.
        again = await ingest(runtime, reports[0][0], source="cli", envelope_to=reports[0][1])
        assert again.duplicate
    finally:
        await runtime.close()
    assert kinds == ["hard", "hard", "hard", "soft", "complaint", "unmatched", "ignored"]
    return first, token, a


@pytest.mark.parametrize("settings_overrides", [VERP])
async def test_blast_page_api_and_log_show_the_bounces_of_a_blast(
    app_client: httpx.AsyncClient, settings: Settings, smtp: SmtpServer, start_worker: Any
) -> None:
    first, token, a = await blast_with_bounces(settings, app_client, smtp, start_worker)
    ids = await subscriber_ids(settings, a)

    # The API: the counts beside the progress, rates of the 10 sent.
    r = await app_client.get(f"/api/blasts/{first}", headers=auth(token))
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "done" and body["sent"] == 10  # the fields it had stay
    assert body["bounces"] == {
        "attempted": 10,
        "hard": 3,
        "soft": 1,
        "complaints": 1,
        "policy": 0,
        "hard_rate": 0.3,
        "complaint_rate": 0.1,
    }

    # The blast page.
    await login(app_client, token)
    page = await app_client.get(f"/admin/blasts/{first}")
    assert page.status_code == 200
    assert field(page.text, "hard") == "3 (30.00 %)"
    assert field(page.text, "soft") == "1 (10.00 %)"
    assert field(page.text, "complaints") == "1 (10.00 %)"
    assert field(page.text, "policy") == "0 (0.00 %)"
    assert "of the 10 messages sent or refused" in page.text
    assert f'href="/admin/bounces?blast={first}"' in page.text

    # The log of this blast: six reports (the forgery proves no blast), newest first.
    html = (await app_client.get(f"/admin/bounces?blast={first}")).text
    rows = log_rows(html)
    assert [k for k, _ in rows] == ["ignored", "complaint", "soft", "hard", "hard", "hard"]
    assert a[0] in rows[-1][1] and "5.1.1" in rows[-1][1] and "User unknown" in rows[-1][1]
    assert a[4] in rows[1][1] and a[3] in rows[2][1] and "4.2.2" in rows[2][1]
    # Filtered by kind: the three hard bounces, with who and why.
    hard = log_rows((await app_client.get(f"/admin/bounces?blast={first}&kind=hard")).text)
    assert [k for k, _ in hard] == ["hard"] * 3
    assert [next(e for e in a if e in text) for _, text in hard] == [a[2], a[1], a[0]]
    assert f'href="/admin/subscribers/{ids[a[0]]}"' in html
    # The forgery is in the unfiltered log, with no blast and no subscriber.
    full = (await app_client.get("/admin/bounces")).text
    everything = log_rows(full)
    assert [k for k, _ in everything].count("unmatched") == 1
    unmatched = next(text for k, text in everything if k == "unmatched")
    assert re.search(r"unmatched\s+–\s+unknown\s+5\.1\.1", unmatched)  # no blast, no one
    assert f"/admin/subscribers/{ids[a[6]]}" not in full  # a[6] was named, not proven
    assert "VERP tag does not verify" in unmatched
    none = await app_client.get(f"/admin/bounces?blast={first}&kind=policy")
    assert none.status_code == 200 and log_rows(none.text) == []
    assert "No policy reports for blast" in none.text

    # The API log, with the same filters.
    r = await app_client.get(
        "/api/bounces", params={"blast_id": first, "kind": "hard"}, headers=auth(token)
    )
    assert r.status_code == 200
    items = r.json()["items"]
    assert [(i["kind"], i["email"], i["subscriber_id"]) for i in items] == [
        ("hard", a[2], ids[a[2]]),
        ("hard", a[1], ids[a[1]]),
        ("hard", a[0], ids[a[0]]),
    ]
    assert items[2]["status"] == "5.1.1" and items[2]["blast_id"] == first
    assert items[2]["source"] == "cli" and items[2]["evidence"] == "verp"
    r = await app_client.get("/api/bounces", params={"kind": "unmatched"}, headers=auth(token))
    [forged] = r.json()["items"]
    assert forged["blast_id"] is None and forged["subscriber_id"] is None
    r = await app_client.get(
        "/api/bounces", params={"blast_id": first, "limit": 2, "offset": 2}, headers=auth(token)
    )
    assert [i["kind"] for i in r.json()["items"]] == ["soft", "hard"]
    r = await app_client.get(
        "/api/bounces", params={"since": "2999-01-01T00:00:00"}, headers=auth(token)
    )
    assert r.json()["items"] == []


@pytest.mark.parametrize("settings_overrides", [VERP])
async def test_the_log_pages_and_refuses_bad_filters(
    app_client: httpx.AsyncClient, settings: Settings, smtp: SmtpServer, start_worker: Any
) -> None:
    first, token, a = await blast_with_bounces(settings, app_client, smtp, start_worker)
    verp = next(m.mail_from for m in smtp.messages if m.rcpt == a[8])
    runtime = Runtime.create(settings)
    try:
        for _ in range(PAGE_SIZE + 2):  # auto-replies: one more page of "ignored"
            await ingest(runtime, out_of_office(verp), source="cli", envelope_to=verp)
    finally:
        await runtime.close()
    await login(app_client, token)
    one = await app_client.get(f"/admin/bounces?blast={first}&kind=ignored")
    assert len(log_rows(one.text)) == PAGE_SIZE
    older = re.search(r'href="([^"]+)" rel="next"', one.text)
    assert older and 'rel="prev"' not in one.text
    two = await app_client.get(older.group(1).replace("&amp;", "&"))
    rows = log_rows(two.text)
    assert len(rows) == 3 and all(k == "ignored" for k, _ in rows)  # 53 in all
    assert a[7] in rows[-1][1]  # the oldest: the first auto-reply, from another subscriber
    assert 'rel="prev"' in two.text and 'rel="next"' not in two.text

    for query, words in (
        ("kind=bogus", "kind: 'bogus' is not one of hard, soft, complaint"),
        ("blast=abc", "blast: 'abc' is not a number"),
        ("blast=0", "blast: '0' is not a number"),
        ("page=-1", "page: '-1' is not a number"),
        ("blast=99999999999999999999999", "is not a number from 1 to"),
    ):
        r = await app_client.get(f"/admin/bounces?{query}")
        assert r.status_code == 422, query
        assert words in r.text.replace("&#39;", "'"), query

    # No inline script or style on the new pages (the CSP would block them silently).
    for path in ("/admin/bounces", f"/admin/blasts/{first}"):
        html = (await app_client.get(path)).text
        assert not re.search(r"<script(?![^>]*\bsrc=)", html), path
        assert " style=" not in html and "<style" not in html, path
        assert not re.search(r"<[^>]+\son[a-z]+=", html), path

    # The API: an editor token, and filters it can read.
    assert (await app_client.get("/api/bounces")).status_code == 401
    assert (await app_client.get("/api/bounces", headers=auth("mlr_wrong"))).status_code == 403
    for params in ({"kind": "bogus"}, {"blast_id": 0}, {"limit": 501}, {"since": "yesterday"}):
        r = await app_client.get("/api/bounces", params=params, headers=auth(token))
        assert r.status_code == 422, params
    r = await app_client.get(
        "/api/bounces", params={"since": "0001-01-01T00:00:00+05:00"}, headers=auth(token)
    )
    assert r.status_code == 422 and "since" in r.json()["detail"]
    # Signed out, the log is closed.
    app_client.cookies.clear()
    r = await app_client.get("/admin/bounces")
    assert r.status_code == 303 and r.headers["location"] == "/admin/login"
