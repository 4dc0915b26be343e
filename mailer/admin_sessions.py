"""Admin sessions live in Redis, so they can be ended: the cookie holds only a random id.

A signed cookie that carries the session itself stays valid until it expires, whoever
copied it, and logging out only asks the browser to forget it. Here the cookie carries
a random id (signed with the current key only, ``mailer/web/admin/session.py``), and
the session is a Redis entry that logging out deletes. Redis holds a SHA-256 of the id,
never the id itself, so reading Redis hands out no sessions.

An entry also names the editor's token ``generation``: rotating the token ends every
session made with the old one even if Redis could not be reached at that moment, and
the editor's ``disabled`` flag is checked on every request (docs/security.md).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass

from redis.asyncio import Redis

from mailer.keys import Keys

SESSION_TTL_S = 12 * 3600
MAX_ID_LENGTH = 64  # token_urlsafe(32) is 43 characters


@dataclass(frozen=True)
class StoredSession:
    editor_id: int
    csrf_secret: str  # CSRF tokens of this session's forms derive from it
    generation: str  # editors.generation() when the session began


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


async def begin(redis: Redis, keys: Keys, editor_id: int, generation: str) -> str:
    """Store a new session and return its id (for the cookie only)."""
    session_id = secrets.token_urlsafe(32)
    digest = _digest(session_id)
    entry = json.dumps({"e": editor_id, "c": secrets.token_hex(16), "g": generation})
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(keys.admin_session(digest), entry, ex=SESSION_TTL_S)
        pipe.sadd(keys.admin_editor_sessions(editor_id), digest)
        pipe.expire(keys.admin_editor_sessions(editor_id), SESSION_TTL_S)
        await pipe.execute()
    return session_id


async def load(redis: Redis, keys: Keys, session_id: str) -> StoredSession | None:
    if not session_id or len(session_id) > MAX_ID_LENGTH:
        return None
    raw = await redis.get(keys.admin_session(_digest(session_id)))
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        stored = StoredSession(data["e"], data["c"], data["g"])
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(stored.editor_id, int) or not all(
        isinstance(v, str) for v in (stored.csrf_secret, stored.generation)
    ):
        return None
    return stored


async def end(redis: Redis, keys: Keys, session_id: str, editor_id: int) -> None:
    """Log out: the entry is gone, so the cookie (and every copy of it) is no session."""
    digest = _digest(session_id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.admin_session(digest))
        pipe.srem(keys.admin_editor_sessions(editor_id), digest)
        await pipe.execute()


async def end_all(redis: Redis, keys: Keys, editor_id: int) -> int:
    """End every session of one editor (disabled, or given a new token); how many ended."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.smembers(keys.admin_editor_sessions(editor_id))
        (members,) = await pipe.execute()
    digests = [m.decode() if isinstance(m, bytes) else str(m) for m in members]
    doomed = [keys.admin_session(d) for d in digests]
    ended = int(await redis.delete(*doomed)) if doomed else 0
    await redis.delete(keys.admin_editor_sessions(editor_id))
    return ended
