"""``mailer bounces serve``: an SMTP listener for the VERP domain's MX.

It accepts mail for three kinds of address on ``MAILER_VERP_DOMAIN`` only, and
refuses every other recipient at RCPT (so it can never be used as a relay or a
general mailbox):

- ``bounces+TAG@DOMAIN``: the return paths our blasts use (DSNs come back here);
- ``complaints@DOMAIN``: the address to register with feedback loops (Yahoo CFL,
  Microsoft JMRP...), which send ARF reports;
- ``postmaster@DOMAIN``: RFC 5321 requires every mail domain to accept it.

The tag's *shape* is checked at RCPT; its MAC is checked by ``ingest``, so a
tampered tag is accepted and stored as unmatched (a forgery is evidence worth
keeping), never acted on. Messages over ``max_size`` are refused with 552 by
aiosmtpd; each accepted message goes through ``ingest`` once per recipient. A
database that is down answers 451 so the sending MTA keeps the report and retries.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import socket
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from mailer.bounces.ingest import IngestUnavailable, ingest
from mailer.runtime import Runtime

log = logging.getLogger("mailer.bounces")

DEFAULT_MAX_SIZE = 32 * 1024 * 1024
MAX_RECIPIENTS = 50  # per transaction; a DSN has one
COMPLAINTS_LOCAL_PART = "complaints"
_BOUNCE_LOCAL = re.compile(r"bounces\+[a-z0-9-]{1,60}", re.I)


def accepts(domain: str, address: str) -> bool:
    """Whether the listener takes mail for ``address`` (see the module docstring)."""
    local, at, rcpt_domain = address.strip().strip("<>").rpartition("@")
    if not at or rcpt_domain.lower().rstrip(".") != domain:
        return False
    lowered = local.lower()
    return lowered in (COMPLAINTS_LOCAL_PART, "postmaster") or bool(_BOUNCE_LOCAL.fullmatch(local))


class BounceHandler:
    """aiosmtpd handler: RCPT filtering, then one ``ingest`` per accepted recipient."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        domain = runtime.settings.verp_domain
        if not domain:
            raise ValueError("MAILER_VERP_DOMAIN is not set: there is no bounce domain to serve")
        self.domain = domain

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 Too many recipients"
        if not accepts(self.domain, address):
            return "550 5.1.1 No such mailbox here: only bounce and complaint addresses"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(  # noqa: N802
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        raw = envelope.original_content or b""
        if isinstance(raw, str):  # only with decode_data=True, which we do not use
            raw = raw.encode("utf-8", "surrogateescape")
        for rcpt in envelope.rcpt_tos:
            try:
                result = await ingest(self.runtime, raw, source="smtp", envelope_to=rcpt)
            except IngestUnavailable as exc:
                log.error("bounce report not stored, the sender will retry: %s", exc)
                return "451 4.3.0 Cannot store the report now; try again later"
            except Exception:  # a bug must not turn into a 5xx: the report would be lost
                log.exception("bounce report not stored, the sender will retry")
                return "451 4.3.0 Cannot store the report now; try again later"
            log.info("%s", result.summary, extra={"source": "smtp"})
        return "250 2.0.0 OK"


async def serve(
    runtime: Runtime,
    host: str,
    port: int,
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[asyncio.Server], None] | None = None,
) -> None:
    """Listen until ``stop`` is set (or SIGINT/SIGTERM when no event is given)."""
    handler = BounceHandler(runtime)
    loop = asyncio.get_running_loop()
    # Named once: left unset, aiosmtpd looks up the FQDN for every connection.
    hostname = socket.gethostname()
    server = await loop.create_server(
        lambda: SMTP(
            handler, hostname=hostname, data_size_limit=max_size, decode_data=False, timeout=120
        ),
        host=host,
        port=port,
    )
    own_stop = stop is None
    stop = stop or asyncio.Event()
    if own_stop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:
        on_ready(server)
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()
        if own_stop:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
