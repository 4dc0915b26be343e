"""The double opt-in mail: one job per sign-up, retried on transient failures.

It is sent only while the subscriber is still pending, or left earlier and signed up
again since (the row keeps its status until this mail's link is clicked), so a retry
that runs after the visitor already confirmed (or left) sends nothing.
"""

from __future__ import annotations

import logging

from mailer.errors import MailerError
from mailer.models import Subscriber, SubscriberEvent, SubscriberStatus
from mailer.render import Renderer
from mailer.runtime import Runtime
from mailer.smtp import PermanentSendError, PolicyError, SmtpPool, TransientSendError
from mailer.subscriptions import LEFT, mark_bounced

log = logging.getLogger("mailer.confirmations")


class RetryLater(MailerError):
    """A transient failure: the queue should run the job again after a backoff."""


def awaits_confirmation(sub: Subscriber) -> bool:
    """Pending, or left and signed up again since: the two cases a confirmation mail is for."""
    if sub.status == SubscriberStatus.pending:
        return True
    return sub.status in LEFT and sub.resubscribe_requested_at is not None


async def send(runtime: Runtime, smtp: SmtpPool, renderer: Renderer, subscriber_id: int) -> str:
    async with runtime.sessions() as session:
        sub = await session.get(Subscriber, subscriber_id)
        if sub is None or not awaits_confirmation(sub):
            return "not pending"
        email = sub.email  # the name stays out: a stranger may have typed it
    try:
        data = renderer.confirmation(to=email, confirm_url=runtime.confirm_url(subscriber_id))
    except ValueError as exc:  # a stored value that cannot go on the wire safely
        async with runtime.sessions() as session:
            session.add(
                SubscriberEvent(
                    subscriber_id=subscriber_id, kind="confirmation_failed", detail=str(exc)[:500]
                )
            )
            await session.commit()
        log.warning("confirmation to subscriber %s not sent: unusable stored value", subscriber_id)
        return "failed"
    try:
        await smtp.send(runtime.settings.from_address, email, data)
    except TransientSendError as exc:
        log.info("confirmation to subscriber %s deferred: %s", subscriber_id, exc)
        raise RetryLater(str(exc)) from exc
    except PermanentSendError as exc:
        async with runtime.sessions() as session:
            if exc.suppress:
                await mark_bounced(session, [subscriber_id], f"{exc.code} {exc.message}")
            else:
                session.add(
                    SubscriberEvent(
                        subscriber_id=subscriber_id,
                        kind="confirmation_failed",
                        detail=f"{exc.code} {exc.message}"[:500],
                    )
                )
            await session.commit()
        log.warning("confirmation to subscriber %s refused: %s", subscriber_id, exc.code)
        return "bounced" if exc.suppress else "failed"
    except PolicyError as exc:
        log.error("confirmation to subscriber %s refused by policy: %s", subscriber_id, exc)
        return "policy"
    async with runtime.sessions() as session:
        session.add(SubscriberEvent(subscriber_id=subscriber_id, kind="confirmation_sent"))
        await session.commit()
    return "sent"
