"""Run ``mailer`` with experimental changes patched in, to measure proposals before anyone
edits mailer/ (``python bench/harness.py --explore base,nopipelining …``).

    python bench/variants.py VARIANT[+VARIANT…] worker|serve [ARGS…]

Nothing here is used by the figures themselves; each variant answers one question of the
form "how much would this change buy?" and is reported beside the plain code in the same
run. Variants that no longer apply to the current code say so and exit 3.

- ``base``: mailer as it is.
- ``nopipelining``: SMTP one command at a time, as before mailer pipelined (RFC 2920);
  the ``pipelining`` variant that measured the proposal is now mailer's own code.
- ``nopreping``: SQLAlchemy engines without ``pool_pre_ping`` (one round trip less per
  session checkout; mailer has done without it since 22cd062).
- ``bigpool``: engine pool_size 40 (a web process with more concurrent requests than
  pool_size + max_overflow opens and closes connections all the time).
- ``norecheck``: the per-group "still subscribed?" query answered from the chunk's bulk
  read (measures what the re-check costs; not a proposal to drop docs/design.md, invariant 3).
- ``flush100``: the recorder writes outcomes every 100 messages instead of 20.
- ``noconvoy``: a lane that waited for the recorder's lock flushes only if still due
  (in mailer since 22cd062).
- ``corerecheck``: the re-check as one cached Core statement (``id = ANY(:ids)``).
- ``jobs3``, ``fastsubscribe``, ``httptools``, ``count``: see their docstrings.
- ``chunk500``: claim 500 rows at a time instead of 200 (in mailer since step 10);
  ``chunk200``: 200 at a time, as before.
- ``fasttoken``: the per-message unsubscribe URL and Message-ID from a precomputed HMAC
  key (measures the itsdangerous cost; in mailer as the ``u1`` token, so only useful on
  commits before it).
- ``wirebytes``: a blast message built as plain bytes and converted by
  ``smtp_pipeline.wire_message`` on its way out, as before the wire form was built once
  per blast (what ``CompiledMessage.wire`` buys).
- ``txrecheck``: the send-time re-check in a transaction (BEGIN, SELECT, ROLLBACK on
  PostgreSQL), as before ``db.single_reads`` (what AUTOCOMMIT buys).
- ``driverrecheck``: the re-check run by asyncpg itself (``id = ANY($1)``).
- ``group8``, ``group4``: lanes of an unlimited blast take 8 or 4 messages at a time
  instead of 16 (``GROUP_UNLIMITED``), so two or five lanes send at once.
- ``recordherd``: every outcome wakes every lane waiting for places in the recorder, as
  before ``Recorder._turn`` woke one lane at a time (what that buys).
- ``nochain``: an unlimited group sent one message at a time (two writes and two
  wake-ups per message), as before ``SmtpPool.send_chain`` (what chaining buys).
- ``inlist``: the id lists of the re-check and of the recorder's UPDATEs as an
  expanding ``IN`` on PostgreSQL too, as before ``db.ids_in`` (what ``= ANY`` buys).
- ``txflush``: every recorder flush in a transaction (BEGIN, UPDATE, COMMIT), as before
  ``db.single_writes`` (what AUTOCOMMIT buys).
- ``onechain``, ``chains2``, ``chains8``: an unlimited group sent as one chain on one
  connection, or as two or eight at once, instead of four (``transmit.CHAINS_PER_GROUP``).
- ``nodriver``: the re-check and the recorder's usual flush through SQLAlchemy's execute
  path on asyncpg too, as before ``driver_sql`` ran them on asyncpg itself.
- ``noredis``: the recorder's flush writes no Redis counters (what they cost per message;
  not a proposal: /metrics reads them).
- ``countereveryflush``: the Redis counters written by every flush, as before
  ``record.COUNTERS_SECONDS``.
- ``flushthenread``: an unlimited group's re-check in its own round trip after the flush
  that made room for the group, as before the re-check went into the flush's statement
  (``record_sql.sent_then``; what one round trip fewer per group buys).
- ``ormclaim``: the claim as an ORM bulk UPDATE built on every call (the session then
  synchronises its identity map from the RETURNING rows), as before ``claims._CLAIM``.
- ``msgidcall``: each Message-ID made by ``render.make_message_id``, key and domain
  worked out per call, as before ``Transmitter.message_id`` kept them.
- ``ormstate``: a batch's ``finish_if_complete`` and ``Claims.next_attempt_at``, and each
  chunk's ``clear_waiting``, built per call and run in an ORM session, as before they
  were Core statements built once.
- ``statusherd``: every lane that finds the kept blast status stale reads it itself, as
  before ``delivery.status`` shared one read per process (what that buys).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

PATCHES: dict[str, Callable[[], None]] = {}


def patch(name: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def deco(fn: Callable[[], None]) -> Callable[[], None]:
        PATCHES[name] = fn
        return fn

    return deco


@patch("base")
def _base() -> None:
    pass


# pipelining ----------------------------------------------------------------------


@patch("nopipelining")
def _nopipelining() -> None:
    """mailer's SMTP connections without RFC 2920 pipelining (aiosmtplib's sendmail, one
    command and reply at a time): what pipelining (in mailer since a1ca5d8) buys."""
    from mailer import smtp

    original = smtp.SmtpPool._new_client

    def _new_client(self: Any) -> Any:
        client = original(self)
        client.use_pipelining = False
        return client

    smtp.SmtpPool._new_client = _new_client


# SQL pool ---------------------------------------------------------------------------


def _engine_kwargs(**forced: Any) -> None:
    from mailer import db, runtime

    original = db.make_engine

    def make_engine(url: str, **kwargs: Any) -> Any:
        if not db.is_sqlite(url):
            kwargs.update(forced)
        return original(url, **kwargs)

    db.make_engine = make_engine
    runtime.make_engine = make_engine  # type: ignore[attr-defined]


@patch("nopreping")
def _nopreping() -> None:
    _engine_kwargs(pool_pre_ping=False)


@patch("bigpool")
def _bigpool() -> None:
    _engine_kwargs(pool_size=40, max_overflow=10)


# delivery knobs -----------------------------------------------------------------------


@patch("norecheck")
def _norecheck() -> None:
    from mailer.delivery import sender as delivery

    original = delivery.Sender._still_subscribed
    cache: dict[int, str] = {}

    async def still(self: Any, ids: list[int]) -> dict[int, str]:
        if len(ids) > 16:  # the chunk's bulk read: real, and remembered
            found = await original(self, ids)
            cache.update(found)
            return found
        return {i: cache[i] for i in ids if i in cache}

    delivery.Sender._still_subscribed = still


@patch("flush100")
def _flush100() -> None:
    from mailer import record

    record.FLUSH_EVERY = 100


@patch("chunk500")
def _chunk500() -> None:
    from mailer.delivery import sender as delivery

    delivery.CHUNK_UNLIMITED = 500


@patch("chunk200")
def _chunk200() -> None:
    """Chunks of 200 rows on an unlimited blast, as before ``CHUNK_UNLIMITED`` was 500."""
    from mailer.delivery import sender as delivery

    delivery.CHUNK_UNLIMITED = 200


@patch("fasttoken")
def _fasttoken() -> None:
    import base64
    import hashlib
    import hmac

    from mailer import runtime

    def unsubscribe_url(self: Any, subscriber_id: int) -> str:
        key = self.settings.signing_keys[-1].encode()
        body = base64.urlsafe_b64encode(str(subscriber_id).encode()).rstrip(b"=")
        sig = hmac.new(key, body, hashlib.sha1).digest()
        token = (body + b"." + base64.urlsafe_b64encode(sig).rstrip(b"=")).decode()
        return f"{self.settings.base_url}/unsubscribe/{token}"

    runtime.Runtime.unsubscribe_url = unsubscribe_url


@patch("noconvoy")
def _noconvoy() -> None:
    """Recorder.add: a lane that waited for the lock while another flushed does not flush
    again unless the buffer is still due (today every waiter writes whatever is there)."""
    import time

    from mailer import record

    async def add(self: Any, outcome: Any) -> None:
        self.buffer.append(outcome)
        if self._due():
            async with self._lock:
                if not self._due():  # flushed by someone else while we waited
                    return
                batch, self.buffer = self.buffer, []
                self.last_flush = time.monotonic()
                await self._write(batch)

    def due(self: Any) -> bool:
        return (
            len(self.buffer) >= record.FLUSH_EVERY
            or time.monotonic() - self.last_flush > record.FLUSH_SECONDS
        )

    record.Recorder._due = due
    record.Recorder.add = add


@patch("corerecheck")
def _corerecheck() -> None:
    """The "still subscribed?" read as one cached Core statement with ``id = ANY(:ids)``
    on a plain connection, instead of an ORM session with an IN list compiled per call."""
    from sqlalchemy import text

    from mailer.delivery import sender as delivery

    original = delivery.Sender._still_subscribed
    query = text("SELECT id, email FROM subscribers WHERE id = ANY(:ids) AND status = 'confirmed'")

    async def still(self: Any, ids: list[int]) -> dict[int, str]:
        if self.runtime.engine.dialect.name != "postgresql":
            return await original(self, ids)
        async with self.runtime.engine.connect() as conn:
            rows = await conn.execute(query, {"ids": ids})
            return {r[0]: r[1] for r in rows}

    delivery.Sender._still_subscribed = still


@patch("wirebytes")
def _wirebytes() -> None:
    """Each message from ``CompiledMessage.build`` (bytes): the SMTP code then counts its
    line ends, looks for dots and copies it to add the final dot (``wire_message``)."""
    from mailer import render

    def wire(self: Any, **values: Any) -> bytes:
        return bytes(self.build(**values))

    render.CompiledMessage.wire = wire


@patch("txrecheck")
def _txrecheck() -> None:
    """The re-check on the read-only engine: asyncpg opens a transaction for it."""
    from mailer import db
    from mailer.delivery import sender

    sender.single_reads = db.readonly


@patch("statusherd")
def _statusherd() -> None:
    """BlastStatuses.current without the shared read: each stale lane sends its own."""
    import time

    from mailer.delivery import status

    async def current(self: Any, blast_id: int) -> str | None:
        known = self._known.get(blast_id)
        if known is not None and time.monotonic() - known[0] < status.STATUS_TTL_S:
            return known[1]
        return (await self._read(blast_id))[1]

    status.BlastStatuses.current = current


def _max_jobs(n: int) -> None:
    from mailer import worker

    original = worker.worker_settings

    def worker_settings(settings: Any, **overrides: Any) -> dict[str, Any]:
        return original(settings, **({"max_jobs": n} | overrides))

    worker.worker_settings = worker_settings


@patch("jobs3")
def _jobs3() -> None:
    """At most 3 arq jobs at once per worker (10 today: 10 batches × 10 lanes contend for
    10 SMTP connections and 20 SQL connections)."""
    _max_jobs(3)


@patch("fastsubscribe")
def _fastsubscribe() -> None:
    """A new address signs up in one SQL statement (subscriber + event, one CTE) instead of
    the ORM's SELECT, INSERT (flush), INSERT, UPDATE; known addresses still take the full
    state machine. PostgreSQL only; measures what the ORM unit of work costs per request."""
    from sqlalchemy import text

    from mailer import subscriptions
    from mailer.db import utcnow

    original = subscriptions.subscribe
    insert_new = text(
        "WITH s AS (INSERT INTO subscribers (email, name, status, created_at, updated_at,"
        " confirm_sent_at) VALUES (:email, :name, 'pending', :now, :now, :now)"
        " ON CONFLICT (email) DO NOTHING RETURNING id),"
        " e AS (INSERT INTO subscriber_events (subscriber_id, kind, at, ip, user_agent)"
        " SELECT id, 'signup', :now, :ip, :ua FROM s)"
        " SELECT id FROM s"
    )

    async def subscribe(
        session: Any, email: str, name: str | None, origin: Any, *, resend_after_s: int
    ) -> int | None:
        if session.get_bind().dialect.name != "postgresql":
            return await original(session, email, name, origin, resend_after_s=resend_after_s)
        params = {
            "email": email,
            "name": name,
            "now": utcnow(),
            "ip": origin.ip,
            "ua": (origin.user_agent or "")[:512] or None,
        }
        new_id = (await session.execute(insert_new, params)).scalar()
        await session.commit()
        if new_id is None:  # a known address: the whole state machine
            return await original(session, email, name, origin, resend_after_s=resend_after_s)
        return int(new_id)

    subscriptions.subscribe = subscribe


@patch("httptools")
def _httptools() -> None:
    """uvicorn with httptools (C HTTP parser; what uvicorn[standard] brings) instead of
    h11. Needs ``pip install --target bench/out/extra httptools`` first, so the shared
    virtualenv stays as the project declares it."""
    from pathlib import Path

    extra = Path(__file__).resolve().parent / "out" / "extra"
    sys.path.insert(0, str(extra))
    import httptools  # noqa: F401 - fails loudly when it is not there


@patch("count")
def _count() -> None:
    """Count recorder writes (and their sizes), re-check queries and session checkouts;
    printed to the worker's log when it exits."""
    import atexit
    from collections import Counter

    from mailer import record
    from mailer.delivery import sender as delivery

    counts: Counter[str] = Counter()
    write = record.Recorder._write
    still = delivery.Sender._still_subscribed

    async def counted_write(self: Any, batch: list[Any]) -> None:
        counts["recorder writes"] += 1
        counts["outcomes written"] += len(batch)
        await write(self, batch)

    async def counted_still(self: Any, ids: list[int]) -> dict[int, str]:
        counts["still-subscribed queries"] += 1
        return await still(self, ids)

    record.Recorder._write = counted_write
    delivery.Sender._still_subscribed = counted_still
    atexit.register(lambda: print(f"bench counts: {dict(counts)}", file=sys.stderr, flush=True))


