"""``mailer migrate``, ``mailer serve`` and ``mailer worker``: the production processes."""

from __future__ import annotations

import typer

from mailer.cli.common import add_commands, fail, settings_or_exit, use_uvloop
from mailer.logs import setup_logging

commands = typer.Typer()


@commands.command()
def migrate() -> None:
    """Create or upgrade the database schema (run before starting new web/worker versions)."""
    settings = settings_or_exit()
    from mailer.migrate import upgrade_url

    try:
        upgrade_url(settings.database_url)
    except Exception as exc:  # noqa: BLE001 - one line for ops, not a traceback
        fail(f"migration failed: {type(exc).__name__}: {exc}".splitlines()[0])
    typer.echo("database is up to date")


@commands.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
) -> None:
    """Run the web process (public pages, editor API, admin UI, ops endpoints)."""
    settings = settings_or_exit()
    setup_logging(settings.log_format)
    import uvicorn

    from mailer.web.app import create_app

    use_uvloop()
    # proxy_headers=False: uvicorn would otherwise rewrite the client address from
    # X-Forwarded-For on its own rule; MAILER_TRUSTED_PROXIES must be the only one.
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        proxy_headers=False,
    )


@commands.command()
def worker() -> None:
    """Run a worker: sends confirmation mails and blast batches, runs the reconciler."""
    settings = settings_or_exit()
    setup_logging(settings.log_format)
    from mailer.worker import make_worker

    use_uvloop()
    make_worker(settings).run()


def register(app: typer.Typer) -> None:
    add_commands(app, commands)
