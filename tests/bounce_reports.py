"""Real-shaped bounce and complaint reports, built from the messages our SMTP server got.

The wording follows what Postfix, Exim and a feedback loop actually send (RFC 3464
DSNs, RFC 5965 ARF), so the VERP envelope and the HMAC Message-ID in them are the
real ones a blast produced. Every builder returns the raw bytes an MTA would hand
to ``mailer bounces ingest``, with CRLF line ends.
"""

from __future__ import annotations

import itertools
from email import message_from_bytes, policy

_serial = itertools.count(1)


def _crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()


def original_headers(original: bytes) -> bytes:
    return original.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def header(original: bytes, name: str) -> str:
    value = message_from_bytes(original, policy=policy.compat32)[name]
    return str(value)


def postfix_dsn(
    original: bytes,
    rcpt: str,
    envelope: str,
    *,
    status: str = "5.1.1",
    action: str = "failed",
    diagnostic: str | None = None,
    whole_message: bool = True,
    queue_id: str | None = None,
) -> bytes:
    """Postfix's bounce (or "delayed mail" notice) for one recipient."""
    queue_id = queue_id or f"4F{next(_serial):08X}"
    delayed = action == "delayed"
    diagnostic = diagnostic or (
        f"smtp; 550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown in virtual "
        "mailbox table"
    )
    subject = (
        "Delayed Mail (still being retried)" if delayed else "Undelivered Mail Returned to Sender"
    )
    boundary = f"{queue_id}.1732700000/mx.example.net"
    human = (
        f"<{rcpt}>: host mx.example.com[203.0.113.5] said: {diagnostic.split(';', 1)[1].strip()}"
        " (in reply to RCPT TO command)"
    )
    if delayed:
        intro = (
            "####################################################################\n"
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\n"
            "####################################################################\n\n"
            "Your message could not be delivered for more than 4 hour(s).\n"
            "It will be retried until it is 5 day(s) old.\n"
        )
    else:
        intro = (
            "I'm sorry to have to inform you that your message could not\n"
            "be delivered to one or more recipients. It's attached below.\n"
        )
    head = f"""Return-Path: <>
Received: by mx.example.net (Postfix)
	id {queue_id}; Wed, 27 Nov 2024 10:00:00 +0000 (UTC)
Date: Wed, 27 Nov 2024 10:00:00 +0000 (UTC)
From: MAILER-DAEMON@mx.example.net (Mail Delivery System)
Subject: {subject}
To: {envelope}
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
	boundary="{boundary}"
Content-Transfer-Encoding: 8bit
Message-Id: <20241127100000.{queue_id}@mx.example.net>

This is a MIME-encapsulated message.

--{boundary}
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx.example.net.

{intro}
For further assistance, please send mail to postmaster.

If you do so, please include this problem report. You can
delete your own text from the attached returned message.

                   The mail system

{human}

--{boundary}
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.net
X-Postfix-Queue-ID: {queue_id}
X-Postfix-Sender: rfc822; {envelope}
Arrival-Date: Wed, 27 Nov 2024 09:59:58 +0000 (UTC)

Final-Recipient: rfc822; {rcpt}
Original-Recipient: rfc822;{rcpt}
Action: {action}
Status: {status}
Remote-MTA: dns; mx.example.com
Diagnostic-Code: {diagnostic}
{"Will-Retry-Until: Mon, 2 Dec 2024 09:59:58 +0000 (UTC)" if delayed else ""}
--{boundary}
"""
    if whole_message and not delayed:
        part = (
            _crlf(
                "Content-Description: Undelivered Message\n"
                "Content-Type: message/rfc822\nContent-Transfer-Encoding: 8bit\n\n"
            )
            + original
        )
    else:
        part = _crlf(
            "Content-Description: Undelivered Message Headers\n"
            "Content-Type: text/rfc822-headers\n\n"
        ) + original_headers(original)
    return _crlf(head) + part + _crlf(f"\n--{boundary}--\n")


