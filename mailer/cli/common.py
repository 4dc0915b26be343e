"""What every command shares: one-line errors, settings or exit, running a coroutine.

Every command reads its configuration from ``MAILER_*`` only, so several
processes can share one. Errors print one line to stderr and exit non-zero.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, NoReturn, TypeVar

import typer

from mailer.config import Settings, SettingsError, load_settings, refuse_dev_key

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


def use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - not on every platform
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def add_commands(app: typer.Typer, commands: typer.Typer) -> None:
    """Put a module's top-level commands (``mailer serve``, not ``mailer editors …``) on
    ``app``, in the order the module defines them."""
    app.registered_commands += commands.registered_commands
