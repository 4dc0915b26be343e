"""The long-lived resources a process needs: one engine, one Redis client, the token signer.

Web processes and workers build the same Runtime from the same settings, so
they can never disagree about where the truth lives.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from mailer.config import Settings
from mailer.db import make_engine, make_sessionmaker, readonly
from mailer.keys import Keys
from mailer.tokens import Tokens


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    reads: async_sessionmaker[AsyncSession]  # for sessions that never write
    redis: Redis
    keys: Keys
    tokens: Tokens

    @classmethod
    def create(cls, settings: Settings) -> Runtime:
        engine = make_engine(settings.database_url)
        return cls(
            settings=settings,
            engine=engine,
            sessions=make_sessionmaker(engine),
            reads=make_sessionmaker(readonly(engine)),
            redis=Redis.from_url(settings.redis_url),
            keys=Keys(settings.queue_name),
            tokens=Tokens(settings.signing_keys, settings.confirm_token_ttl_s),
        )

    def confirm_url(self, subscriber_id: int) -> str:
        return f"{self.settings.base_url}/confirm/{self.tokens.confirm(subscriber_id)}"

    def unsubscribe_url(self, subscriber_id: int) -> str:
        return f"{self.settings.base_url}/unsubscribe/{self.tokens.unsubscribe(subscriber_id)}"

    async def close(self) -> None:
        await self.redis.aclose()
        await self.engine.dispose()
