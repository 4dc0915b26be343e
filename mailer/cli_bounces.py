"""``mailer bounces``: read what comes back (DSNs, complaints) from a pipe or over SMTP.

``ingest`` is what an MTA's pipe transport (or procmail) runs for each message,
so its exit status speaks the MTA's language (sysexits.h): 0 whenever the
message was read, processed or ignored, so the relay never bounces the bounce;
65 for input that is not an email message; 66 for a file that cannot be opened;
75 "try again later" when the database or the configuration is unusable, so the
relay keeps the message and retries instead of losing it (docs/deploy.md).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import NoReturn

import typer

from mailer.config import SettingsError, load_settings
from mailer.logs import setup_logging

bounces_app = typer.Typer(help="Read bounces and complaints sent back to the VERP domain.")

EX_DATAERR = 65
EX_NOINPUT = 66
EX_TEMPFAIL = 75


def _fail(line: str, code: int) -> NoReturn:
    typer.echo(line, err=True)
    raise typer.Exit(code)


@bounces_app.command("ingest")
def ingest_command(
    file: str = typer.Argument("-", help="The message file; '-' or nothing: standard input."),
    envelope_to: str | None = typer.Option(
        None,
        "--envelope-to",
        help="The envelope recipient, e.g. Postfix's ${recipient}; "
        "default: the message's Delivered-To or X-Original-To header.",
    ),
) -> None:
    """Ingest one message (DSN, ARF complaint or anything else); print one line."""
    from mailer.bounces import IngestResult, IngestUnavailable, ingest, read_capped
    from mailer.runtime import Runtime

    try:
        settings = load_settings()
    except SettingsError as exc:
        _fail(f"error: {exc}; message not processed, try again later", EX_TEMPFAIL)
    try:
        if file == "-":
            raw, size = read_capped(sys.stdin.buffer)
        else:
            with Path(file).open("rb") as stream:
                raw, size = read_capped(stream)
    except OSError as exc:
        _fail(f"error: cannot read {file}: {exc.strerror or exc}", EX_NOINPUT)
    if not raw.strip():
        _fail("error: empty input: not an email message", EX_DATAERR)

    async def _run() -> IngestResult:
        runtime = Runtime.create(settings)
        try:
            return await ingest(runtime, raw, source="cli", envelope_to=envelope_to, raw_size=size)
        finally:
            await runtime.close()

    try:
        result = asyncio.run(_run())
    except IngestUnavailable as exc:
        _fail(f"error: {exc}; message not processed, try again later", EX_TEMPFAIL)
    except Exception as exc:  # noqa: BLE001 - a bug must not make the MTA bounce the report
        _fail(f"error: {type(exc).__name__}: {exc}"[:300] + "; try again later", EX_TEMPFAIL)
    if not result.readable:
        _fail(f"error: {result.summary}", EX_DATAERR)
    typer.echo(result.summary)


@bounces_app.command("serve")
def serve_command(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(2525, help="Port to listen on."),
    max_size: int = typer.Option(
        32 * 1024 * 1024, "--max-size", help="Largest message accepted, in bytes (552 above)."
    ),
) -> None:
    """SMTP listener for the VERP domain's MX: bounces+TAG@, complaints@ and postmaster@."""
    from mailer.bounces.listener import COMPLAINTS_LOCAL_PART, serve
    from mailer.runtime import Runtime

    try:
        settings = load_settings()
    except SettingsError as exc:
        _fail(str(exc), 2)
    domain = settings.verp_domain
    if not domain:
        _fail("error: MAILER_VERP_DOMAIN is not set: the listener serves that domain's MX", 2)
    setup_logging(settings.log_format)

    def ready(_server: asyncio.Server) -> None:
        typer.echo(
            f"listening on {host}:{port} for bounces+…@{domain}, "
            f"{COMPLAINTS_LOCAL_PART}@{domain} and postmaster@{domain}"
        )
        sys.stdout.flush()

    async def _run() -> None:
        runtime = Runtime.create(settings)
        try:
            await serve(runtime, host, port, max_size=max_size, on_ready=ready)
        finally:
            await runtime.close()

    try:
        asyncio.run(_run())
    except OSError as exc:
        _fail(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}", 1)