@patch("driverrecheck")
def _driverrecheck() -> None:
    """The "still subscribed?" read run by asyncpg itself on the pool's connection, with
    ``id = ANY($1)`` (one prepared statement for every group size), as the sign-up's
    statement is (``signup_statements.DriverStatement``)."""
    from mailer.delivery import sender as delivery

    original = delivery.Sender._still_subscribed
    sql = "SELECT id, email FROM subscribers WHERE id = ANY($1::int[]) AND status = 'confirmed'"

    async def still(self: Any, ids: list[int]) -> dict[int, str]:
        if self.runtime.engine.dialect.driver != "asyncpg":
            return await original(self, ids)
        async with self._reader.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            return {r[0]: r[1] for r in await raw.fetch(sql, ids)}

    delivery.Sender._still_subscribed = still


@patch("inlist")
def _inlist() -> None:
    """PostgreSQL gets SQLite's statements: an expanding IN, rendered per execution."""
    from mailer import record_sql
    from mailer.delivery import sender

    record_sql.SENT[True] = record_sql.SENT[False]
    record_sql.SKIPPED[True] = record_sql.SKIPPED[False]
    sender._STILL_SUBSCRIBED[True] = sender._STILL_SUBSCRIBED[False]


@patch("txflush")
def _txflush() -> None:
    """The recorder writes every flush in a transaction, as it does on SQLite."""
    from mailer import record

    record.single_writes = lambda engine: None


