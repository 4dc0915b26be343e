"""Signed, purpose-bound tokens for the links we mail out.

Each purpose has its own salt (itsdangerous) or its own derived sub-key (the bare
HMACs below), so a confirm token can never unsubscribe and an unsubscribe token can
never confirm. Confirm tokens expire; unsubscribe tokens never do (an old newsletter
must still let its reader leave). Keys rotate: old keys in ``MAILER_OLD_SECRET_KEYS``
still verify, new tokens use the current key.

Unsubscribe links are made once per message of a blast, so they are a bare HMAC,
``u1.ID.MAC`` (docs/security.md#unsubscribe-links-and-message-ids); the itsdangerous
links mailed before it are still read, and keep working forever.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import re
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


@dataclass(frozen=True)
class BounceClaim:
    subscriber_id: int
    blast_id: int | None


class Mac:
    """HMAC-SHA256 under one purpose's sub-key of one secret key.

    The sub-key, ``HMAC(key, "mailer PURPOSE v1")``, and the HMAC's padded key blocks are
    computed once, here; a call copies that state and hashes only its message. A
    different purpose is a different key, so no MAC made for one verifies for another."""

    __slots__ = ("_state",)

    def __init__(self, key: str, purpose: str) -> None:
        sub_key = hmac.digest(key.encode(), f"mailer {purpose} v1".encode(), "sha256")
        self._state = hmac.new(sub_key, digestmod=hashlib.sha256)

    def __call__(self, message: bytes) -> bytes:
        state = self._state.copy()
        state.update(message)
        return state.digest()


@functools.lru_cache(maxsize=32)
def purpose_mac(key: str, purpose: str) -> Mac:
    """The :class:`Mac` of ``key`` and ``purpose``, derived once per process."""
    return Mac(key, purpose)


class MessageIds:
    """The Message-ID of a blast's delivery, ``<bBLAST.MAC@domain>`` (render.make_message_id):
    the MAC is 128 bits under the Message-ID sub-key. Key and domain are worked out once,
    since a sender makes one per message (bench/analysis.md, step 10)."""

    __slots__ = ("_domain", "_mac")

    def __init__(self, key: str, domain: str) -> None:
        self._domain = domain
        self._mac = purpose_mac(key, "message-id")

    def __call__(self, blast_id: int, subscriber_id: int) -> str:
        return f"<b{blast_id}.{self.mac(blast_id, subscriber_id)}@{self._domain}>"

    def mac(self, blast_id: int, subscriber_id: int) -> str:
        return self._mac(f"msgid:{blast_id}:{subscriber_id}".encode()).hex()[:32]


UNSUBSCRIBE_PREFIX = "u1"  # the version; an itsdangerous token (base64 JSON) never starts so
_UNSUBSCRIBE = re.compile(r"u1\.(0|[1-9][0-9]{0,17})\.([A-Za-z0-9_-]{22})")


def _unsubscribe_mac(mac: Mac, subscriber_id: str) -> str:
    """128 bits of HMAC-SHA256 in base64url without padding: 22 characters."""
    digest = mac(b"unsubscribe:" + subscriber_id.encode())
    return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode()


def _verp_mac(key: str, parts: list[str]) -> str:
    message = ("verp2:" + ":".join(parts)).encode()
    digest = hmac.new(key.encode(), message, "sha256").digest()[:10]  # 80 bits
    return base64.b32encode(digest).decode().lower()


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
        # Old keys first, the current key last (Settings.signing_keys).
        self._unsubscribe_macs = [purpose_mac(k, Purpose.unsubscribe.value) for k in keys]
        # Links mailed before the bare HMAC: read forever, never made again.
        self._legacy_unsubscribe = URLSafeSerializer(keys, salt=Purpose.unsubscribe.value)

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

    def bounce_tag(self, subscriber_id: int, blast_id: int | None = None) -> str:
        """A short signed tag for VERP addresses (``bounces+TAG@domain``).

        ``SUB-BLAST-MAC`` (or ``SUB-MAC`` outside a blast): the MAC is 80 bits of
        HMAC-SHA256 in lower-case base32, 16 characters. Anyone who has seen one VERP
        address can mail a forged bounce to it, so the MAC only has to stop *guessing*
        another subscriber's address; 80 bits does, a 32-bit MAC did not. Lower case and
        digits only, because some relays fold the case of local parts.
        """
        parts = [str(subscriber_id)] if blast_id is None else [str(subscriber_id), str(blast_id)]
        return "-".join([*parts, _verp_mac(self._keys[-1], parts)])

    def read_bounce(self, tag: str) -> BounceClaim:
        """The subscriber (and blast) a VERP tag names, if its MAC verifies under any key."""
        *parts, mac = tag.strip().lower().split("-")
        if not 1 <= len(parts) <= 2 or not all(p.isdigit() and len(p) < 19 for p in parts):
            raise TokenError("not a bounce tag")
        for key in self._keys:
            if hmac.compare_digest(_verp_mac(key, parts), mac):
                blast = int(parts[1]) if len(parts) == 2 else None
                return BounceClaim(subscriber_id=int(parts[0]), blast_id=blast)
        raise TokenError("not a bounce tag")

    def read_bounce_tag(self, tag: str) -> int:
        return self.read_bounce(tag).subscriber_id

    # Unsubscribe ----------------------------------------------------------

    def unsubscribe(self, subscriber_id: int) -> str:
        """``u1.ID.MAC``: made for every message of a blast, so one short HMAC and no JSON."""
        sub = f"{subscriber_id:d}"
        return f"{UNSUBSCRIBE_PREFIX}.{sub}.{_unsubscribe_mac(self._unsubscribe_macs[-1], sub)}"

    def read_unsubscribe(self, token: str) -> int:
        """The subscriber of a ``u1`` token, or of an itsdangerous one mailed before it."""
        invalid = TokenError("This unsubscribe link is not valid.")
        if token.startswith(UNSUBSCRIBE_PREFIX + "."):
            match = _UNSUBSCRIBE.fullmatch(token)
            if match is None:
                raise invalid
            sub, given = match.group(1), match.group(2).encode()
            for mac in reversed(self._unsubscribe_macs):  # the current key first: most use it
                if hmac.compare_digest(_unsubscribe_mac(mac, sub).encode(), given):
                    return int(sub)
            raise invalid
        try:
            value = self._legacy_unsubscribe.loads(token)
        except BadData:
            raise invalid from None
        if not isinstance(value, int) or isinstance(value, bool):
            raise invalid
        return value


def now() -> float:
    return time.time()
