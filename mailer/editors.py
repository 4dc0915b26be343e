"""Editor accounts: bearer tokens shown once, stored only as SHA-256 hashes.

Tokens are 256 random bits, so a fast unsalted hash is enough (no password
stretching needed), and lookup by hash keeps verification a single indexed query.
A token that does not even have the shape of one (``mlr_`` and 43 URL-safe base64
characters) is refused before any query: junk floods cost no SQL at all.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from mailer.errors import NotFound
from mailer.models import Editor
from mailer.subscriptions import InvalidInput, normalize_email

TOKEN_PREFIX = "mlr_"  # noqa: S105 - a label, not a secret
# What new_token() makes: the prefix and token_urlsafe(32), 43 characters.
TOKEN_SHAPE = re.compile(r"mlr_[A-Za-z0-9_-]{43}")


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def well_formed(token: str) -> bool:
    """Whether ``token`` could be an editor token at all (checked before any query)."""
    return TOKEN_SHAPE.fullmatch(token) is not None


def generation(editor: Editor) -> str:
    """Names the editor's current token: sessions made under an older one stop working."""
    return editor.token_hash[:16]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def add_editor(session: AsyncSession, name: str, email: str | None = None) -> str:
    """Create an editor and return its token; the token itself is never stored.

    ``email`` is where editor notices go (a new statement on the site to review)."""
    name = name.strip()
    if not name or len(name) > 100 or not name.isprintable():
        raise InvalidInput("name", "must be 1-100 printable characters")
    address = normalize_email(email) if email is not None else None
    token = new_token()
    session.add(Editor(name=name, token_hash=hash_token(token), email=address))
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise InvalidInput("name", f"an editor named {name!r} already exists") from None
    return token


async def authenticate(session: AsyncSession, token: str) -> Editor | None:
    """The enabled editor holding ``token``, or None. Only reads: callers pass a
    read-only session (``Runtime.reads``), so no lookup waits for SQLite's write lock."""
    if not well_formed(token):
        return None
    digest = hash_token(token)
    editor = await session.scalar(select(Editor).where(Editor.token_hash == digest))
    if editor is None or editor.disabled:
        return None
    if not hmac.compare_digest(editor.token_hash, digest):
        return None
    return editor


async def all_editors(session: AsyncSession) -> list[Editor]:
    return list(await session.scalars(select(Editor).order_by(Editor.name)))


async def _named(session: AsyncSession, name: str) -> Editor:
    editor = await session.scalar(select(Editor).where(Editor.name == name.strip()))
    if editor is None:
        raise NotFound(f"no editor named {name.strip()!r}")
    return editor


async def set_disabled(session: AsyncSession, name: str, disabled: bool) -> Editor:
    """Disable (or enable again) an editor: a disabled one has no API access and no
    admin session (both check this flag on every request)."""
    editor = await _named(session, name)
    editor.disabled = disabled
    await session.commit()
    return editor


async def rotate_token(session: AsyncSession, name: str) -> tuple[Editor, str]:
    """Give an editor a new token; the old one stops working at once, and so do the
    sessions signed in with it (their ``generation`` no longer matches)."""
    editor = await _named(session, name)
    token = new_token()
    editor.token_hash = hash_token(token)
    await session.commit()
    return editor, token
