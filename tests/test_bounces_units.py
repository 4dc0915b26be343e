"""The pure parts of the bounce pipeline: the VERP tag and Message-ID MACs, the
classification table (aligned with smtp.RULES), the listener's address filter."""

from __future__ import annotations

import re

import pytest
from bounce_reports import arf, exim_dsn, postfix_dsn

from mailer.bounces.classify import kind_for, kind_for_feedback
from mailer.bounces.listener import accepts
from mailer.bounces.parse import ReportType, parse
from mailer.config import Settings, SettingsError, load_settings
from mailer.models import BounceKind
from mailer.render import make_message_id, read_message_id
from mailer.smtp import Verdict, classify
from mailer.tokens import TokenError, Tokens

KEY, OLD = "k" * 32, "o" * 32


def test_the_verp_tag_carries_at_least_64_bits_of_mac_and_the_blast() -> None:
    tokens = Tokens([KEY], 3600)
    tag = tokens.bounce_tag(1234, 56)
    sub, blast, mac = tag.split("-")
    assert (sub, blast) == ("1234", "56") and re.fullmatch(r"[a-z2-7]{16}", mac)  # 80 bits
    assert len(f"bounces+{tag}") <= 64  # fits a local part
    claim = tokens.read_bounce(tag)
    assert (claim.subscriber_id, claim.blast_id) == (1234, 56)
    assert tokens.read_bounce(tag.upper()).subscriber_id == 1234  # relays that fold case
    assert tokens.read_bounce(tokens.bounce_tag(7)).blast_id is None
    for bad in (
        f"1235-56-{mac}",  # another subscriber
        f"1234-57-{mac}",  # another blast
        f"1234-{mac}",  # the blast dropped
        f"1234-56-{mac[:-1]}a" if mac[-1] != "a" else f"1234-56-{mac[:-1]}b",
        f"1234-56-{mac[:8]}",  # a short (old 32-bit style) MAC
        "1234-" + "0" * 8,
        "",
        "-".join(["1"] * 5),
    ):
        with pytest.raises(TokenError):
            tokens.read_bounce(bad)
    rotated = Tokens([OLD, KEY], 3600)  # old keys verify; new tags use the current key
    assert rotated.read_bounce(Tokens([OLD], 3600).bounce_tag(9, 1)).subscriber_id == 9


def test_the_message_id_proves_blast_and_subscriber() -> None:
    settings = Settings(env="dev", secret_key=KEY, old_secret_keys=[OLD])
    message_id = make_message_id(settings, 12, 345)
    assert read_message_id(settings, message_id, 345) == 12
    assert read_message_id(settings, message_id, 346) is None
    assert read_message_id(settings, message_id.replace("b12.", "b13."), 345) is None
    assert read_message_id(settings, "<random.abc@example.org>", 345) is None
    old = make_message_id(Settings(env="dev", secret_key=OLD), 3, 4)
    assert read_message_id(settings, old, 4) == 3


@pytest.mark.parametrize(
    ("status", "code", "diagnostic", "action", "kind"),
    [
        (
            "5.1.1",
            550,
            "550 5.1.1 <a@b>: Recipient address rejected: User unknown",
            "failed",
            "hard",
        ),
        ("5.1.10", 550, "550 5.1.10 RESOLVER.ADR.RecipientNotFound", "failed", "hard"),
        (
            "5.2.1",
            550,
            "550 5.2.1 The email account that you tried to reach is disabled",
            None,
            "hard",
        ),
        ("5.0.0", 550, "550 5.1.1 <a@b>: User unknown", "failed", "hard"),  # Exim
        ("5.0.0", 550, "550 Unrouteable address", "failed", "hard"),
        (
            None,
            554,
            "554 delivery error: dd This user doesn't have a yahoo.com account",
            None,
            "hard",
        ),
        (
            "4.2.2",
            452,
            "452 4.2.2 The email account that you tried to reach is over quota",
            "delayed",
            "soft",
        ),
        ("5.2.2", 552, "552 5.2.2 Mailbox full", "failed", "soft"),
        ("4.4.1", None, "connect to mx.example.com: Connection timed out", "delayed", "soft"),
        ("5.0.0", 550, "550 Mailbox quota exceeded", "failed", "soft"),
        ("5.7.1", 550, "550 5.7.1 Message rejected as spam", "failed", "policy"),
        ("5.7.26", 550, "550-5.7.26 This mail is unauthenticated", "failed", "policy"),
        (
            None,
            554,
            "554 Service unavailable; Client host blocked using zen.spamhaus.org",
            None,
            "policy",
        ),
        (None, 550, "550 Message rejected: spam detected", None, "policy"),  # not hard: keywords
        ("5.3.4", 552, "552 5.3.4 Message size exceeds fixed limit", "failed", "policy"),
        ("2.0.0", 250, "250 OK", "delivered", "ignored"),
        ("2.0.0", None, None, "relayed", "ignored"),
        (None, None, "something went wrong", None, None),
    ],
)
def test_classification(
    status: str | None,
    code: int | None,
    diagnostic: str | None,
    action: str | None,
    kind: str | None,
) -> None:
    got = kind_for(status=status, code=code, diagnostic=diagnostic, action=action)
    assert (got.value if got else None) == kind