def exim_dsn(original: bytes, rcpt: str, envelope: str) -> bytes:
    """Exim 4.9x: multipart/report whose Status is a generic 5.0.0; the real code is in
    the Diagnostic-Code."""
    n = next(_serial)
    boundary = f"1732700000-eximdsn-{n}"
    head = f"""Return-path: <>
Received: from Debian-exim by mx.example.org with local (Exim 4.96)
	id 1tGabc-000{n}-Xy; Wed, 27 Nov 2024 10:00:00 +0000
X-Failed-Recipients: {rcpt}
Auto-Submitted: auto-replied
From: Mail Delivery System <Mailer-Daemon@mx.example.org>
To: {envelope}
Content-Type: multipart/report; report-type=delivery-status; boundary={boundary}
MIME-Version: 1.0
Subject: Mail delivery failed: returning message to sender
Message-Id: <E1tGabc-000{n}-Xy@mx.example.org>
Date: Wed, 27 Nov 2024 10:00:00 +0000

--{boundary}
Content-type: text/plain; charset=us-ascii

This message was created automatically by mail delivery software.

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  {rcpt}
    host mx.example.com [203.0.113.5]
    SMTP error from remote mail server after RCPT TO:<{rcpt}>:
    550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown

--{boundary}
Content-type: message/delivery-status

Reporting-MTA: dns; mx.example.org

Action: failed
Final-Recipient: rfc822;{rcpt}
Status: 5.0.0
Remote-MTA: dns; mx.example.com
Diagnostic-Code: smtp; 550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown

--{boundary}
Content-type: message/rfc822

"""
    return _crlf(head) + original + _crlf(f"\n--{boundary}--\n")


def exim_prose(original: bytes, rcpt: str, envelope: str) -> bytes:
    """Older Exim (and many appliances): a bounce in prose, no report part at all."""
    n = next(_serial)
    head = f"""Return-path: <>
From: Mail Delivery System <Mailer-Daemon@relay.example.org>
To: {envelope}
Subject: Mail delivery failed: returning message to sender
Message-Id: <E1tGxyz-000{n}-Qq@relay.example.org>
Date: Wed, 27 Nov 2024 10:00:00 +0000
X-Failed-Recipients: {rcpt}
Auto-Submitted: auto-replied

This message was created automatically by mail delivery software.

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  {rcpt}
    SMTP error from remote mail server after RCPT TO:<{rcpt}>:
    host mx.example.com [203.0.113.5]: 550 No such user here

------ This is a copy of the message, including all the headers. ------

"""
    return _crlf(head) + original


def arf(original: bytes, *, redact_to: bool = True, whole_message: bool = False) -> bytes:
    """A feedback-loop complaint (RFC 5965), the way Yahoo's CFL and JMRP send them:
    the original's recipient is often redacted, our signed headers are not."""
    n = next(_serial)
    boundary = f"----=_Part_{n}_feedback"
    body = original if whole_message else original_headers(original)
    if redact_to:
        lines = body.split(b"\r\n")
        body = b"\r\n".join(
            b"To: redacted@example.com" if ln.lower().startswith(b"to:") else ln for ln in lines
        )
    head = f"""From: feedbackloop@fbl.example.net
To: complaints@bounce.test
Subject: FW: complaint about a message from 192.0.2.1
Date: Wed, 27 Nov 2024 11:00:00 +0000
Message-ID: <fbl.{n}.1732705200@fbl.example.net>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report;
	boundary="{boundary}"

--{boundary}
Content-Type: text/plain; charset="US-ASCII"
Content-Transfer-Encoding: 7bit

This is an email abuse report for an email message received from IP
192.0.2.1 on Wed, 27 Nov 2024 10:00:00 +0000. For more information
about this format please see http://www.mipassoc.org/arf/.

--{boundary}
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: ExampleFBL/1.0
Version: 1
Original-Mail-From: <bounces@bounce.test>
Arrival-Date: Wed, 27 Nov 2024 10:00:00 +0000
Source-IP: 192.0.2.1
Reported-Domain: example.org

--{boundary}
Content-Type: {"message/rfc822" if whole_message else "text/rfc822-headers"}
Content-Disposition: inline

"""
    return _crlf(head) + body + _crlf(f"\n--{boundary}--\n")


def tamper(verp: str) -> str:
    """The same VERP address with one character of its MAC changed."""
    local, _, domain = verp.rpartition("@")
    last = local[-1]
    return f"{local[:-1]}{'a' if last != 'a' else 'b'}@{domain}"


def out_of_office(to: str) -> bytes:
    return _crlf(
        f"""From: Alice <alice@example.com>
To: {to}
Subject: Automatic reply: A statement
Auto-Submitted: auto-replied
X-Autoreply: yes
Date: Wed, 27 Nov 2024 10:00:00 +0000
Message-ID: <ooo.{next(_serial)}@example.com>

I am out of the office until Monday.
"""
    )
