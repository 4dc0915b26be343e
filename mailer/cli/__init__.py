"""``mailer``: the command line for editors and ops.

Each command group lives in its own module, which adds its commands to ``app`` in
``register``; adding a group is one more module in the tuple below. The order of
that tuple is the order ``mailer --help`` lists the commands in.
"""

from __future__ import annotations

import typer

from mailer.cli import bounces, dev, editors, feeds, publish, serve, status, subscribers

app = typer.Typer(help="mailer: newsletters with double opt-in and one-click unsubscribe.")

for group in (serve, editors, publish, dev, subscribers, status, bounces, feeds):
    group.register(app)


def main() -> None:
    app()
