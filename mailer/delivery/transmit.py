"""Put a batch's messages on the wire and say what became of each: the send stage.

The sender (``delivery.sender``) decides what goes out and when: claims, re-checks,
throttles. This stage renders each message for its recipient, hands it to the SMTP pool
and turns the relay's answer into an ``Outcome`` for the recorder, by the rules of
``smtp.RULES`` (docs/smtp.md). A rate-limited message goes out alone, on the connection
its sender holds from before its slot. An unlimited group goes out as four chains at
once, each on its own connection (``SmtpPool.send_chain``): each message's final dot in
the same write as the next one's envelope, one write and one wake-up per message
(docs/smtp.md, RFC 2920).
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

from mailer.backoff import retry_delay
from mailer.blast_state import pause_if_sending
from mailer.db import utcnow
from mailer.delivery.claims import Claimed
from mailer.record import Outcome
from mailer.render import CompiledMessage, message_ids
from mailer.runtime import Runtime
from mailer.smtp import (
    Connection,
    PermanentSendError,
    PolicyError,
    SendError,
    SmtpConfigError,
    SmtpPool,
)
from mailer.stats import OutcomeStatus, SendStats
from mailer.wire import Stuffed

# An unlimited group goes out as this many chains at once, on as many connections.
CHAINS_PER_GROUP = 4


def outcome_for(
    blast_id: int, item: Claimed, status: OutcomeStatus, *args: Any, **kw: Any
) -> Outcome:
    """What became of ``item``; the rest as ``Outcome`` takes it (code, error, ...)."""
    return Outcome(blast_id, item.delivery_id, item.subscriber_id, status, *args, **kw)


def _unsendable(blast_id: int, item: Claimed, exc: ValueError) -> Outcome:
    """An address or URL that cannot be put on the wire: failed, nothing was sent."""
    return outcome_for(blast_id, item, OutcomeStatus.failed, None, str(exc)[:200])


class Transmitter:
    """One per worker process, beside the sender: renders, sends, classifies."""

    def __init__(self, runtime: Runtime, smtp: SmtpPool, stats: SendStats) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.smtp = smtp
        self.stats = stats  # the SMTP latency histogram, written with the recorder's flushes
        self.message_id = message_ids(runtime.settings)  # one per message: built once

    def envelope_sender(self, subscriber_id: int, blast_id: int | None = None) -> str:
        """The Return-Path; with VERP a signed one per subscriber and blast (docs/bounces.md)."""
        if not self.settings.verp_domain:
            return self.settings.from_address
        tag = self.runtime.tokens.bounce_tag(subscriber_id, blast_id)
        return f"bounces+{tag}@{self.settings.verp_domain}"

    def _wire(self, compiled: CompiledMessage, blast_id: int, item: Claimed, email: str) -> Stuffed:
        """The message for this recipient, ready for DATA: no scan or copy of it later."""
        return compiled.wire(
            to=email,
            unsubscribe_url=self.runtime.unsubscribe_url(item.subscriber_id),
            message_id=self.message_id(blast_id, item.subscriber_id),
        )

    async def one(
        self,
        compiled: CompiledMessage,
        blast_id: int,
        item: Claimed,
        email: str,
        conn: Connection | None,
    ) -> Outcome | None:
        """Send one message; None when the relay itself is unusable (the blast is paused)."""
        try:
            data = self._wire(compiled, blast_id, item, email)
        except ValueError as exc:
            return _unsendable(blast_id, item, exc)
        started = time.perf_counter()
        error: SendError | SmtpConfigError | None = None
        try:
            sender = self.envelope_sender(item.subscriber_id, blast_id)
            await self.smtp.send(sender, email, data, conn)
        except (SendError, SmtpConfigError) as exc:
            error = exc
        finally:
            self.stats.observe_smtp(time.perf_counter() - started)
        return await self._outcome(blast_id, item, error)

    async def chain(
        self, compiled: CompiledMessage, blast_id: int, group: list[tuple[Claimed, str]]
    ) -> tuple[list[Outcome], list[Claimed]]:
        """Send a group of messages as CHAINS_PER_GROUP chains at once, each on its own
        connection.

        A chain waits for the relay's reply to each message before it writes the next, so
        one chain at a time leaves the worker idle for a round trip per message. The
        group's places in the recorder's buffer are taken before it is sent, so sending
        it over several connections at once changes nothing in what a crash can repeat
        (docs/design.md, invariant 2).

        Returns the outcomes, and the items not attempted because the relay is unusable
        (the blast is paused then; the caller gives their rows back).
        """
        outcomes: list[Outcome] = []
        sendable: list[Claimed] = []
        messages = []
        for item, email in group:
            try:
                data = self._wire(compiled, blast_id, item, email)
            except ValueError as exc:
                outcomes.append(_unsendable(blast_id, item, exc))
                continue
            sendable.append(item)
            messages.append((self.envelope_sender(item.subscriber_id, blast_id), email, data))
        size = -(-len(messages) // CHAINS_PER_GROUP)  # the parts, as even as can be
        starts = range(0, len(messages), size or 1)
        async with asyncio.TaskGroup() as tasks:  # a failure in one cancels the others
            running = [tasks.create_task(self.smtp.send_chain(messages[i : i + size]))
                       for i in starts]  # fmt: skip
        unsent: list[Claimed] = []
        unusable: SmtpConfigError | None = None
        for start, task in zip(starts, running, strict=True):
            items, results = sendable[start : start + size], task.result()
            last = results[-1][0] if results else None
            if isinstance(last, SmtpConfigError):  # the relay is unusable: the chain ended there
                unusable = last
                results = results[:-1]
            unsent += items[len(results) :]  # they wait, with the blast
            for item, (error, seconds) in zip(items, results, strict=False):
                self.stats.observe_smtp(seconds)
                outcome = await self._outcome(blast_id, item, error)
                assert outcome is not None  # only an SmtpConfigError has none
                outcomes.append(outcome)
        if unusable is not None:
            await self._pause(blast_id, unusable)
        return outcomes, unsent

    async def _outcome(
        self, blast_id: int, item: Claimed, error: SendError | SmtpConfigError | None
    ) -> Outcome | None:
        failed = OutcomeStatus.failed
        if error is None:
            return outcome_for(blast_id, item, OutcomeStatus.sent)
        if isinstance(error, SmtpConfigError):
            await self._pause(blast_id, error)
            return None
        if isinstance(error, PolicyError):
            return outcome_for(blast_id, item, failed, error.code, error.message, policy=True)
        if isinstance(error, PermanentSendError):
            suppress = error.suppress
            return outcome_for(blast_id, item, failed, error.code, error.message, suppress=suppress)
        return self._transient(blast_id, item, error)  # 4xx, timeouts, dropped lines

    async def _pause(self, blast_id: int, error: SmtpConfigError) -> None:
        await pause_if_sending(self.runtime, blast_id, f"SMTP relay unusable: {error}")

    def _transient(self, blast_id: int, item: Claimed, exc: SendError) -> Outcome:
        now = utcnow()
        first = item.first_attempt_at or now
        if (now - first).total_seconds() >= self.settings.retry_max_age_s:
            gave_up = f"gave up: {exc.message}"
            return outcome_for(blast_id, item, OutcomeStatus.failed, exc.code, gave_up)
        delay = retry_delay(item.attempts + 1, self.settings.retry_base_s)
        later = now + timedelta(seconds=delay)
        retry = OutcomeStatus.retry
        return outcome_for(blast_id, item, retry, exc.code, exc.message, next_attempt_at=later)
