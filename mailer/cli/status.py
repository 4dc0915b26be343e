"""``mailer status``: the ops screen, read straight from Redis and SQL."""

from __future__ import annotations

import typer

from mailer.cli.common import add_commands, fail, run, settings_or_exit

commands = typer.Typer()


@commands.command()
def status(
    watch: bool = typer.Option(False, "--watch", help="Refresh every 2 s until Ctrl-C."),
) -> None:
    """Workers, queue depth, send rate and the progress of every active blast."""
    settings = settings_or_exit()
    from mailer.ops.status import Unavailable, show

    try:
        run(show(settings, watch=watch))
    except Unavailable as exc:
        fail(str(exc))


def register(app: typer.Typer) -> None:
    add_commands(app, commands)
