"""``mailer editors …``: editor accounts, and taking their access away.

``disable`` and ``rotate`` act in SQL first (the flag and the token hash every request
checks), then end the editor's admin sessions in Redis. If Redis cannot be reached
those sessions still stop working at their next request, because each one is checked
against the editor's row (``mailer/admin_sessions.py``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import typer

from mailer.cli.common import fail, run, settings_or_exit
from mailer.config import Settings
from mailer.errors import MailerError

if TYPE_CHECKING:
    from mailer.runtime import Runtime

commands = typer.Typer(help="Manage editor accounts.")
T = TypeVar("T")


def _with_runtime(settings: Settings, work: Callable[[Runtime], Awaitable[T]]) -> T:
    """Run ``work(runtime)``; a domain error becomes the usual one-line error."""
    from mailer.runtime import Runtime

    async def _main() -> T:
        runtime = Runtime.create(settings)
        try:
            return await work(runtime)
        finally:
            await runtime.close()

    try:
        return run(_main())
    except MailerError as exc:
        fail(exc.message)


async def _end_sessions(runtime: Runtime, editor_id: int) -> str:
    """End the editor's admin sessions; says how it went, for the command's output."""
    from redis.exceptions import RedisError

    from mailer import admin_sessions

    try:
        ended = await admin_sessions.end_all(runtime.redis, runtime.keys, editor_id)
    except (RedisError, OSError):
        return "Redis is unreachable: open admin sessions end at their next request"
    return f"{ended} admin session{'s' if ended != 1 else ''} ended"


@commands.command("add")
def editors_add(
    name: str,
    email: str | None = typer.Option(
        None, "--email", help="Where notices for this editor go (new statements on the site)."
    ),
) -> None:
    """Create an editor. Prints the token once, alone on the last line; only its hash is kept."""
    settings = settings_or_exit()
    from mailer.db import make_engine, make_sessionmaker
    from mailer.editors import add_editor
    from mailer.subscriptions import InvalidInput

    async def _add() -> str:
        engine = make_engine(settings.database_url)
        try:
            async with make_sessionmaker(engine)() as session:
                return await add_editor(session, name, email)
        finally:
            await engine.dispose()

    try:
        token = run(_add())
    except InvalidInput as exc:
        fail(str(exc))
    typer.echo(f"Editor {name!r} created. Keep this token secret; it is shown only once:")
    typer.echo(token)


@commands.command("list")
def editors_list() -> None:
    """List editors: name, whether they are active, when created, their notice address."""
    settings = settings_or_exit()
    from mailer.editors import all_editors

    async def _list(runtime: Runtime) -> list[tuple[str, str, str, str]]:
        async with runtime.reads() as session:
            return [
                (
                    e.name,
                    "disabled" if e.disabled else "active",
                    e.created_at.strftime("%Y-%m-%d %H:%M UTC"),
                    e.email or "-",
                )
                for e in await all_editors(session)
            ]

    rows = _with_runtime(settings, _list)
    if not rows:
        typer.echo("No editors yet. Create one with: mailer editors add NAME")
        return
    header = ("NAME", "STATUS", "CREATED", "EMAIL")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        padded = [c.ljust(w) for c, w in zip(row[:3], widths, strict=True)]
        typer.echo("  ".join([*padded, row[3]]))


def _set_disabled(name: str, disabled: bool) -> tuple[str, str]:
    settings = settings_or_exit()
    from mailer.editors import set_disabled

    async def _work(runtime: Runtime) -> tuple[str, str]:
        async with runtime.sessions() as session:
            editor = await set_disabled(session, name, disabled)
        ended = await _end_sessions(runtime, editor.id) if disabled else ""
        return editor.name, ended

    return _with_runtime(settings, _work)


@commands.command("disable")
def editors_disable(name: str) -> None:
    """Take an editor's access away at once: their token stops working for the API and the
    admin UI, and their admin sessions end. Undo with `mailer editors enable NAME`."""
    found, ended = _set_disabled(name, True)
    typer.echo(f"Editor {found!r} disabled: the token no longer works; {ended}.")


@commands.command("enable")
def editors_enable(name: str) -> None:
    """Let a disabled editor in again, with the token they had."""
    found, _ = _set_disabled(name, False)
    typer.echo(f"Editor {found!r} enabled.")


@commands.command("rotate")
def editors_rotate(name: str) -> None:
    """Give an editor a new token; the old one stops working and their admin sessions end.
    Prints the new token once, alone on the last line."""
    settings = settings_or_exit()
    from mailer.editors import rotate_token

    async def _work(runtime: Runtime) -> tuple[str, str, str, bool]:
        async with runtime.sessions() as session:
            editor, token = await rotate_token(session, name)
        return editor.name, token, await _end_sessions(runtime, editor.id), editor.disabled

    found, token, ended, disabled = _with_runtime(settings, _work)
    note = " The editor stays disabled until `mailer editors enable`." if disabled else ""
    typer.echo(f"Editor {found!r} has a new token; the old one no longer works; {ended}.{note}")
    typer.echo("Keep this token secret; it is shown only once:")
    typer.echo(token)


def register(app: typer.Typer) -> None:
    app.add_typer(commands, name="editors")
