"""DKIM signing (dkimpy), with both List-Unsubscribe headers inside ``h=``.

RFC 8058 requires List-Unsubscribe and List-Unsubscribe-Post to be covered by the
signature, and dkimpy's default header list leaves the second one out, so the
list is given explicitly. The key is read once per process, not per message.

The headers a reader sees or a filter acts on are *oversigned*: named once more in
``h=`` than they occur (RFC 6376 §5.4.2), the extra name standing for an instance
that does not exist. A verifier hashes an empty header for it, so anyone who adds a
second Subject (or From, List-Unsubscribe…) after signing breaks the signature,
instead of having a mail client show their copy above a valid one. An oversigned
header we did not send at all (a confirmation has no List-Unsubscribe) is named once,
which forbids adding it later (docs/security.md).
dkimpy's RSA is pure Python (several ms of CPU per message): a relay that signs
for you (SES, Postmark, Mailgun) is far cheaper at volume — see docs/deploy.md.
"""

from __future__ import annotations

import dkim

from mailer.config import Settings
from mailer.errors import MailerError

SIGNED_HEADERS = [
    b"from",
    b"to",
    b"subject",
    b"date",
    b"message-id",
    b"mime-version",
    b"content-type",
    b"list-id",
    b"list-unsubscribe",
    b"list-unsubscribe-post",
    b"feedback-id",
]
OVERSIGNED_HEADERS = [
    b"from",
    b"to",
    b"subject",
    b"date",
    b"message-id",
    b"list-unsubscribe",
    b"list-unsubscribe-post",
    b"feedback-id",
]


class DkimConfigError(MailerError):
    """The DKIM settings are incomplete or the key cannot be read."""


class DkimSigner:
    def __init__(self, domain: str, selector: str, private_key: bytes) -> None:
        self.domain = domain.encode()
        self.selector = selector.encode()
        self.private_key = private_key
        self.sign(b"From: a@b.c\r\nSubject: key check\r\n\r\nx\r\n")  # fail at start-up

    @classmethod
    def from_settings(cls, settings: Settings) -> DkimSigner | None:
        names = (settings.dkim_domain, settings.dkim_selector, settings.dkim_key_file)
        if not any(names):
            return None
        if not all(names):
            raise DkimConfigError(
                "MAILER_DKIM_DOMAIN, MAILER_DKIM_SELECTOR and MAILER_DKIM_KEY_FILE go together"
            )
        assert settings.dkim_key_file and settings.dkim_domain and settings.dkim_selector
        try:
            key = settings.dkim_key_file.read_bytes()
        except OSError as exc:
            raise DkimConfigError(f"MAILER_DKIM_KEY_FILE: cannot read: {exc}") from None
        try:
            return cls(settings.dkim_domain, settings.dkim_selector, key)
        except dkim.DKIMException as exc:
            raise DkimConfigError(f"MAILER_DKIM_KEY_FILE: not a usable key: {exc}") from None

    def sign(self, message: bytes) -> bytes:
        """Return the message with a DKIM-Signature header in front (relaxed/relaxed)."""
        present = {
            line.split(b":", 1)[0].strip().lower()
            for line in message.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
            if line and not line[:1].isspace()
        }
        headers = [h for h in SIGNED_HEADERS if h in present] + OVERSIGNED_HEADERS
        signature = dkim.sign(
            message,
            self.selector,
            self.domain,
            self.private_key,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=headers,
        )
        return bytes(signature) + message
