"""The one-time admin login link that ``mailer dev`` prints, so a new developer can sign in
without creating an editor and copying its token by hand.

On each start ``mailer dev`` makes sure a local editor named ``dev`` exists (created on
the first start) and stores a random token for it in Redis, keyed by the token's
SHA-256 and expiring after ``LINK_TTL_S``; the link carries the token itself. Following
the link shows a page with a "Sign in" button (a GET never signs in: link scanners and
previews fetch links too, docs/design.md#other-facts-about-mail-on-the-wire), and the
POST takes the token out of Redis in one transaction, so it signs in once at most.

The web side serves these links only when ``MAILER_ENV=dev`` (``mailer/web/app.py``):
in any other mode the route does not exist and nothing here is ever written.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select

from mailer.editors import add_editor
from mailer.models import Editor
from mailer.runtime import Runtime

DEV_EDITOR = "dev"
LINK_TTL_S = 15 * 60  # long enough to switch to the browser, short enough to be stale soon
MAX_TOKEN_CHARS = 100


@dataclass(frozen=True)
class DevLogin:
    url: str  # the one-time link
    editor_name: str
    api_token: str | None  # the editor's API token, when this start created the editor


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def issue(runtime: Runtime) -> DevLogin | None:
    """A fresh one-time link for the local editor (created first when missing); None when
    that editor was disabled on purpose (``mailer editors disable dev``)."""
    api_token = None
    async with runtime.sessions() as session:
        editor = await session.scalar(select(Editor).where(Editor.name == DEV_EDITOR))
        if editor is None:
            api_token = await add_editor(session, DEV_EDITOR)
            editor = await session.scalar(select(Editor).where(Editor.name == DEV_EDITOR))
        assert editor is not None
        if editor.disabled:
            return None
        editor_id = editor.id
    token = secrets.token_urlsafe(32)
    await runtime.redis.set(runtime.keys.dev_login(_digest(token)), editor_id, ex=LINK_TTL_S)
    url = f"{runtime.settings.base_url}/admin/login/{token}"
    return DevLogin(url=url, editor_name=DEV_EDITOR, api_token=api_token)


def _plausible(token: str) -> bool:
    return 0 < len(token) <= MAX_TOKEN_CHARS and token.isascii()


async def is_valid(runtime: Runtime, token: str) -> bool:
    """Whether the link would still sign in (for the page the GET shows); uses nothing up."""
    if not _plausible(token):
        return False
    return bool(await runtime.redis.exists(runtime.keys.dev_login(_digest(token))))


async def consume(runtime: Runtime, token: str) -> int | None:
    """The editor id the token signs in as, taking the token out of Redis (GET and DEL in
    one MULTI, so two requests racing with one link cannot both win); None when unknown,
    used or expired."""
    if not _plausible(token):
        return None
    key = runtime.keys.dev_login(_digest(token))
    async with runtime.redis.pipeline(transaction=True) as pipe:
        pipe.get(key)
        pipe.delete(key)
        value, _ = await pipe.execute()
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None
