"""``mailer editors …``: editor accounts."""

from __future__ import annotations

import typer

from mailer.cli.common import fail, run, settings_or_exit

commands = typer.Typer(help="Manage editor accounts.")


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


def register(app: typer.Typer) -> None:
    app.add_typer(commands, name="editors")
