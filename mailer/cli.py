"""``mailer``: the command line for editors and ops.

Every command reads its configuration from ``MAILER_*`` only, so several
processes can share one. Errors print one line to stderr and exit non-zero.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer

from mailer.cli_bounces import bounces_app
from mailer.cli_feeds import feeds_app
from mailer.config import (
    Settings,
    SettingsError,
    load_dev_settings,
    load_settings,
    refuse_dev_key,
)
from mailer.logs import setup_logging

app = typer.Typer(help="mailer: newsletters with double opt-in and one-click unsubscribe.")
editors_app = typer.Typer(help="Manage editor accounts.")
subscribers_app = typer.Typer(help="Import and export subscribers.")
app.add_typer(editors_app, name="editors")
app.add_typer(subscribers_app, name="subscribers")
app.add_typer(bounces_app, name="bounces")
app.add_typer(feeds_app, name="feeds")

T = TypeVar("T")


def fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def settings_or_exit(**overrides: Any) -> Settings:
    """Every command but `mailer dev`: production unless configured, never the dev key."""
    try:
        return refuse_dev_key(load_settings(**overrides))
    except SettingsError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - not on every platform
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


@app.command()
def migrate() -> None:
    """Create or upgrade the database schema (run before starting new web/worker versions)."""
    settings = settings_or_exit()
    from mailer.migrate import upgrade_url

    try:
        upgrade_url(settings.database_url)
    except Exception as exc:  # noqa: BLE001 - one line for ops, not a traceback
        fail(f"migration failed: {type(exc).__name__}: {exc}".splitlines()[0])
    typer.echo("database is up to date")


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
) -> None:
    """Run the web process (public pages, editor API, admin UI, ops endpoints)."""
    settings = settings_or_exit()
    setup_logging(settings.log_format)
    import uvicorn

    from mailer.web.app import create_app

    _use_uvloop()
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


@app.command()
def worker() -> None:
    """Run a worker: sends confirmation mails and blast batches, runs the reconciler."""
    settings = settings_or_exit()
    setup_logging(settings.log_format)
    from arq.worker import Worker

    from mailer.worker import worker_settings

    _use_uvloop()
    Worker(**worker_settings(settings)).run()


@editors_app.command("add")
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


@app.command("send-test")
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


@app.command()
def publish(
    file: Path = typer.Argument(..., help="A Markdown file: front matter or a first # heading."),
    blast: bool = typer.Option(False, "--blast", help="Blast it to every confirmed subscriber."),
    at: str | None = typer.Option(None, "--at", help="Blast at this ISO 8601 time (with zone)."),
) -> None:
    """Publish a statement from a Markdown file, and optionally blast it now or later."""
    settings = settings_or_exit()
    from datetime import datetime

    from pydantic import ValidationError

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
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            fail(f"{file}: {where}: {first.get('msg')}")
        fail(f"{file}: {exc}")

    async def _publish() -> tuple[int, int | None, str | None]:
        from mailer import blasts
        from mailer.runtime import Runtime
        from mailer.statements import create_statement
        from mailer.worker import Queue

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

    from mailer.blasts import BlastError

    try:
        statement_id, blast_id, status = run(_publish())
    except BlastError as exc:
        fail(exc.message)
    typer.echo(f"statement {statement_id} published: {data.title}")
    if blast_id is not None:
        typer.echo(
            f"blast {blast_id} {status}" + (f" for {send_at.isoformat()}" if send_at else "")
        )


# mailer dev ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_private_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        fail(
            "no Redis: set MAILER_REDIS_URL=redis://HOST:PORT/0, or install redis-server "
            "(Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis)"
        )
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, url
        except OSError:
            time.sleep(0.05)
    proc.kill()
    fail("the private redis-server did not start")


@app.command()
def dev(
    host: str = typer.Option("127.0.0.1", help="Address for the web server."),
    port: int = typer.Option(8000, help="Port for the web server."),
) -> None:
    """Everything in one process: web, worker, and an SMTP catcher with an inbox page."""
    base = dev_settings()
    overrides: dict[str, Any] = {}
    if "MAILER_BASE_URL" not in os.environ:
        overrides["base_url"] = f"http://{host}:{port}"
    redis_proc = None
    if "MAILER_REDIS_URL" not in os.environ:
        workdir = Path(tempfile.mkdtemp(prefix="mailer-redis-"))
        redis_proc, overrides["redis_url"] = _start_private_redis(workdir)
    catcher = None
    if "MAILER_SMTP_HOST" not in os.environ:
        from mailer.devsmtp import DevSmtp

        smtp_port = free_port()
        catcher = DevSmtp(base.dev_inbox_dir, smtp_port)
        catcher.start()
        overrides.update(smtp_host="127.0.0.1", smtp_port=smtp_port)
    settings = base.model_copy(update=overrides)
    setup_logging(settings.log_format)
    try:
        from mailer.migrate import upgrade_url

        upgrade_url(settings.database_url)
        typer.echo(f"mailer dev: sign-up form  {settings.base_url}/subscribe")
        typer.echo(f"mailer dev: dev inbox     {settings.base_url}/dev/inbox")
        typer.echo(f"mailer dev: admin         {settings.base_url}/admin")
        typer.echo(f"mailer dev: redis {settings.redis_url}, database {settings.database_url}")
        sys.stdout.flush()
        _use_uvloop()
        run(_dev_main(settings, host, port))
    finally:
        if catcher is not None:
            catcher.stop()
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)


def dev_settings() -> Settings:
    """The one place dev mode is switched on, so `mailer dev` needs no configuration.

    Without MAILER_SECRET_KEY it signs with the built-in key, which no other command
    accepts (``refuse_dev_key``), so nothing signed here is valid in a real deployment.
    """
    try:
        return load_dev_settings()
    except SettingsError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


async def _dev_main(settings: Settings, host: str, port: int) -> None:
    import uvicorn
    from arq.worker import Worker

    from mailer.web.app import create_app
    from mailer.worker import worker_settings

    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings), host=host, port=port, log_config=None, proxy_headers=False
        )
    )
    arq_worker = Worker(**worker_settings(settings, handle_signals=False))
    worker_task = asyncio.create_task(arq_worker.async_run())
    try:
        await server.serve()
    finally:
        worker_task.cancel()
        await arq_worker.close()


# mailer subscribers import / export -------------------------------------------------

SUBSCRIBER_STATUSES = ("pending", "confirmed", "unsubscribed", "bounced")


@subscribers_app.command("import")
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

    _use_uvloop()  # queueing 100k confirmation jobs is mostly event-loop work
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


@subscribers_app.command("export")
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


def main() -> None:
    app()


@app.command()
def status(
    watch: bool = typer.Option(False, "--watch", help="Refresh every 2 s until Ctrl-C."),
) -> None:
    """Workers, queue depth, send rate and the progress of every active blast."""
    settings = settings_or_exit()
    from mailer.status import Unavailable, show

    try:
        run(show(settings, watch=watch))
    except Unavailable as exc:
        fail(str(exc))
