"""Editor accounts: bearer tokens shown once, stored only as SHA-256 hashes.

Tokens are 256 random bits, so a fast unsalted hash is enough (no password
stretching needed), and lookup by hash keeps verification a single indexed query.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from mailer.models import Editor
from mailer.subscriptions import InvalidInput, normalize_email

TOKEN_PREFIX = "mlr_"  # noqa: S105 - a label, not a secret


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def add_editor(session: AsyncSession, name: str, email: str | None = None) -> str:
    """Create an editor and return its token; the token itself is never stored.

    ``email`` is where editor notices go (a new statement on the site to review)."""
    name = name.strip()
    if not name or len(name) > 100 or not name.isprintable():
        raise InvalidInput("name", "must be 1-100 printable characters")
    address = normalize_email(email) if email is not None else None
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(Editor(name=name, token_hash=hash_token(token), email=address))
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise InvalidInput("name", f"an editor named {name!r} already exists") from None
    return token


async def authenticate(session: AsyncSession, token: str) -> Editor | None:
    if not token or len(token) > 200:
        return None
    digest = hash_token(token)
    editor = await session.scalar(select(Editor).where(Editor.token_hash == digest))
    if editor is None or editor.disabled:
        return None
    if not hmac.compare_digest(editor.token_hash, digest):
        return None
    return editor
