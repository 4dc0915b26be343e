"""Amazon SNS message signatures: the envelope Amazon SES bounce notifications arrive in.

SNS signs each message it POSTs with the private key of a certificate it publishes at
``SigningCertURL``. Verifying one, as AWS documents it (docs/deploy.md has the links):

1. The certificate URL must be ``https://sns.<region>.amazonaws.com/….pem`` (or the
   ``.amazonaws.com.cn`` China partition). Anything else is refused *before* any fetch:
   otherwise a forger could point us at a certificate of their own, or make the server
   fetch an internal URL for them.
2. The certificate is fetched over verified HTTPS with a timeout and a size cap, must
   be within its validity dates, and is cached by URL (SNS rotates certificates by
   publishing them at new URLs, so a URL's content does not change).
3. The string to sign is built from the message's own fields, in byte order, each as
   ``Name\\nvalue\\n``: for a ``Notification`` Message, MessageId, Subject (only when
   present), Timestamp, TopicArn, Type; for ``SubscriptionConfirmation`` and
   ``UnsubscribeConfirmation`` Message, MessageId, SubscribeURL, Timestamp, Token,
   TopicArn, Type.
4. ``Signature`` (base64) must verify with the certificate's RSA key: SHA1withRSA for
   ``SignatureVersion`` 1, SHA256withRSA for 2.

A subscription is confirmed by GETting its ``SubscribeURL``, which must pass the same
host rule, and only once the message's signature verified.

The message's ``Timestamp`` is signed but not held to an age: SNS retries a delivery
for as long as the topic's retry policy says (hours, with a custom one), and a replayed
notification is stored once anyway, by its fingerprint (``ses.py``).

Every outbound request goes through one ``httpx`` transport, :attr:`SnsVerifier.transport`
(``None``: the network). Tests hand it a local one, so nothing leaves the machine.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections import OrderedDict
from collections.abc import Mapping
from datetime import UTC, datetime
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from mailer.bounces.providers.common import Rejected

TYPES = ("Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation")
NOTIFICATION_FIELDS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
CONFIRMATION_FIELDS = (
    "Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type",
)  # fmt: skip
_HOST = re.compile(r"sns\.[a-z]{2}(?:-[a-z]+)+-\d{1,2}\.amazonaws\.com(?:\.cn)?")
_SAFE_URL = re.compile(r"[\x21-\x7e]{1,2048}")  # printable ASCII, no spaces or controls
FETCH_TIMEOUT_S = 5.0
MAX_CERT_BYTES = 64 * 1024
CACHE_SIZE = 32


def string_to_sign(message: Mapping[str, object]) -> bytes:
    """The canonical text SNS signed, for the message's ``Type``; 400 when a field is missing."""
    kind = message.get("Type")
    names = NOTIFICATION_FIELDS if kind == "Notification" else CONFIRMATION_FIELDS
    out: list[str] = []
    for name in names:
        value = message.get(name)
        if value is None and name == "Subject":
            continue  # signed only when present
        if not isinstance(value, str):
            raise Rejected(400, f"SNS {kind} message: {name} is missing or not a string")
        out.append(f"{name}\n{value}\n")
    return "".join(out).encode()


def sns_url(url: object, what: str) -> str:
    """``url`` if it is ``https://sns.<region>.amazonaws.com/…``; 403 otherwise, unfetched."""
    if not isinstance(url, str) or not _SAFE_URL.fullmatch(url):
        raise Rejected(403, f"{what} is missing or not a plain URL")
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme != "https" or parts.netloc != host or not _HOST.fullmatch(host):
        raise Rejected(403, f"{what} must be an https://sns.<region>.amazonaws.com/ URL")
    return url


class SnsVerifier:
    """Verifies SNS signatures and confirms subscriptions; caches certificates by URL."""

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.transport = transport
        self._keys: OrderedDict[str, tuple[rsa.RSAPublicKey, datetime]] = OrderedDict()

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=self.transport, timeout=FETCH_TIMEOUT_S, follow_redirects=False
        )

    async def verify(self, message: Mapping[str, object]) -> None:
        """Return when ``message`` carries a valid SNS signature; raise :class:`Rejected`."""
        version = message.get("SignatureVersion")
        signature = message.get("Signature")
        if signature is None:
            raise Rejected(401, "SNS message is not signed (no Signature)")
        if version not in ("1", "2"):
            raise Rejected(403, "SNS SignatureVersion must be 1 or 2")
        try:
            raw = base64.b64decode(str(signature), validate=True)
        except (binascii.Error, ValueError):
            raise Rejected(403, "SNS Signature is not base64") from None
        url = sns_url(message.get("SigningCertURL"), "SigningCertURL")
        if not urlsplit(url).path.endswith(".pem"):
            raise Rejected(403, "SigningCertURL must name a .pem certificate")
        signed = string_to_sign(message)  # 400 before any fetch when a field is missing
        key = await self.public_key(url)
        digest = hashes.SHA1() if version == "1" else hashes.SHA256()  # noqa: S303 (SNS v1)
        try:
            key.verify(raw, signed, padding.PKCS1v15(), digest)
        except InvalidSignature:
            raise Rejected(403, "SNS signature does not verify") from None

    async def public_key(self, url: str) -> rsa.RSAPublicKey:
        """The RSA key of the certificate at ``url`` (already checked by :func:`sns_url`)."""
        cached = self._keys.get(url)
        if cached is not None and cached[1] > datetime.now(UTC):
            self._keys.move_to_end(url)
            return cached[0]
        pem = await self._fetch(url)
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise Rejected(403, "SigningCertURL does not serve a PEM certificate") from None
        now = datetime.now(UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise Rejected(403, "the SNS signing certificate is expired or not yet valid")
        key = cert.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise Rejected(403, "the SNS signing certificate does not hold an RSA key")
        self._keys[url] = (key, cert.not_valid_after_utc)
        while len(self._keys) > CACHE_SIZE:
            self._keys.popitem(last=False)
        return key

    async def _fetch(self, url: str) -> bytes:
        """GET ``url``: 503 when AWS cannot be reached (SNS retries), 403 for a bad answer."""
        body = bytearray()
        try:
            async with self._client() as client, client.stream("GET", url) as answer:
                if answer.status_code >= 500:
                    raise Rejected(503, f"SigningCertURL answered {answer.status_code}; retry")
                if answer.status_code != 200:
                    raise Rejected(403, f"SigningCertURL answered {answer.status_code}")
                async for chunk in answer.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_CERT_BYTES:
                        raise Rejected(403, f"SigningCertURL serves over {MAX_CERT_BYTES} bytes")
        except httpx.HTTPError as exc:
            raise Rejected(
                503, f"could not fetch the SNS signing certificate ({type(exc).__name__})"
            ) from None
        return bytes(body)

    async def confirm(self, subscribe_url: object) -> None:
        """Confirm a subscription by visiting its ``SubscribeURL`` (same host rule)."""
        url = sns_url(subscribe_url, "SubscribeURL")
        try:
            async with self._client() as client:
                answer = await client.get(url)
        except httpx.HTTPError as exc:
            raise Rejected(
                502, f"could not confirm the subscription ({type(exc).__name__})"
            ) from None
        if answer.status_code != 200:
            raise Rejected(502, f"confirming the subscription: SNS answered {answer.status_code}")
