"""Signed, purpose-bound tokens for the links we mail out.

Each purpose has its own salt, so a confirm token can never unsubscribe and an
unsubscribe token can never confirm. Confirm tokens expire; unsubscribe tokens
never do (an old newsletter must still let its reader leave). Keys rotate: old
keys in ``MAILER_OLD_SECRET_KEYS`` still verify, new tokens use the current key.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from enum import StrEnum

from itsdangerous import BadData, SignatureExpired, URLSafeSerializer, URLSafeTimedSerializer

from mailer.errors import MailerError


class Purpose(StrEnum):
    confirm = "confirm"
    unsubscribe = "unsubscribe"


class TokenError(MailerError):
    """A token that cannot be used; ``reason`` is safe to show to the visitor."""

    def __init__(self, reason: str, *, expired: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.expired = expired


@dataclass(frozen=True)
class ConfirmClaim:
    subscriber_id: int
    issued_at: float


class _ClockedSerializer(URLSafeTimedSerializer):
    """A timed serializer whose clock can be set, so tests can time-travel."""

    def __init__(self, keys: list[str], salt: str, now: float | None = None) -> None:
        super().__init__(keys, salt=salt)
        self._now = now

    def make_signer(self, salt: str | bytes | None = None):  # type: ignore[no-untyped-def]
        signer = super().make_signer(salt)
        if self._now is not None:
            fixed = int(self._now)
            signer.get_timestamp = lambda: fixed  # type: ignore[attr-defined,method-assign]
        return signer


class Tokens:
    def __init__(self, keys: list[str], confirm_ttl_s: int) -> None:
        self._keys = keys
        self._ttl = confirm_ttl_s
        self._unsubscribe = URLSafeSerializer(keys, salt=Purpose.unsubscribe.value)

    # Confirm --------------------------------------------------------------

    def confirm(self, subscriber_id: int, *, now: float | None = None) -> str:
        serializer = _ClockedSerializer(self._keys, salt=Purpose.confirm.value, now=now)
        return serializer.dumps(subscriber_id)

    def read_confirm(self, token: str, *, now: float | None = None) -> ConfirmClaim:
        serializer = _ClockedSerializer(self._keys, salt=Purpose.confirm.value, now=now)
        try:
            value, issued = serializer.loads(token, max_age=self._ttl, return_timestamp=True)
        except SignatureExpired:
            raise TokenError("This confirmation link has expired.", expired=True) from None
        except BadData:
            raise TokenError("This confirmation link is not valid.") from None
        if not isinstance(value, int) or isinstance(value, bool):
            raise TokenError("This confirmation link is not valid.")
        return ConfirmClaim(subscriber_id=value, issued_at=issued.timestamp())

    # Bounces ----------------------------------------------------------------

    def bounce_tag(self, subscriber_id: int) -> str:
        """A short signed tag for VERP addresses (``bounces+TAG@domain``): id and 8 MAC chars."""
        mac = hmac.new(self._keys[-1].encode(), f"verp:{subscriber_id}".encode(), "sha256")
        return f"{subscriber_id}-{mac.hexdigest()[:8]}"

    def read_bounce_tag(self, tag: str) -> int:
        sub, _, mac = tag.partition("-")
        if not sub.isdigit():
            raise TokenError("not a bounce tag")
        for key in self._keys:
            expected = hmac.new(key.encode(), f"verp:{sub}".encode(), "sha256").hexdigest()[:8]
            if hmac.compare_digest(expected, mac):
                return int(sub)
        raise TokenError("not a bounce tag")

    # Unsubscribe ----------------------------------------------------------

    def unsubscribe(self, subscriber_id: int) -> str:
        return self._unsubscribe.dumps(subscriber_id)

    def read_unsubscribe(self, token: str) -> int:
        try:
            value = self._unsubscribe.loads(token)
        except BadData:
            raise TokenError("This unsubscribe link is not valid.") from None
        if not isinstance(value, int) or isinstance(value, bool):
            raise TokenError("This unsubscribe link is not valid.")
        return value


def now() -> float:
    return time.time()