@pytest.mark.parametrize(
    ("reply", "verdict", "kind"),
    [
        ("550 5.1.1 no such user", Verdict.bounce, "hard"),
        ("451 4.3.0 try later", Verdict.retry, "soft"),
        ("554 5.7.1 blocked", Verdict.policy, "policy"),
        ("550 5.2.1 mailbox disabled", Verdict.bounce, "hard"),
    ],
)
def test_smtp_time_and_dsn_agree(reply: str, verdict: Verdict, kind: str) -> None:
    code, text = int(reply[:3]), reply[4:]
    assert classify(code, text) is verdict  # what the sender does during the transaction
    status = text.split()[0]
    during = kind_for(code=code, diagnostic=reply)
    later = kind_for(status=status, code=code, diagnostic=f"smtp; {reply}", action="failed")
    assert during == later == BounceKind(kind)


def test_feedback_types() -> None:
    assert kind_for_feedback("abuse") is BounceKind.complaint
    assert kind_for_feedback("fraud") is BounceKind.complaint
    assert kind_for_feedback("not-spam") is BounceKind.ignored
    assert kind_for_feedback("auth-failure") is BounceKind.ignored


def test_reports_parse_into_their_parts() -> None:
    original = (
        b"From: updates@example.org\r\nTo: bob@example.com\r\nSubject: Hi\r\n"
        b"Message-ID: <b3.0123456789abcdef01234567@example.org>\r\n"
        b"List-Unsubscribe: <https://x.example/unsubscribe/MQ.abc>\r\n\r\nHello\r\n"
    )
    dsn = parse(postfix_dsn(original, "bob@example.com", "bounces+1-x@bounce.test"))
    assert dsn.type is ReportType.dsn and dsn.recipients_total == 1
    r = dsn.recipients[0]
    assert (r.final_recipient, r.action, r.status, r.code) == (
        "bob@example.com",
        "failed",
        "5.1.1",
        550,
    )
    assert (
        dsn.original is not None
        and dsn.original.message_id == "<b3.0123456789abcdef01234567@example.org>"
    )
    headers_only = parse(postfix_dsn(original, "bob@example.com", "x", whole_message=False))
    assert headers_only.original == dsn.original
    exim = parse(exim_dsn(original, "bob@example.com", "x"))
    assert exim.recipients[0].status == "5.0.0" and exim.recipients[0].code == 550
    complaint = parse(arf(original))
    assert complaint.type is ReportType.arf and complaint.feedback_type == "abuse"
    assert complaint.original is not None and complaint.original.to == "redacted@example.com"
    assert "/unsubscribe/MQ.abc" in (complaint.original.list_unsubscribe or "")
    # Same report, other transport: CRLF vs LF and an extra Received line.
    raw = postfix_dsn(original, "bob@example.com", "x", queue_id="4FSAME")
    again = b"Received: from elsewhere\n" + raw.replace(b"\r\n", b"\n")
    assert parse(again).digest == parse(raw).digest


def test_the_listener_takes_only_bounce_and_complaint_addresses() -> None:
    domain = "bounce.test"
    for ok in ("bounces+12-3-abcdefghijklmnop@bounce.test", "<complaints@bounce.test>",
               "Postmaster@Bounce.Test", "bounces+anything-shaped@bounce.test"):  # fmt: skip
        assert accepts(domain, ok), ok
    for no in ("bounces@bounce.test", "alice@bounce.test", "bounces+1-x@bounce.test.evil",
               "bounces+1-x@other.test", "complaints@other.test", "bounces+a b@bounce.test",
               "bounces+1-x", ""):  # fmt: skip
        assert not accepts(domain, no), no


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("bounce_pause_rate", 1.5),
        ("complaint_pause_rate", 0),
        ("soft_bounce_limit", 0),
        ("soft_bounce_window_days", 0),
        ("bounce_pause_min_sent", 0),
        ("verp_domain", "not a domain"),
        ("verp_domain", "bounces@example.org"),
    ],
)
def test_a_wrong_threshold_stops_start_up_naming_the_variable(setting: str, value: object) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(**VALID, **{setting: value})
    assert str(caught.value).startswith(f"configuration error: MAILER_{setting.upper()}:")
    assert "\n" not in str(caught.value)


def test_the_verp_domain_is_kept_in_lower_case() -> None:
    assert (
        load_settings(**VALID, verp_domain="Bounce.Example.ORG.").verp_domain
        == "bounce.example.org"
    )


VALID = {"env": "dev", "secret_key": "bounce-test-secret-key-0123456789abcdef"}
