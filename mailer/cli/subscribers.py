"""``mailer subscribers import|export``: subscribers in and out as CSV."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from mailer.cli.common import fail, run, settings_or_exit, use_uvloop

commands = typer.Typer(help="Import and export subscribers.")

SUBSCRIBER_STATUSES = ("pending", "confirmed", "unsubscribed", "bounced")


@commands.command("import")
def subscribers_import(
    file: Path = typer.Argument(..., help="CSV with a header: email, name, status, consent_*."),
    confirmed: bool = typer.Option(
        False, "--confirmed", help="Import as confirmed, no mail (needs --consent-source)."
    ),
    consent_source: str | None = typer.Option(
        None, "--consent-source", help="Where these people gave consent, kept as the record."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Report only; write nothing."),
    allow_suppressed: bool = typer.Option(
        False, "--allow-suppressed", help="Re-add addresses that were erased earlier."
    ),
) -> None:
    """Import subscribers from CSV; new ones get a confirmation mail unless --confirmed."""
    source = (consent_source or "").strip() or None
    if confirmed and source is None:
        typer.echo(
            "error: --confirmed needs --consent-source TEXT (where consent was given)", err=True
        )
        raise typer.Exit(2)
    if source is not None and (len(source) > 200 or not source.isprintable()):
        typer.echo("error: --consent-source must be printable and at most 200 characters", err=True)
        raise typer.Exit(2)
    settings = settings_or_exit()
    import logging

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from mailer.importer import ImportFileError, ImportOptions, import_csv

    opts = ImportOptions(confirmed, source, dry_run, allow_suppressed)
    # arq logs each Redis connection retry; the one-line error below says it all.
    logging.getLogger("arq.connections").setLevel(logging.ERROR)
    columns = (TextColumn("importing lines"), BarColumn(), MofNCompleteColumn())
    bar = Progress(*columns, console=Console(stderr=True))

    def progress(line: int, total: int) -> None:
        if not bar.task_ids:  # shown once the file passed its checks, so errors stay one line
            bar.start()
            bar.add_task("import", total=total)
        bar.update(bar.task_ids[0], completed=line)

    use_uvloop()  # queueing 100k confirmation jobs is mostly event-loop work
    try:
        report = run(import_csv(settings, file, opts, progress))
    except ImportFileError as exc:
        error = str(exc)
    except Exception as exc:  # noqa: BLE001 - one line for the operator, not a traceback
        error = f"import stopped: {type(exc).__name__}: {exc}".splitlines()[0]
    else:
        error = ""
    finally:
        if bar.task_ids:
            bar.stop()
    if error:
        fail(error)
    for line in report.lines():
        typer.echo(line)


@commands.command("export")
def subscribers_export(
    status: str | None = typer.Option(None, "--status", help="Only this status."),
) -> None:
    """Write subscribers as CSV to stdout, in the columns `subscribers import` reads."""
    if status is not None and status not in SUBSCRIBER_STATUSES:
        typer.echo(f"error: --status must be one of {', '.join(SUBSCRIBER_STATUSES)}", err=True)
        raise typer.Exit(2)
    settings = settings_or_exit()
    from mailer.db import make_engine
    from mailer.exporter import export_csv

    async def _export() -> int:
        engine = make_engine(settings.database_url)
        try:
            return await export_csv(engine, sys.stdout, status)
        finally:
            await engine.dispose()

    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:  # names are UTF-8 whatever the locale says
        reconfigure(encoding="utf-8")
    try:
        run(_export())
        sys.stdout.flush()
    except BrokenPipeError:  # `mailer subscribers export | head`: the reader is gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except Exception as exc:  # noqa: BLE001
        fail(f"export stopped: {type(exc).__name__}: {exc}".splitlines()[0])


def register(app: typer.Typer) -> None:
    app.add_typer(commands, name="subscribers")
