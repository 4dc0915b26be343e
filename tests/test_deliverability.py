"""The mail itself passes a spam filter: SpamAssassin's offline score of the bytes on the wire.

Both kinds of mail are produced through the real paths (a blast sent by a worker, a sign-up
answered with a confirmation) and taken from the test SMTP server exactly as received, then
scored by Debian's SpamAssassin with network tests off and Bayes off, so the score depends
only on the message (docs/deliverability.md explains the budget and the preheader).
"""

from __future__ import annotations

import email.policy
import re
import shutil
import subprocess
from email.parser import BytesParser
from typing import Any

import httpx
import pytest
from helpers import blast, editor_token, publish, seed_subscribers, wait_status, wait_until
from smtpserver import SmtpServer

from mailer.config import Settings

# Local tests only (-L), no user preferences written (-x), no Bayes: what any receiving
# SpamAssassin would add on top of DNS blocklists and its own learning.
SPAMASSASSIN = [
    "spamassassin",
    "-L",
    "-x",
    "-t",
    "--cf=use_bayes 0",
    "--cf=bayes_auto_learn 0",
    "--cf=report_safe 0",
]
MAX_SCORE = 0.1

STATEMENT = """\
We met the council on Tuesday about the closure of the **Riverside library**.

## What was agreed

- The reading room stays open on weekdays until the end of the year.
- A public consultation starts next month; everyone on this list will get the dates.
- The children's section moves to the first floor while the roof is repaired.

Thank you to the 1,200 people who signed the letter. The full minutes are
[on our website](https://news.example.org/minutes/2024-05), and you can reply to
this mail with questions.
"""


def score(raw: bytes) -> tuple[float, list[str], str]:
    """SpamAssassin's score of the message, the rules that hit, and its report."""
    assert shutil.which("spamassassin"), "spamassassin missing: `make test` installs it"
    done = subprocess.run(SPAMASSASSIN, input=raw, capture_output=True, timeout=180, check=True)
    out = done.stdout
    head = BytesParser(policy=email.policy.compat32).parsebytes(out, headersonly=True)
    status = " ".join(str(head["X-Spam-Status"]).split())
    match = re.search(r"score=(-?[0-9.]+) .*tests=(.*?) (autolearn|version)=", status)
    assert match, f"no X-Spam-Status in SpamAssassin's output: {out[:2000]!r}"
    text = out.decode("utf-8", "replace")
    report = text[text.find("Content analysis details") :] if "Content analysis" in text else ""
    rules = [r for r in match.group(2).replace(" ", "").split(",") if r and r != "none"]
    return float(match.group(1)), rules, report


def check(kind: str, raw: bytes) -> None:
    points, rules, report = score(raw)
    print(f"\n{kind}: {points} points, rules: {', '.join(rules)}\n{report}")
    assert points <= MAX_SCORE, f"{kind} scores {points} > {MAX_SCORE}: {rules}\n{report}"
    # The preheader is hidden with display:none, never text in the background's colour.
    assert "HTML_FONT_LOW_CONTRAST" not in rules


# Links as in production (https, a host name): a test server's http://127.0.0.1:port would
# be scored too (WEIRD_PORT, NUMERIC_HTTP_ADDR) and is not what subscribers get.
@pytest.mark.parametrize("settings_overrides", [{"base_url": "https://news.example.org"}])
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the bytes don't depend on the DB
async def test_statement_and_confirmation_mail_score_at_most_0_1(
    app_client: httpx.AsyncClient, smtp: SmtpServer, settings: Settings, start_worker: Any
) -> None:
    people = await seed_subscribers(settings, confirmed=1)
    token = await editor_token(settings)
    await start_worker()

    title = "Riverside library: what the council agreed"
    bid = await blast(
        app_client, token, await publish(app_client, token, title=title, body_markdown=STATEMENT)
    )
    await wait_status(app_client, token, bid, "done", timeout=30)
    [statement] = smtp.recorder.to(people["confirmed"][0])
    html = statement.message.get_body(preferencelist=("html",))
    assert html is not None and "Riverside library" in str(html.get_content())
    assert 'class="preheader"' in str(html.get_content())  # the preheader is there, hidden

    r = await app_client.post("/subscribe", data={"email": "ada@example.net", "name": "Ada"})
    assert r.status_code == 202, r.text
    await wait_until(lambda: smtp.recorder.to("ada@example.net"), timeout=20)
    [confirmation] = smtp.recorder.to("ada@example.net")
    assert "confirm" in str(confirmation.message["Subject"]).lower()

    check("statement", statement.data)
    check("confirmation", confirmation.data)