@patch("onechain")
def _onechain() -> None:
    from mailer.delivery import transmit

    transmit.CHAINS_PER_GROUP = 1


@patch("chains2")
def _chains2() -> None:
    from mailer.delivery import transmit

    transmit.CHAINS_PER_GROUP = 2


@patch("chains8")
def _chains8() -> None:
    from mailer.delivery import transmit

    transmit.CHAINS_PER_GROUP = 8


@patch("nodriver")
def _nodriver() -> None:
    from mailer import record
    from mailer.delivery import sender

    record.on_driver = sender.on_driver = lambda engine: False


@patch("noredis")
def _noredis() -> None:
    from mailer import record

    async def nothing(self: Any, *args: Any) -> None:
        return None

    record.Recorder._count_in_redis = nothing


@patch("countereveryflush")
def _countereveryflush() -> None:
    from mailer import record

    record.COUNTERS_SECONDS = 0.0


@patch("nochain")
def _nochain() -> None:
    """Transmitter.chain sending each message of the group alone (``Transmitter.one``),
    as before chaining; the outcomes go to the recorder after the group, as with a chain."""
    from mailer.delivery import transmit

    async def chain(self: Any, compiled: Any, blast_id: int, group: list[Any]) -> Any:
        outcomes = []
        for i, (item, email) in enumerate(group):
            outcome = await self.one(compiled, blast_id, item, email, None)
            if outcome is None:
                return outcomes, [c for c, _ in group[i:]]
            outcomes.append(outcome)
        return outcomes, []

    transmit.Transmitter.chain = chain


