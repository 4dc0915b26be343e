"""``mailer send-test`` and ``mailer publish``: mail out from the command line."""

from __future__ import annotations

from pathlib import Path

import typer

from mailer.cli.common import add_commands, fail, run, settings_or_exit

commands = typer.Typer()


@commands.command("send-test")
def send_test(address: str) -> None:
    """Send one test message through the configured SMTP relay, to check the settings."""
    settings = settings_or_exit()
    from mailer.render import Renderer
    from mailer.smtp import SendError, SmtpConfigError, SmtpPool
    from mailer.subscriptions import InvalidInput, normalize_email

    try:
        to = normalize_email(address)
    except InvalidInput as exc:
        fail(str(exc))

    async def _send() -> None:
        pool = SmtpPool(settings, size=1)
        try:
            data = Renderer(settings).confirmation(
                to=to, confirm_url=f"{settings.base_url}/subscribe"
            )
            await pool.send(settings.from_address, to, data)
        finally:
            await pool.close()

    try:
        run(_send())
    except (SendError, SmtpConfigError) as exc:
        fail(f"SMTP relay {settings.smtp_host}:{settings.smtp_port} refused: {exc}")
    typer.echo(f"sent a test message to {to} via {settings.smtp_host}:{settings.smtp_port}")


@commands.command()
def publish(
    file: Path = typer.Argument(..., help="A Markdown file: front matter or a first # heading."),
    blast: bool = typer.Option(False, "--blast", help="Blast it to every confirmed subscriber."),
    at: str | None = typer.Option(None, "--at", help="Blast at this ISO 8601 time (with zone)."),
) -> None:
    """Publish a statement from a Markdown file, and optionally blast it now or later."""
    settings = settings_or_exit()
    from datetime import datetime

    from pydantic import ValidationError

    from mailer.errors import one_line
    from mailer.statements import parse_markdown_file

    if at is not None and not blast:
        fail("--at needs --blast")
    send_at = None
    if at is not None:
        try:
            send_at = datetime.fromisoformat(at)
        except ValueError:
            fail(f"--at: not an ISO 8601 time: {at!r} (e.g. 2026-12-01T09:00:00+00:00)")
        if send_at.tzinfo is None:
            fail(f"--at: {at!r} has no timezone; add one, e.g. {at}+00:00")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {file}: {exc}")
    try:
        data = parse_markdown_file(text).validate()
    except ValueError as exc:
        if isinstance(exc, ValidationError):
            # pydantic's own words, "Value error, " included, as this command always printed.
            fail(f"{file}: {one_line(exc, first=True, raw=True)}")
        fail(f"{file}: {exc}")

    async def _publish() -> tuple[int, int | None, str | None]:
        from mailer import blasts
        from mailer.queue import Queue
        from mailer.runtime import Runtime
        from mailer.statements import create_statement

        runtime = Runtime.create(settings)
        queue = await Queue.connect(settings)
        try:
            async with runtime.sessions() as session:
                statement = await create_statement(session, data, None)
            if not blast:
                return statement.id, None, None
            created = await blasts.create(runtime, queue, statement.id, send_at, None)
            return statement.id, created.id, created.status
        finally:
            await queue.close()
            await runtime.close()

    from mailer.errors import MailerError

    try:
        statement_id, blast_id, status = run(_publish())
    except MailerError as exc:
        fail(str(exc))
    typer.echo(f"statement {statement_id} published: {data.title}")
    if blast_id is not None:
        typer.echo(
            f"blast {blast_id} {status}" + (f" for {send_at.isoformat()}" if send_at else "")
        )


def register(app: typer.Typer) -> None:
    add_commands(app, commands)
