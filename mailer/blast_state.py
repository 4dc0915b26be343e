"""Every write of a blast's status, and of the note (``reason``) shown beside it.

A blast's status is written from the web process (an editor pauses, resumes,
cancels), by the worker that snapshots its audience, by the recorder (too many
policy rejections pause it; the last outcome finishes it) and by the sender (an
unusable relay pauses it; a daily quota makes it wait). All of those writes live
here, so the state machine can be read in one place:

- a blast is created ``scheduled`` (``send_at`` in the future) or ``queued``;
- ``scheduled`` or ``queued`` → ``sending`` once its audience is snapshotted;
- ``queued`` or ``sending`` → ``paused`` by an editor; ``sending`` → ``paused`` by a
  worker (too many policy rejections, an unusable relay);
- ``paused`` → ``sending`` on resume if it had started, else back to ``queued``;
- ``sending`` → ``done`` once no delivery row is pending or in flight;
- any status but ``done`` → ``cancelled``.

Each write is conditional on the status it expects, so concurrent writers (two
workers, a worker and an editor) never undo each other.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from mailer.db import utcnow
from mailer.errors import Conflict, NotFound
from mailer.models import Blast, BlastStatus, Delivery, DeliveryStatus
from mailer.runtime import Runtime

# Logger names are part of the log format (JSON logs carry them), so each write keeps
# the logger of the module it used to live in: editors' transitions "mailer.blasts",
# the worker's pauses and completions "mailer.record".
log = logging.getLogger("mailer.blasts")
worker_log = logging.getLogger("mailer.record")


# Editors' transitions ----------------------------------------------------------------


async def transition(
    runtime: Runtime, blast_id: int, allowed: tuple[str, ...], to: str, **values: Any
) -> Blast:
    """Move a blast from one of ``allowed`` to ``to`` (under a row lock), setting ``values``.

    Cancelling also cancels every row still pending; rows in flight are left to their
    batch, which stops at its next status check (or to the reconciler, once free).
    """
    async with runtime.sessions() as session:
        blast = await session.get(Blast, blast_id, with_for_update=True)
        if blast is None:
            raise NotFound(f"no blast with id {blast_id}")
        if blast.status not in allowed:
            raise Conflict(f"blast {blast_id} is {blast.status}; cannot make it {to}")
        blast.status = to
        for key, value in values.items():
            setattr(blast, key, value)
        if to == BlastStatus.cancelled:
            await session.execute(
                update(Delivery)
                .where(Delivery.blast_id == blast_id, Delivery.status == DeliveryStatus.pending)
                .values(status=DeliveryStatus.cancelled)
            )
        await session.commit()
    log.info("blast %s is now %s", blast_id, to, extra={"blast_id": blast_id, "status": str(to)})
    return blast


def start_sending(blast: Blast, total: int) -> None:
    """The audience is snapshotted: the blast is sending (on a row the caller locked)."""
    blast.status = BlastStatus.sending
    blast.total = total
    blast.started_at = utcnow()


# The worker's writes -----------------------------------------------------------------


async def pause_in_session(session: AsyncSession, blast_id: int, reason: str) -> bool:
    """Pause a sending blast inside the caller's transaction (bounce rules use it)."""
    result = await session.execute(
        update(Blast)
        .where(Blast.id == blast_id, Blast.status == BlastStatus.sending)
        .values(status=BlastStatus.paused, reason=reason[:500])
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def _log_paused(blast_id: int, reason: str) -> None:
    worker_log.error(
        "blast %s paused: %s",
        blast_id,
        reason,
        extra={"blast_id": blast_id, "status": BlastStatus.paused.value},
    )


async def pause_if_sending(runtime: Runtime, blast_id: int, reason: str) -> bool:
    """Pause a sending blast for a reason an editor must act on (an unusable relay)."""
    async with runtime.sessions() as session:
        paused = await pause_in_session(session, blast_id, reason)
        await session.commit()
    if paused:
        _log_paused(blast_id, reason)
    return paused


async def count_policy_failures(
    session: AsyncSession,
    blast_id: int,
    count: int,
    last: tuple[int | None, str | None],
    limit: int,
) -> str | None:
    """Add ``count`` policy rejections; past ``limit`` pause the blast and return why.

    Runs in the recorder's transaction, so the count and the pause commit with the
    outcomes that caused them.
    """
    failures = await session.scalar(
        update(Blast)
        .where(Blast.id == blast_id)
        .values(policy_failures=Blast.policy_failures + count)
        .returning(Blast.policy_failures)
    )
    if failures is None or failures < limit:
        return None
    code, error = last
    reason = (
        f"paused after {failures} policy rejections by the receiving servers "
        f"(last: {code} {error}); the sender's reputation or "
        f"authentication needs attention before resuming"
    )
    if await pause_in_session(session, blast_id, reason):
        _log_paused(blast_id, reason)
    return reason


async def finish_if_complete(runtime: Runtime, blast_id: int) -> bool:
    """Mark the blast done once no row is pending or in flight. A Core statement built
    once, on a plain connection: every batch job ends with it (bench/analysis.md,
    step 10)."""
    async with runtime.engine.begin() as conn:
        result = await conn.execute(_FINISH, {"f_blast": blast_id, "f_now": utcnow()})
    done = bool(result.rowcount)
    if done:
        worker_log.info("blast %s done", blast_id, extra={"blast_id": blast_id, "status": "done"})
    return done


_FINISH = (
    update(Blast)
    .where(
        Blast.id == bindparam("f_blast"),
        Blast.status == BlastStatus.sending,
        ~select(Delivery.id)
        .where(
            Delivery.blast_id == bindparam("f_blast"),
            Delivery.status.in_([DeliveryStatus.pending, DeliveryStatus.sending]),
        )
        .exists(),
    )
    .values(
        status=BlastStatus.done,
        finished_at=bindparam("f_now", type_=Blast.finished_at.type),
        reason=None,
    )
)


# Waiting notes -----------------------------------------------------------------------


async def note_waiting(session: AsyncSession, blast_id: int, why: str) -> None:
    """Say why a sending blast makes no progress for now (a quota), in the caller's
    transaction; the note starts with "waiting:" so that sending again clears it."""
    await session.execute(
        update(Blast).where(Blast.id == blast_id).values(reason=f"waiting: {why}")
    )


async def clear_waiting(runtime: Runtime, blast_id: int) -> None:
    """Sending again after a quota wait: the "waiting" note no longer holds. Every chunk
    of a batch runs it, and it rarely finds a note: a Core statement built once."""
    async with runtime.engine.begin() as conn:
        await conn.execute(_CLEAR_WAITING, {"w_blast": blast_id})


_CLEAR_WAITING = (
    update(Blast)
    .where(Blast.id == bindparam("w_blast"), Blast.reason.like("waiting:%"))
    .values(reason=None)
)
