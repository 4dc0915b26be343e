"""Provider webhook requests shaped like each provider's documented examples, signed with
keys generated here: an SNS signing certificate (self-signed, for the host
``sns.us-east-1.amazonaws.com``, served by a local httpx transport so nothing reaches
the internet), a SendGrid ECDSA P-256 key pair, a Mailgun signing key and Postmark
basic-auth credentials.

Each provider has an adapter with the same three builders, ``hard``, ``soft`` and
``complaint`` (an address, and the Message-ID of the message concerned), plus
``forged`` (same body, a wrong signature or password) and ``unsigned``, so one test
can drive all four through the same scenario.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from mailer.bounces.providers.sns import string_to_sign

TOPIC = "arn:aws:sns:us-east-1:123456789012:mailer-ses-feedback"
SNS_HOST = "sns.us-east-1.amazonaws.com"
POSTMARK_USER = "postmark-hooks"
POSTMARK_PASSWORD = "correct-horse-battery-staple-42"
MAILGUN_KEY = "key-" + "5f2c0a" * 5

_serial = itertools.count(1)
Request = tuple[bytes, dict[str, str]]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# Amazon SES through SNS -------------------------------------------------------------


@dataclass
class Sns:
    """An SNS stand-in: signs messages and serves its certificate through a transport."""

    key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    cert_path: str = "/SimpleNotificationService-0123456789abcdef0123456789abcdef.pem"
    requests: list[httpx.Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SNS_HOST)])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .sign(self.key, hashes.SHA256())
        )
        self.pem = cert.public_bytes(serialization.Encoding.PEM)

    @property
    def cert_url(self) -> str:
        return f"https://{SNS_HOST}{self.cert_path}"

    def transport(self) -> httpx.MockTransport:
        def serve(request: httpx.Request) -> httpx.Response:
            self.requests.append(request)
            if request.url.host == SNS_HOST and request.url.path == self.cert_path:
                return httpx.Response(200, content=self.pem)
            if request.url.params.get("Action") == "ConfirmSubscription":
                return httpx.Response(200, content=b"<ConfirmSubscriptionResponse/>")
            return httpx.Response(404)

        return httpx.MockTransport(serve)

    def sign(self, message: dict[str, Any], version: str = "1", url: str | None = None) -> bytes:
        message = dict(message, SignatureVersion=version, SigningCertURL=url or self.cert_url)
        digest = hashes.SHA1() if version == "1" else hashes.SHA256()  # noqa: S303
        signature = self.key.sign(string_to_sign(message), padding.PKCS1v15(), digest)
        message["Signature"] = base64.b64encode(signature).decode()
        return json.dumps(message, indent=2).encode()

    def notification(self, ses: dict[str, Any], **extra: Any) -> dict[str, Any]:
        message_id = str(uuid.uuid4())
        return {
            "Type": "Notification",
            "MessageId": message_id,
            "TopicArn": TOPIC,
            "Message": json.dumps(ses),
            "Timestamp": _now(),
            "UnsubscribeURL": f"https://{SNS_HOST}/?Action=Unsubscribe&SubscriptionArn="
            f"{TOPIC}:{uuid.uuid4()}",
        } | extra

    def subscription(self) -> dict[str, Any]:
        token = secrets.token_hex(64)
        return {
            "Type": "SubscriptionConfirmation",
            "MessageId": str(uuid.uuid4()),
            "Token": token,
            "TopicArn": TOPIC,
            "Message": f"You have chosen to subscribe to the topic {TOPIC}.\n"
            "To confirm the subscription, visit the SubscribeURL included in this message.",
            "SubscribeURL": f"https://{SNS_HOST}/?Action=ConfirmSubscription&TopicArn={TOPIC}"
            f"&Token={token}",
            "Timestamp": _now(),
        }


def ses_mail(
    email: str, message_id: str | None, list_unsubscribe: str | None = None
) -> dict[str, Any]:
    headers = [
        {"name": "From", "value": "Campaign updates <updates@example.org>"},
        {"name": "To", "value": email},
        {"name": "Subject", "value": "A statement"},
    ]
    if message_id:
        headers.append({"name": "Message-ID", "value": message_id})
    if list_unsubscribe:
        headers.append({"name": "List-Unsubscribe", "value": list_unsubscribe})
    common = {"from": ["updates@example.org"], "to": [email], "subject": "A statement"}
    if message_id:
        common["messageId"] = message_id
    return {
        "timestamp": _now(),
        "source": "updates@example.org",
        "sourceArn": "arn:aws:ses:us-east-1:123456789012:identity/example.org",
        "sendingAccountId": "123456789012",
        "messageId": f"0100018{secrets.token_hex(6)}-{uuid.uuid4()}-000000",
        "destination": [email],
        "headersTruncated": False,
        "headers": headers,
        "commonHeaders": common,
    }


def ses_bounce(
    email: str,
    message_id: str | None,
    *,
    bounce_type: str = "Permanent",
    sub_type: str = "General",
    status: str = "5.1.1",
    diagnostic: str | None = None,
) -> dict[str, Any]:
    diagnostic = diagnostic or f"smtp; 550 {status} <{email}>... User unknown"
    return {
        "notificationType": "Bounce",
        "bounce": {
            "bounceType": bounce_type,
            "bounceSubType": sub_type,
            "bouncedRecipients": [
                {
                    "emailAddress": email,
                    "action": "failed",
                    "status": status,
                    "diagnosticCode": diagnostic,
                }
            ],
            "timestamp": _now(),
            "feedbackId": f"0100018{secrets.token_hex(6)}-{uuid.uuid4()}-000000",
            "remoteMtaIp": "192.0.2.25",
            "reportingMTA": "dsn; a8-30.smtp-out.amazonses.com",
        },
        "mail": ses_mail(email, message_id),
    }


def ses_complaint(email: str, message_id: str | None, feedback: str = "abuse") -> dict[str, Any]:
    return {
        "notificationType": "Complaint",
        "complaint": {
            "userAgent": "ExampleCorp Feedback Loop (V0.01)",
            "complainedRecipients": [{"emailAddress": email}],
            "complaintFeedbackType": feedback,
            "arrivalDate": _now(),
            "timestamp": _now(),
            "feedbackId": f"0100018{secrets.token_hex(6)}-{uuid.uuid4()}-000000",
        },
        "mail": ses_mail(email, message_id),
    }


@dataclass
class SesHook:
    sns: Sns
    path: str = "/webhooks/ses"

    def _request(self, ses: dict[str, Any]) -> Request:
        body = self.sns.sign(self.sns.notification(ses))
        return body, {"content-type": "text/plain; charset=UTF-8",
                      "x-amz-sns-message-type": "Notification"}  # fmt: skip

    def hard(self, email: str, message_id: str | None) -> Request:
        return self._request(ses_bounce(email, message_id))

    def soft(self, email: str, message_id: str | None) -> Request:
        return self._request(
            ses_bounce(
                email,
                message_id,
                bounce_type="Transient",
                sub_type="MailboxFull",
                status="4.2.2",
                diagnostic="smtp; 452 4.2.2 Mailbox full",
            )
        )

    def complaint(self, email: str, message_id: str | None) -> Request:
        return self._request(ses_complaint(email, message_id))

    def forged(self, request: Request) -> Request:
        message = json.loads(request[0])
        message["Message"] = message["Message"].replace('"Transient"', '"Permanent"') + " "
        return json.dumps(message).encode(), request[1]

    def unsigned(self, request: Request) -> Request:
        message = json.loads(request[0])
        del message["Signature"]
        return json.dumps(message).encode(), request[1]


# Postmark -------------------------------------------------------------------------------


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def postmark_content(email: str, message_id: str | None) -> str:
    """The bounce message Postmark keeps: its own headers first, then the original's."""
    original = f"Message-ID: {message_id}\r\n" if message_id else ""
    return (
        "Return-Path: <>\r\nMessage-ID: <20260101120000.ABC123@mx.example.com>\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\nContent-Type: multipart/report; "
        'report-type=delivery-status; boundary="b1"\r\n\r\n--b1\r\n\r\n'
        f"<{email}>: host mx.example.com said: 550 5.1.1 User unknown\r\n--b1\r\n"
        "Content-Type: text/rfc822-headers\r\n\r\nFrom: updates@example.org\r\n"
        f"To: {email}\r\n{original}Subject: A statement\r\n\r\n--b1--\r\n"
    )