def _group(n: int) -> None:
    from mailer.delivery import sender as delivery

    delivery.GROUP_UNLIMITED = n


@patch("group4")
def _group4() -> None:
    """Lanes of an unlimited blast take 4 messages at a time instead of 16: with the
    recorder's 20 places, five lanes send at once instead of one."""
    _group(4)


@patch("group10")
def _group10() -> None:
    """Lanes of 10: two groups fit in the recorder's 20 places at once."""
    _group(10)


@patch("group8")
def _group8() -> None:
    _group(8)


@patch("flushthenread")
def _flushthenread() -> None:
    """A group's re-check in a round trip of its own after the flush that made room for
    it, as before ``Recorder.reserve`` took the read into the flush's statement."""
    from mailer.delivery import sender

    sender.Sender._recheck = lambda self, ids: None


@patch("ormclaim")
def _ormclaim() -> None:
    """The claim as the ORM bulk UPDATE built on every call, as before ``claims._CLAIM``."""
    from datetime import timedelta

    from sqlalchemy import func, or_, select, update

    from mailer.db import utcnow
    from mailer.delivery import claims
    from mailer.models import Delivery, DeliveryStatus

    async def claim(self: Any, blast_id: int, first_id: int, last_id: int, limit: int) -> Any:
        now = utcnow()
        lease = now + timedelta(seconds=self.settings.delivery_lease_s)
        async with self.runtime.sessions() as session:
            ids = (
                select(Delivery.id)
                .where(
                    Delivery.blast_id == blast_id,
                    Delivery.id.between(first_id, last_id),
                    Delivery.status == DeliveryStatus.pending,
                    or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now),
                )
                .order_by(Delivery.id)
                .limit(limit)
            )
            if self.runtime.engine.dialect.name == "postgresql":
                ids = ids.with_for_update(skip_locked=True)
            rows = await session.execute(
                update(Delivery)
                .where(Delivery.id.in_(ids.scalar_subquery()))
                .where(Delivery.status == DeliveryStatus.pending)
                .values(
                    status=DeliveryStatus.sending,
                    lease_until=lease,
                    first_attempt_at=func.coalesce(Delivery.first_attempt_at, now),
                )
                .returning(
                    Delivery.id,
                    Delivery.subscriber_id,
                    Delivery.attempts,
                    Delivery.first_attempt_at,
                )
            )
            claimed = [claims.Claimed(r[0], r[1], r[2], r[3]) for r in rows if r[1] is not None]
            await session.commit()
        claimed.sort(key=lambda c: c.delivery_id)
        return claimed

    claims.Claims.claim = claim