def postmark_bounce(
    email: str,
    message_id: str | None,
    *,
    kind: str = "HardBounce",
    details: str = "smtp;550 5.1.1 The email account that you tried to reach does not exist.",
) -> dict[str, Any]:
    return {
        "RecordType": "Bounce",
        "MessageStream": "outbound",
        "ID": 4323372036854775000 + next(_serial),
        "Type": kind,
        "TypeCode": {"HardBounce": 1, "SoftBounce": 4096, "Transient": 2}.get(kind, 2048),
        "Name": kind,
        "Tag": "statement",
        "MessageID": str(uuid.uuid4()),
        "Metadata": {},
        "ServerID": 23,
        "Description": "The server was unable to deliver your message.",
        "Details": details,
        "Email": email,
        "From": "updates@example.org",
        "BouncedAt": _now(),
        "DumpAvailable": True,
        "Inactive": kind == "HardBounce",
        "CanActivate": True,
        "Subject": "A statement",
        "Content": postmark_content(email, message_id),
    }


@dataclass
class PostmarkHook:
    path: str = "/webhooks/postmark"
    auth: dict[str, str] = field(default_factory=lambda: basic(POSTMARK_USER, POSTMARK_PASSWORD))

    def _request(self, record: dict[str, Any]) -> Request:
        return json.dumps(record).encode(), {"content-type": "application/json"} | self.auth

    def hard(self, email: str, message_id: str | None) -> Request:
        return self._request(postmark_bounce(email, message_id))

    def soft(self, email: str, message_id: str | None) -> Request:
        record = postmark_bounce(
            email, message_id, kind="SoftBounce", details="smtp;452 4.2.2 Mailbox full"
        )
        return self._request(record)

    def complaint(self, email: str, message_id: str | None) -> Request:
        record = postmark_bounce(email, message_id, kind="SpamComplaint", details="")
        record.update(RecordType="SpamComplaint", TypeCode=512, Name="Spam complaint")
        return self._request(record)

    def forged(self, request: Request) -> Request:
        return request[0], request[1] | basic(POSTMARK_USER, POSTMARK_PASSWORD + "x")

    def unsigned(self, request: Request) -> Request:
        return request[0], {"content-type": "application/json"}