@patch("msgidcall")
def _msgidcall() -> None:
    """Each Message-ID from ``make_message_id``, which derives the key and the domain again
    on every call, as before ``Transmitter.message_id`` kept them."""
    from mailer.delivery import transmit
    from mailer.render import make_message_id

    init = transmit.Transmitter.__init__

    def patched(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        settings = self.settings
        self.message_id = lambda blast_id, sub: make_message_id(settings, blast_id, sub)

    transmit.Transmitter.__init__ = patched  # type: ignore[method-assign]


@patch("ormstate")
def _ormstate() -> None:
    """A batch's ``finish_if_complete``, its ``Claims.next_attempt_at`` and each chunk's
    ``clear_waiting`` built per call and run in an ORM session, as before they were Core
    statements built once."""
    from sqlalchemy import func, select, update

    from mailer.db import utcnow
    from mailer.delivery import claims, sender
    from mailer.models import Blast, BlastStatus, Delivery, DeliveryStatus

    async def finish(runtime: Any, blast_id: int) -> bool:
        async with runtime.sessions() as session:
            open_rows = (
                select(Delivery.id)
                .where(
                    Delivery.blast_id == blast_id,
                    Delivery.status.in_([DeliveryStatus.pending, DeliveryStatus.sending]),
                )
                .exists()
            )
            result = await session.execute(
                update(Blast)
                .where(Blast.id == blast_id, Blast.status == BlastStatus.sending, ~open_rows)
                .values(status=BlastStatus.done, finished_at=utcnow(), reason=None)
            )
            await session.commit()
        return bool(result.rowcount)

    async def clear(runtime: Any, blast_id: int) -> None:
        async with runtime.sessions() as session:
            await session.execute(
                update(Blast)
                .where(Blast.id == blast_id, Blast.reason.like("waiting:%"))
                .values(reason=None)
            )
            await session.commit()

    async def least_pending(self: Any, column: Any, blast_id: int, first: int, last: int) -> Any:
        async with self.runtime.reads() as session:
            return await session.scalar(
                select(func.min(column)).where(
                    Delivery.blast_id == blast_id,
                    Delivery.id.between(first, last),
                    Delivery.status == DeliveryStatus.pending,
                )
            )

    sender.finish_if_complete = finish
    sender.clear_waiting = clear
    claims.Claims._least_pending = least_pending


@patch("recordherd")
def _recordherd() -> None:
    from mailer import record

    def wake_all(self: Any) -> None:
        for turn in self._waiting:
            if not turn.done():
                turn.set_result(None)

    record.Recorder._wake = wake_all


def apply(names: str) -> None:
    for name in names.split("+"):
        if name not in PATCHES:
            print(f"unknown variant {name!r}; known: {', '.join(PATCHES)}", file=sys.stderr)
            sys.exit(2)
        try:
            PATCHES[name]()
        except (AttributeError, ImportError) as exc:
            print(f"variant {name} no longer applies: {exc!r}", file=sys.stderr)
            sys.exit(3)


if __name__ == "__main__":
    apply(sys.argv[1])
    sys.argv = ["mailer", *sys.argv[2:]]
    from mailer.cli import main

    main()