# SendGrid -------------------------------------------------------------------------------


@dataclass
class SendGridHook:
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    path: str = "/webhooks/sendgrid"

    @property
    def public_key(self) -> str:
        der = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(der).decode()

    def signed(self, body: bytes, timestamp: int | None = None) -> Request:
        stamp = str(int(time.time()) if timestamp is None else timestamp)
        signature = self.key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        return body, {
            "content-type": "application/json",
            "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
            "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
        }

    @staticmethod
    def event(email: str, message_id: str | None, event: str, **fields: Any) -> dict[str, Any]:
        return {
            "email": email,
            "timestamp": int(time.time()),
            "smtp-id": message_id or f"<{secrets.token_hex(6)}@ismtpd-555>",
            "event": event,
            "category": "statements",
            "sg_event_id": base64.b64encode(secrets.token_bytes(16)).decode(),
            "sg_message_id": f"{secrets.token_hex(8)}.filter0001.16648.5515E0B88.0",
        } | fields

    def hard(self, email: str, message_id: str | None) -> Request:
        ev = self.event(email, message_id, "bounce", type="bounce", status="5.1.1",
                        reason="550 5.1.1 The email account that you tried to reach does not exist",
                        bounce_classification="Invalid Address")  # fmt: skip
        return self.signed(json.dumps([ev]).encode())

    def soft(self, email: str, message_id: str | None) -> Request:
        ev = self.event(email, message_id, "bounce", type="blocked", status="4.2.2",
                        reason="452 4.2.2 Mailbox full",
                        bounce_classification="Mailbox Unavailable")  # fmt: skip
        return self.signed(json.dumps([ev]).encode())

    def complaint(self, email: str, message_id: str | None) -> Request:
        return self.signed(json.dumps([self.event(email, message_id, "spamreport")]).encode())

    def forged(self, request: Request) -> Request:
        other = ec.generate_private_key(ec.SECP256R1())
        stamp = request[1]["X-Twilio-Email-Event-Webhook-Timestamp"]
        signature = other.sign(stamp.encode() + request[0], ec.ECDSA(hashes.SHA256()))
        headers = dict(request[1])
        headers["X-Twilio-Email-Event-Webhook-Signature"] = base64.b64encode(signature).decode()
        return request[0], headers

    def unsigned(self, request: Request) -> Request:
        return request[0], {"content-type": "application/json"}


# Mailgun ---------------------------------------------------------------------------------


def mailgun_signature(
    key: str = MAILGUN_KEY, timestamp: int | None = None, token: str | None = None
) -> dict[str, str]:
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    token = token or secrets.token_hex(25)
    digest = hmac.new(key.encode(), (stamp + token).encode(), hashlib.sha256).hexdigest()
    return {"timestamp": stamp, "token": token, "signature": digest}


def mailgun_event(email: str, message_id: str | None, event: str, **fields: Any) -> dict[str, Any]:
    headers = {"to": email, "from": "updates@example.org", "subject": "A statement"}
    if message_id:
        headers["message-id"] = message_id.strip("<>")  # Mailgun drops the brackets
    return {
        "id": secrets.token_urlsafe(16),
        "timestamp": time.time(),
        "log-level": "error" if event == "failed" else "warn",
        "event": event,
        "recipient": email,
        "recipient-domain": email.rpartition("@")[2],
        "message": {"headers": headers, "attachments": [], "size": 2048},
        "tags": [],
        "user-variables": {},
    } | fields


@dataclass
class MailgunHook:
    path: str = "/webhooks/mailgun"

    @staticmethod
    def request(data: dict[str, Any], signature: dict[str, str] | None = None) -> Request:
        body = {"signature": signature or mailgun_signature(), "event-data": data}
        return json.dumps(body).encode(), {"content-type": "application/json"}

    def hard(self, email: str, message_id: str | None) -> Request:
        return self.request(mailgun_event(
            email, message_id, "failed", severity="permanent", reason="bounce",
            **{"delivery-status": {"code": 550, "attempt-no": 1,
                                   "message": "5.1.1 The email account does not exist",
                                   "description": "", "enhanced-code": "5.1.1"}},
        ))  # fmt: skip

    def soft(self, email: str, message_id: str | None) -> Request:
        return self.request(mailgun_event(
            email, message_id, "failed", severity="temporary", reason="generic",
            **{"delivery-status": {"code": 452, "attempt-no": 1,
                                   "message": "4.2.2 Mailbox full", "description": ""}},
        ))  # fmt: skip

    def complaint(self, email: str, message_id: str | None) -> Request:
        return self.request(mailgun_event(email, message_id, "complained"))

    def forged(self, request: Request) -> Request:
        body = json.loads(request[0])
        body["signature"] = mailgun_signature(key="key-not-ours")
        return json.dumps(body).encode(), request[1]

    def unsigned(self, request: Request) -> Request:
        body = json.loads(request[0])
        del body["signature"]
        return json.dumps(body).encode(), request[1]
